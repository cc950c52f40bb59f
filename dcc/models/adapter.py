"""Model adapters: what dcc knows of one kind of model -- its skeleton (which transformers Auto class), what the whole
model is called with, the inputs of its first block as (args, kwargs), its calibration batch, what `validate`
compares and how it is evaluated. The kind comes from the config (causal LM or encoder), never from a table of
architectures; the compiler sees only (args, kwargs). A diffusers model (dcc.models.diffusers) is told by its folder
(config.json's _class_name), not by these."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .loader import ModelLoadError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DEFAULT_KIND = "causal-lm"   # the kind of an artifact whose manifest records none (written before the adapters)


class _Stop(Exception):
    """Raised by the hook on the first block: nothing after block 0's inputs needs to run."""


class ModelAdapter:
    """One model kind. Subclasses set `kind` and implement the methods that raise NotImplementedError."""
    kind: ClassVar[str]
    eval_option: ClassVar[str]       # the `dcc eval` option that evaluates this kind ("--ppl", "--text")
    compares: ClassVar[str]          # what `validate --model` compares, in words

    # ---------------------------------------------------------------------------------------------- skeleton
    def auto_class(self, config):
        """The transformers Auto class whose from_config builds the model dcc compiles."""
        raise NotImplementedError

    def build_kwargs(self, config, keys) -> dict:
        """Constructor arguments that depend on what the checkpoint holds (keys: its tensor names, or None)."""
        return {}

    def model_class(self, config):
        """The transformers class auto_class builds for this config, or None when it has none."""
        mapping = self.auto_class(config)._model_mapping
        if type(config) not in mapping:
            return None
        cls = mapping[type(config)]
        return cls[0] if isinstance(cls, (list, tuple)) else cls

    def attention_implementation(self, config) -> str:
        """sdpa (one graph node per attention), or eager where sdpa would compute another function: a model class
        without an sdpa path, or scores soft-capped with tanh (Gemma 2), which sdpa cannot do. The analysis finds
        attention in either form (ir/attention_sites.py)."""
        if getattr(config, "attn_logit_softcapping", None):
            return "eager"
        return "sdpa" if getattr(self.model_class(config), "_supports_sdpa", True) else "eager"

    def build(self, config, dtype: torch.dtype = torch.float32, keys=None, device: str = "meta") -> nn.Module:
        """The model of `config` in eval mode, on `device` (meta: a skeleton without memory), with sdpa attention
        or, where that would compute another function, eager attention (attention_implementation)."""
        with torch.device(device):
            model = self.auto_class(config).from_config(
                config, attn_implementation=self.attention_implementation(config), dtype=dtype,
                trust_remote_code=False, **self.build_kwargs(config, keys))
        return model.eval()

    def checkpoint_prefix(self, model: nn.Module, keys) -> str:
        """What the checkpoint's tensor names carry in front of the model's: '' as a rule; the base model's prefix
        ('bert.') when a head model's checkpoint (BertForMaskedLM) is loaded into the base model dcc builds."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        names = [n for n, _ in model.named_parameters()]
        if not prefix or any(n.startswith(prefix + ".") for n in names):
            return ""
        have = set(keys)
        plain = sum(n in have for n in names)
        prefixed = sum(f"{prefix}.{n}" in have for n in names)
        return prefix + "." if prefixed > plain else ""

    # ---------------------------------------------------------------------------------------------- calibration
    def forward_kwargs(self, batch) -> dict:
        """What the whole model is called with on a batch (to reach block 0, to evaluate)."""
        raise NotImplementedError

    def block_kwargs(self, kwargs: dict) -> dict:
        """Block 0's keyword inputs as caught, cleaned of what must not reach a captured block (caches)."""
        return {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}

    @torch.no_grad()
    def block0_inputs(self, lm, batch, device) -> tuple[tuple, dict]:
        """Run lm.model on the batch up to its first block and catch that block's (args, kwargs)."""
        caught = {}

        def hook(mod, args, kwargs):
            caught["args"], caught["kwargs"] = args, kwargs
            raise _Stop

        h = lm.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            lm.model(**self.forward_kwargs(_to(batch, device)))
        except _Stop:
            pass
        finally:
            h.remove()
        if "args" not in caught:
            raise RuntimeError("the model's forward never reached its first block")
        kwargs = self.block_kwargs(dict(caught["kwargs"]))
        args = caught["args"]
        if not args:  # hidden states passed by keyword
            args = (kwargs.pop("hidden_states"),)
        return args, kwargs

    def calibration(self, lm, path, chunks: int | None, seq_len: int) -> torch.Tensor:
        """[chunks, seq_len] token ids from a text file (the folder's tokenizer, or whitespace-separated ids)."""
        raise NotImplementedError

    def block_inputs(self, lm, batch, device):
        """What compile_blocks takes (dcc.compiler.sequential): a function giving block 0's (args, kwargs) on the
        batch, computed once the passes' model prologues have run (a rotation of the embeddings changes them)."""
        dev = torch.device(device)
        return lambda: self.block0_inputs(lm, batch, dev)

    def calib_summary(self, batch) -> dict:
        """The manifest's account of the calibration batch (beside the file's name and checksum)."""
        return {"chunks": int(batch.shape[0]), "seq_len": int(batch.shape[1])}

    def calib_tokens(self, batch) -> int:
        """Tokens the blocks see per calibration run (the memory estimate)."""
        return batch.numel()

    def describe_calibration(self, batch) -> str:
        return f"{batch.shape[0]} x {batch.shape[1]} tokens"

    # ---------------------------------------------------------------------------------------------- evaluation
    def eval_data(self, tokenizer, config: dict, path, seq_len: int, limit: int | None):
        """The evaluation batches of a text file (tokenizer: the artifact's, or None for token-id files)."""
        raise NotImplementedError

    def evaluate(self, model, data, baseline=None, device: str = "cpu", progress: bool = True) -> dict:
        """{row: metrics} of the artifact's model (and the float baseline where given or needed)."""
        raise NotImplementedError

    def report(self, results: dict) -> list[str]:
        """The lines `dcc eval` prints for evaluate()'s results."""
        raise NotImplementedError

    def max_tokens(self, config: dict) -> int | None:
        """The longest sequence the model takes (absolute position tables), or None where it has no hard limit."""
        return None

    def outputs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """What `validate --model` compares between the artifact and the float model on token ids."""
        raise NotImplementedError

    def compare(self, ref: torch.Tensor, got: torch.Tensor) -> dict:
        raise NotImplementedError

    def describe_comparison(self, cmp: dict) -> str:
        raise NotImplementedError


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def _has_class(mapping, config) -> bool:
    return type(config) in mapping


