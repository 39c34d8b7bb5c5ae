"""The training engine: exact resume (also after SIGKILL), gradient accumulation, mixed
precision, activation checkpointing, LAMB against timm, token files, data parallelism."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimforge.data import lm_splits
from slimforge.data.tokens import TokenFile, TokenWriter, token_dtype
from slimforge.data.windows import byte_tokens, random_windows
from slimforge.models import GPT, GPTConfig
from slimforge.optim import Lamb, param_groups
from slimforge.train import TrainConfig, Trainer, checkpoint_blocks

SCRIPT = Path(__file__).parent / "scripts" / "train_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMFORGE_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600, **kw
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final.safetensors"))


def _tiny(**kw) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return GPT(GPTConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=32, **kw))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return byte_tokens(lm_splits()[0][:200_000])


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run([str(SCRIPT), str(whole)])
    proc = _run([str(SCRIPT), str(killed), "--kill-at", "7"], check=False)
    assert proc.returncode == -9, proc.stderr  # SIGKILL after step 7; last checkpoint: step 4
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert not list((killed / "checkpoints").glob(".step-*"))  # no half-written checkpoint
    _run([str(SCRIPT), str(killed), "--resume"])
    a, b = _params(whole), _params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12


def test_sigint_saves_a_checkpoint_and_stops(tmp_path: Path, tokens: torch.Tensor) -> None:
    import signal

    from slimforge.train import Callback

    class Interrupt(Callback):
        def on_step_end(self, trainer, step, metrics):  # type: ignore[no-untyped-def]
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    model = _tiny()
    cfg = TrainConfig(steps=10, batch_size=2, seq_len=32, progress=False)
    res = Trainer(model, tokens, None, cfg, out_dir=tmp_path, callbacks=[Interrupt()]).fit()
    assert res.interrupted and len(res.losses) == 3
    assert (tmp_path / "checkpoints" / "step-0000003" / "model.safetensors").is_file()
    res2 = Trainer(_tiny(), tokens, None, cfg, out_dir=tmp_path).fit(resume=True)
    assert len(res2.losses) == 10 and res2.losses[:3] == res.losses


def test_gradient_accumulation_matches_one_big_batch(tokens: torch.Tensor) -> None:
    batches = list(next(random_windows(tokens, 32, 8, torch.Generator().manual_seed(1))).split(8))
    big = _tiny()
    Trainer(
        big, batches, None, TrainConfig(steps=3, batch_size=8, seq_len=32, progress=False)
    ).fit()
    small = _tiny()
    halves = [b for batch in batches for b in batch.split(4)]
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, grad_accum=2, progress=False)
    Trainer(small, halves, None, cfg).fit()
    for (name, p), q in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    ids = torch.randint(0, 256, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = _tiny(mlp="moe", num_experts=4)
        if ckpt:
            assert checkpoint_blocks(model) == 2
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert set(model.state_dict()) == set(_tiny(mlp="moe", num_experts=4).state_dict())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="no model spec"):
        checkpoint_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision: str, tokens: torch.Tensor) -> None:
    model = _tiny()
    cfg = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=1e-2, precision=precision,
                      eval_windows=8, progress=False)  # fmt: skip
    res = Trainer(model, tokens, tokens[-5000:], cfg).fit()
    assert all(math.isfinite(x) for x in res.losses)
    assert res.losses[-1] < res.losses[0] - 1.0
    assert next(model.parameters()).dtype == torch.float32  # autocast: fp32 master weights


# --------------------------------------------------------------------------------- LAMB


def _lamb_pair(shapes, dtype, **kw):  # type: ignore[no-untyped-def]
    from timm.optim import Lamb as TimmLamb

    ps = [torch.randn(*s, dtype=dtype) for s in shapes]
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    return a, b, Lamb(a, **kw), TimmLamb(b, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lamb_matches_timm_on_every_flag_combination(dtype: torch.dtype) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (4, 4, 2), (1,), (64, 48)]
    flags = itertools.product([True, False], [True, False], [None, 1.0, 0.05], [True, False],
                              [True, False], [0.0, 0.01])  # fmt: skip
    for bc, ga, mgn, tc, aa, wd in flags:
        kw = dict(lr=1e-2, bias_correction=bc, grad_averaging=ga, max_grad_norm=mgn,
                  trust_clip=tc, always_adapt=aa, weight_decay=wd)  # fmt: skip
        a, b, oa, ob = _lamb_pair(shapes, dtype, **kw)
        for _ in range(10):
            for x, y in zip(a, b, strict=True):
                g = torch.randn_like(x)
                x.grad, y.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        for x, y in zip(a, b, strict=True):
            rel = float((x - y).detach().abs().max() / y.detach().abs().max())
            assert rel < 1e-6, (kw, rel)


def test_lamb_rosenbrock_and_state_dict_round_trip() -> None:
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = Lamb([xy], lr=0.02, weight_decay=0.0, always_adapt=False, max_grad_norm=None)

    def f(p: torch.Tensor) -> torch.Tensor:
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    for _ in range(3000):
        opt.zero_grad()
        f(xy).backward()
        opt.step()
    assert float(f(xy)) < 1e-3, xy
    model = _tiny()
    opt = Lamb(param_groups(model, 0.01), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    clone = _tiny()
    clone.load_state_dict(model.state_dict())
    opt2 = Lamb(param_groups(clone, 0.01), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as after a save and a load
    for m, o in ((model, opt), (clone, opt2)):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lamb_bf16_params_keep_an_fp32_master() -> None:
    p = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    opt = Lamb([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), p.detach())


# --------------------------------------------------------------------------------- data


def test_token_files_round_trip_and_train(tmp_path: Path) -> None:
    assert [token_dtype(v) for v in (256, 257, 65536, 65537)] == [
        "uint8", "uint16", "uint16", "uint32"]  # fmt: skip
    docs = [np.arange(10) % 300, np.arange(5) + 290]
    with TokenWriter(tmp_path / "toks", vocab_size=300, tokenizer="test") as w:
        for d in docs:
            w.write(d)
    f = TokenFile(tmp_path / "toks.bin")
    assert len(f) == 15 and f.meta["documents"] == 2 and f.tokens.dtype == np.dtype("<u2")
    assert np.array_equal(np.asarray(f.tokens), np.concatenate(docs))
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        with TokenWriter(tmp_path / "bad", vocab_size=300) as w:
            w.write(np.array([300]))
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob(".bad.bin.*"))
    (tmp_path / "toks.bin").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="holds 7 bytes"):
        TokenFile(tmp_path / "toks")
    big = np.frombuffer(lm_splits()[0][:50_000], dtype=np.uint8)
    with TokenWriter(tmp_path / "corpus", vocab_size=256) as w:
        w.write(big)
    res = Trainer(_tiny(), TokenFile(tmp_path / "corpus"), None,
                  TrainConfig(steps=5, batch_size=2, seq_len=32, progress=False)).fit()  # fmt: skip
    assert len(res.losses) == 5


# --------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    """gloo, 2 ranks x batch 2 against 1 rank x batch 4: same global batches, same result."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", "5", "--save-every", "0", "--dropout", "0"]  # dropout masks differ
    _run([str(SCRIPT), str(one), "--batch", "4", *common])
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
          str(SCRIPT), str(two), "--batch", "2", *common])  # fmt: skip
    a, b = _params(one), _params(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
