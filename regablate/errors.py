"""Errors whose message is meant for the user: the CLI prints them as one line and exits non-zero."""


class RegablateError(Exception):
    """A user-facing error: bad input, missing file, incompatible checkpoint."""
