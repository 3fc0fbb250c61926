"""The project's error types and the one error handler every command line uses.

Errors we raise for bad input are ``ValueError`` / ``OSError`` subclasses (``ConfigError``, ``WeightLoadError``,
``FaceAnalysisError``, ``InputError`` …) or :class:`DynamicIDError`. :func:`run_cli` turns them into one line on
stderr, ``error: <message>``, and exit status 1; argparse's usage errors keep their status 2; Ctrl-C exits with
130 (``error: interrupted``). Anything else is a bug and keeps its traceback. ``--debug`` on any command line (or
``DYNAMICID_DEBUG=1`` in the environment) shows the traceback of known errors as well.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

__all__ = ["DynamicIDError", "InputError", "OutputPathError", "ResourceLimitError", "KNOWN_ERRORS", "debug_enabled",
           "format_error", "run_cli", "EXIT_ERROR", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_ERROR = 1  # a known error: bad input, missing file, corrupt data, refused overwrite
EXIT_USAGE = 2  # argparse: unknown / missing / malformed options
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class DynamicIDError(Exception):
    """Base of the project's errors that are not naturally a ``ValueError`` / ``OSError``."""


class InputError(DynamicIDError, ValueError):
    """A parameter or input value outside what is accepted (the message names it and the accepted range)."""


class OutputPathError(DynamicIDError, OSError):
    """An output location that cannot be written (checked before the work starts)."""

    def __str__(self) -> str:  # OSError's own __str__ would format errno fields we do not set
        return str(self.args[0]) if self.args else ""


class ResourceLimitError(InputError):
    """A request above a documented size limit (image pixels, batch size, estimated memory)."""


KNOWN_ERRORS: tuple[type[BaseException], ...] = (DynamicIDError, ValueError, OSError)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("DYNAMICID_DEBUG", "").strip() not in ("", "0", "false", "no")


def format_error(err: BaseException) -> str:
    """One line: the message with newlines folded; ``OSError``s from the OS as ``PATH: reason``."""
    if isinstance(err, OSError) and not isinstance(err, DynamicIDError) and err.strerror:
        if err.filename:
            text = f"{err.filename}: {err.strerror.lower()}"
            if isinstance(err, PermissionError):
                text += " (unreadable or unwritable for this user)"
        else:
            text = err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)`` under the shared error policy (module docstring); returns the exit status.

    ``--debug`` is taken out of ``argv`` before ``main`` sees it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse (2), or a command's own exit
        code = exit_.code
        if isinstance(code, str):  # SystemExit("message"): a known error in the old style
            print(f"error: {' '.join(code.split())}", file=sys.stderr)
            return EXIT_ERROR
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (nothing was written for the unfinished output)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KNOWN_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"error: {format_error(err)}", file=sys.stderr)
        return EXIT_ERROR
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
