import time

# When this process began, near enough: `python -m umm` and every rank's worker import umm before
# anything heavy. The trainer logs the time from here to the end of its first step.
PROCESS_START = time.time()
