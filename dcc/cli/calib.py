"""`dcc calib`: calibration data. `dcc calib record PIPELINE_DIR --prompts FILE -o calib.safetensors` runs a local
diffusers pipeline on the prompts (offline) and records its transformer's (or UNet's) inputs at several steps of a
short schedule, for `dcc compile MODEL --calib calib.safetensors`."""
from __future__ import annotations

from pathlib import Path

import click

from .main import _fail, friendly, main


@main.group()
def calib():
    """Calibration data for `dcc compile --calib`."""


@calib.command()
@click.argument("pipeline", type=click.Path())
@click.option("--prompts", type=click.Path(), required=True, help="Text file: one prompt per line.")
@click.option("-o", "--output", "out", type=click.Path(), required=True,
              help="The calibration file to write (safetensors).")
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Denoising steps of the schedule the pipeline runs.")
@click.option("--timesteps", type=click.IntRange(min=1), default=None,
              help="Record at this many of the steps, spread evenly (default: every step).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image height (default: the pipeline's).")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image width (default: the pipeline's).")
@click.option("--max-sequence-length", type=click.IntRange(min=1), default=None,
              help="Text tokens, for pipelines that take it (default: the pipeline's).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="What the pipeline computes in (and the recorded inputs are stored in).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@friendly
def record(pipeline, prompts, out, steps, timesteps, height, width, max_sequence_length, dtype, seed, force):
    """Record the inputs of PIPELINE's transformer (or UNet) on the prompts: every prompt in one batch, at
    --timesteps of --steps steps; each batch row at each recorded step is one sample."""
    import torch
    from ..models.diffusers_record import read_prompts, record as run
    from .main import install_logging
    install_logging()
    o = Path(out)
    if o.exists() and not force:
        _fail(f"{o}: exists (use --force to replace it)")
    calib = run(Path(pipeline), read_prompts(prompts), steps=steps, timesteps=timesteps, height=height, width=width,
                seed=seed, max_sequence_length=max_sequence_length, dtype=getattr(torch, dtype))
    tmp = o.with_name(o.name + ".part")
    calib.save(tmp)
    tmp.replace(o)
    click.echo(f"wrote {o}: {calib.samples} samples of {calib.cls}'s inputs ({', '.join(calib.layout)})", err=True)
