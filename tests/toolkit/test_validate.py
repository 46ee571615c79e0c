"""Command-line keys are checked against the schema before Hydra composes anything."""
import pytest

from umm.config import ConfigError
from umm.config.validate import check_overrides, free_form_paths


def test_valid_overrides_pass():
    check_overrides([
        "-m", "--cfg", "job", "pipeline=irg", "hydra/launcher=basic", "hydra.verbose=true",
        "torchrun.nproc_per_node=8", "++optim.lr=1e-5", "~launcher.args.x",
        "+launcher.args.anything.deep=1", "+data.datasets.new={kind:t2i,path:x.jsonl}",
        "optim.lr=1e-5,4e-5", "run_name=lr_${optim.lr}",
    ])


@pytest.mark.parametrize("arg, match", [
    ("optim.learning_rate=1", r"unknown key 'optim\.learning_rate' \(value: '1'\)\. Valid keys of 'optim': betas,"),
    ("++train.max_step=3", r"Did you mean 'train\.max_steps'\?"),
    ("model.llm.hiden_size=3", r"unknown key 'model\.llm\.hiden_size'.*Did you mean 'model\.llm\.hidden_size'\?"),
    ("runname=x", r"Did you mean 'run_name'\?"),
])
def test_unknown_keys_name_path_value_and_valid_keys(arg, match):
    with pytest.raises(ConfigError, match=match):
        check_overrides([arg])


def test_free_form_paths_are_the_dict_fields():
    assert set(free_form_paths()) == {"data.datasets", "launcher.env", "launcher.args",
                                      "launcher.slurm.additional_parameters", "train.inductor_options"}
