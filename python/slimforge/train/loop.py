"""`Trainer`: a small, dependable training loop for models of the causal-LM protocol.

AdamW (or LAMB) with linear warm-up and cosine decay, gradient clipping, gradient accumulation,
mixed precision (bf16 / fp16 autocast, a gradient scaler for fp16), per-block activation
checkpointing from the model spec, periodic evaluation, a JSONL metrics log, callbacks,
atomic checkpoints every N steps and on SIGINT / SIGTERM, exact resume, and data parallelism
under ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimforge.config import Config
from slimforge.data.windows import random_windows, spaced_windows
from slimforge.eval import LMEval, evaluate_lm
from slimforge.train import distributed as dist_util
from slimforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "Callback",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "checkpoint_blocks",
    "distillation_loss",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "lamb")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay from 1
    to ``min_ratio`` at ``total`` steps (nanoGPT's schedule)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    ramp = min(1.0, (step + 1) / max(1, warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return ramp * (min_ratio + (1 - min_ratio) * cosine)


@dataclass(frozen=True)
class TrainConfig(Config):
    """steps (optimizer steps), batch_size (sequences per micro-batch and rank), seq_len
    (tokens per window), grad_accum (micro-batches per step: the global batch is batch_size x
    ranks x grad_accum), lr (peak), warmup_steps (default steps // 20), min_lr_ratio, the
    optimizer ("adamw" or "lamb") with weight_decay and betas, grad_clip (global norm; None:
    off), precision ("fp32", "bf16" or "fp16" autocast), checkpointing (recompute each block's
    activations in the backward pass), eval_every (steps; 0: at the end only), eval_windows,
    log_every (steps between metrics lines), save_every (steps between checkpoints when the
    trainer has an ``out_dir``; 0: at the end and on a signal only), keep_checkpoints, seed
    (window sampling)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    checkpointing: bool = False
    eval_every: int = 0
    eval_windows: int = 128
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_windows", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)


@dataclass
class TrainResult:
    """losses: training loss per step (mean over its micro-batches); evals: (step, LMEval)
    pairs; tokens: tokens trained on (all ranks); train_seconds: time in forward, backward and
    optimizer steps (evaluation and checkpoints excluded); interrupted: stopped by a signal
    (a checkpoint was saved first when the trainer has an out_dir)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, LMEval]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_eval(self) -> LMEval | None:
        return self.evals[-1][1] if self.evals else None

    def to_json(self) -> dict[str, Any]:
        return {
            "losses": self.losses,
            "evals": [[s, e.nll, e.tokens] for s, e in self.evals],
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainResult:
        return cls(
            losses=list(d["losses"]),
            evals=[(int(s), LMEval(float(n), int(t))) for s, n, t in d["evals"]],
            tokens=int(d["tokens"]),
            train_seconds=float(d["train_seconds"]),
        )


class Callback:
    """Hooks into the loop; override what you need. ``trainer.model`` is the model (unwrapped),
    ``trainer.optimizer`` the optimizer. ``on_step_end`` runs after each optimizer step with the
    step number (1-based) and the step's metrics; returning True stops training."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (also on resume)."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> bool | None:
        """After each optimizer step; True stops the run."""
        return None

    def on_eval(self, trainer: Trainer, step: int, result: LMEval) -> None:
        """After each evaluation."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last step (or the interruption)."""


def default_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss: ``model(batch, labels=batch).loss``."""
    loss = model(batch, labels=batch).loss
    if loss is None:
        raise ValueError("the model returned no loss for labels: is it a causal LM?")
    return loss


def distillation_loss(teacher: nn.Module, temperature: float = 1.0) -> LossFn:
    """A ``loss_fn`` distilling ``teacher`` into the trained model: KL(teacher || student) of
    the next-token distributions at ``temperature``, scaled by T^2 (Hinton et al.), mean over
    positions. The teacher runs without gradients in eval mode."""
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher.eval()

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(batch).logits.float()
        s_logits = model(batch).logits.float()
        t = F.log_softmax(t_logits / temperature, -1).flatten(0, -2)
        s = F.log_softmax(s_logits / temperature, -1).flatten(0, -2)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
        return kl * temperature**2

    return loss


def checkpoint_blocks(model: nn.Module, enable: bool = True) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, ``use_reentrant=False``), for the blocks the model's spec names.
    Returns how many blocks were changed. Parameter names and ``state_dict`` are unchanged;
    ``enable=False`` undoes it."""
    from slimforge.models.spec import model_spec

    spec = model_spec(model)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} has no model spec: activation checkpointing needs to know "
            "its blocks (give the model a spec() method, see slimforge.models.spec)"
        )
    count = 0
    for block in spec.block_list(model):
        if "forward" in block.__dict__:
            del block.__dict__["forward"]  # undo an earlier wrap
        if enable:
            plain = block.forward

            def forward(*args: Any, _plain: Callable[..., Any] = plain, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    from torch.utils.checkpoint import checkpoint

                    return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
                return _plain(*args, **kwargs)

            block.forward = forward  # type: ignore[method-assign]
        count += 1
    return count


def _make_optimizer(params: list[nn.Parameter], c: TrainConfig) -> torch.optim.Optimizer:
    if c.optimizer == "lamb":
        from slimforge.optim import Lamb

        return Lamb(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
    return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


class Trainer:
    """Trains ``model`` on ``train_data``.

    train_data: 1-D tokens (an int64 tensor, an integer NumPy array or a
        :class:`~slimforge.data.tokens.TokenFile`: random windows of ``seq_len`` are drawn from a
        seeded generator whose state is the data position) or a sequence of batches (cycled in
        order): ``(batch, seqlen)`` id tensors for language models, or anything ``loss_fn``
        takes, e.g. ``(images, labels)`` tuples for a classifier (throughput then counts
        examples).
    eval_data: 1-D tokens (``eval_windows`` evenly spaced windows), an ``(n, length)`` tensor of
        windows, or None.
    loss_fn: ``loss_fn(model, batch) -> scalar``; default the causal-LM loss.
    params: the parameters to train (default: every parameter that requires grad).
    out_dir: where ``metrics.jsonl`` and checkpoints go (None: neither).
    callbacks: :class:`Callback` instances.
    optimizer: an optimizer over ``params`` to use instead of the config's.

    Under ``torchrun`` (``torch.distributed`` initialised, see
    :func:`slimforge.train.distributed.init_from_env`) the model is wrapped in
    ``DistributedDataParallel``; every rank draws the same global batch and trains on its
    slice, rank 0 logs and saves.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        eval_data: Any = None,
        config: TrainConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        params: Iterable[nn.Parameter] | None = None,
        out_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model = model
        self.config = config or TrainConfig()
        self.loss_fn = loss_fn or default_loss
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.rank, self.world = dist_util.rank_and_world()
        self._train_data = train_data
        self.eval_windows = self._eval_windows(eval_data)
        chosen = list(params if params is not None else model.parameters())
        trainable = [p for p in chosen if p.requires_grad]
        if not trainable:
            raise ValueError("no trainable parameters")
        self._params = trainable
        self.optimizer = optimizer or _make_optimizer(trainable, self.config)
        c = self.config
        self._device_type = next(iter(trainable)).device.type
        self.scaler = torch.amp.GradScaler(self._device_type) if c.precision == "fp16" else None
        if c.checkpointing:
            checkpoint_blocks(model)
        self._step_model: nn.Module = dist_util.wrap_ddp(model) if self.world > 1 else model
        self._generator = torch.Generator().manual_seed(c.seed)
        self._batch_index = 0
        self._stop = False

    # ------------------------------------------------------------------ data

    def _eval_windows(self, data: Any) -> torch.Tensor | None:
        if data is None:
            return None
        if isinstance(data, torch.Tensor) and data.dim() == 2:
            return data
        return spaced_windows(data, self.config.seq_len, self.config.eval_windows)

    def _is_token_stream(self) -> bool:
        d = self._train_data
        return (
            (isinstance(d, torch.Tensor) and d.dim() == 1)
            or isinstance(d, np.ndarray)
            or isinstance(getattr(d, "tokens", None), np.ndarray)
        )

    def _micro_batches(self) -> Iterator[torch.Tensor]:
        """This rank's micro-batches, in order."""
        c = self.config
        if self._is_token_stream():
            glob = random_windows(
                self._train_data, c.seq_len, c.batch_size * self.world, self._generator
            )
            for batch in glob:
                yield batch[self.rank * c.batch_size : (self.rank + 1) * c.batch_size]
        data = self._train_data
        if not isinstance(data, Sequence):
            data = list(data)
            self._train_data = data
        if not data:
            raise ValueError("train_data holds no batches")
        while True:
            batch = data[self._batch_index % len(data)]
            self._batch_index += 1
            yield batch

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(device_type=self._device_type, dtype=dtype)

    def _train_step(self, batches: Iterator[torch.Tensor]) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for i in range(c.grad_accum):
            batch = next(batches)
            last = i == c.grad_accum - 1
            sync = (
                contextlib.nullcontext() if last or self.world == 1 else self._step_model.no_sync()
            )
            with sync:
                with self._autocast():
                    loss = self.loss_fn(self._step_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)}")
                scaled = loss / c.grad_accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total += float(loss.detach())
            tokens += _batch_tokens(batch) * self.world
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, c.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total / c.grad_accum, tokens

    def evaluate(self) -> LMEval:
        """Evaluation NLL of the model on the evaluation windows."""
        if self.eval_windows is None:
            raise ValueError("no eval_data was given")
        with self._autocast():
            return evaluate_lm(self.model, self.eval_windows, batch_size=self.config.batch_size)

    # ------------------------------------------------------------------ state

    def _state(self, result: TrainResult) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "result": result.to_json(),
            "batch_index": self._batch_index,
            "scaler": None if self.scaler is None else _plain(self.scaler.state_dict()),
            "world": self.world,
        }

    def save(self, step: int, result: TrainResult) -> Path | None:
        """Writes a checkpoint of the current state (rank 0; None without an out_dir)."""
        if self.out_dir is None:
            return None
        path = None
        if self.rank == 0:
            path = save_checkpoint(
                self.out_dir, step, self.model, self.optimizer, self._state(result),
                self._generator, keep=self.config.keep_checkpoints,
            )  # fmt: skip
            logger.info("saved %s", path)
        dist_util.barrier()
        return path

    def _resume(self) -> tuple[int, TrainResult]:
        assert self.out_dir is not None
        path = latest_checkpoint(self.out_dir)
        if path is None:
            logger.info("no checkpoint under %s: starting from step 0", self.out_dir)
            return 0, TrainResult()
        meta = load_checkpoint(path, self.model, self.optimizer, self._generator)
        if meta.get("world", 1) != self.world:
            raise ValueError(
                f"{path} was written by {meta.get('world')} ranks, this run has {self.world}"
            )
        self._batch_index = int(meta["batch_index"])
        if self.scaler is not None and meta.get("scaler") is not None:
            self.scaler.load_state_dict(meta["scaler"])
        logger.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"]), TrainResult.from_json(meta["result"])

    # ------------------------------------------------------------------ loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM set a flag: the current step finishes, a checkpoint is saved."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            if self._stop:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop = True
            logger.warning("signal %d: stopping after this step", signum)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def fit(self, resume: bool = False) -> TrainResult:
        """Runs the optimizer steps left to ``config.steps``; with ``resume`` it first restores
        the newest checkpoint under ``out_dir`` (and reaches the same parameters as a run that
        was never stopped). Evaluates every ``eval_every`` steps and at the end when eval data
        was given; checkpoints every ``save_every`` steps, at the end and on SIGINT/SIGTERM
        when an ``out_dir`` was given. Returns the history of the whole run."""
        from tqdm.auto import tqdm

        c = self.config
        if resume and self.out_dir is None:
            raise ValueError("resume needs the trainer's out_dir")
        start, result = self._resume() if resume else (0, TrainResult())
        for cb in self.callbacks:
            cb.on_train_start(self)
        batches = self._micro_batches()
        self.model.train()
        self._stop = False
        bar = tqdm(
            range(start, c.steps), desc="train", disable=not c.progress or self.rank != 0,
            unit="step", initial=start, total=c.steps,
        )  # fmt: skip
        step = start
        with self._signals():
            for step in bar:
                if c.eval_every and step % c.eval_every == 0 and self.eval_windows is not None:
                    self._record_eval(step, result)
                    self.model.train()
                mult = warmup_cosine(step, c.steps, c.warmup, c.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = c.lr * mult
                t0 = time.perf_counter()
                loss, tokens = self._train_step(batches)
                result.train_seconds += time.perf_counter() - t0
                result.tokens += tokens
                result.losses.append(loss)
                metrics = {"step": step + 1, "loss": loss, "lr": c.lr * mult,
                           "tokens": result.tokens, "tokens_per_s": result.tokens_per_s}  # fmt: skip
                if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
                    self._log(metrics)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{result.tokens_per_s:,.0f}")
                stop = any(cb.on_step_end(self, step + 1, metrics) for cb in self.callbacks)
                if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < c.steps:
                    self.save(step + 1, result)
                if stop or self._stop:
                    result.interrupted = self._stop
                    self.save(step + 1, result)
                    break
            else:
                step = c.steps
        if not result.interrupted and step >= c.steps:
            if self.eval_windows is not None:
                self._record_eval(c.steps, result)
            self.save(c.steps, result)
        self.model.eval()
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _record_eval(self, step: int, result: TrainResult) -> None:
        ev = self.evaluate()
        result.evals.append((step, ev))
        self._log({"step": step, "eval_nll": ev.nll, "eval_ppl": ev.perplexity})
        for cb in self.callbacks:
            cb.on_eval(self, step, ev)


def _batch_tokens(batch: Any) -> int:
    """Tokens (ids of an LM batch) or examples (first tensor's rows) in a batch, for throughput."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() if batch.dtype in (torch.int64, torch.int32) else batch.shape[0]
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return _batch_tokens(first) if isinstance(first, torch.Tensor) else 1


def _plain(obj: Any) -> Any:
    """JSON-ready copy of a small state dict (tensors become floats)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj
