"""The `dcc` command: compile, inspect, validate, eval. Thin click wrappers over dcc.api and dcc.runtime; every
failure is one line on stderr naming the file, layer or tensor, and a non-zero exit."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys

import click

from .. import __version__


def _fail(msg: str, code: int = 2):
    click.echo(f"dcc: error: {msg}", err=True)
    sys.exit(code)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: the work in progress unwinds (temporary output removed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []   # the termination signals that arrived, whatever became of their exception


def _raise_interrupted(signum, frame):
    # the exception is raised wherever Python code runs next; inside a callback from a C extension (safetensors'
    # tensor read) the extension may turn it into an error of its own, so the signal is also remembered
    _received.append(signum)
    raise Interrupted(signum)


class _EchoHandler(logging.Handler):
    """Library messages (logger "dcc") to stderr through click, so they reach whatever stderr is current (a test
    runner swaps it) -- one line each, no prefixes for info, "warning: " for warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and not msg.startswith(("warning", "note")):
            msg = f"warning: {msg}"
        click.echo(msg, err=True)


def install_logging(verbose: bool = False) -> None:
    """dcc's library code logs through `logging`; the CLI shows INFO and above (DEBUG with -v) on stderr."""
    logger = logging.getLogger("dcc")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the writer's cleanup runs (only possible in the main thread)."""
    import threading
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_interrupted)


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (`dcc passes | head`): stop quietly, as a pipeline's writer does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    sys.exit(128 + signal.SIGPIPE)


KNOWN_ERRORS = ("ModelLoadError", "DataError", "LayoutError", "ArtifactError", "OutputExistsError", "OutputError",
                "ArtifactWriteError", "GGUFError", "PassError", "AnalysisError", "TargetError", "ValueError",
                "GpuMemoryError")


def friendly(fn):
    """Turn expected errors into one clear line; --debug (DCC_DEBUG=1) shows the traceback instead."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            out = fn(*a, **kw)
            sys.stdout.flush()   # a closed pipe shows here, inside the handler, not at interpreter exit
            return out
        except (SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            from ..compiler.launch import stopped_by_launcher
            if stopped_by_launcher():   # a process of a spread compile: the launcher's line names the failure
                sys.exit(128 + signum)
            _fail(f"interrupted ({signal.Signals(signum).name}); stopped cleanly, no output was written",
                  128 + signum)
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            from ..compiler.launch import lost_peer
            if lost_peer(e):   # a process of a spread compile whose peer failed first: the launcher names it
                sys.exit(1)
            if _received:   # a signal whose exception an extension replaced by its own: still an interruption
                _fail(f"interrupted ({signal.Signals(_received[0]).name}); stopped cleanly, no output was written",
                      128 + _received[0])
            if os.environ.get("DCC_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            known = type(e).__name__ in KNOWN_ERRORS
            _fail(msg if known else f"{type(e).__name__}: {msg} (set DCC_DEBUG=1 for the traceback)")
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dcc")
def main():
    """dcc: compile Hugging Face models into engine-ready quantized checkpoints.

    \b
    dcc compile MODEL --algo awq -o out/ --calib calib.txt     (dcc compile --help lists the targets)
    dcc inspect out/
    dcc validate out/ --model MODEL --text wiki.test.raw --max-kl 0.1 --junit validate.xml   (a CI gate)
    dcc eval out/ --ppl wiki.test.raw --baseline MODEL
    dcc generate out/ "Once upon a time" --max-new-tokens 64   (--device cuda: dcc's kernels)
    dcc diff yesterday/ out/ --max-layer-error-increase 0.1    dcc report out/ -o report.html

    \b
    diffusion models (pip install 'dcc[diffusers]'):
    dcc calib record PIPELINE --prompts prompts.txt -o calib.safetensors
    dcc compile PIPELINE --target nunchaku --calib calib.safetensors -o out/
    dcc eval out/ --images prompts.txt --pipeline PIPELINE --out-html report.html
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # dcc never downloads anything
    install_signal_handlers()
    install_logging()


from . import commands  # noqa: E402,F401  (registers the subcommands)
from . import validate  # noqa: E402,F401  (registers `dcc validate`)
from . import lora  # noqa: E402,F401  (registers `dcc lora merge`)
from . import calib  # noqa: E402,F401  (registers `dcc calib`)
from . import diff  # noqa: E402,F401  (registers `dcc diff`)
from . import report  # noqa: E402,F401  (registers `dcc report`)
from . import generate  # noqa: E402,F401  (registers `dcc generate`)
