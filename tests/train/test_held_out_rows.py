"""The rows the samples show (train.sample_prompts: null) never train: the loader skips exactly those."""
from __future__ import annotations

from umm.data.loader import build_loader
from umm.methods import get_recipe
from umm.model.tokenizer import load_tokenizer
from umm.train.sample_prompts import data_specs, held_out_rows

from .conftest import run_config


def _sources(cfg, tokenizer, held_out, batches):
    stream = build_loader(cfg, get_recipe(cfg.method), tokenizer, tokenizer.special, held_out=held_out)
    # A batch names each sample "<dataset>:<row source>".
    return [s.split(":", 1)[1] for _ in range(batches) for s in next(stream).sources]


def test_sampled_rows_never_appear_in_a_training_batch(model_dir, data_root, tmp_path):
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.num_sample_prompts": 8})
    tokenizer = load_tokenizer(model_dir)
    specs = data_specs(cfg.data, cfg.train.num_sample_prompts)
    shown = {s.source for s in specs}
    assert len(shown) == 8
    # Enough batches for every row of both datasets (48 t2i, 24 vlm rows) to come round at least twice.
    trained = _sources(cfg, tokenizer, held_out_rows(specs), 40)
    everything = _sources(cfg, tokenizer, None, 40)
    assert shown <= set(everything)  # without holding out, the shown rows train
    assert not shown & set(trained)
    assert set(trained) == set(everything) - shown  # every other row still trains
