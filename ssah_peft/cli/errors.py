"""User errors and bugs: how a command reports a mistake the user can fix, and nothing else.

A mistake the user can fix raises :class:`CLIError`; :func:`run_command` prints it as one line, ``ssah-peft: error:
MESSAGE``, and exits with its status: 2 for options, paths and missing files (as argparse does), 1 for the contents
of an input (a file that is not what it should be, a unit map of another model). Errors of the library
(``ValueError``, ``OSError``, ``SafetensorError``, ...) become user errors only where a command reads the user's
files or checks them against a model (:func:`user_errors`), or loads a model (:func:`loading`), and then name the
file or model; so do errors of the storage (a full disk, a quota: :data:`STORAGE_ERRNOS`) wherever they happen.
Anywhere else an exception is a bug and keeps its traceback. ``SSAH_PEFT_TRACEBACK=1`` shows the traceback of user
errors too.

Its own module because every command and every check raises through it, and it depends on nothing else here.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Union

PathLike = Union[str, os.PathLike]

#: Environment variable that makes user errors show their traceback as well.
TRACEBACK_ENV = "SSAH_PEFT_TRACEBACK"


class CLIError(Exception):
    """A mistake the user can fix; reported as ``ssah-peft: error: MESSAGE`` with exit ``status``, no traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


#: Errors of the storage, not of the program: a write refused by a full disk, a quota, a read-only or size-limited
#: file system. Wherever a command meets one (its own outputs, a Trainer checkpoint, a saved model) it is reported
#: as a user error; ssah-peft's own writes are atomic and name the file (:func:`ssah_peft._files.write_atomic`).
STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)
)


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``args.handler(args)``; a :class:`CLIError`, and an ``OSError`` of the storage (:data:`STORAGE_ERRNOS`),
    exit as argparse does, with ``prog: error: message``."""
    try:
        return int(args.handler(args))
    except (CLIError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in STORAGE_ERRNOS:
            raise
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        status = error.status if isinstance(error, CLIError) else 1
        message = str(error) if isinstance(error, CLIError) else describe_error(error)
        parser.exit(status, f"{parser.prog}: error: {message}\n")


def _reading_errors() -> tuple[type[BaseException], ...]:
    """Errors of reading a file or checking it against a model: user errors inside :func:`user_errors`."""
    from safetensors import SafetensorError

    return (ValueError, TypeError, KeyError, OSError, SafetensorError)


@contextmanager
def user_errors(name: PathLike, *, status: int = 1, also_named: Iterable[PathLike] = ()) -> Iterator[None]:
    """Report the errors of reading ``name`` (a file, folder or model) as a :class:`CLIError` ``name: message``.

    The prefix is left out when the message already names ``name`` or one of ``also_named``.
    """
    try:
        yield
    except CLIError:
        raise
    except _reading_errors() as error:
        text = describe_error(error)
        if not any(str(n) in text for n in (name, *also_named)):
            text = f"{name}: {text}"
        raise CLIError(text, 2 if isinstance(error, FileNotFoundError) else status) from error


@contextmanager
def loading(name: str, option: str = "--model") -> Iterator[None]:
    """Report a model, adapter or judge that cannot be loaded (missing hub repo, no network, broken files, an
    embedded model's package not installed: its ImportError names the install command)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, ImportError, SafetensorError) as error:
        raise CLIError(f"{option} {name} could not be loaded: {describe_error(error)}", 1) from error


def describe_error(error: BaseException) -> str:
    """A one-line description of a reading error, without Python's error codes."""
    from safetensors import SafetensorError

    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename} does not exist"
    if isinstance(error, IsADirectoryError) and error.filename:
        return f"{error.filename} is a folder, not a file"
    if isinstance(error, PermissionError) and error.filename:
        return f"permission denied: {error.filename}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    if isinstance(error, SafetensorError):
        return f"not a readable safetensors file ({error})"
    if isinstance(error, KeyError):
        return f"missing entry {error.args[0]!r}" if error.args else "missing entry"
    return str(error) or type(error).__name__
