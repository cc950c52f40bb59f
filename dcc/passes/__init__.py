"""Compiler passes, one per file; each registers under its file name (the recipe and CLI token)."""
import importlib
import pkgutil

_LOADED = False


def load_all() -> None:
    """Import every pass module so that its @register runs."""
    global _LOADED
    if _LOADED:
        return
    for m in pkgutil.iter_modules(__path__):
        if m.name not in ("base",) and not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
    _LOADED = True
