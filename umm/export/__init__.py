"""``umm export``: a run's checkpoint as a BAGEL model dir (umm/export/cli.py)."""
