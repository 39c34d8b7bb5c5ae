"""Byte-level BPE tokenizer (GPT-2 style) on top of Hugging Face ``tokenizers``.

``ByteLevelBPETokenizer`` turns a vocabulary list and a ranked merge list (as stored in a
llama.cpp GGUF file, ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``) into a
``tokenizers.Tokenizer``: a ``BPE`` model, a ``ByteLevel`` pre-tokenizer (the GPT-2 regex, then
every UTF-8 byte mapped to a printable character) optionally preceded by ``Digits`` (every digit
its own pre-token, SmolLM's llama.cpp pre-tokenizer ``smollm``), and a ``ByteLevel`` decoder.

Why: it replaces a pure-Python BPE loop. The merges run in Rust (faster on text not seen
before), ``encode_batch`` encodes in parallel, and the pre-tokenizer uses Unicode's ``\\p{L}`` /
``\\p{N}`` classes and Rust's numeric test, as the Hugging Face SmolLM2 tokenizer does, where the
Python version approximated them with ``re`` (``[^\\W\\d_]`` / ``\\d``). Ids match the Python
version's (tests/data/smollm2_tokenizer_ids.json) except near the rare Nl / No number characters
(``²``, ``½``, ``Ⅳ``, ``①``), which the digit split now separates like digits. Encoding is plain
text in, ids out: no BOS/EOS is added and special-token strings such as ``<|im_start|>`` in the
text are tokenized as text.

The ``tokenizers`` package is an optional dependency (``pip install 'slimforge[llm]'``); it is
imported when a tokenizer is built, so ``slimforge.models`` imports without it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

__all__ = ["ByteLevelBPETokenizer"]

_INSTALL_HINT = "pip install 'slimforge[llm]'  (or: pip install tokenizers)"


def _import_tokenizers() -> Any:
    """The ``tokenizers`` module, or an ImportError that says how to install it."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            f"ByteLevelBPETokenizer needs the Hugging Face `tokenizers` package: {_INSTALL_HINT}"
        ) from e
    return tokenizers


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the ByteLevel alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte
    order, so e.g. the space 0x20 becomes ``Ġ``. Vocabulary entries are spelled in this alphabet.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ByteLevelBPETokenizer:
    """Byte-level BPE (GPT-2 style) from a vocabulary list and ranked merges.

    ``tokens[i]`` is the ByteLevel spelling of token id ``i``; ``merges[r]`` is ``"left right"``,
    the pair merged at rank ``r`` (lower merges first). ``split_digits=True`` splits every digit
    into its own pre-token before the GPT-2 regex, as SmolLM's tokenizer (llama.cpp
    pre-tokenizer ``smollm``) does; it can be toggled later by assigning ``split_digits``.

    Attributes: ``tokens`` (list), ``vocab`` (token -> id) and ``ranks`` ((left, right) ->
    rank). ``bos_token_id`` / ``eos_token_id`` are
    None unless set (``from_gguf`` reads them); ``encode`` never adds them.

    Raises ValueError on a malformed vocabulary or merge list, and ImportError when the
    ``tokenizers`` package is missing.
    """

    def __init__(self, tokens: list[str], merges: list[str], split_digits: bool = True) -> None:
        tk = _import_tokenizers()
        self.tokens = list(tokens)
        self.vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if not isinstance(t, str) or not t:
                raise ValueError(f"token {i} is {t!r}: tokens must be non-empty strings")
            if t in self.vocab:
                raise ValueError(
                    f"token {t!r} appears twice in the vocabulary (ids {self.vocab[t]} and {i})"
                )
            self.vocab[t] = i
        self.ranks: dict[tuple[str, str], int] = {}
        for r, m in enumerate(merges):
            parts = m.split(" ") if isinstance(m, str) else []
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"merge {r} is {m!r}, not two symbols separated by one space")
            pair = (parts[0], parts[1])
            for sym in (*pair, pair[0] + pair[1]):
                if sym not in self.vocab:
                    raise ValueError(f"merge {r} {m!r}: symbol {sym!r} is not in the vocabulary")
            if pair in self.ranks:
                raise ValueError(f"merge {r} {m!r} repeats merge {self.ranks[pair]}")
            self.ranks[pair] = r
        self.bos_token_id: int | None = None
        self.eos_token_id: int | None = None

        # Bytes with no vocabulary entry: tokenizers' BPE (no unk token) would drop them
        # silently, so encode() rejects text containing them instead.
        enc = _bytes_to_unicode()
        self._byte_dec = {c: b for b, c in enc.items()}
        self._known_bytes = bytes(b for b in range(256) if enc[b] in self.vocab)
        self._has_unknown_bytes = len(self._known_bytes) < 256

        model = tk.models.BPE(
            self.vocab, list(self.ranks), dropout=None, unk_token=None, ignore_merges=False
        )
        self._tk: tokenizers.Tokenizer = tk.Tokenizer(model)
        self._tk.decoder = tk.decoders.ByteLevel()
        self._split_digits = bool(split_digits)
        self._set_pre_tokenizer()

    @classmethod
    def from_gguf(cls, path: str | Path) -> ByteLevelBPETokenizer:
        """The tokenizer stored in a llama.cpp GGUF file (``tokenizer.ggml.*`` metadata).

        Needs ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE). Digits are split when
        ``tokenizer.ggml.pre`` is ``"smollm"``; any other pre-tokenizer name gets the plain GPT-2
        regex. ``bos_token_id`` / ``eos_token_id`` come from the metadata when present.
        """
        from slimforge.quant.formats.gguf import read_gguf

        md = read_gguf(path).metadata
        kind = md.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if not isinstance(md.get(key), list):
                raise ValueError(f"{path}: metadata {key!r} is missing or not an array")
        tok = cls(
            md["tokenizer.ggml.tokens"],
            md["tokenizer.ggml.merges"],
            split_digits=md.get("tokenizer.ggml.pre") == "smollm",
        )
        for attr in ("bos_token_id", "eos_token_id"):
            tid = md.get(f"tokenizer.ggml.{attr}")
            if tid is None:
                continue
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < tok.vocab_size:
                raise ValueError(f"{path}: tokenizer.ggml.{attr} {tid!r} is not a token id")
            setattr(tok, attr, tid)
        return tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``len(tokens)``), special tokens included."""
        return len(self.tokens)

    @property
    def split_digits(self) -> bool:
        """Whether every digit is its own pre-token (SmolLM); assigning rebuilds the pre-tokenizer."""
        return self._split_digits

    @split_digits.setter
    def split_digits(self, value: bool) -> None:
        self._split_digits = bool(value)
        self._set_pre_tokenizer()

    def _set_pre_tokenizer(self) -> None:
        pre = _import_tokenizers().pre_tokenizers
        byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
        if self._split_digits:
            self._tk.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), byte_level])
        else:
            self._tk.pre_tokenizer = byte_level

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokens of ``text`` as plain text (what BPE then merges within)."""
        pieces = self._tk.pre_tokenizer.pre_tokenize_str(text)
        return [bytes(self._byte_dec[c] for c in p).decode("utf-8") for p, _ in pieces]

    def _check_encodable(self, text: str) -> None:
        """TypeError unless ``text`` is a str; ValueError (UnicodeEncodeError for a lone
        surrogate) if it holds a character the vocabulary cannot spell."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        data = text.encode("utf-8")
        # Deleting every known byte leaves only the unknown ones (C speed, no Python loop).
        if self._has_unknown_bytes and data.translate(None, self._known_bytes):
            known = set(self._known_bytes)
            i, ch = next((i, c) for i, c in enumerate(text) if set(c.encode("utf-8")) - known)
            raise ValueError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {i} has a UTF-8 byte with no "
                "entry in the vocabulary, so it cannot be encoded"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added).

        Raises ValueError if ``text`` holds a character whose UTF-8 bytes are not all in the
        vocabulary (SmolLM2, for one, lacks a few control characters such as U+0004).
        """
        self._check_encodable(text)
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, encoded in parallel by the Rust batch encoder.

        ``tokenizers`` disables its thread pool in a process forked after it was used (set
        ``TOKENIZERS_PARALLELISM`` to silence its warning); results are the same either way.
        """
        texts = list(texts)
        for t in texts:
            self._check_encodable(t)
        batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD.

        A token spelled with any character outside the ByteLevel alphabet (never the case in
        SmolLM2) decodes to its spelling as is. Accepts any integers (Python, NumPy, 0-d tensors); raises ValueError on an id outside
        ``[0, vocab_size)`` rather than skipping it as ``tokenizers`` would.
        """
        ids = [operator.index(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= len(self.tokens)):
            k, bad = next((k, i) for k, i in enumerate(ids) if not 0 <= i < len(self.tokens))
            raise ValueError(
                f"token id {bad} at position {k} is out of range [0, {len(self.tokens)})"
            )
        return self._tk.decode(ids, skip_special_tokens=False)
