"""dcc's Python API: compile a model for a target. The CLI is a thin layer over these functions."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .compiler import dist
from .compiler.gpu_memory import check_fits, free_and_total_mb
from .compiler.host_memory import host_room
from .ir import gpu_matmul
from .compiler.resume import Checkpoint, fingerprint, worth_keeping
from .compiler.sequential import ModelForward, compile_blocks
from .ir.fused_linear import SplitLinear
from .models.loader import LazyModel
from .targets import BUILTIN_TARGETS

DEFAULT_TARGET = BUILTIN_TARGETS[0]   # the registry line's first target: the CLI's default
log = logging.getLogger("dcc")
# the CompileOptions fields that a target's own Options class checks (the CLI's target flags)
TARGET_OPTIONS = ("algo", "bits", "group_size", "zero", "kv_bits", "rank", "precision", "dtype", "unsupported")


@dataclass
class CompileOptions:
    """What `dcc compile` takes; documented in its --help. The target options (algo, bits, group_size, zero,
    kv_bits, rank, precision, dtype, unsupported) are checked by the target's own Options class; None means the target's default."""
    target: str | None = None       # None: the recipe's, else DEFAULT_TARGET
    algo: str | None = None         # None: the recipe's, else the target's default algorithm
    bits: int | None = None
    group_size: int | None = None   # None: the recipe's, else the target's default
    zero: str | None = None         # a TinyChat option
    kv_bits: str | int | None = None   # a QServe option
    rank: int | None = None         # a Nunchaku option: the low-rank branch's rank
    precision: str | None = None    # a Nunchaku option: int4
    dtype: str | None = None        # None: the recipe's, else float16
    calib: str | None = None
    recipe: str | None = None       # a recipe file (YAML/JSON) or an artifact's dcc.json
    calib_chunks: int | None = None     # None: the recipe's, else 16
    calib_seq_len: int | None = None    # None: the recipe's, else 256
    unsupported: str | None = None  # None: the recipe's, else "error"
    seed: int | None = None         # None: the recipe's, else 0
    device: str = "cpu"
    dump_dir: str | None = None
    force: bool = False
    resume: bool = False            # continue an interrupted compile of `out` from its last checkpointed block
    checkpoint: bool = True         # checkpoint each block (what resume continues from; chain compiles only)
    debug: bool = False
    progress: bool = True
    verbose: bool = False
    steps: list | None = None       # Python API only: an explicit pass list (e.g. a benchmark's ablation)
    gpu_matmul: str = "fp32"        # float32 products of the graph runs on a GPU: fp32 or 3xtf32 (ir/gpu_matmul.py)


def estimate_memory_mb(lm: LazyModel, tokens: int, mode: str = "full", gptq: bool = False) -> float:
    """Peak of one block: its float weights (x2 for the pre-pass copy), the parts outside the blocks (embeddings,
    head), the linears' float32 inputs on every calibration token (each linear counted, though q/k/v and gate/up
    share one copy: an upper estimate; lean, the widest one only; spill, none: they are in host memory, and one of
    the batch's 8 leaves of the widest comes back at a time, with the Gram product's two float32 copies of it), four
    copies of the hidden states (inputs, float and current outputs, the reference; three spilled), one chunk's
    intermediates (compiler/chunks.py: a few float32 tensors of the widest linear), and with GPTQ three float64
    K x K matrices of the widest input (H shared by a stage, its permuted copy, the factor: passes/gptq.py; 20 GB
    for a 70B down_proj)."""
    from .compiler.chunks import CHUNK_TOKENS
    block = max(sum(p.numel() for p in b.parameters()) for b in lm.blocks) * 4 * 2
    outer = sum(p.numel() for n, p in lm.model.named_parameters() if not lm.in_blocks(n)) * 4
    linears = [[m for m in b.modules() if isinstance(m, torch.nn.Linear)] for b in lm.blocks]
    widest_in = max((m.in_features for lins in linears for m in lins), default=0)
    if mode == "spill":
        acts = (tokens // 8 + 1) * widest_in * 4 * 3
    else:
        acts = tokens * max((max if mode == "lean" else sum)([m.in_features for m in lins] or [0])
                            for lins in linears) * 4
    widest = max((max(m.in_features, m.out_features) for lins in linears for m in lins), default=0)
    hidden = tokens * min((m.in_features for lins in linears for m in lins), default=0) * 4   # the residual width
    chunk = min(tokens, CHUNK_TOKENS) * widest * 4 * 6
    hess = 3 * widest_in ** 2 * 8 if gptq else 0
    # spilled, the float and reference outputs wait in host memory: inputs, an output, and the reference brought
    # back to measure the block's error at its end
    return (block + outer + acts + (3 if mode == "spill" else 4) * hidden + chunk + hess) / 2**20


def spilled_inputs_mb(lm: LazyModel, tokens: int) -> float:
    """Host memory the spilled inputs take: every linear's input on every calibration token, float32 (each linear
    counted, though q/k/v and gate/up share one copy: an upper estimate)."""
    return tokens * max(sum(m.in_features for m in b.modules() if isinstance(m, torch.nn.Linear))
                        for b in lm.blocks) * 4 / 2**20


def estimate_artifact_bytes(lm: LazyModel, bits: int) -> int:
    """An upper estimate of the artifact's size: every linear of the blocks at `bits` per weight plus one 16-bit
    scale and zero per 32 weights (the smallest group any layout takes), everything else 16-bit."""
    def block_bytes(b) -> float:
        lin = sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear))
        return lin * (bits / 8 + 4 / 32) + (sum(p.numel() for p in b.parameters()) - lin) * 2

    outer = sum(p.numel() for n, p in lm.model.named_parameters() if not lm.in_blocks(n))
    return int(sum(block_bytes(b) for b in lm.blocks) + outer * 2) + (1 << 20)


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


def calibration_ids(lm: LazyModel, opts: CompileOptions):
    """The calibration batch as the model's adapter reads the --calib file: [chunks, seq_len] token ids for a
    language model, recorded forward inputs (dcc.models.diffusers_calib.CalibInputs) for a diffusion model."""
    if not opts.calib:
        raise ValueError("--calib is required: a text file (or token ids for models without a tokenizer)")
    return lm.adapter.calibration(lm, opts.calib, opts.calib_chunks, opts.calib_seq_len)


def block0_inputs(lm: LazyModel, batch: torch.Tensor, device: str = "cpu"):
    """What compile_blocks takes: a function giving block 0's (args, kwargs) on the batch, computed by the model's
    adapter once the passes' model prologues have run (a rotation of the embeddings changes them)."""
    dev = torch.device(device)
    return lambda: lm.adapter.block0_inputs(lm, batch, dev)


