"""Running the `dcc` command in-process for the CLI tests (tests/ is on pytest's pythonpath)."""
from click.testing import CliRunner

from dcc.cli.main import main


def run(*args) -> tuple[int, str]:
    """(exit code, stdout and stderr) of `dcc ARGS...`."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def error_line(text: str) -> str:
    """The one error line (progress and info lines may precede it)."""
    errors = [line for line in text.splitlines() if line.startswith("dcc: error:")]
    assert len(errors) == 1, text
    return errors[0]
