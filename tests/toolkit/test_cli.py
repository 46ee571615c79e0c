"""The real CLI in a subprocess: dry-run command lines, and errors that stop before anything runs."""
from pathlib import Path

import pytest
import yaml

from .helpers import PY, commands, files_under, umm


def test_irg_dry_run_prints_each_stage_torchrun_argv(tmp_path):
    r = umm(["pipeline=irg", "torchrun.nproc_per_node=8", "run_name=irg_try1", f"output_root={tmp_path}", "dry_run=true"])
    assert r.returncode == 0, r.stderr
    got = commands(r.stdout)
    expected = [
        [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "8", "--node-rank", "0",
         "--standalone", "--max-restarts", "0", "-m", "umm.train.worker",
         str(tmp_path / "irg_try1" / stage / "resolved.yaml")]
        for stage in ("stage1", "stage2")
    ]
    assert got == expected
    # A dry run writes nothing but the sweep's record of itself (Hydra's, written once every job validated).
    assert files_under(tmp_path) == ["irg_try1/multirun.yaml"]


def test_two_node_rendezvous_dry_run(tmp_path):
    r = umm(["torchrun=multinode", "torchrun.node_rank=1", "torchrun.rdzv_endpoint=node0:29500",
             "run_name=two", f"output_root={tmp_path}", "dry_run=true"])
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout) == [[
        PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "two", "--max-restarts", "0",
        "-m", "umm.train.worker", str(tmp_path / "two" / "resolved.yaml")]]
    assert "resolved.yaml" not in files_under(tmp_path / "two")


def test_slurm_dry_run_shows_sbatch_settings_and_one_torchrun_per_node(tmp_path):
    # Works without hydra-submitit-launcher installed; hosts come from the allocation's node list.
    r = umm(["launcher=slurm", "torchrun=multinode", "launcher.slurm.partition=gpu", "run_name=big",
             f"output_root={tmp_path}", "dry_run=true"], env={"SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert r.returncode == 0, r.stderr
    settings = r.stdout.split("# sbatch settings")[1].split("# node 0")[0]
    for line in ("nodes: 2", "tasks_per_node: 1", "gpus_per_node: 8", "partition: gpu", "name: big"):
        assert line in settings
    argvs = commands(r.stdout)
    assert [a[a.index("--node-rank") + 1] for a in argvs] == ["0", "1"]
    assert all(a[a.index("--rdzv-endpoint") + 1] == "gpu007:29500" for a in argvs)


def test_slurm_without_allocation_or_dry_run_says_how_to_submit(tmp_path):
    r = umm(["launcher=slurm", "torchrun=multinode", f"output_root={tmp_path}"])
    assert r.returncode == 2
    assert "python -m umm -m launcher=slurm" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message, code", [
    (["torchrun.nproc_per_nod=8"],
     "unknown key 'torchrun.nproc_per_nod' (value: '8'). Did you mean 'torchrun.nproc_per_node'? Valid keys of 'torchrun': extra_args, max_restarts, nnodes, node_rank, nproc_per_node,", 2),
    (["+optim.lrr=1e-4"], "unknown key 'optim.lrr' (value: '1e-4'). Did you mean 'optim.lr'?", 2),
    (["+trainn.max_steps=3"], "unknown key 'trainn' (value: '3'). Did you mean 'train'? Valid keys of the root config:", 2),
    (["torchrun.nproc_per_node=eight"], "Value 'eight' of type 'str' could not be converted to Integer\n    full_key: torchrun.nproc_per_node", 1),
    (["model=tinyy"], "Could not find 'model/tinyy'\n\nAvailable options in 'model':\n\tbagel_7b_mot\n\ttiny", 1),
    (["train.precision=fp16"], "train.precision = 'fp16' is not a valid choice. Did you mean 'bf16'? Choose one of: bf16, fp32.", 2),
    (["train.activation_checkpointing=some"], "train.activation_checkpointing = 'some' is not a valid choice. "
     "Choose one of: true or full (recompute every block), every2", 2),
    (["train.master_weights=optimizer", "train.grad_accum=2"],
     "train.master_weights = 'optimizer' (bf16 parameters, fp32 masters in the optimizer) needs train.precision=bf16 "
     "and train.grad_accum=1, here bf16 and 2. Use train.master_weights=auto", 2),
    (["pipeline=recA", "method.think_drop=0.5"], "method.think_drop = 0.5 has no effect with method.recipe=reca "
     "(only unicot reads it): remove it, or pick a method of that recipe.", 2),
])
def test_bad_config_fails_with_a_message_and_writes_nothing(tmp_path, args, message, code):
    r = umm([*args, f"output_root={tmp_path}", "run_name=bad"])
    assert r.returncode == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # not even Hydra's .hydra/ or log


