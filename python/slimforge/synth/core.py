"""Prompting, generation, filtering and writing of a synthetic corpus (see the package doc)."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from slimforge.config import Config

__all__ = [
    "ByteCodec",
    "FilterConfig",
    "SynthConfig",
    "SynthReport",
    "filter_records",
    "generate_records",
    "prompts_from_corpus",
    "prompts_from_templates",
    "repeated_ngram_fraction",
    "synthesize",
    "teacher_perplexities",
]


class Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteCodec:
    """UTF-8 bytes as token ids (the byte-level models of ``slimforge prepare``)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class SynthConfig(Config):
    """Sampling settings: max_new_tokens per document, temperature, top_p, top_k (None: off),
    repetition_penalty, batch_size (prompts generated together), seed (batch ``i`` uses
    ``seed + i``: any batch can be regenerated from its record)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int | None = None
    repetition_penalty: float = 1.1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


@dataclass(frozen=True)
class FilterConfig(Config):
    """The rules, in the order they run: min_chars / max_chars of the generated text (without
    the prompt); max_repeated_ngram: the largest share of word n-grams (``ngram`` words) that
    repeat an earlier n-gram of the same text (degenerate loops); perplexity_band: the teacher's
    own perplexity of the text must lie in ``(low, high)`` (too low: copied or looping; too
    high: noise; None: off); dedup_threshold: near duplicates within the set (Jaccard of word
    5-gram shingles, MinHash + LSH; None: off); against_threshold: near duplicates of the
    training corpus given as ``against`` (None: off)."""

    min_chars: int = 64
    max_chars: int | None = None
    max_repeated_ngram: float = 0.3
    ngram: int = 3
    perplexity_band: tuple[float, float] | None = None
    dedup_threshold: float | None = 0.7
    against_threshold: float | None = 0.7

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")
        if not 0 < self.max_repeated_ngram <= 1:
            raise ValueError(f"max_repeated_ngram must be in (0, 1], got {self.max_repeated_ngram}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.perplexity_band is not None:
            lo, hi = self.perplexity_band
            if not 0 <= lo < hi:
                raise ValueError("perplexity_band must be (low, high) with 0 <= low < high")
            object.__setattr__(self, "perplexity_band", (float(lo), float(hi)))
        for name in ("dedup_threshold", "against_threshold"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1] or None, got {v}")


RULES = ("too_short", "too_long", "repetitive", "perplexity_low", "perplexity_high",
         "near_duplicate", "near_corpus")  # fmt: skip


@dataclass
class SynthReport:
    """What generation produced and what each filter removed (rules in order: a record counts
    under the first rule that removed it)."""

    generated: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    generated_chars: int = 0
    kept_chars: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    path: str | None = None

    @property
    def near_duplicate_rate(self) -> float:
        """Share of the records reaching the dedup rules that were near duplicates."""
        reached = self.generated - sum(
            self.removed[r] for r in RULES if r not in ("near_duplicate", "near_corpus")
        )
        dups = self.removed["near_duplicate"] + self.removed["near_corpus"]
        return dups / reached if reached else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "generated": self.generated, "kept": self.kept, "removed": dict(self.removed),
            "near_duplicate_rate": self.near_duplicate_rate,
            "generated_chars": self.generated_chars, "kept_chars": self.kept_chars,
            "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "path": self.path,
        }  # fmt: skip

    def summary(self) -> str:
        lines = [f"generated {self.generated} documents ({self.generated_chars:,} chars)"]
        if self.seconds:
            lines[0] += f" in {self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s)"
        for rule, n in self.removed.items():
            lines.append(f"  removed {n:5d}  {rule}")
        lines.append(f"kept {self.kept} ({self.kept_chars:,} chars)")
        return "\n".join(lines)


def prompts_from_corpus(
    texts: Sequence[str], n: int, chars: int = 64, seed: int = 0, min_chars: int = 16
) -> list[str]:
    """``n`` prompts: openings of randomly chosen documents (their first ``chars`` characters,
    cut back to a word boundary), without repeats while enough documents are long enough."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool = [t.strip() for t in texts if len(t.strip()) >= min_chars]
    if not pool:
        raise ValueError(f"no document has at least {min_chars} characters")
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    for i in range(n):
        text = pool[order[i % len(order)]]
        cut = text[:chars]
        if len(text) > chars and " " in cut:
            cut = cut[: cut.rfind(" ") + 1]
        out.append(cut)
    return out


