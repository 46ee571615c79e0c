"""Tokenizer of a model dir: word-level tiny tokenizer, special-ids-only reference dir, errors."""
from __future__ import annotations

import json

import pytest

from tests.model.reference import require_reference
from umm.data import synthetic, synthetic_irg
from umm.methods.reca import template_words
from umm.model.tiny import vocabulary
from umm.model.tokenizer import UNKNOWN, TokenizerError, build_word_level, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_word_level(vocabulary()).save(str(d / "tokenizer.json"))
    return load_tokenizer(d)


def test_special_ids_are_bagel_tokens(tok):
    s = tok.special
    names = {s.bos: "<|im_start|>", s.eos: "<|im_end|>", s.vision_start: "<|vision_start|>", s.vision_end: "<|vision_end|>"}
    for i, name in names.items():
        assert tok.token_to_id(name) == i
    assert tok.token_to_id("<|endoftext|>") == tok.endoftext
    assert len(set(names)) == 4


def test_encode_decode(tok):
    ids = tok.encode("A Red circle, 12 again!")
    assert tok.decode(ids) == "a red circle, 1 2 again!"
    assert tok.encode("red") == tok.encode("  RED ")
    # Unknown words become one unknown id; special tokens in text map to their ids, no framing added.
    assert tok.encode("zyzzyva") == [tok.token_to_id(UNKNOWN)]
    assert tok.encode("<|im_start|>red<|im_end|>") == [tok.bos, *tok.encode("red"), tok.eos]
    assert tok.decode([tok.bos, *tok.encode("red"), tok.eos]) == "red"


def test_tiny_vocabulary_covers_every_synthetic_text(tok):
    unk = tok.token_to_id(UNKNOWN)
    words = set(synthetic.words()) | set(synthetic_irg.words()) | set(template_words())
    missing = [w for w in sorted(words) if unk in tok.encode(w)]
    assert not missing


def test_reference_dir_has_special_ids_only():
    t = load_tokenizer(require_reference() / "model")
    assert (t.bos, t.eos, t.special.vision_start, t.special.vision_end, t.endoftext) == (951, 952, 959, 960, 950)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        t.encode("red")


def test_missing_or_incomplete_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor special_tokens.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "special_tokens.json").write_text(json.dumps({"<|im_start|>": 1, "<|im_end|>": 2}))
    with pytest.raises(TokenizerError, match="vision_start"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="lowercase"):
        build_word_level(["Red"])


def test_shaped_model_dir_loads_strictly_with_qwen_special_ids(tmp_path):
    """scripts/make_shaped_model_dir.py (the real-size smoke runs' model dir), at the tiny dims:
    our strict loader takes it, the specials sit at Qwen2.5's ids, any text encodes byte by byte."""
    import subprocess
    import sys
    from pathlib import Path

    from umm.model.io import load_model_dir

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_shaped_model_dir.py"
    out = tmp_path / "shaped"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--model", "tiny", "--device", "cpu"], check=True)
    loaded = load_model_dir(out)
    special = loaded.tokenizer.special
    assert (special.bos, special.eos, special.vision_start, special.vision_end) == (151644, 151645, 151652, 151653)
    assert loaded.tokenizer.endoftext == 151643
    text = "Ein Hund läuft 🐕 über die Wiese"
    ids = loaded.tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert loaded.tokenizer.decode(ids) == text
