"""Exceptions that the command line maps to exit codes.

Bad input (a config key, a value, a dataset parameter) raises :class:`ValueError` (exit 2); a run
that started and then failed (divergence, a crash of a worker) raises :class:`RunError` (exit 1).
"""


class RunError(RuntimeError):
    """A run started and failed; what it had finished (checkpoints, metrics) is kept."""