def resolve(opts: CompileOptions):
    """(target, its typed options, the recipe or None, opts with calibration/seed filled): command-line values
    first, then the recipe's, then the defaults."""
    import dataclasses
    from .recipe import load_recipe
    from .targets.base import get_target
    recipe = load_recipe(opts.recipe) if opts.recipe else None
    r_target = recipe.target if recipe else None
    if opts.target and r_target and opts.target != r_target:
        raise ValueError(f"--target {opts.target}: the recipe {recipe.path} is for target {r_target}")
    target = get_target(opts.target or r_target or DEFAULT_TARGET)
    given = {k: getattr(opts, k) for k in TARGET_OPTIONS}
    merged = {**(recipe.options if recipe else {}), **{k: v for k, v in given.items() if v is not None}}
    topts = target.options(**merged)
    fill = {}
    for name, rname, default in (("calib_chunks", "calib_chunks", 16), ("calib_seq_len", "calib_seq_len", 256),
                                 ("seed", "seed", 0)):
        if getattr(opts, name) is None:
            fill[name] = getattr(recipe, rname, None) if recipe and getattr(recipe, rname) is not None else default
    return target, topts, recipe, dataclasses.replace(opts, **fill)


def compile_model(model: str, out: str, opts: CompileOptions, log=log.info) -> Path:
    """Compile `model` (HF folder or GGUF) for opts.target into the artifact folder `out`; returns its path."""
    from .runtime.device import check_device
    from .targets.artifact import ArtifactWriter, checkpoint_progress
    target, topts, recipe, opts = resolve(opts)
    check_device(opts.device)
    gpu_matmul.check(opts.gpu_matmul)
    for name in ("calib_chunks", "calib_seq_len"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be at least 1")
    check_dump_dir(opts.dump_dir)
    if opts.resume and not opts.checkpoint:
        raise ValueError("--resume continues from the checkpoints that --no-checkpoint turns off: give one of them")
    spec = target.spec(topts)
    world = dist.current()
    if world.distributed:
        opts = distributed_options(opts, world)
    lm = LazyModel(model, device=opts.device)
    if world.distributed and lm.adapter.kind == "diffusers":
        raise ValueError(f"{lm.path.name}: a diffusion model's compile is driven by its own forward and runs in one "
                         f"process; compile it without --procs/--gpus")
    if opts.resume and lm.adapter.kind == "diffusers":
        raise ValueError("--resume: not supported for diffusion models yet (the model's own forward drives their "
                         "compile, so it has no point between blocks to restart from); run without --resume")
    steps = (opts.steps if opts.steps is not None else recipe.passes if recipe and recipe.passes
             else target.pipeline(topts))
    target = target.for_model(lm, topts)   # this compile's target (model-dependent choices live on it)
    assign = target.assigner(topts, spec)
    kept = target.preflight(lm, spec, topts)
    if not world.main:   # the other processes of a spread compile calibrate their share; process 0 writes
        return _follow(lm, steps, assign, opts, world)
    # the output is checked (and locked) before the long work: refused paths, free space, a concurrent writer
    writer = ArtifactWriter(out, force=opts.force, protect=(lm.path, Path(model)),
                            need_bytes=estimate_artifact_bytes(lm, spec.bits), log=log, resume=opts.resume)
    ckpt = None
    try:
        ids = calibration_ids(lm, opts)
        n_blocks = len(lm.blocks)
        log(f"dcc {__version__}: {lm.path.name} ({type(lm.model).__name__}, {n_blocks} blocks at "
            f"{lm.blocks_prefix}) -> {target.name} {spec.short()}, algo {topts.algo}")
        if kept:
            log(f"{len(kept)} linears cannot take this layout and stay 16-bit (--unsupported keep); first: {kept[0]}")
        tokens, need_mb, mode = plan_memory(lm, ids, opts, world, steps)
        where = "on the GPU" if torch.device(opts.device).type == "cuda" else "in host memory"
        spread = f", split over {world.size} processes ({world.backend})" if world.distributed else ""
        how = {"full": "", "lean": "; the linears' inputs one at a time, as all of them fit neither the GPU nor the "
                                   "host",
               "spill": f"; the linears' inputs in host memory (up to {spilled_inputs_mb(lm, tokens):.0f} MB), as "
                        f"they do not fit the GPU"}[mode]
        log(f"calibration: {lm.adapter.describe_calibration(ids)} from {opts.calib}{spread}; estimated peak memory "
            f"{need_mb:.0f} MB {where}{' per process' if spread else ''} (one block at a time{how})")
        check_fits(opts.device, need_mb, f"a block's float weights and the parts outside the blocks, and its linears' "
                                         f"inputs on {tokens} calibration tokens"
                                         + {"full": "", "lean": ", one at a time", "spill": " in host memory"}[mode])
        calib_sha = _sha(opts.calib)
        if recipe is not None and recipe.calib_sha256 and recipe.calib_sha256 != calib_sha:
            log(f"note: {opts.calib} is not the calibration file {recipe.path} was made with (its sha256 "
                f"differs), so the artifact will differ from the recipe's")
        emitter = target.emitter(writer, topts)
        dumper = None
        if opts.dump_dir:
            from .ir.dump import Dumper
            dumper = Dumper(opts.dump_dir)
        inputs = share_inputs(lm.adapter.block_inputs(lm, ids, opts.device), world, ids)
        if opts.checkpoint and not isinstance(inputs, ModelForward):
            ckpt = checkpoint(model, writer, emitter, target, topts, steps, opts, calib_sha, log)
        if opts.resume and not writer.resumed:
            log(f"--resume: no interrupted compile of {writer.out} to continue; compiling from block 0")
        with gpu_matmul.using(opts.gpu_matmul):
            res = compile_blocks(lm, steps, inputs, assign, on_block=emitter.on_block,
                                 dumper=dumper, device=opts.device, seed=opts.seed, debug=opts.debug,
                                 progress=opts.progress, verbose=opts.verbose, checkpoint=ckpt, memory=mode,
                                 global_batch=len(ids) if world.distributed else None)
        emitter.finish(lm)
        if all("skip_reason" in v for v in emitter.layers.values()):
            raise ValueError(f"{lm.path.name}: no linear layer was quantized (the pipeline "
                             f"{' -> '.join(s.name for s in steps)} quantized nothing); an artifact with nothing "
                             f"quantized is refused")
        manifest = build_manifest(target, topts, opts, spec, steps, ids, lm, emitter, recipe, calib_sha)
        config = target.hf_config(lm, spec, topts, emitter)
        path = writer.finalize(config, manifest, source=lm.path)
    except BaseException as e:
        if ckpt is not None:   # a checkpoint being written by its thread is finished first (or its error dropped)
            with contextlib.suppress(Exception):
                ckpt.wait()
        # an adopted checkpoint is never lost before it is checked against this run's inputs (then it goes back
        # where it was found, and the error says why)
        unchecked = writer.resumed and (ckpt is None or ckpt.blocks is None)
        kept = writer.abort(keep=unchecked or (ckpt is not None or writer.resumed) and worth_keeping(e))
        if kept is not None and not unchecked:
            log(f"kept the interrupted compile in {kept} ({checkpoint_progress(kept)}): the same command with "
                f"--resume continues it, --force discards it")
        raise
    for msg, count in Counter(res.messages).items():   # what passes skipped, once per kind with its block count
        log(f"note: {msg} ({count} of {n_blocks} blocks)")
    times = ", ".join(f"{k} {v:.1f}s" for k, v in res.timing.seconds.items())
    resumed = f" ({ckpt.blocks_loaded} of them in the interrupted compile)" if ckpt and ckpt.blocks_loaded else ""
    log(f"compiled {n_blocks} blocks{resumed} in {res.seconds:.1f}s (passes: {times}); peak RSS "
        f"{res.peak_rss_mb:.0f} MB")
    log(f"wrote {path} (loads in: {', '.join(manifest['engines'])})")
    notes = getattr(emitter, "kernel_notes", [])
    if notes:
        log(f"note: {len(notes)} layers have shapes the engine's own GEMM kernels do not cover "
            f"(listed in config.json), first: {notes[0]}")
    return path


def plan_memory(lm: LazyModel, ids, opts: CompileOptions, world, steps=()) -> tuple[int, float, str]:
    """(this process's calibration tokens, its estimated peak memory in MB, mode): the first mode whose estimate
    fits -- "full" (every linear's inputs held on the GPU), "spill" (held in host memory, compiler/spill.py: the
    same collection runs and the same arithmetic, so the same bytes as full), "lean" (one linear's at a time on the
    GPU, a block run per read: where the host has no room either; later linears' inputs are then collected after
    the passes changed the ones before, so the bytes can differ); "full" on the CPU. $DCC_CALIB_MEMORY forces
    one (and skips the host check)."""
    from .compiler.spill import forced_mode
    tokens = lm.adapter.calib_tokens(ids)
    if world.distributed:
        tokens = tokens * world.share(len(ids))[1] // len(ids)
    gptq = any(getattr(s, "name", None) == "gptq" for s in steps or ())
    est = {m: estimate_memory_mb(lm, tokens, m, gptq=gptq) for m in ("full", "spill", "lean")}
    mode = forced_mode()
    if mode == "auto":
        mode = "full"
        if torch.device(opts.device).type == "cuda" and est["full"] > free_and_total_mb(torch.device(opts.device))[0]:
            mode = "spill" if host_room(spilled_inputs_mb(lm, tokens)) else "lean"
    return tokens, est[mode], mode


def share_inputs(inputs, world, ids):
    """Block 0's inputs cut to this process's share of the calibration sequences `ids` (every tensor whose first
    dimension is the batch; tensors the batch shares stay whole). One process: as they are."""
    if not world.distributed:
        return inputs
    n_seq = len(ids)
    if isinstance(inputs, ModelForward):
        raise ValueError("a model forward's compile runs in one process")
    from .compiler.chunks import slice_batch
    start, count = world.share(n_seq)
    if count == 0:
        raise ValueError(f"the calibration set has {n_seq} sequences, fewer than the {world.size} processes; give "
                         f"at least {world.size} with --calib-chunks")

    def own(v):   # a copy of the share, so that the whole batch's tensors can be freed
        if isinstance(v, torch.Tensor):
            return v.clone()
        return tuple(own(t) for t in v) if isinstance(v, tuple) else v

    def local():
        args, kwargs = slice_batch(*(inputs() if callable(inputs) else inputs), n_seq, start, start + count)
        return tuple(own(a) for a in args), {k: own(v) for k, v in kwargs.items()}
    return local


def _follow(lm: LazyModel, steps, assign, opts: CompileOptions, world) -> None:
    """A process other than 0 of a spread compile: the same passes on its share of the calibration batch, taking
    the same decisions from the statistics reduced over every process (compiler/stats.py); nothing written."""
    ids = calibration_ids(lm, opts)
    _, need_mb, mode = plan_memory(lm, ids, opts, world, steps)
    check_fits(opts.device, need_mb, f"process {world.rank}'s share of the calibration inputs")
    inputs = share_inputs(lm.adapter.block_inputs(lm, ids, opts.device), world, ids)
    with gpu_matmul.using(opts.gpu_matmul):
        compile_blocks(lm, steps, inputs, assign, device=opts.device, seed=opts.seed, debug=opts.debug,
                       progress=False, verbose=False, memory=mode, global_batch=len(ids))


def distributed_options(opts: CompileOptions, world) -> CompileOptions:
    """This process's options in a compile spread over world.size processes (compiler/dist.py): its own device,
    no checkpoints (the next block's inputs are split over the processes), output and logs in process 0 only."""
    import dataclasses
    if opts.resume:
        raise ValueError("--resume: a compile spread over several processes keeps no checkpoints to resume from; "
                         "run it again without --resume")
    return dataclasses.replace(opts, device=str(world.device), checkpoint=False,
                               progress=opts.progress and world.main, dump_dir=opts.dump_dir if world.main else None)


def checkpoint(model: str, writer, emitter, target, topts, steps, opts: CompileOptions, calib_sha: str,
               log=log.info) -> Checkpoint:
    """The compile's per-block checkpoints (compiler/resume.py), fingerprinted by what the artifact's bytes depend on;
    an interrupted compile's, when the writer adopted one (--resume), checked and loaded."""
    # named as the user knows them; the names of the model and calibration file too: the manifest records them
    recipe = {"target": target.name, "option": topts.to_dict(), "pass pipeline": [s.to_dict() for s in steps],
              "--seed": opts.seed, "--calib-chunks": opts.calib_chunks, "--calib-seq-len": opts.calib_seq_len,
              "calibration file name": Path(opts.calib).name, "model name": Path(model).name,
              "device kind": torch.device(opts.device).type}
    if opts.gpu_matmul != "fp32":   # named only when set: the checkpoints of earlier compiles stay valid
        recipe["--gpu-matmul"] = opts.gpu_matmul
    versions = {"dcc": __version__, "torch": torch.__version__, "transformers": _version("transformers")}
    ckpt = Checkpoint(writer.journal, fingerprint(Path(model), calib_sha, recipe, versions), emitter, writer, log,
                      name=writer.partial)
    if writer.resumed:
        done = ckpt.load()
        log(f"--resume: {done} of {ckpt.blocks} blocks were done in the interrupted compile; continuing from block "
            f"{done}")
    return ckpt


def build_manifest(target, topts, opts: CompileOptions, spec, steps, ids, lm, emitter, recipe=None,
                   calib_sha: str | None = None) -> dict:
    """dcc.json (less the file checksums, which the writer adds): the one place the manifest is built. Its recipe
    section is itself a recipe (target, options, pipeline, seed, calibration), so `--recipe dcc.json` reproduces
    the artifact."""
    if opts.steps is not None:
        label = "custom pipeline"
    elif recipe is not None and recipe.passes:
        label = recipe.label or f"recipe {recipe.path.name}"
    else:
        label = topts.algo
    return {
        "format": "dcc-artifact", "version": 1, "target": target.name,
        "engines": target.engines(spec, emitter),
        "recipe": {"target": target.name, "options": topts.to_dict(), "algo": label,
                   "weight": spec.to_dict(), "pipeline": [s.to_dict() for s in steps],
                   "seed": opts.seed, "unsupported": topts.unsupported,
                   "calibration": {"file": Path(opts.calib).name, "sha256": calib_sha or _sha(opts.calib),
                                   **lm.adapter.calib_summary(ids),
                                   **({"gpu_matmul": opts.gpu_matmul} if opts.gpu_matmul != "fp32" else {})}},
        "source": {"model": lm.path.name, "kind": lm.adapter.kind, "architecture": type(lm.model).__name__,
                   "blocks": lm.blocks_prefix, "num_blocks": len(lm.blocks), **_diffusers_source(lm),
                   **_split_linears(lm)},
        "versions": {"dcc": __version__, "torch": torch.__version__.split("+")[0],
                     "transformers": _version("transformers"), "python": platform.python_version(),
                     **({"diffusers": _version("diffusers")} if lm.adapter.kind == "diffusers" else {})},
        "dtype": topts.dtype, "tied_embeddings": emitter.tied,
        "runtime": target.runtime(topts, emitter),
        "layers": emitter.layers, "blocks": emitter.blocks,
    }


def _split_linears(lm) -> dict:
    """The fused linears the compile split into their parts (ir/fused_linear.py), {model path: part widths}: the
    runtime splits its model the same way before filling it."""
    splits = {name: [m.out_features for m in mod.children()] for name, mod in lm.model.named_modules()
              if isinstance(mod, SplitLinear)}
    return {"split_linears": splits} if splits else {}


def _diffusers_source(lm) -> dict:
    """A diffusion model's block lists (in the module tree's order) and the pipeline it came from, if any."""
    if lm.adapter.kind != "diffusers":
        return {}
    return {"block_lists": list(lm.block_lists),
            "pipeline": lm.pipeline_path.name if lm.pipeline_path is not None else None}


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _version(mod: str) -> str:
    try:
        return sys.modules[mod].__version__ if mod in sys.modules else __import__(mod).__version__
    except Exception:
        return "unknown"
