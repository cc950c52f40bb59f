"""`dcc lora merge`: a LoRA appended to the low-rank branch of a Nunchaku-target artifact, without requantizing
(dcc/targets/nunchaku/lora.py does the work; this is the thin command)."""
from __future__ import annotations

import click

from .main import _fail, friendly, main


@main.group()
def lora():
    """LoRA adapters on compiled artifacts."""


@lora.command("merge")
@click.argument("artifact", type=click.Path())
@click.argument("lora_file", metavar="LORA", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Artifact folder to create.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Multiplies the LoRA (on top of its alpha/rank); folded into the stored factors.")
@click.option("--skip-unmatched", is_flag=True,
              help="Leave out (and list) LoRA modules that dcc did not quantize (outside the blocks, text encoders); "
                   "without it they are an error. LoRAs on 16-bit layers are always an error.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is a dcc artifact (never ARTIFACT itself, the LoRA file or the current "
                   "folder); the old one is swapped out only once the new one is complete.")
@friendly
def merge(artifact, lora_file, out, strength, skip_unmatched, force):
    """Merge LORA (a .safetensors: diffusers/PEFT lora_A/lora_B, kohya lora_down/lora_up, kohya FLUX in BFL naming
    through diffusers' converter) into ARTIFACT (a Nunchaku-target artifact), writing a new artifact.

    Each targeted layer's 16-bit low-rank branch gains the LoRA's ranks after its SVD ranks (scale = strength *
    alpha / rank folded into lora_down); qweight, wscales and smooth are copied byte for byte; LoRA biases add into
    the bias. The manifest records the LoRA file's sha256, the strength and the layers touched."""
    from ..runtime.artifact import load_artifact
    from ..targets.nunchaku.lora import merge_artifact
    from ..targets.nunchaku.lora_keys import LoraError
    try:
        rec = merge_artifact(load_artifact(artifact), lora_file, out, strength=strength, force=force,
                             skip_unmatched=skip_unmatched)
    except LoraError as e:
        _fail(str(e).strip().splitlines()[0])
    layers = rec["layers"]
    ranks = sorted({v["ranks"][1] - v["ranks"][0] for v in layers.values() if v["ranks"]})
    biases = sum(v["bias"] for v in layers.values())
    click.echo(f"merged {rec['file']} ({rec['format']}, strength {rec['strength']:g}) into {len(layers)} layers"
               f" of {artifact}: LoRA rank {', '.join(map(str, ranks)) or '-'} appended to the low-rank branch"
               + (f", {biases} biases changed" if biases else ""), err=True)
    if rec["skipped"]:
        click.echo(f"skipped {len(rec['skipped'])} LoRA modules (--skip-unmatched):", err=True)
        for s in rec["skipped"]:
            click.echo(f"  {s}", err=True)
    click.echo(f"wrote {out}", err=True)
