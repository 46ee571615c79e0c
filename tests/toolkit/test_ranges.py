"""Numbers a run cannot work with are config errors at validation (umm/config/ranges.py), so a dry run
catches them; helper config files are not options of their group."""
import pytest
from hydra.errors import MissingConfigException

from umm.config import ConfigError, validate

from .helpers import compose_root, files_under, umm

# Each case in process (compose + validate, as the app does); the CLI path is checked once below.
BAD = [
    ("train.grad_accum=0", "train.grad_accum = 0 must be >= 1."),
    ("train.max_steps=0", "train.max_steps = 0 must be >= 1."),
    ("train.max_steps=-1", "train.max_steps = -1 must be >= 1."),
    ("method.text_cond_dropout_prob=1.5", "method.text_cond_dropout_prob = 1.5 must be in [0, 1]."),
    ("method.vit_cond_dropout_prob=-3", "method.vit_cond_dropout_prob = -3.0 must be in [0, 1]."),
    ("method.vae_cond_dropout_prob=1.01", "method.vae_cond_dropout_prob = 1.01 must be in [0, 1]."),
    ("method.lora.dropout=2", "method.lora.dropout = 2.0 must be in [0, 1]."),
    ("method.think_drop=-0.1", "method.think_drop = -0.1 must be in [0, 1]."),
    ("optim.min_lr=-1e-7", "optim.min_lr = -1e-07 must be >= 0."),
    ("optim.warmup_steps=-5", "optim.warmup_steps = -5 must be >= 0."),
    ("train.export_every=-1", "train.export_every = -1 must be >= 0."),
    ("data.max_skip_fraction=2", "data.max_skip_fraction = 2.0 must be in [0, 1]."),
    ("data.max_resize_factor=0.5", "data.max_resize_factor = 0.5 must be >= 1."),
    ("data.max_image_pixels=0", "data.max_image_pixels = 0 must be >= 1."),
    ("optim.lr=-1", "optim.lr = -1.0 must be > 0."),
    ("optim.lr=0", "optim.lr = 0.0 must be > 0."),
    ("optim.lr=nan", "optim.lr = nan must be a finite number > 0."),
    ("optim.lr=inf", "optim.lr = inf must be a finite number > 0."),
    ("optim.weight_decay=-1", "optim.weight_decay = -1.0 must be >= 0."),
    ("train.ema_decay=1.5", "train.ema_decay = 1.5 must be in [0, 1]."),
    ("data.datasets.vlm.weight=0", "data.datasets.vlm.weight = 0.0 must be > 0."),
    ("data.datasets.t2i.weight=-2", "data.datasets.t2i.weight = -2.0 must be > 0."),
    ("data.max_num_tokens=500",
     "data.max_num_tokens_per_sample = 512 is more than data.max_num_tokens = 500, the most tokens a batch "
     "holds: raise data.max_num_tokens or lower data.max_num_tokens_per_sample."),
    ("data.expected_num_tokens=2000",
     "data.expected_num_tokens = 2000 is more than data.max_num_tokens = 1152, the most tokens a batch holds: "
     "raise data.max_num_tokens or lower data.expected_num_tokens."),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_a_number_that_cannot_work_is_a_config_error(override, message, clean_umm_env):
    cfg = compose_root(["model=tiny", "data=synthetic", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == message


def test_the_edges_of_each_range_are_accepted(clean_umm_env):
    validate(compose_root(["data=synthetic", "train.max_steps=1", "train.grad_accum=1", "train.ema_decay=1", "optim.weight_decay=0",
                           "method.text_cond_dropout_prob=0", "method.vit_cond_dropout_prob=1",
                           "optim.lr=1e-12", "data.max_num_tokens=1024", "data.expected_num_tokens=1024"]))


@pytest.mark.parametrize("helper", ["synthetic_common", "irg_common"])
def test_helper_files_are_not_options_of_the_data_group(helper, clean_umm_env):
    with pytest.raises(MissingConfigException, match=f"Could not find 'data/{helper}'"):
        compose_root([f"data={helper}"])


def test_a_dry_run_stops_at_a_bad_number_with_one_line_and_writes_nothing(tmp_path):
    r = umm(["train.grad_accum=0", "dry_run=true", "run_name=bad", f"output_root={tmp_path}"])
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == ["umm: config error: train.grad_accum = 0 must be >= 1."]
    assert files_under(tmp_path) == []
    r = umm(["--help"])
    data = next(line for line in r.stdout.splitlines() if line.startswith("data: "))
    assert data == ("data: files, irg_stage1, irg_stage2, synthetic, synthetic_reca, synthetic_unicot, upstream_irg_stage1, "
                    "upstream_irg_stage2, upstream_reca, upstream_sft, upstream_unicot")
