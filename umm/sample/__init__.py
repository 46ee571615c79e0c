"""``umm sample``: images and answers from a run, a checkpoint or a model dir (umm/sample/cli.py)."""
