"""Errors that reach the user as one clear message (no traceback), and the exit codes every command maps them
to (``run_command``). Torch-free; every package uses these."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (a file, an argument, a config): the message names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint cannot be read, or does not fit the model."""


class ConfigError(UserError):
    """A config file or override is invalid or not supported."""


USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line; ours for any bad input
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's ``body`` and return its exit code (None counts as 0): a ``UserError`` prints one line
    ``<prog>: error: <message>`` to stderr and gives 2, Ctrl-C gives 130 with one line (commands that have
    more to say, such as ``frcnn train``'s resume command, catch it themselves and return 130). An ``OSError`` that no check
    anticipated (a file system turned read-only, a full disk, a path that vanished mid-run) and running out
    of memory are the machine's state, not a bug: one line naming them, exit 2. Anything else propagates
    (exit 1 with its traceback: an internal error)."""
    try:
        return int(body() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}; check that path, its permissions and the free disk "
              "space, then run the command again", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except MemoryError:
        print(f"{prog}: error: out of memory; use smaller inputs (images, --batch) or a machine with more "
              "memory", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); files are written whole or not at all, so nothing half-written "
              "is left", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
