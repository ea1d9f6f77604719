"""Errors a user can act on. The CLI prints their message (no traceback) and exits with `exit_code`."""


class RecsError(Exception):
    """Base of every error whose message is meant for the user."""

    exit_code = 1


class InputError(RecsError):
    """An input cannot be used at all: missing file, unreadable format, absent column.

    The message names the file, column or config key and what was expected.
    """

    exit_code = 2


class StorageError(RecsError):
    """A file could not be written (a full disk, no permission, a read-only or failing device). The
    message names the path; nothing half-written is left under the real name. Exit code 1."""


class BadDataError(RecsError):
    """Too many rows of a source were quarantined: the run stops before publishing. Exit code 1."""
