"""GGUF writing and export: the writer/reader round trip (every tensor type, every metadata
type), llama.cpp's quantizers against the ``gguf`` package's, the code-for-code mapping of
GPTQ/AWQ/RTN INT4 weights onto Q4_1/Q4_0 (and INT8 onto Q8_0), exported models loading back
with their logits, the CLI, and llama.cpp itself where ``llama_cpp`` is importable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimforge.cli import main as cli_main
from slimforge.models.llama import LlamaConfig, LlamaForCausalLM
from slimforge.models.tokenizer import ByteLevelBPETokenizer
from slimforge.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly, quantize_
from slimforge.quant.formats.gguf import _GGML_LAYOUTS, GGUFTensor, read_gguf
from slimforge.quant.formats.gguf_writer import export_gguf, quantize_gguf, write_gguf
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import unpack_int4

gguf = pytest.importorskip("gguf")

TYPE_IDS = {v[0]: k for k, v in _GGML_LAYOUTS.items()}
VOCAB = 48


# ------------------------------------------------------------------ container round trip

# (value type id or (9, element type id), strategy of values exactly representable in it)
_F32 = st.floats(width=32, allow_nan=False)
METADATA_TYPES = [
    (0, st.integers(0, 255)), (1, st.integers(-128, 127)), (2, st.integers(0, 2**16 - 1)),
    (3, st.integers(-(2**15), 2**15 - 1)), (4, st.integers(0, 2**32 - 1)),
    (5, st.integers(-(2**31), 2**31 - 1)), (6, _F32), (7, st.booleans()), (8, st.text()),
    (10, st.integers(0, 2**64 - 1)), (11, st.integers(-(2**63), 2**63 - 1)),
    (12, st.floats(allow_nan=False)), ((9, 8), st.lists(st.text(), max_size=5)),
    ((9, 5), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5)),
    ((9, 6), st.lists(_F32, max_size=5)), ((9, 0), st.lists(st.integers(0, 255), max_size=5)),
    ((9, 7), st.lists(st.booleans(), max_size=5)),
]  # fmt: skip


@st.composite
def gguf_contents(draw: st.DrawFn) -> tuple[dict, dict, list[GGUFTensor]]:
    keys = draw(st.lists(st.text(min_size=1, max_size=12), max_size=6, unique=True))
    meta, types = {}, {}
    for k in keys:
        if k == "general.alignment":
            continue
        vtype, values = draw(st.sampled_from(METADATA_TYPES))
        meta[k], types[k] = draw(values), vtype
    tensors = []
    ids = draw(st.lists(st.sampled_from(sorted(_GGML_LAYOUTS)), max_size=5))
    for i, tid in enumerate(ids):
        _, block, nbytes = _GGML_LAYOUTS[tid]
        rows = draw(st.integers(1, 3))
        blocks = draw(st.integers(1, 3))
        shape = (rows, blocks * block) if draw(st.booleans()) else (blocks * block,)
        n = int(np.prod(shape)) // block * nbytes
        data = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
        tensors.append(GGUFTensor(f"t{i}.{tid}", shape, tid, data))
    return meta, types, tensors


@given(contents=gguf_contents(), alignment=st.sampled_from([32, 8, 64]))
def test_write_read_round_trip_is_bit_exact(contents, alignment: int, tmp_path_factory) -> None:
    meta, types, tensors = contents
    path = tmp_path_factory.mktemp("rt") / "x.gguf"
    write_gguf(path, meta, tensors, types=types, alignment=alignment)
    f = read_gguf(path)
    extra = {"general.alignment": alignment} if alignment != 32 else {}
    assert f.metadata == {**meta, **extra}
    for k, t in types.items():
        assert f.metadata_types[k] == t
    assert list(f.tensors) == [t.name for t in tensors]
    for t in tensors:
        got = f.tensors[t.name]
        assert got.shape == t.shape and got.ggml_type == t.ggml_type
        assert np.asarray(got.data).tobytes() == t.data.tobytes()
    # Written again from what was read: the same bytes.
    again = path.with_name("y.gguf")
    write_gguf(again, f.metadata, f.tensors.values(), types=f.metadata_types)
    assert again.read_bytes() == path.read_bytes()


def test_write_gguf_rejects_bad_input(tmp_path: Path) -> None:
    t = GGUFTensor("a", (2, 32), TYPE_IDS["Q8_0"], np.zeros(68, np.uint8))
    with pytest.raises(ValueError, match="unique"):
        write_gguf(tmp_path / "x.gguf", {}, [t, t])
    with pytest.raises(ValueError, match="needs 68 bytes"):
        write_gguf(tmp_path / "x.gguf", {}, [GGUFTensor("a", (2, 32), 8, np.zeros(60, np.uint8))])
    with pytest.raises(ValueError, match="whole number"):
        write_gguf(tmp_path / "x.gguf", {}, [GGUFTensor("a", (2, 30), 8, np.zeros(60, np.uint8))])
    with pytest.raises(ValueError, match="power of two"):
        write_gguf(tmp_path / "x.gguf", {}, [], alignment=24)
    with pytest.raises(TypeError, match="metadata"):
        write_gguf(tmp_path / "x.gguf", {"k": object()}, [])
    assert not (tmp_path / "x.gguf").exists()  # nothing half-written


@pytest.mark.assets
def test_smollm2_file_round_trips_byte_for_byte(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    f = read_gguf(smollm2_gguf_path)
    out = tmp_path / "copy.gguf"
    write_gguf(out, f.metadata, f.tensors.values(), types=f.metadata_types)
    assert out.read_bytes() == smollm2_gguf_path.read_bytes()


# ---------------------------------------------------------------------------- quantizers


@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 4),
    type_name=st.sampled_from(["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]),
    kind=st.sampled_from(["normal", "constant", "zeros", "sparse", "wide"]),
    seed=st.integers(0, 2**16),
)
def test_quantize_gguf_matches_the_gguf_package(
    rows: int, blocks: int, type_name: str, kind: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    if kind == "constant":
        w[:] = np.float32(rng.standard_normal())
    elif kind == "zeros":
        w[:] = 0
    elif kind == "sparse":
        w[rng.random(w.shape) < 0.8] = 0
    elif kind == "wide":
        w *= np.float32(10.0) ** rng.integers(-6, 6, size=w.shape)
    qtype = gguf.GGMLQuantizationType[type_name]
    want = gguf.quants.quantize(w, qtype)
    got = quantize_gguf(w, type_name)
    assert got.dtype == np.uint8 or type_name in ("F32", "F16")
    assert np.ascontiguousarray(got).view(np.uint8).tobytes() == want.view(np.uint8).tobytes()


def test_quantize_gguf_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_gguf(np.zeros((2, 33), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize_gguf(np.zeros((2, 32), np.float32), "Q5_0")


# ---------------------------------------------------------------------------- model export


def tiny_tokenizer() -> ByteLevelBPETokenizer:
    from slimforge.models.tokenizer import _bytes_to_unicode

    chars = [_bytes_to_unicode()[b] for b in range(ord("a"), ord("a") + VOCAB - 2)]
    tok = ByteLevelBPETokenizer([*chars, "ab", "abc"], ["a b", "ab c"], split_digits=False)
    tok.bos_token_id, tok.eos_token_id = 1, 2
    return tok


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, max_seq_len=64, rope_theta=10000.0, tie_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    return model


IDS = torch.tensor([[1, 5, 9, 2, 7, 30, 3, 12, 8, 44, 6, 19]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("tie", [True, False])
def test_f32_export_loads_back_exactly(tie: bool, tmp_path: Path) -> None:
    model = tiny_llama(tie)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "f32", tokenizer=tiny_tokenizer(), name="tiny")
    assert all(t.max_abs_error == 0 for t in report.tensors)
    back = LlamaForCausalLM.from_gguf(path)
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=1e-5)
    md = read_gguf(path).metadata
    assert md["general.name"] == "tiny" and md["tokenizer.ggml.merges"] == ["a b", "ab c"]
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["llama.block_count"] == 2
    tok = ByteLevelBPETokenizer.from_gguf(path)
    assert tok.tokens == tiny_tokenizer().tokens and tok.encode("abcd") == tiny_tokenizer().encode(
        "abcd"
    )


@pytest.mark.parametrize("type_name", ["f16", "q8_0", "q4_0", "q4_1"])
def test_float_export_requantizes_with_llama_cpp_rounding(type_name: str, tmp_path: Path) -> None:
    model = tiny_llama()
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, type_name, tokenizer=tiny_tokenizer())
    f = read_gguf(path)
    want_type = type_name.upper()
    q = f.tensors["blk.0.attn_v.weight"]
    assert q.type_name == want_type
    w = model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.asarray(q.data).tobytes() == quantize_gguf(w, want_type).tobytes()
    info = {t.name: t for t in report.tensors}["blk.0.attn_v.weight"]
    assert info.mapping == ("converted" if type_name == "f16" else "requantized")
    back = dequant = q.dequantize()
    assert info.max_abs_error == pytest.approx(float(np.abs(dequant - w).max()), rel=1e-6)
    assert back.shape == w.shape
    head = f.tensors["token_embd.weight"].type_name
    assert head == ("Q8_0" if type_name.startswith("q4") else want_type)
    assert bool(report.requantized()) == (type_name != "f16")


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(4)]


def quantized(kind: str) -> LlamaForCausalLM:
    model = tiny_llama()
    if kind == "gptq":
        quantize_(model, GPTQ(bits=4, group_size=32, act_order=False), calibration=calib(),
                  progress=False)  # fmt: skip
    elif kind == "gptq-static":
        quantize_(model, GPTQ(bits=4, group_size=32, static_groups=True), calibration=calib(),
                  progress=False)  # fmt: skip
    elif kind == "awq":
        quantize_(model, AWQ(bits=4, group_size=32), calibration=calib(), progress=False)
    elif kind == "rtn-g64":  # groups of 64 = two Q4_1 blocks (down_proj's 96 inputs: 32)
        quantize_(model, Int4WeightOnly(group_size=64), progress=False,
                  filter_fn=lambda m, n: not n.endswith("down_proj"))  # fmt: skip
        quantize_(model, Int4WeightOnly(group_size=32), progress=False)
    elif kind == "rtn-sym":
        quantize_(model, Int4WeightOnly(group_size=32, symmetric=True), progress=False)
    elif kind == "int8":
        quantize_(model, Int8WeightOnly(), progress=False)
    return model


def quant_linears(model: LlamaForCausalLM) -> dict[str, tuple[QuantLinear, int]]:
    """GGUF name -> (the QuantLinear behind it, heads for the q/k row order or 0)."""
    out = {}
    c = model.cfg
    for i, layer in enumerate(model.layers):
        at, mlp = layer.self_attn, layer.mlp
        for gname, mod, heads in (
            ("attn_q", at.q_proj, c.num_heads), ("attn_k", at.k_proj, c.num_kv_heads),
            ("attn_v", at.v_proj, 0), ("attn_output", at.o_proj, 0),
            ("ffn_gate", mlp.gate_proj, 0), ("ffn_up", mlp.up_proj, 0),
            ("ffn_down", mlp.down_proj, 0),
        ):  # fmt: skip
            if isinstance(mod, QuantLinear):
                out[f"blk.{i}.{gname}.weight"] = (mod, heads)
    return out


def permute_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order of q/k rows (Hugging Face halves -> adjacent pairs)."""
    if not heads:
        return a
    n = a.shape[0]
    return a.reshape(heads, 2, n // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def blocks_of(raw: np.ndarray, nbytes: int) -> np.ndarray:
    return np.asarray(raw).view(np.uint8).reshape(-1, nbytes)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 15, qs >> 4], axis=1)


