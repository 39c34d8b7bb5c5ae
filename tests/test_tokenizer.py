"""ByteLevelBPETokenizer on Hugging Face ``tokenizers``: SmolLM2 ids equal the recorded reference
of the former pure-Python implementation, round trips, small hand-built vocabularies, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimforge.models.tokenizer import ByteLevelBPETokenizer, _bytes_to_unicode

pytest.importorskip("tokenizers")

_FIXTURE = Path(__file__).parent / "data" / "smollm2_tokenizer_ids.json"

_ENC = _bytes_to_unicode()
_SP = _ENC[ord(" ")]
_BASE = [_ENC[b] for b in range(256)]
_TOKENS = [*_BASE, "lo", "low", _SP + "l", _SP + "lo", "er", "lower"]
_MERGES = ["l o", "lo w", f"{_SP} l", f"{_SP}l o", "e r", "low er"]


def _samples() -> list[dict]:
    return json.loads(_FIXTURE.read_text(encoding="utf-8"))["samples"]


@pytest.fixture(scope="module")
def smol(smollm2_gguf_path: Path) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer.from_gguf(smollm2_gguf_path)


def _small(split_digits: bool = True) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer(_TOKENS, _MERGES, split_digits=split_digits)


# ---------------------------------------------------------------- SmolLM2 (assets)


@pytest.mark.assets
def test_smollm2_ids_match_recorded_reference(smol: ByteLevelBPETokenizer) -> None:
    """Ids recorded from the pure-Python tokenizer before the switch, reproduced exactly."""
    samples = _samples()
    assert len(samples) >= 12
    assert smol.split_digits  # tokenizer.ggml.pre == "smollm", as when the fixture was recorded
    for s in samples:
        assert smol.encode(s["text"]) == s["ids"], s["name"]
    assert smol.encode_batch([s["text"] for s in samples]) == [s["ids"] for s in samples]


@pytest.mark.assets
def test_smollm2_metadata(smol: ByteLevelBPETokenizer) -> None:
    assert smol.vocab_size == len(smol.tokens) == 49152
    assert (smol.bos_token_id, smol.eos_token_id) == (1, 2)
    assert smol.tokens[1] == "<|im_start|>"
    # No special-token handling: the marker string is tokenized as plain text.
    assert smol.encode("<|im_start|>") != [1]
    assert smol.decode([1, 2]) == "<|im_start|><|im_end|>"


@pytest.mark.assets
def test_smollm2_round_trip_sample(smol: ByteLevelBPETokenizer) -> None:
    for s in _samples():
        assert smol.decode(s["ids"]) == s["text"], s["name"]
        assert smol.decode(smol.encode(s["text"])) == s["text"], s["name"]


# Any code point, mixed with pieces that exercise the GPT-2 regex and the digit split.
_TEXTISH = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(" \t\n\r'sdtlmrev0123456789.,_-!?éü中😀") + ["'ll", "  ", "👨‍👩‍👧"]),
    ),
    max_size=60,
).map("".join)


@pytest.mark.assets
@given(text=_TEXTISH)
def test_smollm2_round_trip_hypothesis(smol: ByteLevelBPETokenizer, text: str) -> None:
    # SmolLM2 has no token for a few bytes (U+0004, U+0006, ...): drop the characters using them.
    known = set(smol._known_bytes)
    text = "".join(c for c in text if set(c.encode("utf-8")) <= known)
    for split in (True, False):
        smol.split_digits = split
        try:
            ids = smol.encode(text)
            assert smol.decode(ids) == text
            assert all(0 <= i < smol.vocab_size for i in ids)
        finally:
            smol.split_digits = True


@pytest.mark.assets
def test_smollm2_rejects_bytes_missing_from_vocab(smol: ByteLevelBPETokenizer) -> None:
    assert smol.encode("a\x1cb") == smol.encode_batch(["a\x1cb"])[0]  # 0x1C is in the vocab
    with pytest.raises(ValueError, match=r"U\+0004\) at position 2"):
        smol.encode("ab\x04c")
    with pytest.raises(ValueError, match=r"U\+0004"):
        smol.encode_batch(["fine", "not\x04fine"])


# ---------------------------------------------------------------- small hand-built vocabulary


def test_small_vocab_merges_and_attributes() -> None:
    tok = _small()
    v = tok.vocab
    assert tok.vocab_size == len(_TOKENS)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    assert tok.ranks[("l", "o")] == 0 and tok.ranks[("low", "er")] == 5
    assert tok.encode("lower") == [v["lower"]]
    assert tok.encode("low lo") == [v["low"], v[_SP], v["lo"]]
    assert tok.encode("") == [] and tok.decode([]) == ""
    texts = ["lower", "low lo", "", "a12 héllo"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(iter(texts)) == tok.encode_batch(texts)
    assert tok.decode(np.array(tok.encode("lower low"))) == "lower low"


def test_small_vocab_split_digits_toggle() -> None:
    tok = _small(split_digits=True)
    assert tok.pretokenize(" 2004") == [" ", "2", "0", "0", "4"]
    tok.split_digits = False
    assert not tok.split_digits
    assert tok.pretokenize(" 2004 ab_c") == [" 2004", " ab", "_", "c"]
    assert tok.encode(" 12") == [tok.vocab[_SP], tok.vocab["1"], tok.vocab["2"]]
    tok.split_digits = True
    assert tok.pretokenize("a12") == ["a", "1", "2"]


def test_small_vocab_unicode_number_classes() -> None:
    # Digits and the GPT-2 regex use Unicode's N (Nd, Nl, No) and L classes, as the Hugging
    # Face SmolLM2 tokenizer does; the former `re` version treated "²" or "Ⅳ" as letters.
    tok = _small(split_digits=True)
    assert tok.pretokenize("x² Ⅳ٣") == ["x", "²", " ", "Ⅳ", "٣"]
    assert _small(split_digits=False).pretokenize("x² Ⅳ٣") == ["x", "²", " Ⅳ٣"]


@given(text=st.text(max_size=80), split=st.booleans())
def test_small_vocab_round_trip_hypothesis(text: str, split: bool) -> None:
    tok = _small(split_digits=split)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_decode_invalid_utf8_is_replaced() -> None:
    tok = _small()
    e_acute = "é".encode()
    assert tok.decode([tok.vocab[_ENC[e_acute[0]]], tok.vocab["a"]]) == "\ufffda"


def test_decode_token_outside_byte_alphabet() -> None:
    tok = ByteLevelBPETokenizer([*_TOKENS, "<|中|>"], _MERGES)
    assert tok.decode([len(_TOKENS), tok.vocab["a"]]) == "<|中|>a"


def test_pickle_round_trip() -> None:
    tok = _small(split_digits=False)
    tok.eos_token_id = 3
    back = pickle.loads(pickle.dumps(tok))
    assert not back.split_digits and back.eos_token_id == 3
    assert back.encode("lower 2004") == tok.encode("lower 2004")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("merges", "match"),
    [
        (["l q"], r"merge 0 'l q': symbol 'lq' is not"),  # both bytes known, "lq" is not
        (["l zz"], r"symbol 'zz' is not in the vocabulary"),
        (["lo"], "not two symbols"),
        (["l  o"], "not two symbols"),
        (["l o w"], "not two symbols"),
        (["l o", "l o"], "merge 1 'l o' repeats merge 0"),
    ],
)
def test_bad_merges(merges: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ByteLevelBPETokenizer(_TOKENS, merges)


def test_bad_tokens() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        ByteLevelBPETokenizer([*_TOKENS, "lo"], _MERGES)
    with pytest.raises(ValueError, match="non-empty strings"):
        ByteLevelBPETokenizer([*_TOKENS, ""], _MERGES)


def test_decode_out_of_range_and_bad_types() -> None:
    tok = _small()
    with pytest.raises(ValueError, match=rf"token id {len(_TOKENS)} at position 1 is out of range"):
        tok.decode([0, len(_TOKENS)])
    with pytest.raises(ValueError, match="token id -1 at position 0"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode([1.0])
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):  # a ValueError
        tok.encode("lone \ud800 surrogate")


def test_byte_missing_from_vocab() -> None:
    tokens = [t for t in _TOKENS if t != _ENC[0xA9]]  # "é" is C3 A9
    tok = ByteLevelBPETokenizer(tokens, _MERGES)
    assert tok.decode(tok.encode("plain ascii 42")) == "plain ascii 42"
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 1"):
        tok.encode("héllo")


def _write_tokenizer_gguf(path: Path, meta: dict) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        if isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_small(tmp_path: Path) -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": _TOKENS,
        "tokenizer.ggml.merges": _MERGES,
        "tokenizer.ggml.bos_token_id": 3,
        "tokenizer.ggml.eos_token_id": 4,
    }
    tok = ByteLevelBPETokenizer.from_gguf(_write_tokenizer_gguf(tmp_path / "a.gguf", meta))
    assert (tok.bos_token_id, tok.eos_token_id, tok.split_digits) == (3, 4, True)
    assert tok.encode("lower") == [tok.vocab["lower"]]
    del meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.eos_token_id"]
    tok = ByteLevelBPETokenizer.from_gguf(_write_tokenizer_gguf(tmp_path / "b.gguf", meta))
    assert (tok.bos_token_id, tok.eos_token_id, tok.split_digits) == (3, None, False)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model is 'llama'; only 'gpt2'"),
        ({"tokenizer.ggml.merges": None}, "'tokenizer.ggml.merges' is missing"),
        ({"tokenizer.ggml.eos_token_id": 10_000}, "eos_token_id 10000 is not a token id"),
        ({"tokenizer.ggml.merges": ["l zz"]}, "'zz' is not in the vocabulary"),
    ],
)
def test_from_gguf_errors(tmp_path: Path, change: dict, match: str) -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": _TOKENS,
        "tokenizer.ggml.merges": _MERGES,
    }
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    path = _write_tokenizer_gguf(tmp_path / "t.gguf", meta)
    with pytest.raises(ValueError, match=match):
        ByteLevelBPETokenizer.from_gguf(path)


def test_missing_tokenizers_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install 'slimforge\[llm\]'"):
        _small()


def test_models_package_imports_without_tokenizers() -> None:
    code = (
        "import sys; sys.modules['tokenizers'] = None\n"
        "import slimforge.models as m\n"
        "try:\n"
        "    m.ByteLevelBPETokenizer(['a'], [])\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR" in out.stdout and "slimforge[llm]" in out.stdout
