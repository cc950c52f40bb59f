"""`dcc validate`: prove that every quantized layer decodes to exactly the fake-quant weight the compiler evaluated
(checksums recorded at compile time), and measure how far each layer's output and the model's output drift from the
float model on the same tokens (the logits of a causal LM, the last hidden states and embeddings of an encoder: the
adapter of the artifact's model kind says which), or, for a diffusion model, on recorded forward inputs (the denoiser's
output, and each block's)."""
from __future__ import annotations

import contextlib
import json
import math
import sys

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..models.adapter import artifact_adapter
from ..models.loader import find_blocks
from ..targets.artifact import sha256_tensor
from .artifact import Artifact
from .graph_blocks import linear_outputs
from .reference import build_model
from .text_metrics import perplexities


def check_exact(art: Artifact, progress: bool = False) -> dict[str, bool]:
    """layer -> decoded 16-bit weight equals the compile-time fake-quant weight, bit for bit."""
    out = {}
    layers = art.quantized_layers()
    for name, entry in tqdm(layers.items(), total=len(layers), desc="decoding layers", unit="layer",
                            disable=not progress, file=sys.stderr, leave=False):
        w = art.decode(name).to(art.format_of(name).decoded_dtype or art.dtype)
        out[name] = sha256_tensor(w) == entry.get("weight_sha256")
    return out


def _capture_outputs(model, ids: torch.Tensor, adapter) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with linear_outputs(model) as outs, torch.no_grad():
        final = adapter.outputs(model, ids)
    return dict(outs), final


def compare_with_float(art: Artifact, float_model, ids: torch.Tensor, qmodel=None,
                       blocks: list[str] | None = None, text: bool = False, progress: bool = False) -> dict:
    """Per-layer relative output error and the agreement of the model's outputs (logits, or an encoder's hidden
    states and embeddings, or a denoiser's output) of the artifact (run by `qmodel`, default the CPU reference; it
    may live on another device) against the float model (CPU) on `ids` (token ids; a diffusion model's recorded
    inputs). With `blocks` (module paths), also each block's relative output error ("blocks", in call order). With
    `text` (ids are windows of a real text), also both models' perplexity on it. `progress`: a bar per model over
    its blocks, on stderr."""
    adapter = artifact_adapter(art.manifest)
    qmodel = build_model(art) if qmodel is None else qmodel
    dev = next(qmodel.parameters()).device
    with _block_outputs(float_model, blocks) as f_blocks, _ticking(float_model, "float model", progress):
        f_out, f_final = _capture_outputs(float_model, ids, adapter)
    with _block_outputs(qmodel, blocks) as q_blocks, _ticking(qmodel, "artifact", progress):
        q_out, q_final = _capture_outputs(qmodel, ids.to(dev), adapter)
    q_out, q_final = {k: v.cpu() for k, v in q_out.items()}, q_final.cpu()
    f_out.update(_split_outputs(f_out, (art.manifest.get("source") or {}).get("split_linears") or {}))
    layers = {}
    for name in art.manifest["layers"]:
        if name in f_out and name in q_out:
            ref, got = f_out[name].double(), q_out[name].double()
            layers[name] = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    out = {"layers": layers, "compares": adapter.compares, **adapter.compare(f_final, q_final)}
    if text:
        out.update(perplexities(f_final, q_final, ids))
    if blocks is not None:
        out["blocks"] = {k: rel_err(v, q_blocks[k]) for k, v in f_blocks.items() if k in q_blocks}
    return out


def _split_outputs(outs: dict[str, torch.Tensor], splits: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The float model's fused linears' outputs cut into the parts the compile split them into ({fused path:
    widths}, ir/fused_linear.py): part i of 'x.qkv_proj' is 'x.qkv_proj.i', the artifact's layer."""
    out = {}
    for path, widths in splits.items():
        if path in outs:
            for i, part in enumerate(outs[path].split(widths, dim=-1)):
                out[f"{path}.{i}"] = part
    return out


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.cpu().double(), got.cpu().double()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


@contextlib.contextmanager
def _block_outputs(model, blocks: list[str] | None):
    """A dict filled, while the model runs, with each named block's output: its floating tensors flattened into
    one (a FLUX double block returns the text and the image stream)."""
    outs: dict[str, torch.Tensor] = {}

    def keep(path, out):
        leaves = [t.detach().flatten() for t in pytree.tree_leaves(out)
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        outs[path] = torch.cat(leaves) if leaves else torch.zeros(0)

    hooks = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: keep(p, o)) for p in blocks or ()]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _ticking(model, desc: str, progress: bool):
    """A progress bar (stderr, with an ETA) that moves each time one of the model's blocks has run."""
    if not progress:
        yield
        return
    _, blocks = find_blocks(model)
    bar = tqdm(total=len(blocks), desc=desc, unit="block", file=sys.stderr, leave=False)

    def tick(mod, args, out):   # returns None: the output stays; a block's graph capture runs it too, uncounted
        if not getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)():
            bar.update(1)

    hooks = [b.register_forward_hook(tick) for b in blocks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def sample_ids(vocab: int, n: int = 2, length: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def sqnr_db(rel_err: float) -> float:
    return -20 * math.log10(max(rel_err, 1e-30))


_SAME = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "vocab_size")


# a diffusers model's config: its class and sizes
_SAME_DIFFUSERS = ("_class_name", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                   "num_attention_heads", "joint_attention_dim", "cross_attention_dim", "block_out_channels",
                   "layers_per_block", "transformer_layers_per_block", "dim", "n_layers", "n_refiner_layers")


def config_difference(a: dict, b: dict, diffusers: bool) -> tuple[str, object, object] | None:
    """The first architecture or size field two configs disagree on, as (field, a's, b's); None if none does."""
    for key in _SAME_DIFFUSERS if diffusers else _SAME:
        va, vb = a.get(key), b.get(key)
        if diffusers:   # a loaded model's config holds tuples where config.json has lists
            va, vb = json.loads(json.dumps(va)), json.loads(json.dumps(vb))
        if va is not None and vb is not None and va != vb:
            return key, va, vb
    return None


def check_same_model(art: Artifact, config: dict, model_path) -> None:
    """The source model given for comparison must be the one the artifact was compiled from (same architecture
    and sizes); otherwise one line says which field differs."""
    diff = config_difference(art.config, config, (art.manifest.get("source") or {}).get("kind") == "diffusers")
    if diff is not None:
        key, a, b = diff
        raise ValueError(f"{model_path}: not the model {art.path.name} was compiled from ({key} {b}, the "
                         f"artifact's is {a}; its source: {art.manifest.get('source', {}).get('model', '?')})")
