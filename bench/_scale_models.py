"""bench/scale.py's inputs: random bf16 Llamas of real shapes (Meta-Llama-3-8B, a 4-block slice of Meta-Llama-3-70B, a
tiny one for --quick) written as sharded safetensors folders with a real tokenizer, and the calibration text and windows
that dcc and the peer both use. The weights are drawn on the GPU (when there is one) one shard at a time, so host
memory holds at most one shard."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROPE_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@dataclass(frozen=True)
class ModelSpec:
    """A Llama shape. `layers` blocks are built; `full_layers` is the real model's depth (what timings project to)."""
    key: str
    name: str
    hidden: int
    intermediate: int
    layers: int
    full_layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    max_positions: int = 8192
    shard_mb: int = 5000
    seed: int = 0
    std: float = 0.02

    def config(self, rope_scaling: bool = False) -> dict:
        """config.json as Meta's Meta-Llama-3 checkpoints ship it (RoPE theta 500000 over 8192 positions); with
        `rope_scaling`, as Llama-3.1's (llama3 scaling, 131072 positions), which dcc's targets refuse (their engines
        apply plain RoPE)."""
        scaled = {"rope_scaling": dict(ROPE_LLAMA3), "max_position_embeddings": 131072} if rope_scaling else {}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
                "hidden_size": self.hidden, "initializer_range": self.std, "intermediate_size": self.intermediate,
                "max_position_embeddings": self.max_positions, "mlp_bias": False,
                "num_attention_heads": self.heads, "num_hidden_layers": self.layers,
                "num_key_value_heads": self.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "use_cache": True, "vocab_size": self.vocab, **scaled}


MODELS = {
    "8b": ModelSpec("8b", "Llama-3-8B (random)", 4096, 14336, 32, 32, 32, 8),
    "70b4": ModelSpec("70b4", "Llama-3-70B, first 4 of 80 blocks (random)", 8192, 28672, 4, 80, 64, 8),
    # --quick: CPU-sized, the same vocabulary (the real tokenizer's ids), small shards so the index is exercised
    "tiny": ModelSpec("tiny", "tiny Llama-3 shape (random)", 256, 768, 2, 8, 4, 2, shard_mb=40),
}


def tensor_shapes(s: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM, in checkpoint order."""
    hd = s.hidden // s.heads
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (s.hidden,)),
                (p + "self_attn.q_proj.weight", (s.heads * hd, s.hidden)),
                (p + "self_attn.k_proj.weight", (s.kv_heads * hd, s.hidden)),
                (p + "self_attn.v_proj.weight", (s.kv_heads * hd, s.hidden)),
                (p + "self_attn.o_proj.weight", (s.hidden, s.heads * hd)),
                (p + "post_attention_layernorm.weight", (s.hidden,)),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate))]
    return out + [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]


def _shards(s: ModelSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors packed in order into shards of at most shard_mb (a tensor larger than that gets one of its own)."""
    limit, shards, cur, size = s.shard_mb * 2**20, [], [], 0
    for name, shape in tensor_shapes(s):
        nbytes = 2 * int(torch.Size(shape).numel())
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    return shards + ([cur] if cur else [])


def build(s: ModelSpec, folder: Path, tokenizer_dir: Path, device: str, rope_scaling: bool = False) -> dict:
    """Write the model folder (config, shards, index, tokenizer) unless one built from the same spec is there;
    returns {"seconds", "bytes", "cached"}. Norms are 1, every matrix N(0, std) drawn from a generator seeded by
    (seed, tensor index), so a folder is the same whichever device drew it (up to the device's RNG)."""
    from safetensors.torch import save_file
    stamp = folder / "scale_spec.json"
    want = {**asdict(s), "device_rng": torch.device(device).type, "rope_scaling": rope_scaling}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return {"seconds": 0.0, "bytes": _size(folder), "cached": True}
    t = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shards = _shards(s)
    weight_map, total, index = {}, 0, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                w = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator(device=device).manual_seed(s.seed * 1_000_003 + index)
                w = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, s.std, generator=g)
                w = w.to(torch.bfloat16).cpu()
            index += 1
            tensors[name] = w
            weight_map[name] = fname
            total += w.numel() * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(s.config(rope_scaling), indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    stamp.write_text(json.dumps(want) + "\n")
    return {"seconds": round(time.perf_counter() - t, 1), "bytes": _size(folder), "cached": False}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def calibration(assets: Path, model_dir: Path, out_dir: Path, shapes: list[tuple[int, int]]) -> tuple[Path, dict, dict]:
    """calib.txt (WikiText-2 test, then PTB valid and test, repeated until the largest shape fits) and, per shape,
    the [chunks, seq_len] token windows dcc cuts from it (dcc.models.text, the model folder's tokenizer), saved as
    ids_<n>x<len>.pt for the peer. Returns the file, a description of it and {shape: ids path}."""
    from dcc.models.text import bos_token, load_tokenizer, read_text, tokenize_file, windows
    tok = load_tokenizer(model_dir)
    base = "\n\n".join(read_text(p) for p in (assets / "wikitext2_raw_test" / "wiki.test.raw",
                                                 assets / "ptb" / "ptb.valid.txt", assets / "ptb" / "ptb.test.txt"))
    need = max(n * L for n, L in shapes)
    per_copy = len(tok(base, add_special_tokens=False, verbose=False)["input_ids"])
    copies = -(-need * 11 // 10 // per_copy)   # 10 % margin: tokens across a seam may merge
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = out_dir / "calib.txt"
    text = "\n\n".join([base] * copies)
    if not calib.is_file() or calib.read_text(encoding="utf-8") != text:
        calib.write_text(text, encoding="utf-8")
    ids = tokenize_file(calib, tok)
    paths = {}
    for n, L in shapes:
        p = out_dir / f"ids_{n}x{L}.pt"
        torch.save(windows(ids, n, L, str(calib), bos=bos_token(tok)).clone(), p)
        paths[(n, L)] = p
    return calib, {"file": str(calib), "tokens": int(ids.numel()), "copies": copies,
                   "sources": ["wikitext2_raw_test/wiki.test.raw", "ptb/ptb.valid.txt", "ptb/ptb.test.txt"],
                   "tokenizer": "SmolLM2 (49,152 ids, valid in a 128,256 vocabulary)"}, paths
