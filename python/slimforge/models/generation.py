"""Generation with a key/value cache for the library's causal LMs.

`generate(model, input_ids, ...)` continues a batch of prompts of different lengths. Models that
implement the cached-LM methods (`GPT`, `GPT` with MoE layers, `LlamaForCausalLM`):

    cache = model.make_cache(batch, capacity)            # a preallocated KVCache
    plan = model.decode_plan()                           # fused projections for decode steps
    logits = model.forward_cached(tokens, cache, cu_seqlens)        # prefill: packed prompts
    logits = model.forward_cached(next_tokens, cache, plan=plan)    # decode: one token each

run the prompts once through the tiled attention kernel (packed, so padding costs nothing and a
sequence never sees another's tokens), then one token per step with `decode_attention` against
the cache. Every sequence is stored from position 0 whatever its padding, so a padded batch
gives each row what that prompt alone gives. Other models (anything following the causal-LM
protocol) run the same loop by recomputing the whole sequence at every step.

Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a
draw; ``temperature=0`` is greedy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimforge import _native

__all__ = ["GenerationOutput", "KVCache", "fuse_projections", "generate"]


class KVCache:
    """Preallocated keys and values of every layer of a batch.

    ``k``, ``v``: ``(num_layers, batch, num_kv_heads, capacity, head_dim)``; ``lengths``:
    ``(batch,)`` int64, tokens stored per sequence (position ``p`` of a sequence holds its
    ``p``-th token); ``rope``: the rotary tables ``(cos, sin)`` of every position, each
    ``(capacity, head_dim // 2)`` float32, or None for a model without rotary embeddings.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_theta: float | None = None,
    ) -> None:
        if min(num_layers, batch, num_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(
                "KVCache sizes must be positive, got "
                f"layers={num_layers} batch={batch} kv_heads={num_kv_heads} "
                f"head_dim={head_dim} capacity={capacity}"
            )
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.rope: tuple[Tensor, Tensor] | None = None
        if rope_theta is not None:
            from slimforge.attention import rotary_cos_sin

            pos = torch.arange(capacity, device=device)
            cos, sin = rotary_cos_sin(pos, head_dim, rope_theta)
            self.rope = (cos[:, 0].contiguous(), sin[:, 0].contiguous())
        self.scale = head_dim**-0.5
        # NumPy views for the Rust decode kernel (they share the buffers): no per-step setup.
        self._native = dtype == torch.float32 and torch.device(device).type == "cpu"
        if self._native:
            self._np = (
                [t.numpy() for t in self.k],
                [t.numpy() for t in self.v],
                self.lengths.numpy(),
                None if self.rope is None else tuple(t.numpy() for t in self.rope),
            )

    def attend(self, layer: int, qkv: Tensor, num_heads: int, rotary: bool = True) -> Tensor:
        """`decode_attention` of one layer's new tokens ``qkv (batch, (heads_q + 2 heads_kv) *
        head_dim)``: appends their k/v at ``lengths`` (not advanced) and returns
        ``(batch, heads_q * head_dim)``; ``rotary=False`` skips the rotary embedding."""
        rope = self.rope if rotary else None
        if self._native and qkv.dtype == torch.float32 and qkv.is_cpu:
            k, v, lengths, tables = self._np
            cos, sin = tables if (rotary and tables is not None) else (None, None)
            out = _native.attention_decode_step(
                qkv.detach().contiguous().numpy(), k[layer], v[layer], lengths, num_heads,
                cos, sin, self.scale,
            )  # fmt: skip
            return torch.from_numpy(out)
        from slimforge.attention import decode_attention

        return decode_attention(qkv, self.k[layer], self.v[layer], self.lengths, num_heads, rope)

    @property
    def capacity(self) -> int:
        return int(self.k.shape[3])

    @property
    def batch(self) -> int:
        return int(self.k.shape[1])

    def reset(self) -> None:
        """Forget every sequence (the buffers are kept)."""
        self.lengths.zero_()

    def write_prefill(self, layer: int, k: Tensor, v: Tensor, seq: Tensor, pos: Tensor) -> None:
        """Store packed keys/values ``(tokens, kv_heads, head_dim)`` of sequence ``seq[i]`` at
        position ``pos[i]``."""
        self.k[layer][seq, :, pos] = k.to(self.k.dtype)
        self.v[layer][seq, :, pos] = v.to(self.v.dtype)


def packed_positions(cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sequence index, position within it, lengths)`` of every token of a pack given its
    int32 offsets ``(batch + 1,)``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    starts = cu_seqlens[:-1].long()[seq]
    return seq, torch.arange(total) - starts, lengths


def fuse_projections(modules: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    """One callable for several projections of one input: ``x -> cat([m(x) for m], -1)``.

    Plain ``nn.Linear``s become one ``F.linear`` on their stacked weights, and quantized
    linears one fused kernel call (`slimforge.quant.linear.fuse_quant_linears`); anything else
    (adapters, mixed kinds) is called one by one. The stacked copies are taken now: build it
    again after the weights change.
    """
    mods = list(modules)
    if all(type(m) is nn.Linear for m in mods):
        lin: list[nn.Linear] = mods  # type: ignore[assignment]
        dev = {(m.weight.dtype, m.weight.device) for m in lin}
        if len(dev) == 1 and len({m.in_features for m in lin}) == 1:
            weight = torch.cat([m.weight.detach() for m in lin])
            bias = None
            if any(m.bias is not None for m in lin):
                bias = torch.cat(
                    [
                        m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                        for m in lin
                    ]
                )
            return functools.partial(F.linear, weight=weight, bias=bias)
    from slimforge.quant.linear import fuse_quant_linears

    fused = fuse_quant_linears(mods)
    if fused is not None:
        return fused
    if len(mods) == 1:
        return mods[0]
    return lambda x: torch.cat([m(x) for m in mods], dim=-1)


class GenerationOutput(NamedTuple):
    """``sequences (batch, prompt width + max_new_tokens)``: each row's left padding, prompt,
    new tokens, then ``pad_token_id``; ``new_tokens (batch, max_new_tokens)`` (``pad_token_id``
    after a row stopped); ``num_new (batch,)`` tokens generated per row (a stop sequence
    included); ``logits (batch, steps, vocab)`` float32, the model's logits before sampling at
    each step, when asked for (else None)."""

    sequences: Tensor
    new_tokens: Tensor
    num_new: Tensor
    logits: Tensor | None = None


def _prompts(
    input_ids: Tensor | Sequence[Sequence[int]] | Sequence[int],
    attention_mask: Tensor | None,
) -> tuple[list[Tensor], list[int], int, torch.device]:
    """(real tokens of each row, left padding of each row, prompt width, device)."""
    if isinstance(input_ids, Tensor):
        from slimforge.models.protocol import check_input_ids

        check_input_ids(input_ids)
        ids = input_ids.long()
        b, t = ids.shape
        if attention_mask is None:
            return list(ids), [0] * b, t, ids.device
        if attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=ids.device, dtype=torch.bool)
        rows, lefts = [], []
        for i in range(b):
            where = mask[i].nonzero().flatten()
            n = where.numel()
            if n == 0:
                raise ValueError(f"row {i} of attention_mask is all padding: nothing to continue")
            left = int(where[0])
            if int(where[-1]) - left + 1 != n:
                raise ValueError(
                    f"row {i} of attention_mask has padding between tokens; pad on the left or "
                    "the right only"
                )
            rows.append(ids[i, left : left + n])
            lefts.append(left)
        return rows, lefts, t, ids.device
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a tensor of input_ids, not with lists")
    seqs = list(input_ids)
    if seqs and not isinstance(seqs[0], (Sequence, Tensor)):
        seqs = [seqs]  # one prompt as a list of ids
    if not seqs:
        raise ValueError("no prompts given")
    rows = [torch.as_tensor(list(s) if not isinstance(s, Tensor) else s).long() for s in seqs]
    for i, r in enumerate(rows):
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty sequence of ids")
    width = max(r.numel() for r in rows)
    return rows, [width - r.numel() for r in rows], width, torch.device("cpu")


def _stop_sequences(stop: int | Sequence[int | Sequence[int]] | None) -> list[tuple[int, ...]]:
    if stop is None:
        return []
    if isinstance(stop, int):
        return [(int(stop),)]
    out = []
    for s in stop:
        seq = (int(s),) if isinstance(s, int) else tuple(int(x) for x in s)
        if not seq:
            raise ValueError("a stop sequence must hold at least one id")
        out.append(seq)
    return out


def _check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    repetition_penalty: float,
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (temperature >= 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if not (repetition_penalty > 0 and repetition_penalty < float("inf")):
        raise ValueError(f"repetition_penalty must be finite and > 0, got {repetition_penalty}")


def _next_tokens(
    logits: Tensor,
    seen: Tensor | None,
    temperature: float,
    top_p: float,
    top_k: int | None,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> Tensor:
    """(batch,) next ids from float logits (batch, vocab)."""
    if seen is not None:
        penalized = torch.where(
            logits < 0, logits * repetition_penalty, logits / repetition_penalty
        )
        logits = torch.where(seen, penalized, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (p.cumsum(dim=-1) - p) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _max_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_seq_len", None)
    return int(n) if n is not None else None


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor | Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    stop: int | Sequence[int | Sequence[int]] | None = None,
    seed: int | None = None,
    *,
    attention_mask: Tensor | None = None,
    pad_token_id: int = 0,
    streamer: Callable[[Tensor], Any] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_dict: bool = False,
    output_logits: bool = False,
) -> Tensor | GenerationOutput:
    """Continue a batch of prompts by up to ``max_new_tokens`` tokens each.

    Args:
        model: a causal LM of the protocol (``model(ids).logits``); with ``make_cache`` /
            ``forward_cached`` (GPT, MoE GPT, Llama) it runs with a key/value cache.
        input_ids: ``(batch, seqlen)`` int64 with ``attention_mask`` ``(batch, seqlen)`` (1 for
            tokens, 0 for padding on the left or the right of each row), or a list of id lists
            of different lengths (or one list of ids).
        temperature: 0 picks the most likely token (greedy); otherwise logits are divided by it
            and sampled.
        top_p, top_k: nucleus and top-k filtering of the sampled distribution (1.0 / None: off).
        repetition_penalty: CTRL's penalty on every id already in the row (prompt included):
            positive logits divided by it, negative ones multiplied (1.0: off).
        stop: an id, or a list of ids and id sequences; a row stops after generating one (the
            stop tokens are kept) and then yields ``pad_token_id``.
        seed: seeds a fresh ``torch.Generator`` for the draws (or pass ``generator``).
        streamer: called after each step with that step's tokens ``(batch,)`` (``pad_token_id``
            for stopped rows).
        use_cache: False recomputes the whole sequence every step (the reference path).
        return_dict: return a `GenerationOutput` instead of the sequences alone;
            ``output_logits`` also keeps every step's logits in it.

    Returns:
        ``sequences (batch, seqlen + max_new_tokens)``: each row keeps its left padding, then
        prompt and new tokens, then ``pad_token_id`` (right padding moves behind the new tokens),
        or the `GenerationOutput`. The cached path needs prompt + ``max_new_tokens`` within the
        model's ``max_seq_len``; the uncached one slides a window of ``max_seq_len`` tokens.
    """
    _check_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    rows, lefts, width, device = _prompts(input_ids, attention_mask)
    stops = _stop_sequences(stop)
    b = len(rows)
    lengths = [int(r.numel()) for r in rows]
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    max_len = _max_len(model)
    cached = (
        use_cache
        and hasattr(model, "forward_cached")
        and (max_len is None or max(lengths) + max_new_tokens <= max_len)
    )
    if use_cache and hasattr(model, "forward_cached") and not cached:
        raise ValueError(
            f"the longest prompt ({max(lengths)} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's max_seq_len ({max_len}); pass use_cache=False to slide a "
            "window instead"
        )
    new = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    num_new = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    kept: list[Tensor] = []
    seen = None
    if repetition_penalty != 1.0:
        vocab = _vocab_size(model)
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, r.to(device)] = True

    native_steps = False

    def step_logits() -> Callable[[Tensor | None], Tensor]:
        nonlocal native_steps
        if cached:
            cache = model.make_cache(b, max(lengths) + max(max_new_tokens, 1))  # type: ignore[operator]
            plan = model.decode_plan() if hasattr(model, "decode_plan") else None  # type: ignore[operator]
            native_steps = isinstance(plan, _native.LlamaStackDecoder)
            packed = torch.cat([r.to(device) for r in rows])
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

            def run(tokens: Tensor | None) -> Tensor:
                if tokens is None:
                    return model.forward_cached(packed, cache, cu_seqlens=cu.to(device))  # type: ignore[operator]
                return model.forward_cached(tokens, cache, plan=plan)  # type: ignore[operator]

            return run

        history = [r.to(device) for r in rows]

        def recompute(tokens: Tensor | None) -> Tensor:
            if tokens is not None:
                for i in range(b):
                    history[i] = torch.cat([history[i], tokens[i : i + 1]])
            if len(set(lengths)) == 1:  # one length: one batched call
                ctx = torch.stack(history)
                if max_len is not None:
                    ctx = ctx[:, -max_len:]
                return model(ctx).logits[:, -1].float()
            outs = []
            for h in history:
                ctx = h[-max_len:] if max_len is not None else h
                outs.append(model(ctx[None]).logits[0, -1].float())
            return torch.stack(outs)

        return recompute

    run = step_logits()
    logits = run(None).float() if max_new_tokens else None
    threads = torch.get_num_threads()
    if native_steps and threads > 1:
        # The native step runs on slimforge's own thread pool. torch's OpenMP workers, woken
        # by the few small torch ops around it (embedding row, argmax), would spin on the same
        # cores between steps: one torch thread while decoding, restored after.
        torch.set_num_threads(1)
    try:
        for t in range(max_new_tokens):
            assert logits is not None
            if output_logits:
                kept.append(logits)
            tok = _next_tokens(
                logits, seen, temperature, top_p, top_k, repetition_penalty, generator
            )
            tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
            new[:, t] = tok
            num_new += (~done).long()
            if seen is not None:
                seen[torch.arange(b, device=device)[~done], tok[~done]] = True
            for s in stops:
                n = len(s)
                if t + 1 >= n:
                    hit = (new[:, t + 1 - n : t + 1] == torch.tensor(s, device=device)).all(dim=1)
                    done |= hit & (num_new >= n)
            if streamer is not None:
                streamer(tok)
            if t + 1 == max_new_tokens or bool(done.all()):
                break
            # Stopped rows still run (their logits are ignored): feed them a valid id, not the pad.
            logits = run(torch.where(done, torch.zeros_like(tok), tok)).float()
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    sequences = torch.full(
        (b, width + max_new_tokens), pad_token_id, dtype=torch.long, device=device
    )
    for i, r in enumerate(rows):
        start = lefts[i]
        sequences[i, start : start + lengths[i]] = r.to(device)
        sequences[i, start + lengths[i] : start + lengths[i] + max_new_tokens] = new[i]
    if not return_dict:
        return sequences
    stacked = torch.stack(kept, dim=1) if output_logits and kept else None
    return GenerationOutput(sequences, new, num_new, stacked)


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise ValueError("repetition_penalty needs the model's config.vocab_size")
    return int(vocab)


class GenerationMixin:
    """`model.generate(...)` for the causal LMs of the protocol (`GPT`, `LlamaForCausalLM`): the
    model supplies `make_cache` and `decode_step`; this forwards to `generate`."""

    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]] | list[int],
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        stop: int | list[int | list[int]] | None = None,
        seed: int | None = None,
        **kwargs: object,
    ) -> torch.Tensor | GenerationOutput:
        """KV-cache generation (`slimforge.models.generation.generate` on this model): returns
        ``(B, T + max_new_tokens)`` ids, or a `GenerationOutput` with ``return_dict=True``."""
        return generate(
            self, input_ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
            stop, seed, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
