"""A training run: its settings and start (train.py), the loop of steps and epochs (loop.py), and
what it leaves and shows: the run directory (rundir.py), checkpoints and weights (checkpoint.py),
progress.jsonl (steplog.py) and the progress line (progress.py)."""
