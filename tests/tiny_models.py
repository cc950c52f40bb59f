"""Tiny random-init models saved as Hugging Face folders, and helpers to run passes on them and compare logits
(shared by the pass tests; tests/ is on pytest's pythonpath). Also the plain tiny configs, saved checkpoints and
captured decoder layers of the IR, loader and quantization-pass tests (second half of the file)."""
import copy

import pytest
import torch
import transformers as T
from torch import nn
from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.api import block0_inputs
from dcc.compiler.sequential import compile_blocks
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture, typed_nodes
from dcc.ir.program import copy_graph
from dcc.ir.formats import QuantSpec
from dcc.ir.graph import Block
from dcc.models.loader import LazyModel
from dcc.passes._model_parts import find_final_norm, norm_offset
from dcc.passes.base import get_pass
from dcc.passes.fuse_norms import FuseNorms, FuseNormsConfig

VOCAB = 100


def tiny_config(arch: str, **kw):
    """A config of the models whose norms have non-trivial gains (see tiny_model); kw overrides any field."""
    if arch not in ("llama", "gemma", "opt"):
        raise ValueError(arch)
    return decoder_config(arch, **{"initializer_range": 0.1, **({"head_dim": 16} if arch == "gemma" else {}), **kw})


@torch.no_grad()
def tiny_model(arch: str, seed: int = 0, **kw) -> nn.Module:
    """A random model whose norms have non-trivial gains (and biases), so that folding them matters."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            w.copy_(torch.rand_like(w) + 0.5)
            b = getattr(mod, "bias", None)
            if isinstance(b, nn.Parameter):
                b.normal_(0, 0.3)
    return model


def saved_model(tmp_path, arch: str, seed: int = 0, **kw):
    """(original model, folder it was saved to)."""
    model = tiny_model(arch, seed, **kw)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def lazy(path) -> LazyModel:
    lm = LazyModel(path)
    # Work-around (loader bug, see the report): Gemma's embedding holds a non-persistent `embed_scale` buffer that
    # LazyModel.materialize cannot rebuild (the embedding's __init__ takes no `config`); set it the way the class does.
    for mod in lm.model.modules():
        b = mod._buffers.get("embed_scale")
        if b is not None and b.is_meta and hasattr(mod, "scalar_embed_scale"):
            mod._buffers["embed_scale"] = torch.tensor(mod.scalar_embed_scale)
    return lm


def calib_ids(seed: int = 1, vocab: int = VOCAB, shape=(2, 16)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def compile_model(path, steps):
    """Run the passes through the sequential compiler; returns (lm, {block index: state_dict after the passes},
    {block index: the Block}) -- blocks are released to meta after on_block, so their tensors are cloned there."""
    lm = lazy(path)
    states, blocks = {}, {}

    def on_block(block, *_):
        states[block.index] = {k: v.detach().clone() for k, v in block.module.state_dict().items()}
        blocks[block.index] = block

    compile_blocks(lm, steps, block0_inputs(lm, calib_ids()), assign_specs=lambda b: None, on_block=on_block,
                   progress=False)
    return lm, states, blocks


def rebuild(lm, states) -> nn.Module:
    """A fresh float model holding lm's non-block tensors and the compiled blocks' tensors."""
    fresh = T.AutoModelForCausalLM.from_config(lm.config).eval()
    inside = lm.blocks_prefix + "."
    sd = {k: v for k, v in lm.model.state_dict().items() if not k.startswith(inside)}
    for i, st in states.items():
        sd.update({f"{inside}{i}.{k}": v for k, v in st.items()})
    have = fresh.state_dict()
    for k, v in sd.items():   # parameters a pass created (a bias where the architecture has none)
        if k not in have:
            mod, _, attr = k.rpartition(".")
            setattr(fresh.get_submodule(mod), attr, nn.Parameter(torch.zeros_like(v)))
    fresh.load_state_dict(sd, strict=True)
    return fresh


@torch.no_grad()
def logits(model, ids=None):
    ids = calib_ids(7) if ids is None else ids
    return model(input_ids=ids, use_cache=False).logits


def assert_same_logits(a, b, tol=1e-4):
    scale = float(a.abs().max())
    err = float((a - b).abs().max())
    assert scale > 0.1, f"logit scale {scale} too small for a meaningful comparison"
    assert err < tol * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


def run_and_rebuild(path, steps):
    lm, states, blocks = compile_model(path, steps)
    return lm, rebuild(lm, states), states, blocks


# ---------------------------------------------------------------------------------------------------------------------
# Plain (default-initialised) tiny models, saved checkpoints and captured decoder layers: the rtn, clip, gptq and awq
# pass tests, the IR analysis tests, the loader and the pass manager tests.

INT4_G32 = QuantSpec("int4", symmetric=False, group_size=32, scale_dtype="float16", zero_mode="scaled")
OUTLIERS = [3, 17, 40]   # the input channels outlier_layer gives a 20x norm gain
CONFIG_CLASSES = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig, "gemma": T.GemmaConfig,
                  "qwen3": T.Qwen3Config, "opt": T.OPTConfig}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's thread contention.
    Import it into a test module (`from tiny_models import one_thread`) to apply it to that module's tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def decoder_config(family: str, vocab: int = VOCAB, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                   head_dim=None, layers: int = 2, **kw):
    """A tiny config of `family` (a key of CONFIG_CLASSES) with an MLP twice as wide as `hidden` and 64 positions;
    OPT has no kv_heads or head_dim (its word embeddings are `hidden` wide); kw overrides any field."""
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=64)
    if family == "opt":
        return T.OPTConfig(**{**common, "ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden, **kw})
    extra = {} if head_dim is None else {"head_dim": head_dim}
    return CONFIG_CLASSES[family](**{**common, "num_key_value_heads": kv_heads, "intermediate_size": 2 * hidden,
                                     **extra, **kw})


def save_tiny(path, config, seed: int = 0) -> nn.Module:
    """Seed, build a default-initialised model of `config`, save it to `path` (a Hugging Face folder); the model."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def decoder_layers(model) -> nn.ModuleList:
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


