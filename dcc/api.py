"""dcc's Python API: compile a model for a target. The CLI is a thin layer over these functions."""
from __future__ import annotations

import hashlib
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .compiler.calib_data import check_vocab, load_tokenizer, tokenize_file, windows
from .compiler.sequential import compile_blocks
from .models.loader import LazyModel
from .targets import BUILTIN_TARGETS

DEFAULT_TARGET = BUILTIN_TARGETS[0]   # the registry line's first target: the CLI's default


@dataclass
class CompileOptions:
    """What `dcc compile` takes; documented in its --help. The target options (algo, bits, group_size, zero,
    kv_bits, dtype, unsupported) are checked by the target's own Options class; None means the target's default."""
    target: str = DEFAULT_TARGET
    algo: str | None = None         # None: the target's default algorithm
    bits: int | None = None
    group_size: int | None = None   # None: the target's default
    zero: str | None = None         # a TinyChat option
    kv_bits: str | int | None = None   # a QServe option
    dtype: str = "float16"
    calib: str | None = None
    recipe: str | None = None
    calib_chunks: int = 16
    calib_seq_len: int = 256
    unsupported: str = "error"
    seed: int = 0
    device: str = "cpu"
    dump_dir: str | None = None
    force: bool = False
    debug: bool = False
    progress: bool = True
    verbose: bool = False
    steps: list | None = None       # Python API only: an explicit pass list (e.g. a benchmark's ablation)


def estimate_memory_mb(lm: LazyModel, tokens: int) -> float:
    """Peak of one block: its float weights (x2 for the pre-pass copy), the activations of its linears and the
    parts outside the blocks (embeddings, head)."""
    block = sum(p.numel() for p in lm.blocks[0].parameters()) * 4 * 2
    outer = sum(p.numel() for n, p in lm.model.named_parameters() if not n.startswith(lm.blocks_prefix + ".")) * 4
    acts = tokens * sum(m.in_features for m in lm.blocks[0].modules() if isinstance(m, torch.nn.Linear)) * 4
    return (block + outer + acts * 2) / 2**20


def load_recipe(path: str) -> list:
    """A YAML recipe: `passes: [{pass: awq, config: {grid: 20}}, {pass: clip}, {pass: rtn}]`."""
    import yaml
    from .compiler.pass_manager import Step
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such recipe file")
    try:
        doc = yaml.safe_load(p.read_text())
        steps = [Step.from_dict(d) for d in doc["passes"]]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a recipe (expected 'passes: [{{pass: NAME, config: {{...}}}}, ...]': {e})") from None
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    if not steps:
        raise ValueError(f"{p}: the recipe lists no passes")
    return steps


