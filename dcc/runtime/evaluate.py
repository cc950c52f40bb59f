"""`dcc eval` through the adapter of the artifact's model kind (dcc/models/adapter.py): perplexity of a causal LM on
a text (dcc/models/causal_lm.py), the cosine of an encoder's mean-pooled embeddings to the float model's on a text's
lines (dcc/models/encoder.py); a diffusion model's images are compared by dcc/runtime/images.py."""
from __future__ import annotations

from ..models.adapter import artifact_adapter
from ..models.causal_lm import perplexity  # noqa: F401  (importers: bench scripts, tests)
from ..models.text import load_tokenizer

EVALUATION = {"--ppl": "perplexity (causal LMs)", "--text": "embedding cosine to the float model (encoders)",
              "--images": "image PSNR/SSIM against the 16-bit model (diffusion models)"}


def eval_adapter(art, option: str, baseline: str | None):
    """The artifact's adapter, once the evaluation asked for (`option`) is the one its model kind takes; otherwise
    one line saying which to use."""
    adapter = artifact_adapter(art.manifest)
    arch = (art.manifest.get("source") or {}).get("architecture", "?")
    if option != adapter.eval_option:
        kind = "diffusion model" if adapter.kind == "diffusers" else adapter.kind
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"{art.path}: {option} measures {EVALUATION[option]}, but this artifact's model is "
                         f"{article} {kind} ({arch}); use {adapter.eval_option} FILE"
                         + (" --baseline MODEL" if adapter.kind == "encoder" else "")
                         + (" --pipeline PIPELINE_DIR" if adapter.kind == "diffusers" else ""))
    if adapter.kind == "encoder" and not baseline:
        raise ValueError(f"{art.path}: an encoder ({arch}) is evaluated by the cosine of its embeddings to the float "
                         f"model's: give --baseline MODEL (the model it was compiled from)")
    return adapter


def eval_data(art, adapter, path, seq_len: int, limit: int | None, baseline_folder=None):
    """The adapter's evaluation batches of `path`, tokenized by the artifact's tokenizer (else the baseline's)."""
    tok = load_tokenizer(art.path)
    if tok is None and baseline_folder is not None:
        tok = load_tokenizer(baseline_folder)
    return adapter.eval_data(tok, art.config, path, seq_len, limit)