class _Stop(Exception):
    pass


def first_block_inputs(model, layer, ids):
    """(args, kwargs) of a decoder layer, caught with a forward pre-hook (as the causal-LM adapter's block0_inputs)."""
    caught = {}

    def hook(mod, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    args = caught["args"] or (kwargs.pop("hidden_states"),)
    return args, kwargs


def capture_first_layer(config, ids, outlier_gain=None, seed: int = 0):
    """Layer 0 of a seeded random model of `config` (sdpa attention), captured on its inputs for `ids`:
    (layer, gm, params, args, kwargs). With outlier_gain, every norm gain of the layer is set to it at OUTLIERS."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    layer = decoder_layers(model)[0]
    if outlier_gain is not None:
        with torch.no_grad():
            for name, mod in layer.named_modules():
                if "norm" in name and getattr(mod, "weight", None) is not None:
                    mod.weight[OUTLIERS] = outlier_gain
    args, kwargs = first_block_inputs(model, layer, ids)
    gm, params = capture(layer, args, kwargs)
    return layer, gm, params, args, kwargs


def outlier_layer(family: str = "llama"):
    """A captured layer 0 of a one-layer model (vocab 128, hidden 64) whose norms have a 20x gain at the OUTLIERS
    channels, with its calibration inputs (a 4 x 32 batch): (layer, gm, params, args, kwargs); copied for every run."""
    cfg = decoder_config(family, vocab=128, layers=1, head_dim=16 if family == "gemma" else None)
    # Gemma's gain is (1 + w): an effective gain of 20 everywhere the norm output has an outlier
    return capture_first_layer(cfg, calib_ids(1, vocab=128, shape=(4, 32)),
                               outlier_gain=19.0 if family == "gemma" else 20.0)


def analysed_block(module, gm, params, prefix: str = "model.layers.0") -> Block:
    """A Block running its own copy of the captured graph (graph passes rewrite it; the template stays as it is)."""
    block = Block(0, prefix, module)
    block.gm = copy_graph(gm)
    block.nodes = typed_nodes(block.gm, params)
    analyse(block, block.gm, params)
    return block


def fresh_block(template, spec=INT4_G32):
    """A float copy of a captured layer (outlier_layer) as an analysed Block with `spec` on every linear, and its
    calibration context."""
    layer, gm, params, args, kwargs = template
    block = analysed_block(copy.deepcopy(layer), gm, params)
    for lin in block.linears.values():
        lin.spec = spec
    return block, BlockContext(block, args, kwargs, torch.device("cpu"))


def run_on_copy(template, steps):
    """Run the steps on fresh_block(template): (block, results, relative error of the block output vs the float
    block)."""
    block, ctx = fresh_block(template)
    ref = ctx.block_io()[2].clone()
    results = run_block(block, steps, ctx, PassTiming())
    out = ctx.forward()
    return block, results, float((out - ref).norm() / ref.norm())


def sampled_id_files(model_path, d, seqs: int = 8, length: int = 256):
    """calib.txt / eval.txt of token ids the float model samples itself (real-looking text for a model without a
    tokenizer): the first half of the sequences calibrate, the second half evaluate."""
    from dcc.models.loader import LazyModel
    model = LazyModel(model_path).materialize_all()
    torch.manual_seed(0)
    out = model.generate(torch.ones(seqs, 1, dtype=torch.long), do_sample=True, max_new_tokens=length - 1,
                         min_new_tokens=length - 1, pad_token_id=0)
    (d / "calib.txt").write_text(" ".join(map(str, out[:seqs // 2].flatten().tolist())))
    (d / "eval.txt").write_text(" ".join(map(str, out[seqs // 2:].flatten().tolist())))
    return d / "calib.txt", d / "eval.txt"