@pytest.mark.parametrize("multirun", [[], ["-m", "optim.lr=1e-5,4e-5"]], ids=["run", "multirun"])
def test_a_run_dir_outside_the_output_root_is_one_line_and_nothing_is_written(tmp_path, multirun):
    out = tmp_path / "out"
    r = umm([*multirun, "run_name=../escape", f"output_root={out}", "dry_run=true"])
    assert r.returncode in (1, 2) and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.endswith("run_name = '../escape' must be a non-empty name without '/' (and not '.' or '..'): "
                         "the run dir is <output_root>/<run_name>.")
    assert list(tmp_path.iterdir()) == []  # neither <out>/../escape nor <out> itself


def test_an_output_root_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # CI runs as root: a file in the way is what no permission bit can override
    r = umm(["train=tiny", f"output_root={blocker}", "run_name=r"])
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        f"umm: error: RunDirWriteError: cannot write the run dir {blocker / 'r'}: Not a directory (set output_root=, "
        "run_name= or run_dir= to a writable place)"]
    r = umm(["train=tiny", f"output_root={tmp_path / 'ok'}", "run_name=r", "dry_run=true"])
    assert r.returncode == 0 and files_under(tmp_path) == ["a-file"]  # a valid dry run writes nothing either


def test_inside_a_slurm_allocation_each_node_runs_its_own_torchrun(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[7-8]"}
    r = umm(["launcher=slurm", "torchrun=multinode", "run_name=n", f"output_root={tmp_path}", "dry_run=true"], env=env)
    assert r.returncode == 0, r.stderr
    (argv,) = commands(r.stdout)
    flags = argv[argv.index("--nnodes"):argv.index("-m", 3)]
    assert flags == ["--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", "gpu7:29500", "--rdzv-id", "4242", "--max-restarts", "0"]
    r = umm(["launcher=slurm", "torchrun=multinode", "torchrun.nnodes=3", f"output_root={tmp_path}", "dry_run=true"], env=env)
    assert r.returncode == 2 and "torchrun.nnodes = 3 but the SLURM allocation has 2 nodes" in r.stderr


def _job_dirs(r) -> list:
    assert r.returncode == 0, r.stderr
    return [Path(argv[-1]).parent for argv in commands(r.stdout)]


def test_sweep_jobs_are_named_from_their_own_overrides(tmp_path):
    out, sweep = f"output_root={tmp_path}", tmp_path / "lr"
    first = _job_dirs(umm(["-m", "train.max_steps=3", "optim.lr=1e-5,4e-5", "run_name=lr", out, "dry_run=true"]))
    assert first == [sweep / "optim.lr=1e-05,train.max_steps=3", sweep / "optim.lr=4e-05,train.max_steps=3"]
    # Values reordered, one added, 1e-5 spelled 0.00001, and keys that name no job (logger, launcher.slurm).
    again = _job_dirs(umm(["-m", "optim.lr=2e-5,4e-5,0.00001", "train.max_steps=3", "logger.tensorboard=false",
                           "launcher.slurm.partition=x", "run_name=lr", out, "dry_run=true"]))
    assert again == [sweep / "optim.lr=2e-05,train.max_steps=3", first[1], first[0]]
    # One file name each: "/" escaped; a long name keeps its start and ends in a hash of the whole.
    long = "x" * 150
    names = [d.name for d in _job_dirs(umm(["-m", f"+launcher.env.P=/data/{long}1,/data/{long}2", "run_name=esc",
                                             out, "dry_run=true"]))]
    assert [len(n) for n in names] == [120, 120] and names[0] != names[1]
    assert all(n.startswith("+launcher.env.P=%2Fdata%2Fxxx") for n in names)


def test_sweep_jobs_that_would_share_a_run_dir_stop_before_any_runs(tmp_path):
    r = umm(["-m", "logger.tensorboard=true,false", "run_name=same", f"output_root={tmp_path}"])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"umm preflight failed, nothing was run: job #0 (logger.tensorboard=True) and job #1 (logger.tensorboard=False) "
        f"would share the run dir {tmp_path / 'same' / 'defaults'}, so one would resume the other's checkpoints; run "
        "them with separate run_names (a job's dir is named from its overrides except run_name, output_root, run_dir, "
        "dry_run, launcher, launcher.slurm.*, logger, logger.*, torchrun.node_rank, torchrun.standalone, "
        "torchrun.rdzv_*, torchrun.max_restarts; pipeline=irg names its dirs by stage only)"]
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("pipeline", ["bagel", "recA", "unicot"])
def test_every_job_of_a_sweep_is_validated_before_the_first_starts(tmp_path, pipeline):
    r = umm(["-m", f"pipeline={pipeline}", "train.device=cpu,gpu", "run_name=dev", f"output_root={tmp_path}"])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "umm preflight failed, nothing was run: job #1 (train.device=gpu): train.device = 'gpu' is not a valid "
        "choice. Did you mean 'cpu'? Choose one of: auto, cpu, cuda."]
    assert files_under(tmp_path) == []  # job 0 did not start