def estimate_artifact_bytes(lm: LazyModel, bits: int) -> int:
    """An upper estimate of the artifact's size: every linear of the blocks at `bits` per weight plus one 16-bit
    scale and zero per 32 weights (the smallest group any layout takes), everything else 16-bit."""
    per_block_lin = sum(m.weight.numel() for m in lm.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    per_block = sum(p.numel() for p in lm.blocks[0].parameters())
    outer = sum(p.numel() for n, p in lm.model.named_parameters() if not n.startswith(lm.blocks_prefix + "."))
    lin_bytes = per_block_lin * (bits / 8 + 4 / 32)
    return int(len(lm.blocks) * (lin_bytes + (per_block - per_block_lin) * 2) + outer * 2) + (1 << 20)


def check_dump_dir(path: str | None) -> None:
    """--dump-dir must be creatable: not an existing file, not under one (checked before any work)."""
    if not path:
        return
    p = Path(path).resolve()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--dump-dir {path}: {q} is a file, not a folder")
            break


def calibration_ids(lm: LazyModel, opts: CompileOptions) -> torch.Tensor:
    if not opts.calib:
        raise ValueError("--calib is required: a text file (or token ids for models without a tokenizer)")
    tok = load_tokenizer(lm.path)
    ids = tokenize_file(opts.calib, tok)
    check_vocab(ids, lm.config.vocab_size, opts.calib)
    return windows(ids, opts.calib_chunks, opts.calib_seq_len, opts.calib)


def compile_model(model: str, out: str, opts: CompileOptions, log=print) -> Path:
    """Compile `model` (HF folder or GGUF) for opts.target into the artifact folder `out`; returns its path."""
    from .runtime.device import check_device
    from .targets.artifact import ArtifactWriter
    from .targets.base import get_target
    target = get_target(opts.target)
    topts = target_options(target, opts)
    check_device(opts.device)
    for name in ("calib_chunks", "calib_seq_len"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be at least 1")
    check_dump_dir(opts.dump_dir)
    spec = target.spec(topts)
    lm = LazyModel(model, device=opts.device)
    steps = opts.steps if opts.steps is not None else load_recipe(opts.recipe) if opts.recipe else target.pipeline(topts)
    assign = target.assigner(topts, spec)
    kept = target.preflight(lm, spec, topts)
    # the output is checked (and locked) before the long work: refused paths, free space, a concurrent writer
    writer = ArtifactWriter(out, force=opts.force, protect=(lm.path, Path(model)),
                            need_bytes=estimate_artifact_bytes(lm, spec.bits), log=log)
    try:
        ids = calibration_ids(lm, opts)
        n_blocks = len(lm.blocks)
        log(f"dcc {__version__}: {lm.path.name} ({type(lm.model).__name__}, {n_blocks} blocks at "
            f"{lm.blocks_prefix}) -> {target.name} {spec.short()}, algo {topts.algo}")
        if kept:
            log(f"{len(kept)} linears cannot take this layout and stay 16-bit (--unsupported keep); first: {kept[0]}")
        log(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens from {opts.calib}; estimated peak memory "
            f"{estimate_memory_mb(lm, ids.numel()):.0f} MB (one block at a time)")
        emitter = target.emitter(writer, topts)
        dumper = None
        if opts.dump_dir:
            from .ir.dump import Dumper
            dumper = Dumper(opts.dump_dir)
        res = compile_blocks(lm, steps, ids, assign, on_block=emitter.on_block, dumper=dumper, device=opts.device,
                             seed=opts.seed, debug=opts.debug, progress=opts.progress, verbose=opts.verbose)
        emitter.finish(lm)
        if all("skip_reason" in v for v in emitter.layers.values()):
            raise ValueError(f"{lm.path.name}: no linear layer was quantized (the pipeline "
                             f"{' -> '.join(s.name for s in steps)} quantized nothing); an artifact with nothing "
                             f"quantized is refused")
        manifest = build_manifest(target, topts, opts, spec, steps, ids, lm, emitter)
        config = target.hf_config(lm, spec, topts, emitter)
        path = writer.finalize(config, manifest, source=lm.path)
    except BaseException:
        writer.abort()
        raise
    times = ", ".join(f"{k} {v:.1f}s" for k, v in res.timing.seconds.items())
    log(f"compiled {n_blocks} blocks in {res.seconds:.1f}s (passes: {times}); peak RSS {res.peak_rss_mb:.0f} MB")
    log(f"wrote {path} (loads in: {', '.join(manifest['engines'])})")
    notes = getattr(emitter, "kernel_notes", [])
    if notes:
        log(f"note: {len(notes)} layers have shapes the engine's own GEMM kernels do not cover "
            f"(listed in config.json), first: {notes[0]}")
    return path


def target_options(target, opts: CompileOptions):
    """The target's typed options from the generic CompileOptions (None fields: the target's defaults)."""
    return target.options(algo=opts.algo, bits=opts.bits, group_size=opts.group_size, zero=opts.zero,
                          kv_bits=opts.kv_bits, dtype=opts.dtype, unsupported=opts.unsupported)


def build_manifest(target, topts, opts: CompileOptions, spec, steps, ids, lm, emitter) -> dict:
    """dcc.json (less the file checksums, which the writer adds): the one place the manifest is built."""
    return {
        "format": "dcc-artifact", "version": 1, "target": target.name,
        "engines": target.engines(spec, emitter),
        "recipe": {"algo": f"recipe {Path(opts.recipe).name}" if opts.recipe
                   else "custom pipeline" if opts.steps is not None else topts.algo,
                   "weight": spec.to_dict(), "pipeline": [s.to_dict() for s in steps],
                   "seed": opts.seed, "unsupported": topts.unsupported,
                   "calibration": {"file": Path(opts.calib).name, "sha256": _sha(opts.calib),
                                   "chunks": int(ids.shape[0]), "seq_len": int(ids.shape[1])}},
        "source": {"model": lm.path.name, "architecture": type(lm.model).__name__,
                   "blocks": lm.blocks_prefix, "num_blocks": len(lm.blocks)},
        "versions": {"dcc": __version__, "torch": torch.__version__.split("+")[0],
                     "transformers": _version("transformers"), "python": platform.python_version()},
        "dtype": topts.dtype, "tied_embeddings": emitter.tied,
        "runtime": target.runtime(topts, emitter),
        "layers": emitter.layers, "blocks": emitter.blocks,
    }


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _version(mod: str) -> str:
    try:
        return sys.modules[mod].__version__ if mod in sys.modules else __import__(mod).__version__
    except Exception:
        return "unknown"
