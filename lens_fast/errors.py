"""Errors a user can cause, and how the command line tells them from bugs.

Validation code raises a ``UserError`` subclass with a message that names the bad value
(the CLI flag or config key where there is one) and what was expected. Each subclass
also derives from the built-in exception Python code would expect (``InvalidValue`` is a
``ValueError``, ``MissingFile`` a ``FileNotFoundError``, ...), so library callers can
catch either.

``run_cli`` is the one place that turns exceptions into exit statuses: a ``UserError``
prints one line and exits 2; anything else is a bug in lens_fast and prints its
traceback with a pointer to report it (exit 1), instead of being passed off as the
user's mistake.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable, List


class UserError(Exception):
    """Something the user gave (a value, a file, a folder) is wrong or unusable; the
    message says which and what was expected. The CLI prints it as one line, exit 2."""


class InvalidValue(UserError, ValueError):
    """An option, argument or config value is malformed or out of range."""


class MissingFile(UserError, FileNotFoundError):
    """An input file or folder does not exist (pickle weights where safetensors are
    expected count as missing: lens_fast never reads them)."""


class OutputExists(UserError, FileExistsError):
    """Writing would replace or mix with something already there."""


class CorruptFile(UserError, ValueError):
    """An input file exists but cannot be used: truncated, not the expected format."""


class RunFolderBusy(UserError, RuntimeError):
    """Another process holds the run folder's lock."""


class NoUsableData(UserError, RuntimeError):
    """A data source read on without finding a usable sample."""


class MissingDependency(UserError, ImportError):
    """An optional package that the requested feature needs is not installed; the message
    says which extra to install."""


class StorageError(UserError, OSError):
    """Writing an output failed: disk full, no permission, a file removed underneath."""


def one_line(e: BaseException) -> str:
    """The exception's message with line breaks folded into spaces."""
    text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def storage_error(what: str, e: OSError) -> StorageError:
    """``StorageError("<what>: <e>")`` keeping ``e.errno``."""
    err = StorageError(f"{what}: {one_line(e)}")
    err.errno = e.errno
    return err


def run_cli(prog: str, fn: Callable[[List[str]], int], argv: List[str]) -> int:
    """Run ``fn(argv)``; a ``UserError`` -> one line on stderr and exit status 2, Ctrl-C ->
    130, any other exception -> its traceback, a pointer to report it, and status 1."""
    try:
        return fn(argv)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    except Exception:  # noqa: BLE001 - anything else is a bug: show it, never blame the input
        from importlib.metadata import PackageNotFoundError, version

        try:
            __version__ = version("lens_fast")
        except PackageNotFoundError:
            __version__ = "(not installed)"
        traceback.print_exc()
        print(f"{prog}: internal error: this is a bug in lens_fast {__version__}, not a problem with your input. "
              "Please report it to the lens_fast maintainers with the command line and the traceback above.",
              file=sys.stderr)
        return 1
