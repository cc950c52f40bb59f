"""Nunchaku (SVDQuant W4A4 + low-rank branch, research/targets.md 3) target; importing it registers the target."""
from . import target  # noqa: F401  (registers "nunchaku")
