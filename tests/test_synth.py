"""slimforge.synth: prompts, generation with provenance, each filter rule, the written set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig
from slimforge.synth import (
    ByteCodec,
    FilterConfig,
    SynthConfig,
    filter_records,
    generate_records,
    prompts_from_corpus,
    prompts_from_templates,
    repeated_ngram_fraction,
    synthesize,
    teacher_perplexities,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven sailors sing of distant tides".split()
)


def _doc(seed: int, n: int = 60) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


@pytest.fixture(scope="module")
def teacher() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(num_layers=1, hidden_size=32, num_heads=2, max_seq_len=128)).eval()


def test_prompts_from_corpus():
    texts = ["short", "A long enough opening line of a document, with several words in it."] * 3
    prompts = prompts_from_corpus(texts, 4, chars=20, seed=1)
    assert len(prompts) == 4
    for p in prompts:
        assert texts[1].startswith(p) and len(p) <= 20 and p.endswith(" ")
    assert prompts == prompts_from_corpus(texts, 4, chars=20, seed=1)
    with pytest.raises(ValueError, match="characters"):
        prompts_from_corpus(["tiny"], 2)
    with pytest.raises(ValueError, match="n must"):
        prompts_from_corpus(texts, 0)


def test_prompts_from_templates():
    fields = {"topic": ["tides", "verbs"], "level": ["easy"]}
    prompts = prompts_from_templates(["On {topic} ({level}):", "Why {topic}?"], fields, 20)
    assert all(
        p in {"On tides (easy):", "On verbs (easy):", "Why tides?", "Why verbs?"} for p in prompts
    )
    assert len(set(prompts)) > 1
    with pytest.raises(ValueError, match="needs values"):
        prompts_from_templates(["{missing}"], fields, 1)


@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=30), st.integers(1, 4))
def test_repeated_ngram_fraction_formula(words, n):
    text = " ".join(words)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    want = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    assert repeated_ngram_fraction(text, n) == pytest.approx(want)


def test_repeated_ngram_fraction_examples():
    assert repeated_ngram_fraction("to be or not to be", 2) == pytest.approx(1 / 5)
    assert repeated_ngram_fraction("la la la la la la", 3) == pytest.approx(3 / 4)
    assert repeated_ngram_fraction("one two", 3) == 0.0


def test_teacher_perplexities_match_evaluate_lm(teacher):
    texts = ["Hello there, friend.", "x", "A second, rather longer text for the teacher to read."]
    ppl = teacher_perplexities(teacher, texts, batch_size=2)
    assert math.isnan(ppl[1])
    for i in (0, 2):
        ids = torch.tensor([list(texts[i].encode())])
        assert ppl[i] == pytest.approx(evaluate_lm(teacher, ids).perplexity, rel=1e-4)


def test_generate_records_provenance_and_greedy(teacher):
    prompts = ["Once upon a time", "The sea", "A"]
    cfg = SynthConfig(max_new_tokens=12, temperature=0.0, batch_size=2, repetition_penalty=1.0)
    records, stats = generate_records(teacher, prompts, cfg, progress=False)
    assert [r["prompt"] for r in records] == prompts and stats["new_tokens"] == 36
    for r in records:
        assert r["teacher"] == "GPT" and r["sampling"]["max_new_tokens"] == 12
        ids = torch.tensor([list(r["prompt"].encode())])
        greedy = teacher.generate(ids, max_new_tokens=12, temperature=0.0)[0, ids.shape[1] :]
        assert r["text"] == ByteCodec().decode(greedy.tolist())
    sampled = SynthConfig(max_new_tokens=8, temperature=1.0, seed=3)
    a, _ = generate_records(teacher, prompts, sampled, progress=False)
    b, _ = generate_records(teacher, prompts, sampled, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_filter_rules_each_remove_what_they_should(teacher):
    corpus = [_doc(100 + i) for i in range(20)]
    good = [_doc(i) for i in range(6)]
    records = [{"text": t} for t in good]
    records.append({"text": "too short"})
    records.append({"text": "la la la " * 30})
    records.append({"text": good[0] + " and"})  # a near copy of a kept record
    records.append({"text": corpus[3]})  # a copy of the training corpus
    kept, report = filter_records(records, FilterConfig(min_chars=20), against=corpus)
    assert [r["text"] for r in kept] == good
    assert report.removed["too_short"] == 1 and report.removed["repetitive"] == 1
    assert report.removed["near_duplicate"] == 1 and report.removed["near_corpus"] == 1
    assert report.generated == 10 and report.kept == 6
    assert report.near_duplicate_rate == pytest.approx(2 / 8)
    # Perplexity band: a band around the middle removes the lowest and highest.
    ppl = teacher_perplexities(teacher, good)
    lo, hi = sorted(ppl)[0], sorted(ppl)[-1]
    kept, report = filter_records(
        [{"text": t} for t in good], FilterConfig(min_chars=0, perplexity_band=(lo, hi)), teacher
    )
    assert report.removed["perplexity_low"] == 1 and report.removed["perplexity_high"] == 1
    assert all(lo < r["perplexity"] < hi for r in kept)
    with pytest.raises(ValueError, match="teacher"):
        filter_records(records, FilterConfig(perplexity_band=(1, 2)))


def test_synthesize_writes_jsonl_and_report(tmp_path, teacher):
    out = tmp_path / "synth.jsonl"
    prompts = prompts_from_corpus([_doc(i) for i in range(8)], 6, chars=30)
    report = synthesize(
        teacher, prompts, out, SynthConfig(max_new_tokens=40, batch_size=3),
        FilterConfig(min_chars=5, max_repeated_ngram=1.0), progress=False,
    )  # fmt: skip
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == report.kept and report.generated == 6
    assert all({"text", "prompt", "teacher", "sampling"} <= set(r) for r in lines)
    saved = json.loads((tmp_path / "synth.jsonl.report.json").read_text())
    assert saved["kept"] == report.kept and saved["filters"]["min_chars"] == 5
    assert report.tokens_per_s > 0
    assert not list(tmp_path.glob(".*tmp"))


def test_config_errors():
    for bad in ({"max_new_tokens": 0}, {"top_p": 0}, {"top_k": 0}, {"batch_size": 0},
                {"temperature": -1}, {"repetition_penalty": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            SynthConfig(**bad)
    for bad in ({"min_chars": -1}, {"max_chars": 1, "min_chars": 5}, {"max_repeated_ngram": 0},
                {"perplexity_band": (5, 2)}, {"dedup_threshold": 1.5}, {"ngram": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            FilterConfig(**bad)
