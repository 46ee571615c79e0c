"""The synthetic generator: deterministic, complete marker, texts within the tiny vocabulary, images
that the project's pixel classifier reads as their captions say."""
import filecmp
import json
import os

import pytest

from umm.data.datasets import Manifest
from umm.data.outdir import NotUmmsError
from umm.data.shapes import classify
from umm.data.synthetic import KINDS, SyntheticSettings, generate, is_complete, words

from .conftest import SMALL


def _texts(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("image", "images", "source", "target", "bytes", "type", "from"):
                yield from _texts(v)


def test_every_word_is_in_the_vocabulary(synthetic_root):
    vocab = set(words())
    for kind in KINDS:
        for line in open(os.path.join(synthetic_root, f"{kind}.jsonl")):
            for text in _texts(json.loads(line)):
                unknown = set(text.replace("<image>", " ").split()) - vocab
                assert not unknown, (kind, text)


def test_generation_is_deterministic_and_a_noop_when_complete(tmp_path, synthetic_root):
    out = str(tmp_path / "again")
    assert generate(out, SMALL) and is_complete(out, SMALL)
    for kind in KINDS:
        assert filecmp.cmp(os.path.join(out, f"{kind}.jsonl"), os.path.join(synthetic_root, f"{kind}.jsonl"),
                           shallow=False)
    assert filecmp.cmp(os.path.join(out, "images/edit/00003_target.png"),
                       os.path.join(synthetic_root, "images/edit/00003_target.png"), shallow=False)
    assert not generate(out, SMALL)
    # A set umm made is rewritten for other settings; a folder of anything else is never touched.
    other = SyntheticSettings(num_t2i=5, num_edit=1, num_interleaved=1, num_vlm=1, num_unicot=1)
    assert generate(out, other) and is_complete(out, other)
    assert len(open(os.path.join(out, "t2i.jsonl")).readlines()) == 5
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(NotUmmsError, match="holds files umm did not make"):
        generate(str(mine), SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"] and os.listdir(mine) == ["notes.txt"]


def test_pictures_match_their_texts(synthetic_root):
    t2i = Manifest("t2i", "t2i", "t2i.jsonl", root=synthetic_root)
    for i in range(24):  # one row per (colour, shape) pair
        f = t2i.read(i).fields
        assert " ".join(classify(f["image"])) == f["caption"][0][2:]
    chain = Manifest("u", "unicot", "unicot.jsonl", root=synthetic_root).read(0).fields
    for step in chain["steps"]:
        assert " ".join(classify(step["image"])) == step["summary"][2:]
    assert chain["prompt"] == chain["steps"][-1]["summary"]
