"""GPTQ checkpoint layout and GGUF reading: bit-exact round trips, peers, SmolLM2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimforge.eval import perplexity
from slimforge.models import CausalLMOutput
from slimforge.models.llama import (
    ByteLevelBPETokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    greedy_generate,
)
from slimforge.quant.formats.gguf import dequantize_gguf_tensor, read_gguf
from slimforge.quant.formats.gptq_layout import export_gptq, import_gptq

gguf = pytest.importorskip("gguf")

# ---------------------------------------------------------------- GPTQ layout


def _autogptq_pack(q: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Word-by-word transcription of AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack`` (v1).

    q: (out, in) codes; zeros: (out, n_groups) integer zeros. Returns (qweight, qzeros) int32.
    """
    intweight = q.T.astype(np.uint32)  # (in, out)
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per
        row += 1
    z = (zeros.T.astype(np.int64) - 1).astype(np.uint32)  # (n_groups, out), stores zero - 1
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= z[:, j] << (bits * (j - i))
        i += per
        col += 1
    return qweight.view(np.int32), qzeros.view(np.int32)


def _random_state(out_f: int, in_f: int, gs: int, bits: int, seed: int, zero_min: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ng = in_f // gs
    maxq = 2**bits - 1
    return {
        "q": torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8),
        "scales": (torch.rand(out_f, ng, generator=g) + 0.01).half().float(),
        "zeros": torch.randint(zero_min, maxq + 1, (out_f, ng), generator=g).float(),
        "g_idx": torch.randperm(in_f, generator=g) // gs,
        "bits": bits,
    }


