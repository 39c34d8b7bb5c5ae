"""Model specs: where a model keeps its blocks, projections and norms.

Algorithms that need a model's structure ask its :class:`ModelSpec` instead of guessing from
names: the calibration driver walks ``spec.blocks`` one block at a time, AWQ folds scales into
the norm that feeds a group of projections and leaves query/key rows unclipped, structured
pruning and layer dropping find the MLP and attention projections.

:func:`model_spec` returns the spec of slimforge's own models (their ``spec()`` method) and of
Hugging Face Llama/Mistral/Qwen2-style modules recognised by their standard names; other models
pass a hand-written ``ModelSpec`` (or get ``None``: the whole model is then one block).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LLAMA_BLOCK", "BlockSpec", "ModelSpec", "model_spec"]


@dataclass(frozen=True)
class BlockSpec:
    """Submodule names inside one block (relative to the block).

    attn_norm / mlp_norm: the norms whose outputs feed the attention input projections and the
        MLP input projections (None when there is no such norm, e.g. post-norm blocks).
    attn_in: the attention input projections, q/k/v or one fused projection.
    attn_out: the attention output projection (None for blocks without attention).
    mlp_in: the MLP input projections (gate and up, or one fused fc); empty for an MoE MLP.
    mlp_out: the MLP output (down) projection, or None.
    query_key: which of ``attn_in`` compute queries or keys (AWQ does not clip them: the
        softmax amplifies their error).
    fused_qkv: the name of a fused projection whose output rows are stacked ``[q; k; v]``,
        with ``qkv_rows = (q rows, k rows, v rows)``.
    moe: the name of an MoE module that replaces the MLP, if any.
    keep_float: linears compression leaves in floating point by default (an MoE router:
        quantizing it changes which experts tokens go to).
    """

    attn_norm: str | None = None
    attn_in: tuple[str, ...] = ()
    attn_out: str | None = None
    mlp_norm: str | None = None
    mlp_in: tuple[str, ...] = ()
    mlp_out: str | None = None
    query_key: tuple[str, ...] = ()
    fused_qkv: str | None = None
    qkv_rows: tuple[int, int, int] | None = None
    moe: str | None = None
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.fused_qkv is not None and self.qkv_rows is None:
            raise ValueError("fused_qkv needs qkv_rows = (q rows, k rows, v rows)")
        unknown = [n for n in self.query_key if n not in self.attn_in]
        if unknown:
            raise ValueError(f"query_key names {unknown} are not in attn_in {self.attn_in}")

    def norm_feeding(self, name: str) -> str | None:
        """The norm whose output is the input of projection ``name`` (relative), if any."""
        if name in self.attn_in:
            return self.attn_norm
        if name in self.mlp_in:
            return self.mlp_norm
        return None

    def clip_rows(self, name: str, out_features: int) -> slice | None:
        """Rows of projection ``name``'s weight a clip search may change: none for query/key
        projections, the value rows of a fused q/k/v projection, else all."""
        if name == self.fused_qkv and self.qkv_rows is not None:
            q, k, v = self.qkv_rows
            if q + k + v != out_features:
                raise ValueError(
                    f"{name} has {out_features} output rows, the spec says {q} + {k} + {v}"
                )
            return slice(q + k, None)
        if name in self.query_key:
            return None
        return slice(None)

    def linears(self) -> tuple[str, ...]:
        """Every projection the spec names, in execution order."""
        names = (*self.attn_in, self.attn_out, *self.mlp_in, self.mlp_out)
        return tuple(n for n in names if n is not None)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model keeps its parts (dotted names from the model root).

    blocks: the ``nn.ModuleList`` of repeated blocks; block: the names inside each block;
    embed: the token embedding; final_norm: the norm before the output head; lm_head: the
    output projection, or None when it is tied to ``embed``; family: a label ("gpt", "llama").
    """

    blocks: str
    block: BlockSpec
    embed: str | None = None
    final_norm: str | None = None
    lm_head: str | None = None
    family: str = "custom"

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The model's block list (ValueError when the spec does not fit the model)."""
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError as e:
            raise ValueError(f"the model has no block list at {self.blocks!r}: {e}") from e
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{self.blocks!r} is a {type(blocks).__name__}, not an nn.ModuleList")
        return blocks

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}."

    def keeps_float(self, name: str) -> bool:
        """Whether the dotted model name is one of the blocks' ``keep_float`` linears."""
        split = self.split_name(name)
        return split is not None and split[1] in self.block.keep_float

    def split_name(self, name: str) -> tuple[int, str] | None:
        """``(block index, name inside the block)`` of a dotted model name, or None."""
        prefix = self.blocks + "."
        if not name.startswith(prefix):
            return None
        idx, _, rest = name[len(prefix) :].partition(".")
        if not idx.isdigit() or not rest:
            return None
        return int(idx), rest

    def check(self, model: nn.Module) -> ModelSpec:
        """Raises ValueError unless every named part exists in every block. Returns self."""
        blocks = self.block_list(model)
        names = [n for n in (*self.block.linears(), self.block.attn_norm, self.block.mlp_norm) if n]
        if self.block.moe:
            names.append(self.block.moe)
        for i, blk in enumerate(blocks):
            for n in names:
                try:
                    blk.get_submodule(n)
                except AttributeError as e:
                    raise ValueError(f"block {i} has no {n!r} ({e})") from e
        for n in (self.embed, self.final_norm, self.lm_head):
            if n:
                try:
                    model.get_submodule(n)
                except AttributeError as e:
                    raise ValueError(f"the model has no {n!r} ({e})") from e
        return self


#: The block layout of Hugging Face's Llama / Mistral / Qwen2 and of `LlamaForCausalLM`.
LLAMA_BLOCK = BlockSpec(
    attn_norm="input_layernorm",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)


def _hf_llama_spec(model: nn.Module) -> ModelSpec | None:
    """Hugging Face Llama / Mistral / Qwen2-style causal LMs (``model.layers``), by name."""
    for prefix in ("model.", ""):
        try:
            layers = model.get_submodule(prefix + "layers")
        except AttributeError:
            continue
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        lm_head = "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Linear) else None
        spec = ModelSpec(
            blocks=prefix + "layers",
            block=LLAMA_BLOCK,
            embed=prefix + "embed_tokens",
            final_norm=prefix + "norm",
            lm_head=lm_head,
            family="llama",
        )
        try:
            return spec.check(model)
        except ValueError:
            return None
    return None


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The model's spec: its own ``spec()`` when it has one, the Hugging Face Llama-family
    layout when its module names match, else None."""
    own = getattr(model, "spec", None)
    if callable(own):
        spec = own()
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"{type(model).__name__}.spec() returned {type(spec).__name__}")
        return spec
    return _hf_llama_spec(model)
