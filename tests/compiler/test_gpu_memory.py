"""GPU memory: a compile whose one-block estimate exceeds the device's free memory is refused before any work, and
an out-of-memory error inside a block (raw or wrapped by a pass) becomes one line naming the block. CUDA is faked
(free/total memory patched), so these run on the CPU."""
import pytest
import torch

import dcc.compiler.gpu_memory as gm
from dcc.compiler.pass_manager import PassError
from dcc.compiler.sequential import _BlockCompiler


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(gm, "free_and_total_mb", lambda dev: (3 * 1024.0, 80 * 1024.0))


def test_fits_or_refused_with_the_numbers(gpu):
    gm.check_fits("cuda:0", 2 * 1024, "weights")
    with pytest.raises(gm.GpuMemoryError) as e:
        gm.check_fits("cuda:0", 5 * 1024, "a block's weights")
    assert str(e.value) == ("--device cuda:0: one block needs about 5.0 GB (a block's weights) but 3.0 GB of the "
                            "GPU's 80.0 GB are free; use " + gm.ADVICE)


def test_cpu_is_not_checked(monkeypatch):
    monkeypatch.setattr(gm, "free_and_total_mb", lambda dev: pytest.fail("queried a GPU for --device cpu"))
    gm.check_fits("cpu", 1e9, "weights")


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 1.5 GiB is free. Of the allocated memory ... "
                                  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


def _compiler_on_cuda(monkeypatch, exc):
    comp = _BlockCompiler.__new__(_BlockCompiler)
    comp.device = torch.device("cuda:0")

    def fail(*a, **kw):
        raise exc
    monkeypatch.setattr(comp, "_compile", fail)
    return comp


@pytest.mark.parametrize("wrapped", [False, True])
def test_out_of_memory_in_a_block_is_one_line_naming_it(gpu, monkeypatch, wrapped):
    exc = _oom()
    if wrapped:   # as the pass manager re-raises a pass's error
        try:
            raise PassError("pass gptq failed on block model.layers.7 after awq: OutOfMemoryError: ...") from exc
        except PassError as e:
            exc = e
    comp = _compiler_on_cuda(monkeypatch, exc)
    with pytest.raises(gm.GpuMemoryError) as e:
        comp.compile(7, "model.layers.7", (), {})
    msg = str(e.value)
    during = " in pass gptq" if wrapped else ""
    assert msg.startswith(f"block model.layers.7: the GPU ran out of memory{during} (CUDA out of memory; 3.0 GB of "
                          f"80.0 GB free after it); use fewer calibration tokens")
    assert "\n" not in msg and "PYTORCH_CUDA_ALLOC_CONF" not in msg


def test_other_errors_pass_through(monkeypatch):
    comp = _compiler_on_cuda(monkeypatch, PassError("pass rtn failed on block model.layers.0: ValueError: x"))
    with pytest.raises(PassError, match="pass rtn failed"):
        comp.compile(0, "model.layers.0", (), {})
