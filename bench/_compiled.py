"""The accuracy benchmarks' compile step: `dcc compile` of a model into a temporary folder, timed, and the artifact
loaded from it; the folder (and the artifact's files) are removed when the block ends."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact


@contextmanager
def compiled(model: str, opts: CompileOptions) -> Iterator[tuple[Path, object, float]]:
    """(artifact folder, loaded artifact, compile seconds) of `model` compiled with `opts`, quietly."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        out = compile_model(model, str(Path(d) / "a"), opts, log=lambda m: None)
        secs = time.perf_counter() - t
        yield Path(out), load_artifact(out), secs
