"""A termination signal whose exception a C extension replaced by an error of its own (safetensors reading a tensor
when SIGTERM arrived: "could not determine the shape of object type 'torch.storage.UntypedStorage'") still ends
the command as an interruption (exit 128 + signal, one line), not as a model-loading error."""
import signal

import pytest

from dcc.cli import main as m


def _work_interrupted_inside_an_extension():
    try:
        m._raise_interrupted(signal.SIGTERM, None)
    except m.Interrupted:   # what the extension did with it
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None


def test_swallowed_signal_is_still_an_interruption(monkeypatch, capsys):
    monkeypatch.setattr(m, "_received", [])
    with pytest.raises(SystemExit) as e:
        m.friendly(_work_interrupted_inside_an_extension)()
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == "dcc: error: interrupted (SIGTERM); stopped cleanly, no output was written\n"


def test_an_error_without_a_signal_stays_that_error(monkeypatch, capsys):
    monkeypatch.setattr(m, "_received", [])

    def work():
        raise ValueError("model.safetensors: tensor x cannot be read")
    with pytest.raises(SystemExit) as e:
        m.friendly(work)()
    assert e.value.code == 2
    assert capsys.readouterr().err == "dcc: error: model.safetensors: tensor x cannot be read\n"
