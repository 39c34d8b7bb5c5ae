"""peft interop: adapters made by slimforge load in peft and give the same outputs, and the
reverse, on a small Llama built here (its Hugging Face twin holds the same weights), on
slimforge's own GPT (peft wraps it as a custom module) and on SmolLM2-135M from its GGUF."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from slimforge.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    hf_state_dict,
    load_adapter,
    lora_layers,
    module_name_from_peft,
    peft_module_name,
    save_adapter,
)
from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, max_seq_len=64, rope_theta=50000.0, attn_impl="sdpa",
)  # fmt: skip


def hf_twin(model: LlamaForCausalLM) -> nn.Module:
    """transformers' LlamaForCausalLM with the same weights (names mapped by hf_state_dict)."""
    c = model.cfg
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    hf.load_state_dict(hf_state_dict(model))
    return hf


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{peft file key: tensor} of the active adapter, from either library's model."""
    if isinstance(model, peft.PeftModel):
        return peft.get_peft_model_state_dict(model)
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        return load_file(Path(d) / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, base_gap: float) -> None:
    """The two libraries' base models differ by float rounding (``base_gap``); the adapters
    must add no more than a few times that."""
    gap = float((got - want).abs().max())
    assert gap <= 4 * base_gap + 1e-5, (gap, base_gap)


VARIANTS = {
    "gaussian": {"init": "gaussian"},
    "kaiming-rslora-dropout": {"init": "kaiming", "rslora": True, "dropout": 0.1},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "pissa-dora": {"init": "pissa", "use_dora": True},
}
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa"}


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, nn.Module, torch.Tensor, float]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    with torch.no_grad():
        base_gap = float((hf(ids).logits - model(ids).logits).abs().max())
    assert base_gap < 1e-4
    return model, hf, ids, base_gap


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_slimforge_adapter_loads_in_peft(variant: str, tiny, tmp_path: Path) -> None:
    model, hf, ids, base_gap = tiny
    ours = copy.deepcopy(model)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=tuple(LINEARS), **VARIANTS[variant]))
    perturb(ours, 1)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    assert_same_tensors(lora_tensors(theirs), lora_tensors(ours))
    assert_close_logits(theirs(ids).logits, ours.eval()(ids).logits, base_gap)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_slimforge(variant: str, tiny, tmp_path: Path) -> None:
    model, hf, ids, base_gap = tiny
    v = VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LINEARS, lora_dropout=v.get("dropout", 0.0),
        use_rslora=v.get("rslora", False), use_dora=v.get("use_dora", False),
        init_lora_weights=PEFT_INIT[v.get("init", "gaussian")],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(hf), cfg)
    perturb(theirs, 2)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(model)
    loaded = load_adapter(ours, tmp_path)
    assert (loaded.r, loaded.alpha, loaded.use_dora) == (4, 8.0, v.get("use_dora", False))
    assert len(lora_layers(ours)) == 2 * len(LINEARS)
    assert_same_tensors(lora_tensors(ours), lora_tensors(theirs))
    assert_close_logits(ours(ids).logits, theirs.eval()(ids).logits, base_gap)


def test_regex_targets_and_rank_patterns_load_in_peft(tiny, tmp_path: Path) -> None:
    model, hf, ids, base_gap = tiny
    ours = copy.deepcopy(model)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=("layers.0.self_attn.q_proj",)))
    mlp = ours.layers[1].mlp
    mlp.up_proj = LoraLinear(mlp.up_proj, "default", LoraConfig(r=2, alpha=3))
    perturb(ours, 3)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    wrapped = [
        n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    ]
    assert sorted(wrapped) == [
        "base_model.model.model.layers.0.self_attn.q_proj",
        "base_model.model.model.layers.1.mlp.up_proj",
    ]
    assert_close_logits(theirs(ids).logits, ours(ids).logits, base_gap)


def test_peft_on_slimforge_gpt_round_trips(tmp_path: Path) -> None:
    """peft wraps slimforge's GPT as a custom module: names need no mapping."""
    torch.manual_seed(0)
    config = GPTConfig(num_layers=2, hidden_size=32, attn_impl="sdpa")
    model = GPT(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv", "fc"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), cfg)
    perturb(theirs, 4)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(model)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert_same_tensors(lora_tensors(back), lora_tensors(ours))


def test_name_mapping_both_ways() -> None:
    model = LlamaForCausalLM(TINY)
    for name in ("layers.1.mlp.up_proj", "embed_tokens", "norm"):
        hf = peft_module_name(model, name)
        assert hf == "model." + name and module_name_from_peft(model, hf) == name
    assert peft_module_name(model, "lm_head") == "lm_head"
    gpt = GPT(GPTConfig(num_layers=1, hidden_size=32))
    assert peft_module_name(gpt, "blocks.0.attn.qkv") == "blocks.0.attn.qkv"


@pytest.mark.assets
def test_smollm2_adapter_trained_in_slimforge_loads_in_peft_and_back(
    smollm2_gguf_path: Path, tmp_path: Path
) -> None:
    """SmolLM2-135M (all 30 blocks) and its transformers twin: one adapter trained here
    loads in peft, one made in peft loads here, with the same logits."""
    from slimforge.train import TrainConfig, Trainer

    model = LlamaForCausalLM.from_gguf(smollm2_gguf_path, attn_impl="sdpa")
    hf = hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
        base_gap = float((hf(ids).logits - base).abs().max())
    assert base_gap < 1e-3
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=tuple(LINEARS)))
    tokens = torch.randint(0, model.cfg.vocab_size, (256,))
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=16, lr=1e-2, warmup_steps=0, progress=False)
    Trainer(model, tokens, config=cfg).fit()
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    assert_same_tensors(lora_tensors(theirs), lora_tensors(model))
    with torch.no_grad():
        ours_logits = model(ids).logits
        assert float((ours_logits - base).abs().max()) > 100 * base_gap  # it trained
        assert_close_logits(theirs(ids).logits, ours_logits, base_gap)
    # The reverse: a peft adapter (perturbed) into the same model, as a second adapter.
    perturb(theirs, 5)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft", "from_peft")
    with torch.no_grad():
        assert_close_logits(model(ids).logits, theirs(ids).logits, base_gap)
