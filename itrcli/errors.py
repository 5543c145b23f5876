"""Exit codes and the exceptions that carry them.

Every failure a user can cause or meet (bad arguments, a model that cannot be found, a
locked or damaged library, a full disk) is raised as an :class:`ItrError` with a one-line
message; the CLI prints it as ``Error: ...`` on stderr and exits with its code.  Anything
else is a bug and gets a traceback with ``-v``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in the README and man pages."""

    OK = 0  #: success, also when some files could not be read (they are listed)
    ERROR = 1  #: model cannot load, library missing/locked/damaged, database or disk error
    USAGE = 2  #: bad command line or arguments
    INTERRUPTED = 130  #: Ctrl-C / SIGINT; committed work is kept
    TERMINATED = 143  #: SIGTERM (kill, timeout, systemd); stopped like Ctrl-C, committed work kept


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it stops a run the way Ctrl-C does."""


class ItrError(Exception):
    """A failure with a user-facing one-line message and an exit code."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ItrError):
    """Bad arguments that the parser could not catch (empty query, bad date, ...)."""

    exit_code = ExitCode.USAGE


class ModelError(ItrError):
    """The model cannot be found or loaded."""


class LibraryError(ItrError):
    """The library is missing, bound to another model, locked or damaged."""


class LockedError(LibraryError):
    """Another process holds the library's write lock."""
