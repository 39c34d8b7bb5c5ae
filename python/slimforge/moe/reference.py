"""Plain per-expert loop in the style of Hugging Face's Mixtral block: the correctness oracle
for `MoE` and the baseline of the benchmarks.

It takes the same parameters as `MoE` (router weight (E, D), w_in (E, D, H or 2H), w_out
(E, H, D)) and loops over experts with `torch.where` + `index_add_`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the expert nonlinearity; "swiglu" splits h's last dim into (gate, up)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be swiglu, gelu, relu or silu, got {activation!r}")


def moe_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    top_k: int,
    capacity: int | None = None,
    activation: str = "swiglu",
    router: str = "softmax",
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """y (T, D) for x (T, D): route, loop over experts, `index_add_` the weighted outputs.

    Scores in float32 (float64 for float64 x), weights cast back to x's dtype as in Mixtral.
    With `capacity`, each expert keeps its first `capacity` (token, slot) pairs in token order.
    """
    num_experts = router_weight.shape[0]
    logits = x @ router_weight.t()
    score_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scores = (
        F.softmax(logits.to(score_dtype), dim=-1)
        if router == "softmax"
        else torch.sigmoid(logits.to(score_dtype))
    )
    select = scores if bias is None else scores + bias.to(score_dtype)
    _, idx = torch.topk(select, top_k, dim=-1)
    weights = scores.gather(1, idx)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(num_experts):
        token, slot = torch.where(idx == e)
        if capacity is not None:
            token, slot = token[:capacity], slot[:capacity]
        if token.numel() == 0:
            continue
        h = expert_activation(x[token] @ w_in[e], activation)
        y.index_add_(0, token, (h @ w_out[e]) * weights[token, slot, None])
    return y
