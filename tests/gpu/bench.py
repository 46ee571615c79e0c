"""scripts/bench_train.py as a module, for the GPU tests."""
from tests.scripts import SCRIPTS, load_script

bench_train = load_script("bench_train")
SCRIPT = SCRIPTS / "bench_train.py"
