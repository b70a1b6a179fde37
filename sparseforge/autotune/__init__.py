"""Stage 4 — tune: config spaces, static pruning and the tuning database (a later issue)."""
