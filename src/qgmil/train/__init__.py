"""Training: one fold's loop (loop.py), its resumable state (state.py), cross-validation runs (run.py)."""
