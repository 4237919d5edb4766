"""Lightning callbacks: run-folder bookkeeping and artifact monitors."""

from regablate.callbacks.attention import AttentionMaps
from regablate.callbacks.outliers import OutlierNormMonitor
from regablate.callbacks.run_folder import RunConfig, RunSummary

__all__ = ["AttentionMaps", "OutlierNormMonitor", "RunConfig", "RunSummary"]
