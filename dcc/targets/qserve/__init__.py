"""QServe (W4A8KV4 QoQ, W8A8) target; importing it registers the target."""
from . import target  # noqa: F401  (registers "qserve")
