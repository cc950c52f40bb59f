"""Device names from the command line: check them once, with one true line, before any work."""
from __future__ import annotations

import torch


def check_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', usable on this machine; anything else is a ValueError naming the option."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device name; use cpu or cuda (cuda:N for one GPU of several)"
                         ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: dcc runs on cpu or cuda (cuda:N), not {dev.type}")
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {device}: this torch build ({torch.__version__}) has no CUDA support; use "
                             f"--device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible to torch on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
