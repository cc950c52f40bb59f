"""A tiny random Llama as a Hugging Face folder, and calibration / evaluation token ids it samples itself (it has no
tokenizer; dcc reads whitespace-separated ids), for the CI workflow (.github/workflows/convert-check.yml) and quick
tries of compile, validate, diff and report. Seconds on a CPU.

    python scripts/tiny_model.py OUT_DIR     ->  OUT_DIR/model/, OUT_DIR/calib.txt, OUT_DIR/eval.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers as T


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int):
    """A seeded random Llama: 4 heads (2 KV heads) of 32, an MLP twice as wide as `hidden`, 256 positions."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=0.1)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def sample_ids(model, seqs: int, length: int, seed: int) -> torch.Tensor:
    """Token ids the model samples itself: text it finds likely, so that perplexity and top-1 agreement mean
    something on a model without a tokenizer."""
    torch.manual_seed(seed)
    start = torch.randint(0, model.config.vocab_size, (seqs, 1))
    return model.generate(start, do_sample=True, max_new_tokens=length - 1, min_new_tokens=length - 1,
                          pad_token_id=0, attention_mask=torch.ones_like(start))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write model/, calib.txt and eval.txt into")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=8, help="sequences sampled for calib.txt and for eval.txt each")
    ap.add_argument("--length", type=int, default=128, help="tokens per sampled sequence")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    model = tiny_llama(a.hidden, a.layers, a.vocab, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out / "model")
    ids = sample_ids(model, 2 * a.seqs, a.length, a.seed + 1)
    for name, part in (("calib.txt", ids[:a.seqs]), ("eval.txt", ids[a.seqs:])):
        (a.out / name).write_text(" ".join(map(str, part.flatten().tolist())) + "\n")
    print(f"wrote {a.out / 'model'} ({sum(p.numel() for p in model.parameters())} parameters), "
          f"{a.out / 'calib.txt'} and {a.out / 'eval.txt'} ({a.seqs} x {a.length} tokens each)")


if __name__ == "__main__":
    main()