@pytest.mark.parametrize(
    ("kind", "type_name"),
    [("gptq", "q4_1"), ("gptq-static", "q4_1"), ("awq", "q4_1"), ("rtn-g64", "q4_1"),
     ("rtn-sym", "q4_0"), ("int8", "q8_0")],
)  # fmt: skip
def test_quantized_codes_map_exactly(kind: str, type_name: str, tmp_path: Path) -> None:
    model = quantized(kind)
    path = tmp_path / "m.gguf"
    # An F32 head, so that the logits below differ by the linears alone.
    report = export_gguf(model, path, type_name, tokenizer=tiny_tokenizer(), head_type="f32")
    f = read_gguf(path)
    info = {t.name: t for t in report.tensors}
    mapped = quant_linears(model)
    assert mapped, "the quantizer left no plain QuantLinear"
    for gname, (mod, heads) in mapped.items():
        assert info[gname].mapping == "codes", gname
        t = f.tensors[gname]
        assert t.type_name == type_name.upper()
        codes = (unpack_int4(mod.qweight) if mod.bits == 4 else mod.qweight).numpy()
        per = mod.group_size // 32
        scales = np.repeat(mod.scales.numpy(), per, axis=1).reshape(-1)
        zeros = np.repeat(mod.zeros.numpy(), per, axis=1).reshape(-1)
        codes = permute_rows(codes, heads).reshape(-1, 32)
        scales = permute_rows(np.repeat(mod.scales.numpy(), per, 1), heads).reshape(-1)
        zeros = permute_rows(np.repeat(mod.zeros.numpy(), per, 1), heads).reshape(-1)
        if type_name == "q4_1":
            b = blocks_of(t.data, 20)
            d, m = b[:, :2].copy().view(np.float16)[:, 0], b[:, 2:4].copy().view(np.float16)[:, 0]
            assert np.array_equal(unpack_nibbles(b[:, 4:]), codes)
            assert np.array_equal(d, scales.astype(np.float16))
            assert np.array_equal(m, (-zeros * scales).astype(np.float16))
        elif type_name == "q4_0":
            b = blocks_of(t.data, 18)
            assert np.array_equal(unpack_nibbles(b[:, 2:]), codes)
            assert np.array_equal(b[:, :2].copy().view(np.float16)[:, 0], scales.astype(np.float16))
            assert np.all(zeros == 8)
        else:
            b = blocks_of(t.data, 34)
            signed = b[:, 2:].view(np.int8).astype(np.int16)
            assert np.array_equal(signed, codes.astype(np.int16) - zeros[:, None].astype(np.int16))
        # Written weight == the layer's weight up to the fp16 rounding of scale and min.
        assert info[gname].rel_rms_error < 2e-3
    # Linears that could not be copied (AWQ's unfolded input scales) say so.
    for t in report.requantized():
        assert t.rel_rms_error > 0
    # Loaded back, every linear holds the model's effective weight (q/k rows in their order).
    back = LlamaForCausalLM.from_gguf(path)
    eye = torch.eye(model.cfg.intermediate_size)
    for i, (a, b) in enumerate(zip(model.layers, back.layers, strict=False)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            ma, mb = a.get_submodule(name), b.get_submodule(name)
            with torch.no_grad():
                wa = ma(eye[: mb.in_features, : mb.in_features]).T  # effective (out, in)
            gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}[name]  # fmt: skip
            rel = float((wa - mb.weight.detach()).abs().max() / wa.abs().max())
            limit = 0.2 if info[f"blk.{i}.{gname}.weight"].mapping == "requantized" else 2e-3
            assert rel < limit, (name, rel)
        torch.testing.assert_close(a.input_layernorm.weight, b.input_layernorm.weight)


