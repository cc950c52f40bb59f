"""`dcc generate`: text from a causal-LM artifact, streamed as it is decoded, with prefill and decode tokens/s
(dcc/runtime/generate.py runs the loop, dcc/runtime/prompt.py turns text into ids and back)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .main import _fail, friendly, main


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


@main.command("generate", short_help="Text from a causal-LM artifact, streamed, then prefill and decode tokens/s.")
@click.argument("artifact", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Stop after this many new tokens (or at the model's end-of-sequence token, or its context).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu: the CPU reference (the artifact's numerics, in float32); cuda (cuda:N): dcc's kernels.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode B copies of the prompt at once (the first one is printed; tokens/s per sequence and "
                   "in total).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy (argmax); otherwise sample from softmax(logits / T).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="With --temperature > 0: sample among the most likely tokens holding this much probability.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler (same seed, same tokens).")
@click.option("--exact", is_flag=True,
              help="No KV cache and no padding: every step runs the model on the whole sequence, the reference's "
                   "own computation (one graph capture per length: slow). The cached steps' greedy tokens can "
                   "differ from these where float rounding moves an int8 activation or 4-bit KV code across a "
                   "rounding boundary (W4A8KV4 on real models).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (one user turn).")
@click.option("--json", "as_json", type=click.Path(), default=None,
              help="Also write the tokens, texts and timings to this JSON file.")
@click.option("-q", "--quiet", is_flag=True, help="Only the generated text: no loading note, no tokens/s line.")
@friendly
def generate_cmd(artifact, prompt, max_new_tokens, device, batch, temperature, top_p, seed, exact, chat, as_json,
                 quiet):
    """Generate text from ARTIFACT (a causal LM) after PROMPT, printing it as it is decoded, and end with prefill and
    decode tokens/s on stderr. An artifact without a tokenizer (e.g. stories260K) takes and prints token ids.

    \b
    dcc generate out/ "Once upon a time" --max-new-tokens 32
    dcc generate out/ "What is 2+2?" --chat --temperature 0.7 --top-p 0.9 --seed 1
    dcc generate out/ "Hello" --device cuda --batch 8

    The blocks run as the compiled graphs with the engine's run-time numerics (activation and KV-cache
    quantization), one token per step against a KV cache (K/V quantized per token, as the engine's cache holds
    them); --exact runs the whole sequence at every step instead. Graph captures (once per 32 positions) are left
    out of the tokens/s."""
    from ..models.adapter import artifact_adapter
    from ..models.text import load_tokenizer
    from ..runtime.artifact import load_artifact
    from ..runtime.generate import Sampling, generate
    from ..runtime.prompt import TextStream, completion, encode_prompt, eos_ids
    from .commands import _check_device

    sampling = Sampling(temperature, top_p, seed)
    if not prompt.strip():
        _fail("the prompt is empty")
    _check_device(device)
    art = load_artifact(artifact)
    adapter = artifact_adapter(art.manifest)
    if adapter.kind != "causal-lm":
        kind = "diffusion model" if adapter.kind == "diffusers" else adapter.kind
        arch = (art.manifest.get("source") or {}).get("architecture", "?")
        _fail(f"{art.path}: dcc generate decodes text from causal LMs; this artifact's model is "
              f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({arch})")
    _check_device(device, art)
    tok = load_tokenizer(art.path)
    ids = encode_prompt(tok, prompt, art.config["vocab_size"], chat)
    limit = art.config.get("max_position_embeddings")
    if limit and len(ids) >= limit:
        _fail(f"the prompt has {len(ids)} tokens; the model takes at most {limit} positions")
    t = time.perf_counter()
    fast = None
    if device.startswith("cuda"):
        # the fast decoder (static KV cache, CUDA-graph decode step) where it runs the artifact; else the reference
        # model's blocks on dcc's kernels, with one line saying why
        from ..runtime.fastlm import FastLlama, fast_path_problem
        why = fast_path_problem(art, exact)
        if why is None:
            fast = FastLlama(art, device)
        else:
            if not quiet:
                click.echo(f"note: not the fast decoder ({why}); running the reference model on the GPU", err=True)
            from ..runtime.cuda.model import build_cuda_model
            model = build_cuda_model(art, device)
    else:
        from ..runtime.reference import build_model
        model = build_model(art)
    if not quiet:
        click.echo(f"loaded {art.path} ({art.manifest.get('target')}, {device}{', fast decoder' if fast else ''}) "
                   f"in {time.perf_counter() - t:.1f}s; "
                   f"prompt {len(ids)} tokens", err=True)

    eos = eos_ids(art.path, art.config, tok)
    stream = TextStream(tok, ids)
    ended = False

    def show(tokens: list[int]) -> None:   # the first sequence, as its tokens arrive, up to its EOS
        nonlocal ended
        if not ended:
            piece = stream.push(tokens[0])
            if piece:
                click.echo(piece, nl=False)
                sys.stdout.flush()
            ended = tokens[0] in eos

    made = []   # steps so far, for the line an interruption prints

    def on_tokens(tokens: list[int]) -> None:
        made.append(tokens)
        show(tokens)

    try:
        if fast is not None:
            from ..runtime.fastlm import generate_fast
            res = generate_fast(fast, ids, max_new_tokens, sampling, batch=batch, eos=eos, max_positions=limit,
                                on_tokens=on_tokens)
        else:
            res = generate(model, ids, max_new_tokens, sampling, batch=batch, eos=eos, max_positions=limit,
                           on_tokens=on_tokens, **({"cache": False, "bucket": 1} if exact else {}))
    except KeyboardInterrupt as e:   # Ctrl-C (or SIGTERM): what was printed stays; say where it stopped
        click.echo(stream.flush())
        signum = getattr(e, "signum", 2)
        _fail(f"interrupted after {len(made)} new tokens", 128 + signum)
    click.echo(stream.flush())
    if not quiet:
        rates = f"decode {_rate(res.decode_tps())} tokens/s"
        if batch > 1:
            rates += f" per sequence, {_rate(res.decode_tps_total())} total (batch {batch})"
        why = {"eos": "end of sequence", "length": "--max-new-tokens", "context": "the model's context"}[res.stop]
        click.echo(f"prompt {res.prompt_tokens} tokens; {len(res.tokens[0])} new tokens (stopped: {why}); "
                   f"prefill {_rate(res.prefill_tps())} tokens/s; {rates}"
                   + ("" if res.cached else "; no KV cache")
                   + (f"; graph captures {res.capture_s:.1f}s not counted" if res.captures else ""), err=True)
    if as_json:
        doc = {"artifact": str(art.path), "device": device, "prompt": prompt, "prompt_ids": ids,
               "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed}, **res.summary(),
               "tokens": res.tokens, "texts": [completion(tok, ids, t) for t in res.tokens]}
        Path(as_json).write_text(json.dumps(doc, indent=1) + "\n")
