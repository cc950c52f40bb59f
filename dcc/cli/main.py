"""The `dcc` command: compile, inspect, validate, eval. Thin click wrappers over dcc.api and dcc.runtime; every
failure is one line on stderr naming the file, layer or tensor, and a non-zero exit."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from .. import __version__


def _fail(msg: str, code: int = 2):
    click.echo(f"dcc: error: {msg}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn expected errors into one clear line; --debug (DCC_DEBUG=1) shows the traceback instead."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("DCC_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            known = type(e).__name__ in ("ModelLoadError", "DataError", "LayoutError", "ArtifactError",
                                         "OutputExistsError", "GGUFError", "PassError", "AnalysisError", "ValueError")
            _fail(msg if known else f"{type(e).__name__}: {msg} (set DCC_DEBUG=1 for the traceback)")
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dcc")
def main():
    """dcc: compile Hugging Face models into engine-ready quantized checkpoints.

    \b
    dcc compile MODEL --target tinychat --algo awq -o out/ --calib calib.txt
    dcc inspect out/
    dcc validate out/ --model MODEL
    dcc eval out/ --ppl wiki.test.raw --baseline MODEL
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # dcc never downloads anything


from . import commands  # noqa: E402,F401  (registers the subcommands)
