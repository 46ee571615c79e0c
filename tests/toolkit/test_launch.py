"""Real launches through the CLI: torchrun with 2 CPU processes (gloo), in-process, external script."""
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.train.conftest import SMALL
from umm.data.synthetic import generate
from umm.launch.external import build_args
from umm.launch.slurm import expand_nodelist

from .helpers import REPO, umm

ENTRY = {"UMM_TRAIN_ENTRY": "tests.toolkit.dist_train:train"}
SCRIPTS = REPO / "tests" / "toolkit" / "scripts"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic set: the launcher checks the data before any process starts."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(str(root), SMALL)
    return ["data=synthetic", f"data.root={root}", "data.synthesize=false"]


def test_torchrun_two_cpu_ranks_read_the_same_resolved_config(tmp_path, data):
    r = umm(["torchrun.nproc_per_node=2", "train.device=cpu", "run_name=ddp", f"output_root={tmp_path}", *data],
            env=ENTRY)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "ddp"
    sha = hashlib.sha256((run / "resolved.yaml").read_bytes()).hexdigest()
    ranks = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [(x["rank"], x["world_size"], x["config_sha256"]) for x in ranks] == [(0, 2, sha), (1, 2, sha)]
    assert all(json.loads((run / f"trained_rank{i}.json").read_text())["all_reduce"] == 2 for i in range(2))
    log = (run / "train.log").read_text()
    assert "rank 1: all_reduce=2" in log and "rank 1: all_reduce=2" in r.stdout


def test_a_failing_rank_fails_the_app_with_its_exit_code_and_log(tmp_path, data):
    r = umm(["torchrun.nproc_per_node=2", "run_name=bad", f"output_root={tmp_path}", *data],
            env={**ENTRY, "UMM_TEST_FAIL_RANK": "1"})
    log = tmp_path / "bad" / "train.log"
    assert r.returncode == 1
    assert f"umm: torchrun exited with code 1; its output is in {log}" in r.stderr
    assert "Traceback" not in r.stderr
    assert "rank 1 failing on purpose" in log.read_text()


def test_one_process_runs_in_process(tmp_path, data):
    r = umm(["run_name=one", f"output_root={tmp_path}", *data], env=ENTRY)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "one" / "trained_rank0.json").read_text())["world"] == 1
    assert not (tmp_path / "one" / "train.log").exists()  # no child process


def test_external_script_gets_flags_env_cwd_and_its_exit_code_propagates(tmp_path):
    record = tmp_path / "record.json"
    r = umm(["launcher=external", f"launcher.cwd={SCRIPTS}", "launcher.script=record_args.py", "run_name=ext",
             f"output_root={tmp_path}", f"+launcher.env.RECORD_TO={record}", "+launcher.env.GREETING=hi there",
             "+launcher.args.lr=1e-5", "+launcher.args.use_ema=true", "+launcher.args.tags=[a,b]",
             "+launcher.args.resume_from=null", "+launcher.args.exit_code=7"])
    assert r.returncode == 7
    assert "umm: python record_args.py exited with code 7" in r.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == ["--lr", "1e-05", "--use_ema", "True", "--tags", "a", "--tags", "b", "--exit_code", "7"]
    assert (got["cwd"], got["greeting"]) == (str(SCRIPTS), "hi there")


def test_sigterm_reaches_the_child(tmp_path):
    mark = tmp_path / "mark"
    cmd = [sys.executable, "-m", "umm", "launcher=external", "launcher.entrypoint=bash",
           f"launcher.script={SCRIPTS / 'wait_for_term.sh'}", f"+launcher.env.MARK={mark}",
           "run_name=sig", f"output_root={tmp_path}"]
    app = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "sig" / "train.log"
    deadline = time.time() + 60
    while not (log.exists() and "ready" in log.read_text()):
        assert time.time() < deadline and app.poll() is None, app.communicate()
        time.sleep(0.1)
    app.send_signal(signal.SIGTERM)
    _, err = app.communicate(timeout=60)
    assert mark.read_text().strip() == "term"
    assert app.returncode == 143 and "exited with code 143" in err


def test_build_args_follows_the_seed():
    assert build_args({"a": 1, "b": False, "c": [1, True], "d": None, "e": "x y"}) == [
        "--a", "1", "--b", "False", "--c", "1", "--c", "True", "--e", "x y"]


def test_expand_nodelist():
    assert expand_nodelist("gpu[001-003,010],cpu7,n[8-9]x") == ["gpu001", "gpu002", "gpu003", "gpu010", "cpu7", "n8x", "n9x"]
