"""``python -m umm ...`` (same as the ``umm`` console script)."""
from umm.app import main

main()
