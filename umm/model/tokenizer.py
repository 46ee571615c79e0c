"""Text tokenizer of a model dir: HF ``tokenizers`` plus BAGEL's special ids.

BAGEL frames every text as ``<|im_start|> ids <|im_end|>`` and every image as
``<|vision_start|> ... <|vision_end|>`` (reference/bagel.md §1.4); ``encode`` adds nothing.
A model dir carries ``tokenizer.json`` (Qwen2.5's, or the tiny word-level one) or, like the
reference vectors, only ``special_tokens.json``: then the tokenizer knows the special ids but
cannot encode text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from umm.data.packing import SpecialTokens
from umm.errors import UmmError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
ENDOFTEXT = "<|endoftext|>"
# Order matters only for new vocabularies (the tiny tokenizer): Qwen2.5's relative order.
BAGEL_SPECIALS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END)
UNKNOWN = "<|unk|>"


class TokenizerError(UmmError, ValueError):
    """A model dir's tokenizer files are missing, incomplete or cannot do what was asked."""


class Tokenizer:
    """``encode(text) -> ids`` / ``decode(ids) -> text`` and the special ids the packer needs."""

    def __init__(self, special: SpecialTokens, endoftext: Optional[int], backend=None, source: str = ""):
        self.special = special
        self.endoftext = endoftext
        self.backend = backend  # tokenizers.Tokenizer, or None for special-ids-only dirs
        self.source = source

    @property
    def bos(self) -> int:
        return self.special.bos

    @property
    def eos(self) -> int:
        return self.special.eos

    def __len__(self) -> int:
        return self._require().get_vocab_size(with_added_tokens=True)

    def _require(self):
        if self.backend is None:
            raise TokenizerError(
                f"{self.source} has no tokenizer.json (only special token ids); "
                "give texts as token ids or use a model dir with a tokenizer"
            )
        return self.backend

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without any framing tokens."""
        return self._require().encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._require().decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._require().token_to_id(token)


# Qwen2.5's added tokens that BAGEL uses, at their ids in the released tokenizer (reference/bagel.md §1.4).
QWEN25_SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, VISION_START: 151652, VISION_END: 151653}


def build_byte_level(special_ids: Dict[str, int] = QWEN25_SPECIAL_IDS):
    """A byte-level ``tokenizers.Tokenizer`` (every text encodes, one token per byte) whose special
    tokens sit at the given ids, the rows between filled with reserved tokens: a stand-in for
    Qwen2.5's tokenizer where its files are absent (real-size model dirs with random weights)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i in range(len(vocab), min(special_ids.values())):
        vocab[f"<|reserved_{i}|>"] = i
    tok = HFTokenizer(BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    by_id = sorted(special_ids.items(), key=lambda kv: kv[1])
    filled = len(vocab)
    for token, want in by_id:  # added tokens take the next free ids: reserve the gaps first
        if want < filled:
            raise TokenizerError(f"special token {token} at id {want} collides with an earlier token")
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(filled, want)])
        tok.add_special_tokens([token])
        filled = want + 1
    got = {t: tok.token_to_id(t) for t, _ in by_id}
    if got != dict(by_id):
        raise TokenizerError(f"byte-level tokenizer placed the special tokens at {got}, not {dict(by_id)}")
    return tok


def _special_from_ids(ids: Dict[str, Optional[int]], source: str) -> SpecialTokens:
    missing = [t for t in (IM_START, IM_END, VISION_START, VISION_END) if ids.get(t) is None]
    if missing:
        raise TokenizerError(f"{source} lacks BAGEL's special tokens {missing}; add them to the tokenizer")
    return SpecialTokens(
        bos=int(ids[IM_START]), eos=int(ids[IM_END]),
        vision_start=int(ids[VISION_START]), vision_end=int(ids[VISION_END]),
    )


def from_backend(backend, source: str = "tokenizer") -> Tokenizer:
    """Wrap a ``tokenizers.Tokenizer`` that holds BAGEL's special tokens."""
    ids = {t: backend.token_to_id(t) for t in BAGEL_SPECIALS}
    return Tokenizer(_special_from_ids(ids, source), ids[ENDOFTEXT], backend, source)


def load_tokenizer(model_dir: Union[str, Path]) -> Tokenizer:
    """``tokenizer.json`` if present, else ``special_tokens.json`` (special ids only)."""
    d = Path(model_dir)
    tok_path, special_path = d / "tokenizer.json", d / "special_tokens.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(tok_path))
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise TokenizerError(f"cannot read {tok_path}: {e}") from None
        return from_backend(backend, str(tok_path))
    if special_path.is_file():
        ids = json.loads(special_path.read_text())
        return Tokenizer(_special_from_ids(ids, str(special_path)), ids.get(ENDOFTEXT), None, str(d))
    raise TokenizerError(
        f"model dir {d} has neither tokenizer.json nor special_tokens.json; "
        "copy the tokenizer files of the model into it"
    )


def build_word_level(words: Sequence[str]):
    """A word-level ``tokenizers.Tokenizer`` over ``words`` plus BAGEL's special tokens.

    Lowercases, splits on whitespace, punctuation and single digits; any other word becomes
    ``<|unk|>``. Ids: the words in the given order, then ``<|unk|>``, then the BAGEL specials.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab: Dict[str, int] = {}
    for w in list(words) + [UNKNOWN]:
        if w != w.lower() or not w or any(c.isspace() for c in w):
            raise TokenizerError(f"tiny vocabulary word {w!r} must be lowercase and without spaces")
        vocab.setdefault(w, len(vocab))
    for t in BAGEL_SPECIALS:
        vocab[t] = len(vocab)
    tok = HFTokenizer(WordLevel(vocab, unk_token=UNKNOWN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tok.add_special_tokens(list(BAGEL_SPECIALS) + [UNKNOWN])
    return tok