def test_a_slurm_sweep_dry_run_prints_every_job_and_submits_nothing(tmp_path):
    # hydra-submitit-launcher is not installed here: a dry run must not need it, a real run names it.
    args = ["-m", "launcher=slurm", "torchrun=multinode", "optim.lr=1e-5,4e-5", "run_name=big", f"output_root={tmp_path}"]
    r = umm([*args, "dry_run=true"], env={"SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("# sbatch settings") == 2 and r.stdout.splitlines().count("nodes: 2") == 2
    jobs = [sweep for sweep in (tmp_path / "big" / "optim.lr=1e-05,torchrun=multinode",
                                tmp_path / "big" / "optim.lr=4e-05,torchrun=multinode") for _ in range(2)]
    assert [(a[a.index("--node-rank") + 1], Path(a[-1]).parent) for a in commands(r.stdout)] == \
        list(zip(["0", "1", "0", "1"], jobs))
    r = umm(args)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "umm preflight failed, nothing was run: the Hydra launcher hydra_plugins.hydra_submitit_launcher."
        "submitit_launcher.SlurmLauncher is not installed (No module named 'hydra_plugins'). launcher=slurm "
        "needs it: pip install -e .[slurm]"]


def test_dry_run_prints_the_resolved_config_and_external_command(tmp_path):
    r = umm(["launcher=external", "launcher.script=train.py", "launcher.cwd=/opt/x y", "+launcher.args.lr=0.1",
             "+launcher.env.A=1", "run_name=ext", f"output_root={tmp_path}", "dry_run=true"])
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout.split("# command")[0])
    assert printed["launcher"]["args"] == {"lr": 0.1} and printed["run_dir"] == f"{tmp_path}/ext"
    assert r.stdout.splitlines()[-1] == f"cd '/opt/x y' && env A=1 {PY} train.py --lr 0.1"
    assert not (tmp_path / "ext" / "resolved.yaml").exists()
