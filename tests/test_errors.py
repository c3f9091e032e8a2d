"""runtime.errors.run_command: the one mapping of errors to exit codes that `frcnn` and `export-engine` share."""

from __future__ import annotations

import errno

import pytest
from frcnn.runtime.errors import (
    INTERRUPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    ConfigError,
    run_command,
)


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


@pytest.mark.parametrize(
    "exc, words",
    [
        (ConfigError("config 'x.yaml' is not UTF-8"), "frcnn: error: config 'x.yaml' is not UTF-8"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/model.onnx"),
         "frcnn: error: No space left on device (/out/model.onnx); check that path"),
        (PermissionError(errno.EROFS, "Read-only file system", "/ro/x"), "Read-only file system (/ro/x)"),
        (MemoryError(), "frcnn: error: out of memory"),
    ],
)
def test_bad_state_is_one_line_and_exit_2(exc: BaseException, words: str, capsys) -> None:
    assert run_command("frcnn", _raise(exc)) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_ctrl_c_is_130_and_bugs_propagate(capsys) -> None:
    assert run_command("frcnn", _raise(KeyboardInterrupt())) == INTERRUPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("frcnn: interrupted (Ctrl-C)") and len(err.strip().splitlines()) == 1, err
    assert run_command("frcnn", lambda: None) == 0 and run_command("frcnn", lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        run_command("frcnn", _raise(ZeroDivisionError("a bug")))
