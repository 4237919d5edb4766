"""Errors whose message is meant for the user: the CLI prints them as one line and exits non-zero.

Exit codes of ``regablate``: 2 for a ``RegablateError`` (or a bad argument); ``EXIT_TIME_LIMIT``
for a fit that saved ``last.ckpt`` and stopped because its job's time limit is near (the Slurm
launcher requeues the job).
"""

EXIT_TIME_LIMIT = 3


class RegablateError(Exception):
    """A user-facing error: bad input, missing file, incompatible checkpoint."""
