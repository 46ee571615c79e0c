"""The batch stream: deterministic, resumable (also with workers), sharded, filled, bad-data policy."""
import dataclasses
import json
import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from umm.config.schema import DataConfig
from umm.data.datasets import DataError
from umm.data.loader import DataSkipLimitError, DataStateError, build_loader
from umm.data.mix import RowOrder
from umm.methods import get_recipe

from .conftest import GEOMETRY, SFT_MIX, data_config, root_config
from .formats import write_formats

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")


def _loader(cfg, tokenizer, rank=0, world_size=1):
    return build_loader(cfg, get_recipe(cfg.method), tokenizer, tokenizer.special, rank=rank,
                        world_size=world_size, geometry=GEOMETRY)


def _same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_same_seed_same_batches(synthetic_root, tokenizer):
    cfg = root_config(data_config(synthetic_root, SFT_MIX))
    a, b = _loader(cfg, tokenizer), _loader(cfg, tokenizer)
    assert all(_same(next(a), next(b)) for _ in range(4))
    cfg.data.seed = 7
    c, d = _loader(cfg, tokenizer), _loader(root_config(data_config(synthetic_root, SFT_MIX)), tokenizer)
    assert not all(_same(next(c), next(d)) for _ in range(2))


def test_one_worker_yields_the_batches_of_none(synthetic_root, tokenizer):
    # The upstream presets load with one worker (as upstream's fine-tuning command): the same stream
    # as in-process loading, so a run's data does not depend on which of the two it used.
    inline, worker = (_loader(root_config(data_config(synthetic_root, SFT_MIX, num_workers=n)), tokenizer)
                      for n in (0, 1))
    try:
        assert all(_same(next(inline), next(worker)) for _ in range(4))
        assert json.dumps(inline.state_dict()["streams"]) == json.dumps(worker.state_dict()["streams"])
    finally:
        worker.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_batches_bound_for_cuda_arrive_pinned_and_unchanged(synthetic_root, tokenizer):
    cfg = root_config(data_config(synthetic_root, SFT_MIX, num_workers=1))
    plain = _loader(cfg, tokenizer)
    pinned = build_loader(cfg, get_recipe(cfg.method), tokenizer, tokenizer.special, geometry=GEOMETRY,
                          pin_memory=True)
    try:
        for _ in range(3):
            a, b = next(plain), next(pinned)
            assert _same(a, b)
            values = [getattr(b, f.name) for f in dataclasses.fields(b)]
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            assert tensors and all(t.is_pinned() for t in tensors)
    finally:
        plain.close(), pinned.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_next_batches(synthetic_root, tokenizer, num_workers):
    cfg = root_config(data_config(synthetic_root, SFT_MIX, num_workers=num_workers, max_buffer_size=2))
    stream = _loader(cfg, tokenizer)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # must survive a JSON round trip
    expected = [next(stream) for _ in range(4)]
    resumed = _loader(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert all(_same(next(resumed), e) for e in expected)
    assert resumed.skip_stats() == stream.skip_stats()


def test_resume_from_a_state_with_a_full_buffer(synthetic_root, tokenizer):
    # Big samples against a tight budget make the overflow buffer hold samples at save time.
    mix = {"interleaved": {"kind": "interleaved", "path": "interleaved.jsonl"},
           "t2i": {"kind": "t2i", "path": "t2i.jsonl"}}
    cfg = root_config(data_config(synthetic_root, mix, expected_num_tokens=120, max_num_tokens=130,
                                  max_num_tokens_per_sample=130, prefer_buffer_before=60, max_buffer_size=3))
    stream = _loader(cfg, tokenizer)
    states = []
    for _ in range(6):
        next(stream)
        states.append(stream.state_dict())
    saved = next(s for s in states if s["streams"][0]["buffer"])
    index = states.index(saved)
    stream = _loader(cfg, tokenizer)
    batches = [next(stream) for _ in range(index + 4)]
    resumed = _loader(cfg, tokenizer)
    resumed.load_state_dict(saved)
    assert all(_same(next(resumed), b) for b in batches[index + 1:])


def test_ranks_read_disjoint_rows(synthetic_root, tokenizer):
    cfg = root_config(data_config(synthetic_root, SFT_MIX))
    seen = []
    for rank in range(2):
        stream = _loader(cfg, tokenizer, rank=rank, world_size=2)
        seen.append({s for _ in range(2) for s in next(stream).sources})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    orders = [RowOrder("t2i", 48, seed=1, stream=s, num_streams=4) for s in range(4)]
    rows = [[o.next()[1] for _ in range(12)] for o in orders]
    assert sorted(r for rs in rows for r in rs) == list(range(48))


def test_more_streams_than_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the 8 data streams"):
        RowOrder("tiny", 5, seed=0, stream=0, num_streams=8)


def _synthetic_data_config(root, name="synthetic"):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base=None):
        composed = compose(config_name=None, overrides=[f"+data={name}", f"data.root={root}"])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), composed.data))