def is_encoder(config) -> bool:
    """An encoder-only transformer (the BERT family): neither a decoder nor an encoder-decoder, with a base model
    and a masked-LM model in transformers."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    return _has_class(MODEL_FOR_MASKED_LM_MAPPING, config) and _has_class(MODEL_MAPPING, config)


def kind_of(config) -> str | None:
    """'causal-lm', 'encoder', or None: judged by the architectures the folder names (a causal LM head wins), then
    by the classes transformers has for the model type."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return "causal-lm"
    if archs and archs[0].endswith("ForConditionalGeneration"):
        return None
    if is_encoder(config):
        return "encoder"
    if not archs and _has_class(MODEL_FOR_CAUSAL_LM_MAPPING, config):
        return "causal-lm"
    return None


def adapter_named(kind: str) -> ModelAdapter:
    """The adapter of a kind recorded in an artifact's manifest."""
    from .causal_lm import CausalLM
    from .diffusers import DiffusersModel
    from .encoder import Encoder
    for cls in (CausalLM, Encoder, DiffusersModel):
        if cls.kind == kind:
            return cls()
    raise ValueError(f"unknown model kind {kind!r} (known: {CausalLM.kind}, {Encoder.kind}, {DiffusersModel.kind})")


def adapter_for(config, folder=None) -> ModelAdapter:
    """The adapter of the model `config` describes; a model of another kind is refused in one line naming the
    folder (when given) and the architecture."""
    kind = kind_of(config)
    if kind is not None:
        return adapter_named(kind)
    from .checks import describe
    where = f"{folder}: " if folder is not None else ""
    archs = getattr(config, "architectures", None) or []
    if archs and archs[0].endswith("ForConditionalGeneration"):
        raise ModelLoadError(f"{where}{describe(config)} is an encoder-decoder or multimodal model; dcc compiles "
                             f"decoder-only causal LMs and encoder-only transformers (BERT family) today")
    raise ModelLoadError(f"{where}{describe(config)} is neither a causal language model nor an encoder-only "
                         f"transformer with a masked-LM class in transformers; dcc compiles decoder-only causal LMs "
                         f"and BERT-family encoders today (diffusion transformers are planned)")


def artifact_adapter(manifest: dict) -> ModelAdapter:
    """The adapter an artifact was compiled with (older artifacts record none: causal LM)."""
    return adapter_named((manifest.get("source") or {}).get("kind", DEFAULT_KIND))
