"""TinyChat (AWQ W4A16) target; importing it registers the target."""
from . import target  # noqa: F401  (registers "tinychat")