def test_token_budget_fills_at_least_90_percent_on_the_synthetic_mix(synthetic_root, tokenizer):
    data = _synthetic_data_config(synthetic_root)
    cfg = root_config(data)
    stream = _loader(cfg, tokenizer)
    fills = [next(stream).num_tokens / data.expected_num_tokens for _ in range(20)]
    assert min(fills) >= 0.9, fills
    assert max(b for b in fills) <= data.max_num_tokens / data.expected_num_tokens


@pytest.mark.parametrize("name,recipe", [("synthetic_reca", "reca"), ("synthetic_unicot", "unicot")])
def test_method_data_configs_compose_and_load(synthetic_root, tokenizer, name, recipe):
    data = _synthetic_data_config(synthetic_root, name)
    batch = next(_loader(root_config(data, recipe), tokenizer))
    assert batch.num_tokens >= 0.9 * data.expected_num_tokens


# ---- bad data ------------------------------------------------------------------------------

@pytest.fixture
def dirty_root(tmp_path, synthetic_root):
    """t2i rows of the synthetic set with every 4th row broken (missing image)."""
    root = tmp_path / "dirty"
    shutil.copytree(os.path.join(synthetic_root, "images"), root / "images")
    lines = open(os.path.join(synthetic_root, "t2i.jsonl")).read().splitlines()
    for i in range(0, len(lines), 4):
        row = json.loads(lines[i])
        row["image"] = "images/missing.png"
        lines[i] = json.dumps(row)
    (root / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def test_on_error_raise_names_file_and_line(dirty_root, tokenizer):
    cfg = root_config(data_config(dirty_root, {"t2i": {"kind": "t2i", "path": "t2i.jsonl"}}))
    with pytest.raises(DataError, match=r"t2i\.jsonl:\d+: .*image file not found.*on_error=skip"):
        for _ in range(5):
            next(_loader(cfg, tokenizer))


def test_on_error_skip_counts_and_stops_past_the_fraction(dirty_root, tokenizer):
    mix = {"t2i": {"kind": "t2i", "path": "t2i.jsonl"}}
    cfg = root_config(data_config(dirty_root, mix, on_error="skip", max_skip_fraction=0.5))
    stream = _loader(cfg, tokenizer)
    for _ in range(3):
        next(stream)
    stats = stream.skip_stats()
    assert stats["data/rows_skipped"] == stats["data/skipped_missing_image"] > 0
    assert stats["data/rows_skipped"] < stats["data/rows_read"]
    cfg.data.max_skip_fraction = 0.01
    with pytest.raises(DataSkipLimitError, match="max_skip_fraction"):
        stream = _loader(cfg, tokenizer)
        for _ in range(20):
            next(stream)


def test_sample_over_the_token_limit(synthetic_root, tokenizer):
    mix = {"edit": {"kind": "edit", "path": "edit.jsonl"}}
    cfg = root_config(data_config(synthetic_root, mix, max_num_tokens_per_sample=30))
    with pytest.raises(DataError, match="max_num_tokens_per_sample=30") as info:
        next(_loader(cfg, tokenizer))
    assert info.value.reason == "too_long"


def test_config_errors_before_reading(synthetic_root, tokenizer):
    cfg = root_config(data_config(synthetic_root, {"u": {"kind": "unicot", "path": "unicot.jsonl"}}))
    with pytest.raises(ValueError, match="does not train on"):
        _loader(cfg, tokenizer)
    cfg = root_config(data_config(synthetic_root, SFT_MIX))
    cfg.data.vae_transform.stride = 8
    with pytest.raises(ValueError, match="vae_transform.stride is 8"):
        _loader(cfg, tokenizer)


def test_state_of_another_world_size_is_refused(synthetic_root, tokenizer):
    cfg = root_config(data_config(synthetic_root, SFT_MIX))
    stream = _loader(cfg, tokenizer, rank=0, world_size=2)
    next(stream)
    state = stream.state_dict()
    with pytest.raises(DataStateError, match="world_size=2"):
        _loader(cfg, tokenizer).load_state_dict(state)


@pytest.mark.parametrize("size", [(2048, 2048), (6, 6)])
def test_image_far_outside_the_size_limits(tmp_path, tokenizer, size):
    from PIL import Image

    Image.new("RGB", size, (200, 0, 0)).save(tmp_path / "odd.png")
    row = json.dumps({"image": "odd.png", "caption": "a red square"})
    (tmp_path / "t2i.jsonl").write_text((row + "\n") * 4)
    cfg = root_config(data_config(str(tmp_path), {"t2i": {"kind": "t2i", "path": "t2i.jsonl"}}))
    with pytest.raises(DataError, match=r"t2i\.jsonl:\d: .*far outside the VAE size limits") as info:
        next(_loader(cfg, tokenizer))
    assert info.value.reason == "image_size"


def test_bad_row_in_a_worker_keeps_its_error_type(dirty_root, tokenizer):
    cfg = root_config(data_config(dirty_root, {"t2i": {"kind": "t2i", "path": "t2i.jsonl"}}, num_workers=1))
    with pytest.raises(DataError, match=r"t2i\.jsonl:\d+: .*image file not found"):
        for _ in range(5):
            next(_loader(cfg, tokenizer))


def test_row_groups_are_read_whole_by_one_stream():
    blocks = [4, 4, 2]  # row groups of 10 rows
    orders = [RowOrder("pq", 10, seed=3, stream=s, num_streams=2, blocks=blocks) for s in range(2)]
    rows = [[o.next()[1] for _ in range(len(o._epoch_rows()))] for o in orders]
    group = [0] * 4 + [1] * 4 + [2] * 2
    for mine in rows:  # each stream reads whole groups, one after the other
        runs = [group[r] for r in mine]
        assert all(runs.count(g) == blocks[g] for g in set(runs))
        assert runs == sorted(runs, key=runs.index)
    assert sorted(rows[0] + rows[1]) == list(range(10))
    # num_used repeats the rows, whole groups first: 13 rows = groups 4, 4, 2, then 3 of the first.
    assert RowOrder("pq", 13, seed=3, stream=0, num_streams=1, blocks=blocks).blocks == [4, 4, 2, 3]
    with pytest.raises(ValueError, match="3 row groups, fewer than the 4 data streams"):
        RowOrder("pq", 10, seed=3, stream=0, num_streams=4, blocks=blocks)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_upstream_formats_resume(tmp_path, tokenizer, num_workers):
    root = write_formats(tmp_path, rows=8)
    mix = {"t2i": {"kind": "t2i", "path": "bagel/t2i", "weight": 2.0}, "edit": {"kind": "edit", "path": "bagel/edit"},
           "vlm": {"kind": "vlm", "path": "llava/vlm.jsonl", "image_dir": "llava/images"},
           "irg": {"kind": "interleaved", "path": "irg/improving_full_learning"}}
    cfg = root_config(data_config(str(root), mix, num_workers=num_workers, max_buffer_size=2))
    stream = _loader(cfg, tokenizer)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(4)]
    resumed = _loader(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert all(_same(next(resumed), e) for e in expected)
    sources = {s for b in expected for s in b.sources}
    assert any(".parquet:row" in s for s in sources) and any("vlm.jsonl:" in s for s in sources)


@pytest.mark.parametrize("old_reads,new", [([9, 2], 1), ([5], 2), ([1, 14, 0], 2)], ids=["2to1", "1to2", "3to2"])
def test_resplit_on_another_stream_count_reads_every_row_once_per_epoch(synthetic_root, tokenizer, old_reads, new):
    # Streams saved at different places (one already in epoch 1, one never read) go on as `new` streams.
    from umm.data.loader import PlanStream, StreamSpec, resplit_streams

    cfg = root_config(data_config(synthetic_root, SFT_MIX, max_buffer_size=2))
    recipe = get_recipe(cfg.method)
    old = [PlanStream(cfg.data, recipe, tokenizer, StreamSpec(s, len(old_reads))) for s in range(len(old_reads))]
    keys = [s.key for stream, n in zip(old, old_reads) for _ in range(n) for s in stream.next_batch()]
    states = json.loads(json.dumps([stream.state_dict() if n else None for stream, n in zip(old, old_reads)]))
    resumed = [PlanStream(cfg.data, recipe, tokenizer, StreamSpec(s, new)) for s in range(new)]
    for stream, state in zip(resumed, resplit_streams(states, new, resumed[0].source)):
        stream.load_state_dict(json.loads(json.dumps(state)))
    rows = {name: order.num_rows for name, order in resumed[0].source.orders.items()}

    def whole(epoch):
        return all(len({k for k in keys if k[0] == name and k[1] == epoch}) == n for name, n in rows.items())

    for _ in range(200):
        if whole(0) and whole(1):
            break
        keys += [s.key for stream in resumed for s in stream.next_batch()]
    assert whole(0) and whole(1)
    assert len(keys) == len(set(keys)), "a row was read twice within an epoch"