@given(
    out_words=st.integers(1, 4),
    in_groups=st.integers(1, 4),
    gs_words=st.integers(1, 3),
    bits=st.sampled_from([2, 4, 8]),
    version=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_gptq_roundtrip_bit_exact(
    out_words: int, in_groups: int, gs_words: int, bits: int, version: int, seed: int
) -> None:
    per = 32 // bits
    out_f, gs = out_words * per, gs_words * per
    in_f = in_groups * gs
    st_ = _random_state(out_f, in_f, gs, bits, seed)
    tensors = export_gptq(st_, version=version)
    assert (
        tensors["qweight"].shape == (in_f // per, out_f) and tensors["qweight"].dtype == torch.int32
    )
    assert tensors["qzeros"].shape == (in_groups, out_f // per)
    assert (
        tensors["scales"].shape == (in_groups, out_f) and tensors["scales"].dtype == torch.float16
    )
    q, s, z, g_idx = import_gptq(tensors, bits=bits, version=version)
    assert torch.equal(q, st_["q"])
    assert torch.equal(s, st_["scales"])
    assert torch.equal(z, st_["zeros"])
    assert torch.equal(g_idx.long(), st_["g_idx"])
    # Dequantized weights agree.
    gi = st_["g_idx"]
    want = (st_["q"].float() - st_["zeros"][:, gi]) * st_["scales"][:, gi]
    got = (q.float() - z[:, g_idx.long()]) * s[:, g_idx.long()]
    assert torch.equal(got, want)
    # And tensors -> import -> export is the identity on every bit, for any word contents.
    gen = torch.Generator().manual_seed(seed + 7)
    raw = {
        "qweight": torch.randint(
            -(2**31), 2**31 - 1, tensors["qweight"].shape, generator=gen, dtype=torch.int32
        ),
        "qzeros": torch.randint(
            -(2**31), 2**31 - 1, tensors["qzeros"].shape, generator=gen, dtype=torch.int32
        ),
        "scales": tensors["scales"],
        "g_idx": tensors["g_idx"],
    }
    q2, s2, z2, g2 = import_gptq(raw, bits=bits, version=version)
    again = export_gptq(
        {"q": q2, "scales": s2, "zeros": z2, "g_idx": g2, "bits": bits}, version=version
    )
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(again[k], raw[k]), k


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_v1_matches_autogptq_pack(bits: int) -> None:
    per = 32 // bits
    st_ = _random_state(4 * per, 8 * per, 4 * per, bits, seed=bits, zero_min=1)
    st_["g_idx"] = torch.arange(8 * per) // (4 * per)
    tensors = export_gptq(st_, version=1)
    qweight, qzeros = _autogptq_pack(st_["q"].numpy(), st_["zeros"].numpy(), bits)
    assert np.array_equal(tensors["qweight"].numpy(), qweight)
    assert np.array_equal(tensors["qzeros"].numpy(), qzeros)


def test_gptq_symmetric_int4_zero_words() -> None:
    st_ = _random_state(16, 64, 32, 4, seed=0)
    st_["zeros"] = torch.full_like(st_["zeros"], 8.0)
    v1 = export_gptq(st_, version=1)
    v2 = export_gptq(st_, version=2)
    assert torch.all(v1["qzeros"] == 0x77777777)  # the familiar AutoGPTQ symmetric checkpoint word
    assert torch.all(v2["qzeros"] == -0x77777778)  # 0x88888888 as int32
    # Default g_idx and bias.
    del st_["g_idx"]
    st_["group_size"] = 32
    st_["bias"] = torch.randn(16)
    t = export_gptq(st_)
    assert torch.equal(t["g_idx"], (torch.arange(64) // 32).int())
    assert t["bias"].dtype == torch.float16
    q, s, z, g = import_gptq({k: v for k, v in t.items() if k != "g_idx"})
    assert torch.equal(g, t["g_idx"])


def test_gptq_layout_error_paths() -> None:
    st_ = _random_state(8, 32, 16, 4, seed=1)
    with pytest.raises(ValueError, match="version"):
        export_gptq(st_, version=3)
    with pytest.raises(ValueError, match="bits 2, 4 or 8"):
        export_gptq({**st_, "bits": 3})
    with pytest.raises(ValueError, match="codes must lie"):
        export_gptq({**st_, "q": st_["q"] + 16})
    with pytest.raises(ValueError, match="zeros must be integers"):
        export_gptq({**st_, "zeros": st_["zeros"] + 0.5})
    with pytest.raises(ValueError, match="scales and zeros"):
        export_gptq({**st_, "scales": st_["scales"][:, :1]})
    with pytest.raises(ValueError, match="g_idx"):
        export_gptq({**st_, "g_idx": torch.zeros(31, dtype=torch.long)})
    with pytest.raises(ValueError, match="multiples of 8"):
        export_gptq(
            {**st_, "q": st_["q"][:6], "scales": st_["scales"][:6], "zeros": st_["zeros"][:6]}
        )
    t = export_gptq(st_)
    with pytest.raises(ValueError, match="lack 'qzeros'"):
        import_gptq({"qweight": t["qweight"], "scales": t["scales"]})
    with pytest.raises(ValueError, match="int32"):
        import_gptq({**t, "qweight": t["qweight"].long()})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        import_gptq({**t, "scales": t["scales"][:, :4]})
    with pytest.raises(ValueError, match="g_idx must have"):
        import_gptq({**t, "g_idx": t["g_idx"][:5]})


# ---------------------------------------------------------------- GGUF blocks


# kind -> (ggml type id, bytes per block, byte offsets of the block's fp16 fields)
_TYPES = {
    "Q4_0": (2, 18, (0,)),
    "Q4_1": (3, 20, (0, 2)),
    "Q5_0": (6, 22, (0,)),
    "Q5_1": (7, 24, (0, 2)),
    "Q8_0": (8, 34, (0,)),
    "Q2_K": (10, 84, (80, 82)),
    "Q3_K": (11, 110, (108,)),
    "Q4_K": (12, 144, (0, 2)),
    "Q5_K": (13, 176, (0, 2)),
    "Q6_K": (14, 210, (208,)),
}


def _random_blocks(kind: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes (every code, scale and bit pattern) with finite fp16 d / dmin fields, so
    NaN != NaN does not spoil comparisons."""
    _, nbytes, halves = _TYPES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in halves:
        raw[:, at : at + 2] = rng.normal(0, 0.1, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw


@given(
    kind=st.sampled_from(sorted(_TYPES)), n_blocks=st.integers(1, 40), seed=st.integers(0, 2**16)
)
def test_gguf_block_dequant_matches_gguf_package(kind: str, n_blocks: int, seed: int) -> None:
    ttype = _TYPES[kind][0]
    raw = _random_blocks(kind, n_blocks, seed)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ttype)).reshape(-1)
    mine = dequantize_gguf_tensor(raw, ttype)
    assert mine.dtype == np.float32 and mine.shape == ref.shape
    assert np.array_equal(mine, ref)


def _pack_q4_k(d: float, dmin: float, sc: np.ndarray, mn: np.ndarray, q: np.ndarray) -> np.ndarray:
    """One Q4_K block from 8 six-bit scales / mins and 256 codes, written from the format's
    description (independent of the decoder)."""
    s = np.zeros(12, np.uint8)
    for j in range(8):
        if j < 4:
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        else:
            s[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4)
    qs = np.zeros(128, np.uint8)
    for c in range(4):  # 64 weights per chunk: sub-block 2c in low nibbles, 2c + 1 in high
        qs[32 * c : 32 * c + 32] = q[64 * c : 64 * c + 32] | (q[64 * c + 32 : 64 * c + 64] << 4)
    head = np.array([d, dmin], "<f2").view(np.uint8)
    return np.concatenate([head, s, qs])


def test_gguf_q4_k_from_described_layout() -> None:
    rng = np.random.default_rng(5)
    sc, mn = rng.integers(0, 64, 8, dtype=np.uint8), rng.integers(0, 64, 8, dtype=np.uint8)
    q = rng.integers(0, 16, 256, dtype=np.uint8)
    d, dmin = np.float16(0.013), np.float16(0.021)
    got = dequantize_gguf_tensor(_pack_q4_k(d, dmin, sc, mn, q), 12)
    sub = np.arange(256) // 32
    want = (np.float32(d) * sc[sub]) * q - np.float32(dmin) * mn[sub].astype(np.float32)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_dequant_of_quantized_weights(kind: str) -> None:
    qt = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    packed = gguf.quants.quantize(w, qt)
    mine = dequantize_gguf_tensor(packed, int(qt), (16, 64))
    assert np.array_equal(mine, gguf.quants.dequantize(packed, qt))
    assert np.abs(mine - w).max() < (0.02 if kind == "Q8_0" else 0.5)


def test_gguf_dequant_floats_and_errors() -> None:
    x = np.random.default_rng(1).normal(size=64).astype(np.float32)
    assert np.array_equal(dequantize_gguf_tensor(x.view(np.uint8), 0), x)
    assert np.array_equal(
        dequantize_gguf_tensor(x.astype(np.float16).view(np.uint8), 1),
        x.astype(np.float16).astype(np.float32),
    )
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(
        dequantize_gguf_tensor(bf.view(np.uint8), 30), (bf.astype(np.uint32) << 16).view(np.float32)
    )
    with pytest.raises(ValueError, match="not supported"):
        dequantize_gguf_tensor(np.zeros(66, np.uint8), 16)  # IQ2_XXS
    with pytest.raises(ValueError, match="whole number of blocks"):
        dequantize_gguf_tensor(np.zeros(19, np.uint8), 2)
    with pytest.raises(ValueError, match="shape"):
        dequantize_gguf_tensor(np.zeros(18, np.uint8), 2, (4, 4))


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], meta: dict) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    for name, (arr, kind) in tensors.items():
        if kind == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif kind.endswith("_K"):  # no k-quant encoder in the gguf package: random blocks
            qt = gguf.GGMLQuantizationType[kind]
            rows, cols = arr.shape
            raw = _random_blocks(kind, rows * cols // 256, rows + cols).reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=qt)
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_read_gguf_synthetic_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrs = {
        "a.weight": (rng.normal(size=(8, 64)), "Q4_0"),
        "b.weight": (rng.normal(size=(4, 32)), "Q4_1"),
        "c.weight": (rng.normal(size=(2, 96)), "Q8_0"),
        "d.weight": (rng.normal(size=(5,)), "F32"),
        "e.weight": (rng.normal(size=(3, 7)), "F16"),
        "f.weight": (np.zeros((3, 512)), "Q4_K"),
        "g.weight": (np.zeros((2, 256)), "Q6_K"),
        "h.weight": (rng.normal(size=(2, 64)), "Q5_1"),
    }
    meta = {
        "x.count": 7,
        "x.ratio": 0.5,
        "x.name": "tiny",
        "x.flag": True,
        "x.list": ["a b", "c"],
        "x.ints": [1, 2, 3],
    }
    p = tmp_path / "t.gguf"
    _write_gguf(p, arrs, meta)
    f = read_gguf(p)
    ref = gguf.GGUFReader(str(p))
    assert f.version == 3 and f.metadata["general.architecture"] == "llama"
    for k, v in meta.items():
        got = f.metadata[k]
        assert got == pytest.approx(v) if isinstance(v, float) else got == v
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert mine.shape == tuple(arrs[t.name][0].shape)
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)
        assert np.array_equal(mine.dequantize(), want), t.name
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + p.read_bytes()[4:])
    with pytest.raises(ValueError, match="magic"):
        read_gguf(bad)
    bad.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(bad)
    data = bytearray(p.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 9"):
        read_gguf(bad)


# ---------------------------------------------------------------- Llama from GGUF


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf`` q/k permutation (HF halves -> adjacent pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_llama_from_gguf_matches_torch_model(tmp_path: Path) -> None:
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, rope_theta=10000.0)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    arrs: dict[str, tuple[np.ndarray, str]] = {
        "token_embd.weight": (model.embed_tokens.weight.detach().numpy(), "F32"),
        "output_norm.weight": (model.norm.weight.detach().numpy(), "F32"),
    }
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        at, mlp = layer.self_attn, layer.mlp
        arrs[p + "attn_norm.weight"] = (layer.input_layernorm.weight.detach().numpy(), "F32")
        arrs[p + "ffn_norm.weight"] = (
            layer.post_attention_layernorm.weight.detach().numpy(),
            "F32",
        )
        arrs[p + "attn_q.weight"] = (_llamacpp_permute(at.q_proj.weight.detach().numpy(), 4), "F32")
        arrs[p + "attn_k.weight"] = (_llamacpp_permute(at.k_proj.weight.detach().numpy(), 2), "F32")
        arrs[p + "attn_v.weight"] = (at.v_proj.weight.detach().numpy(), "F32")
        arrs[p + "attn_output.weight"] = (at.o_proj.weight.detach().numpy(), "F32")
        arrs[p + "ffn_gate.weight"] = (mlp.gate_proj.weight.detach().numpy(), "F32")
        arrs[p + "ffn_up.weight"] = (mlp.up_proj.weight.detach().numpy(), "F32")
        arrs[p + "ffn_down.weight"] = (mlp.down_proj.weight.detach().numpy(), "F32")
    meta = {
        "llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(300)],
    }  # fmt: skip
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, arrs, meta)
    loaded = LlamaForCausalLM.from_gguf(path)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids"):
        loaded(torch.randn(2, 3))


def test_byte_level_bpe_merges_by_rank() -> None:
    from slimforge.models.tokenizer import _bytes_to_unicode

    enc = _bytes_to_unicode()
    base = [enc[b] for b in range(256)]
    sp = enc[ord(" ")]
    tokens = [*base, "lo", "low", sp + "l", sp + "lo", "er", "lower"]
    merges = ["l o", "lo w", f"{sp} l", f"{sp}l o", "e r", "low er"]
    tok = ByteLevelBPETokenizer(tokens, merges, split_digits=True)
    v = tok.vocab
    assert tok.encode("lower") == [v["lower"]]
    # "l o" outranks "Ġ l", so " lo" ends as [Ġ, lo]; with "Ġ l" first it becomes Ġlo.
    assert tok.encode("low lo") == [v["low"], v[sp], v["lo"]]
    tok_sp = ByteLevelBPETokenizer(tokens, [f"{sp} l", f"{sp}l o", "l o"], split_digits=True)
    assert tok_sp.encode(" lo") == [v[sp + "lo"]]
    assert tok.encode("a12") == [v["a"], v["1"], v["2"]]
    text = "héllo, wörld 2004!\n\n  x"
    assert tok.decode(tok.encode(text)) == text
    tok2 = ByteLevelBPETokenizer(tokens, merges, split_digits=False)
    assert tok2.pretokenize(" 2004 ab_c") == [" 2004", " ab", "_", "c"]
    assert tok.pretokenize(" 2004") == [" ", "2", "0", "0", "4"]


def test_perplexity_and_generate_on_uniform_model() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> CausalLMOutput:
            return CausalLMOutput(torch.zeros(*ids.shape, 50))

    assert perplexity(Uniform(), torch.arange(40) % 50, seq_len=16) == pytest.approx(50.0)
    assert greedy_generate(Uniform(), [1, 2], 3) == [0, 0, 0]


# ---------------------------------------------------------------- SmolLM2 (assets)


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_gguf_path: Path) -> Path:
    return smollm2_gguf_path


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_tensors_match_gguf_package(smollm2_gguf: Path) -> None:
    f = read_gguf(smollm2_gguf)
    ref = gguf.GGUFReader(str(smollm2_gguf))
    kinds = set()
    for t in ref.tensors:
        mine = f.tensors[t.name]
        kinds.add(mine.type_name)
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(mine.dequantize().reshape(want.shape), want), t.name
    assert {"Q4_1", "Q8_0", "F32"} <= kinds


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_perplexity_and_greedy_decode(smollm2_gguf: Path) -> None:
    model = LlamaForCausalLM.from_gguf(smollm2_gguf)
    tok = ByteLevelBPETokenizer.from_gguf(smollm2_gguf)
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.encode("The capital of France is")
    assert tok.decode(greedy_generate(model, prompt, 2)).startswith(" Paris")
    # The 17.06 reference used a ByteLevel pre-tokenizer without the digit split.
    tok.split_digits = False
    ids = torch.tensor(tok.encode(text)[:256])
    ppl = perplexity(model, ids, seq_len=256)
    assert math.isclose(ppl, 17.06, abs_tol=0.05), ppl
