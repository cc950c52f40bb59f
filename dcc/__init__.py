"""dcc: a model-conversion compiler for quantized neural networks.

    import dcc
    path = dcc.compile("SmolLM2-135M", output="out/", calibration="calib.txt", group_size=64)   # default target
    art = dcc.load(path)                     # manifest, config, tensors; art.decode(layer) -> the stored weight
"""
from __future__ import annotations

__version__ = "0.1.0"


def compile(model, target: str | None = None, output=None, calibration=None, *, recipe=None, calib_chunks=None,
            calib_seq_len=None, seed=None, device: str = "cpu", dump_dir=None, force: bool = False,
            progress: bool = True, **target_options):
    """Compile `model` (a Hugging Face folder or a .gguf file) for `target` into the artifact folder `output`,
    calibrating on the text file `calibration`; returns the artifact's path. target_options are the target's own
    (algo, bits, group_size, dtype, unsupported, and the ones a target adds, e.g. zero or kv_bits; see
    `dcc compile --help`); a bad one raises ValueError naming it. `recipe` (a YAML/JSON recipe or an artifact's
    dcc.json) supplies what is not given here. Progress and notes go to the "dcc" logger."""
    from .api import CompileOptions, compile_model
    if output is None or calibration is None:
        raise ValueError("dcc.compile needs output= (the artifact folder) and calibration= (a text file)")
    from .api import TARGET_OPTIONS
    unknown = sorted(set(target_options) - set(TARGET_OPTIONS))
    if unknown:
        raise ValueError(f"dcc.compile: unknown option {unknown[0]!r} (target options: {', '.join(TARGET_OPTIONS)})")
    opts = CompileOptions(target=target, calib=str(calibration), recipe=None if recipe is None else str(recipe),
                          calib_chunks=calib_chunks, calib_seq_len=calib_seq_len, seed=seed, device=device,
                          dump_dir=None if dump_dir is None else str(dump_dir), force=force, progress=progress,
                          **target_options)
    return compile_model(str(model), str(output), opts)


def load(artifact, verify: bool = True):
    """Open an artifact folder: its manifest, config and tensors (checked against the manifest's checksums unless
    verify=False). `.decode(layer)` gives a quantized layer's weight exactly as the engine reconstructs it."""
    from .runtime.artifact import load_artifact
    return load_artifact(artifact, verify=verify)


__all__ = ["__version__", "compile", "load"]
