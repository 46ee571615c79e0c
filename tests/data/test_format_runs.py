"""Every upstream data format trains through ``python -m umm``: 3-step runs of the tiny model, with
every dataset mandatory so each batch holds a sample of each format."""
import json

import pytest
from omegaconf import OmegaConf

from tests.data.formats import IRG_MODES, write_formats
from tests.reliability.conftest import finish, start
from tests.train.conftest import build_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats"))


def _datasets(**datasets):
    return {name: {**spec, "is_mandatory": True} for name, spec in datasets.items()}


# UniCoT's recipe plans every row layout (its own and SFT's, IRG's conversations included); recA the
# picture-only formats. Two runs keep the suite fast.
RUNS = {
    "unicot": (["pipeline=unicot", "method.lora.r=4", "method.lora.alpha=8"], _datasets(
        t2i={"kind": "t2i", "path": "bagel/t2i"},
        edit={"kind": "edit", "path": "bagel/edit"},
        vlm={"kind": "vlm", "path": "llava/vlm.jsonl", "image_dir": "llava/images"},
        **{m: {"kind": "interleaved", "path": f"irg/{m}"} for m in IRG_MODES[:2]},
        mdp_t2i={"kind": "mdp_t2i", "path": "unicot/mdp_t2i"},
        mdp_edit={"kind": "mdp_edit", "path": "unicot/mdp_edit"},
        mdp_geo={"kind": "mdp_geo", "path": "unicot/mdp_geo"},
        think={"kind": "vlm", "path": "unicot/vlm_think/think.jsonl", "image_dir": "unicot/vlm_think/images"})),
    "reca": (["pipeline=recA"], _datasets(tar={"kind": "images", "path": "reca/shards"},
                                          folder={"kind": "images", "path": "reca/folder"},
                                          parquet={"kind": "images", "path": "reca/pictures.parquet"})),
}


@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_upstream_formats_train_three_steps(tmp_path, model_dir, formats, recipe):
    overrides, datasets = RUNS[recipe]
    # A data config file of this run's datasets, on the tiny sizes of conf/data_synthetic_common.yaml.
    (tmp_path / "conf" / "data").mkdir(parents=True)
    OmegaConf.save({"defaults": ["/data_synthetic_common@_here_", "_self_"], "name": "formats", "root": str(formats),
                    "synthesize": False, "datasets": datasets}, tmp_path / "conf" / "data" / "formats.yaml")
    run_dir = tmp_path / "run"
    args = ["--config-dir", str(tmp_path / "conf"), *overrides, "data=formats", "train=tiny", f"model.path={model_dir}",
            f"run_dir={run_dir}", "train.max_steps=3", "train.save_every=3", "train.log_every=1",
            "train.num_sample_prompts=0", "logger.tensorboard=false", "logger.progress_bar=false"]
    done = finish(start(args))
    assert done.returncode == 0, done.stdout[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["data/rows_read"] >= 3 * len(datasets)  # every batch has a sample of every dataset
    assert rows[-1]["skipped_samples"] == 0
