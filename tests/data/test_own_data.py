"""Your own data through ``python -m umm``: a data file anywhere on disk, command-line datasets that
replace the mix, bad datasets stopped before the model loads, and a data.root umm did not make left as
it was."""
import json
from pathlib import Path

import pytest
import yaml

from tests.data.conftest import SMALL, data_config, root_config
from tests.reliability.conftest import finish, start
from tests.train.conftest import build_model_dir
from umm.config.schema import DatasetConfig
from umm.data.loader import check_data
from umm.data.synthetic import generate
from umm.errors import DataConfigError
from umm.methods import get_recipe

QUIET = ["train.num_sample_prompts=0", "logger.tensorboard=false", "logger.progress_bar=false"]


@pytest.fixture(scope="module")
def mydata(tmp_path_factory) -> Path:
    """Files of the user's own: the synthetic rows, written where no config points."""
    root = tmp_path_factory.mktemp("elsewhere") / "mydata"
    generate(str(root), SMALL)
    (root / "empty.jsonl").write_text("")
    return root


def _dry_run_config(stdout: str) -> dict:
    return yaml.safe_load(stdout.split("\n# command")[0])  # the resolved config, before the command


def test_data_file_trains_and_command_line_datasets_replace_the_mix(tmp_path, mydata):
    model = build_model_dir(tmp_path / "model")
    data_file = tmp_path / "configs" / "mine.yaml"
    data_file.parent.mkdir()
    data_file.write_text(f"root: {mydata}\nnum_workers: 2\ndatasets:\n  pictures: {{kind: t2i, path: t2i.jsonl}}\n"
                         "  questions: {kind: vlm, path: vlm.jsonl, weight: 0.5}\n")
    run_dir = tmp_path / "run"
    train = start(["data=files", f"data.file={data_file}", "data.num_workers=0", "train=tiny", f"model.path={model}",
                   f"run_dir={run_dir}", "train.max_steps=2", "train.save_every=2", "train.log_every=1", *QUIET])
    # recA's preset mix is `images`; the command line's datasets replace it.
    dry = start(["pipeline=recA", f"data.root={mydata}", "data.datasets={mine: {kind: images, path: t2i.jsonl}}",
                 f"run_dir={tmp_path / 'dry'}", "dry_run=true"])
    done, dry = finish(train), finish(dry)
    assert done.returncode == 0, done.stdout[-3000:]
    assert [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")] == [1, 2]
    data = yaml.safe_load(open(run_dir / "resolved.yaml"))["data"]
    assert (data["name"], data["root"], data["file"]) == ("mine", str(mydata), str(data_file))
    assert sorted(data["datasets"]) == ["pictures", "questions"] and data["datasets"]["questions"]["weight"] == 0.5
    assert data["synthesize"] is False and data["num_workers"] == 0  # the command line wins over the file
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert _dry_run_config(dry.stdout)["data"]["datasets"] == {"mine": {
        "kind": "images", "path": "t2i.jsonl", "weight": 1.0, "is_mandatory": False, "num_used": None,
        "image_dir": None, "vae_transform": None, "vit_transform": None}}


BAD = {
    "no rows": (["data.datasets={e: {kind: t2i, path: empty.jsonl}}"], "ManifestError: data.datasets.e: ",
                "empty.jsonl (jsonl) has no rows"),
    "kind": (["pipeline=recA", "data.datasets={q: {kind: vlm, path: vlm.jsonl}}"],
             "DataConfigError: data.datasets.q.kind is 'vlm', which recipe 'reca' does not train on",
             "it accepts ['edit', 'images', 't2i']"),
}


def test_bad_datasets_stop_before_the_model_loads(tmp_path, mydata):
    """model.path does not exist: each run must stop at its data, with one line, before the model."""
    procs = {name: start(["data=files", f"data.root={mydata}", *args, "model.path=/nonexistent/model",
                          f"output_root={tmp_path}", f"run_name=r{i}", *QUIET])
             for i, (name, (args, _, _)) in enumerate(BAD.items())}
    for name, proc in procs.items():
        done = finish(proc)
        _, start_of_line, end_of_line = BAD[name]
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (name, done.stdout)
        assert lines[0].startswith(f"umm: error: {start_of_line}") and end_of_line in lines[0], (name, lines[0])


def test_check_data_counts_every_rank_and_worker_and_the_weights(mydata):
    """The launcher's check (the code path above): streams are nodes x ranks x workers; weights; none at all."""
    cfg = root_config(data_config(str(mydata), {"v": {"kind": "vlm", "path": "vlm.jsonl"}}, num_workers=4))
    cfg.torchrun.nnodes, cfg.torchrun.nproc_per_node = 2, 4
    with pytest.raises(DataConfigError, match=r"^data.datasets.v has 24 rows, fewer than the 32 data streams"):
        check_data(cfg, get_recipe(cfg.method))
    cfg.torchrun.nproc_per_node = 3
    check_data(cfg, get_recipe(cfg.method))  # 24 streams: one row each
    cfg.data.datasets["t"] = DatasetConfig(kind="t2i", path="t2i.jsonl", weight=0.0)
    cfg.data.datasets["v"].weight = 0.0
    with pytest.raises(DataConfigError, match=r"weights must be >= 0 with a positive sum; got v=0.0, t=0.0$"):
        check_data(cfg, get_recipe(cfg.method))
    cfg.data.datasets = {}  # data=files with nothing given
    with pytest.raises(DataConfigError, match=r"lists no datasets .*data.datasets=\{name: .* or in a file, data.file="):
        check_data(cfg, get_recipe(cfg.method))


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_data_root_umm_did_not_make_is_never_touched(tmp_path):
    """data.synthesize=true (the presets' default) with data.root at the user's folder: IRG (the sweep's
    preflight) and BAGEL (the launch) stop with one line; the folder, and a sibling named like the old
    temp dir, stay byte-identical."""
    user = tmp_path / "data" / "mine"
    (user / "images").mkdir(parents=True)
    (user / "trajectories.jsonl").write_text('{"parts": []}\n')
    (user / "images" / "0.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "data" / "mine.tmp").mkdir()
    (tmp_path / "data" / "mine.tmp" / "keep.txt").write_text("also mine")
    before = _snapshot(tmp_path / "data")
    common = [f"data.root={user}", "model.path=/nonexistent/model", f"output_root={tmp_path / 'out'}"]
    # The synthetic data options (data.synthesize=true): IRG's per stage, BAGEL's mix.
    irg, bagel = start(["pipeline=irg", "data=${method}", *common]), start(["pipeline=bagel", "data=synthetic", *common])
    expected = (f"data.synthesize=true, but data.root {user} holds files umm did not make (no umm COMPLETE "
                "marker); nothing was changed: point data.root at an empty or new directory, or set "
                "data.synthesize=false to read your own data there")
    for proc, prefix in ((irg, "umm preflight failed, nothing was run: NotUmmsError: stage1: "),
                         (bagel, "umm: error: NotUmmsError: ")):
        done = finish(proc)
        assert done.returncode != 0 and done.stdout.strip().splitlines() == [prefix + expected], done.stdout
    assert _snapshot(tmp_path / "data") == before