def test_export_rejects_bad_arguments(tmp_path: Path) -> None:
    from slimforge.models.gpt import GPT, GPTConfig

    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        export_gguf(GPT(GPTConfig(vocab_size=16, num_layers=1)), tmp_path / "x.gguf")
    model = tiny_llama()
    with pytest.raises(ValueError, match="type must be one of"):
        export_gguf(model, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(ValueError, match="head_type"):
        export_gguf(model, tmp_path / "x.gguf", "q8_0", head_type="q3")
    small = ByteLevelBPETokenizer(["a", "b"], [], split_digits=False)
    with pytest.raises(ValueError, match="2 tokens"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=small)
    with pytest.raises(TypeError, match="tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=42)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from safetensors.torch import save_model

    model = tiny_llama()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text(
        json.dumps({"model": "llama", **model.cfg.to_dict()}), encoding="utf-8"
    )
    save_model(model, str(run / "model.safetensors"))
    tok_file = tmp_path / "tok.gguf"
    export_gguf(model, tok_file, "f32", tokenizer=tiny_tokenizer())
    out = tmp_path / "out.gguf"
    argv = ["export", str(run), "--format", "gguf", "--type", "q4_1", "--quantize", "int4",
            "--tokenizer", str(tok_file), "-o", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert "14 copied code for code" in capsys.readouterr().out
    f = read_gguf(out)
    assert f.tensors["blk.1.ffn_down.weight"].type_name == "Q4_1"
    assert f.metadata["tokenizer.ggml.tokens"] == tiny_tokenizer().tokens
    assert cli_main(["export", str(run), "-o", str(tmp_path / "y.gguf")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli_main(["export", str(tok_file), "-o", str(tok_file)]) == 2
    # And a GGUF input, re-exported and generated from.
    assert cli_main(["export", str(out), "--type", "q8_0", "-o", str(tmp_path / "z.gguf")]) == 0
    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "z.gguf"), "--prompt", "abc",
                     "--max-new-tokens", "3"]) == 0  # fmt: skip


# ------------------------------------------------------------------------------ llama.cpp


def llama_cpp_next_tokens(path: Path, prompt: list[int], forced: list[int]) -> list[int]:
    """llama.cpp's greedy choice after the prompt and after each of the ``forced`` tokens fed
    one by one (teacher forcing; batched evaluation of this build crashed on an
    AVX-512/AMX CPU, so every token goes in with its own ``eval``)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=1, n_ubatch=1, n_threads=2, verbose=False
    )
    vocab = llm.n_vocab()

    def last() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    llm.eval(prompt)
    out = [last()]
    for t in forced[:-1]:
        llm.eval([t])
        out.append(last())
    llm.close()
    return out


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["f16", "q8_0", "q4_0", "q4_1"])
def test_llama_cpp_runs_the_export_like_slimforge(
    type_name: str, smollm2_gguf_path: Path, tmp_path: Path
) -> None:
    """An exported SmolLM2 (first 4 of 30 layers, to keep it short) loads in llama.cpp, and
    along slimforge's 32-token greedy continuation on the weights exactly as written,
    llama.cpp picks the same next token at (nearly) every position. llama.cpp computes
    quantized dot products on 8-bit-quantized activations (and F16 ones in half precision),
    so a near tie may flip: free-running continuations can part after such a flip."""
    pytest.importorskip("llama_cpp")
    from slimforge.models.llama import greedy_generate

    model = LlamaForCausalLM.from_gguf(smollm2_gguf_path, num_layers=4)
    path = tmp_path / f"smol-{type_name}.gguf"
    export_gguf(model, path, type_name, tokenizer=smollm2_gguf_path)
    ours = LlamaForCausalLM.from_gguf(path)  # the written weights, quantized ones included
    tok = ByteLevelBPETokenizer.from_gguf(smollm2_gguf_path)
    prompt = [1, *tok.encode("The three primary colors are")]
    want = greedy_generate(ours, prompt, 32)
    got = llama_cpp_next_tokens(path, prompt, want)
    agree = sum(a == b for a, b in zip(got, want, strict=True))
    assert agree >= 30, (agree, got, want)
