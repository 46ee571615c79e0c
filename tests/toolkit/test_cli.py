"""The real CLI in a subprocess: dry-run command lines, and errors that stop before anything runs."""
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
    # A dry run writes nothing beyond Hydra's own logs.
    hydra_own = (".hydra/", ".log", "multirun.yaml")
    assert not [f for f in files_under(tmp_path) if not any(h in f for h in hydra_own)]


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
    (["train.master_weights=optimizer", "train.grad_accum=2"],
     "train.master_weights = 'optimizer' (bf16 parameters, fp32 masters in the optimizer) needs train.precision=bf16 "
     "and train.grad_accum=1, here bf16 and 2. Use train.master_weights=auto", 2),
])
def test_bad_config_fails_with_a_message_and_writes_nothing(tmp_path, args, message, code):
    r = umm([*args, f"output_root={tmp_path}", "run_name=bad"])
    assert r.returncode == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not [f for f in files_under(tmp_path) if not (f.startswith("bad/.hydra/") or f == "bad/umm.log")]


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


def test_sweep_jobs_get_their_own_run_dirs(tmp_path):
    r = umm(["-m", "optim.lr=1e-5,4e-5", "run_name=lr", f"output_root={tmp_path}", "dry_run=true"])
    assert r.returncode == 0, r.stderr
    assert [a[-1] for a in commands(r.stdout)] == [str(tmp_path / "lr" / n / "resolved.yaml") for n in ("0", "1")]


def test_dry_run_prints_the_resolved_config_and_external_command(tmp_path):
    r = umm(["launcher=external", "launcher.script=train.py", "launcher.cwd=/opt/x y", "+launcher.args.lr=0.1",
             "+launcher.env.A=1", "run_name=ext", f"output_root={tmp_path}", "dry_run=true"])
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout.split("# command")[0])
    assert printed["launcher"]["args"] == {"lr": 0.1} and printed["run_dir"] == f"{tmp_path}/ext"
    assert r.stdout.splitlines()[-1] == f"cd '/opt/x y' && env A=1 {PY} train.py --lr 0.1"
    assert not (tmp_path / "ext" / "resolved.yaml").exists()
