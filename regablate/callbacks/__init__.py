"""Lightning callbacks: run-folder bookkeeping, artifact monitors, and the save at a job's time limit."""

from regablate.callbacks.attention import AttentionMaps
from regablate.callbacks.outliers import OutlierNormMonitor
from regablate.callbacks.run_folder import RunConfig, RunSummary
from regablate.callbacks.time_limit import TimeLimitCheckpoint

__all__ = ["AttentionMaps", "OutlierNormMonitor", "RunConfig", "RunSummary", "TimeLimitCheckpoint"]
