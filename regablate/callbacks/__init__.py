"""Lightning callbacks: run-folder bookkeeping (and, later, artifact monitors)."""

from regablate.callbacks.run_folder import RunConfig, RunSummary

__all__ = ["RunConfig", "RunSummary"]
