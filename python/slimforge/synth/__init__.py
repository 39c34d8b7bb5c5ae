"""Synthetic "textbook" data: a teacher writes, the filters keep what is worth training on.

    from slimforge.synth import SynthConfig, FilterConfig, prompts_from_corpus, synthesize

    prompts = prompts_from_corpus(texts, n=200)
    report = synthesize(teacher, prompts, "synth.jsonl", SynthConfig(max_new_tokens=256),
                        FilterConfig(), against=texts)
    print(report.summary())

Generation runs through the KV-cache generator (batched, ragged prompts); the filters are
length and repetition rules, a teacher-perplexity band, and near duplicates (within the set and
against a training corpus) found by :mod:`slimforge.dedup`. Each kept record carries its
provenance (prompt, sampling settings, seed, teacher) and the report says how many each rule
removed.
"""

from slimforge._optional import require

require("torch", "slimforge.synth")

from slimforge.synth.core import (
    ByteCodec,
    FilterConfig,
    SynthConfig,
    SynthReport,
    filter_records,
    generate_records,
    prompts_from_corpus,
    prompts_from_templates,
    repeated_ngram_fraction,
    synthesize,
    teacher_perplexities,
)

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
