"""Autotuning: config space, static pruning by ahead-of-time compile, timing on a GPU or a
cost model without one, and the persistent tuning database."""
from .db import TuningDatabaseWarning, TuningDB, TuningKey, TuningRecord, default_db_path
from .tuner import Candidate, TuningError, TuningResult, resolve_target, tune

__all__ = ["Candidate", "TuningDB", "TuningDatabaseWarning", "TuningError", "TuningKey", "TuningRecord",
           "TuningResult", "default_db_path", "resolve_target", "tune"]