def prompts_from_templates(
    templates: Sequence[str], fields: Mapping[str, Sequence[str]], n: int, seed: int = 0
) -> list[str]:
    """``n`` prompts: random templates (``str.format`` fields) filled with random values,
    e.g. ``("A lesson on {topic}:\\n", {"topic": ["tides", "verbs"]})``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not templates:
        raise ValueError("templates is empty")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(list(templates))
        names = re.findall(r"{(\w+)}", t)
        missing = [x for x in names if not fields.get(x)]
        if missing:
            raise ValueError(f"template {t!r} needs values for {missing}")
        out.append(t.format(**{x: rng.choice(list(fields[x])) for x in names}))
    return out


def _model_name(model: nn.Module) -> str:
    return getattr(model, "name_or_path", None) or type(model).__name__


def generate_records(
    teacher: nn.Module,
    prompts: Sequence[str],
    config: SynthConfig | None = None,
    codec: Codec | None = None,
    progress: bool = True,
    teacher_name: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One generated document per prompt, batched: ``(records, stats)``. Each record has
    ``text`` (the continuation, without the prompt), ``prompt``, ``sampling`` (the settings and
    the batch seed) and ``teacher``; stats: ``seconds`` and ``new_tokens``."""
    import time

    from tqdm.auto import tqdm

    c = config or SynthConfig()
    codec = codec or ByteCodec()
    if not prompts:
        raise ValueError("no prompts")
    name = teacher_name or _model_name(teacher)
    sampling = c.to_dict()
    records: list[dict[str, Any]] = []
    start, new_tokens = time.perf_counter(), 0
    was_training = teacher.training
    teacher.eval()
    try:
        for b in tqdm(range(0, len(prompts), c.batch_size), desc="synth", disable=not progress):
            batch = list(prompts[b : b + c.batch_size])
            ids = [codec.encode(p) for p in batch]
            if any(not x for x in ids):
                raise ValueError("an empty prompt: every prompt needs at least one token")
            seed = c.seed + b // c.batch_size
            out = teacher.generate(  # type: ignore[operator]
                ids, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                top_p=c.top_p, top_k=c.top_k, repetition_penalty=c.repetition_penalty,
                seed=seed, return_dict=True,
            )  # fmt: skip
            for row, prompt in enumerate(batch):
                n = int(out.num_new[row])
                new_tokens += n
                text = codec.decode(out.new_tokens[row, :n].tolist())
                records.append({
                    "text": text, "prompt": prompt, "teacher": name,
                    "sampling": {**sampling, "batch_seed": seed},
                })  # fmt: skip
    finally:
        teacher.train(was_training)
    return records, {"seconds": time.perf_counter() - start, "new_tokens": float(new_tokens)}


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier n-gram of it (0 for texts
    with fewer than ``n`` words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


@torch.no_grad()
def teacher_perplexities(
    teacher: nn.Module,
    texts: Sequence[str],
    codec: Codec | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> list[float]:
    """The teacher's perplexity of each text (the first ``max_tokens`` tokens, default the
    model's context; NaN for texts shorter than 2 tokens)."""
    import torch.nn.functional as F

    codec = codec or ByteCodec()
    if max_tokens is None:
        cfg = getattr(teacher, "config", None)
        max_tokens = int(
            getattr(cfg, "max_seq_len", 0) or getattr(cfg, "max_position_embeddings", 0) or 1024
        )
    was_training = teacher.training
    teacher.eval()
    out: list[float] = []
    try:
        encoded = [codec.encode(t)[:max_tokens] for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        result = [math.nan] * len(encoded)
        for b in range(0, len(order), batch_size):
            rows = [i for i in order[b : b + batch_size] if len(encoded[i]) >= 2]
            if not rows:
                continue
            width = max(len(encoded[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = True
            logits = getattr(out_ := teacher(ids), "logits", out_).float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="none",
            ).view(len(rows), -1)  # fmt: skip
            keep = mask[:, 1:].float()
            per = (nll * keep).sum(1) / keep.sum(1)
            for r, i in enumerate(rows):
                result[i] = float(torch.exp(per[r]))
        out = result
    finally:
        teacher.train(was_training)
    return out


def _near_duplicates(texts: Sequence[str], threshold: float) -> np.ndarray:
    from slimforge.dedup import deduplicate

    return ~np.asarray(deduplicate(list(texts), threshold=threshold).keep, dtype=bool)


def _near_corpus(texts: Sequence[str], against: Any, threshold: float) -> np.ndarray:
    from slimforge.dedup import LSHIndex, MinHasher

    hasher = MinHasher()
    if isinstance(against, LSHIndex):
        index = against
    else:
        index = LSHIndex(threshold=threshold, num_perm=hasher.num_perm)
        docs = list(against)
        for s in range(0, len(docs), 4096):
            index.insert(hasher.signatures(docs[s : s + 4096]))
    pairs, _ = index.query_pairs(hasher.signatures(list(texts)))
    hit = np.zeros(len(texts), dtype=bool)
    hit[pairs[:, 0]] = True
    return hit


def filter_records(
    records: Sequence[dict[str, Any]],
    config: FilterConfig | None = None,
    teacher: nn.Module | None = None,
    codec: Codec | None = None,
    against: Any = None,
) -> tuple[list[dict[str, Any]], SynthReport]:
    """Applies the :class:`FilterConfig` rules in order; ``(kept records, report)``. The
    perplexity band needs ``teacher``; ``against`` (texts, or a :class:`slimforge.dedup.LSHIndex`
    of the training corpus) enables the corpus rule. Kept records gain ``perplexity`` when it was
    computed."""
    c = config or FilterConfig()
    report = SynthReport(generated=len(records))
    report.generated_chars = sum(len(r["text"]) for r in records)
    alive = list(range(len(records)))

    def drop(rule: str, bad: Sequence[bool]) -> None:
        nonlocal alive
        report.removed[rule] += int(sum(bad))
        alive = [i for i, b in zip(alive, bad, strict=True) if not b]

    texts = [r["text"] for r in records]
    drop("too_short", [len(texts[i].strip()) < c.min_chars for i in alive])
    if c.max_chars is not None:
        drop("too_long", [len(texts[i]) > c.max_chars for i in alive])
    drop(
        "repetitive",
        [repeated_ngram_fraction(texts[i], c.ngram) > c.max_repeated_ngram for i in alive],
    )
    ppl: dict[int, float] = {}
    if c.perplexity_band is not None and alive:
        if teacher is None:
            raise ValueError("perplexity_band needs the teacher")
        values = teacher_perplexities(teacher, [texts[i] for i in alive], codec)
        ppl = dict(zip(alive, values, strict=True))
        lo, hi = c.perplexity_band
        drop("perplexity_low", [not ppl[i] > lo for i in alive])
        drop("perplexity_high", [ppl[i] >= hi for i in alive])
    if c.dedup_threshold is not None and len(alive) > 1:
        drop("near_duplicate", list(_near_duplicates([texts[i] for i in alive], c.dedup_threshold)))
    if c.against_threshold is not None and against is not None and alive:
        drop(
            "near_corpus",
            list(_near_corpus([texts[i] for i in alive], against, c.against_threshold)),
        )
    kept = []
    for i in alive:
        rec = dict(records[i])
        if i in ppl:
            rec["perplexity"] = ppl[i]
        kept.append(rec)
    report.kept = len(kept)
    report.kept_chars = sum(len(r["text"]) for r in kept)
    return kept, report


def synthesize(
    teacher: nn.Module,
    prompts: Sequence[str],
    out_path: str | os.PathLike[str],
    config: SynthConfig | None = None,
    filters: FilterConfig | None = None,
    codec: Codec | None = None,
    against: Any = None,
    progress: bool = True,
    teacher_name: str | None = None,
) -> SynthReport:
    """Generate one document per prompt, filter, and write the kept records as JSONL to
    ``out_path`` (atomically) with the report beside it (``<out_path>.report.json``)."""
    from slimforge.io import atomic_path

    records, stats = generate_records(teacher, prompts, config, codec, progress, teacher_name)
    kept, report = filter_records(records, filters, teacher, codec, against)
    report.seconds = stats["seconds"]
    report.tokens_per_s = stats["new_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    out = Path(out_path)
    report.path = str(out)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in kept:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    report_path = out.with_name(out.name + ".report.json")
    payload = {**report.to_dict(), "filters": (filters or FilterConfig()).to_dict()}
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return report
