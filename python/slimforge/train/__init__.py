"""Training: the loop every area trains with (pre-training, distillation, QAT, recovery).

    trainer = Trainer(model, train_tokens, val_tokens, TrainConfig(steps=1200, lr=2e-3),
                      out_dir="runs/gpt")
    result = trainer.fit()              # AdamW or LAMB, warm-up + cosine, clipping
    result.final_eval.perplexity
    Trainer(...same..., out_dir="runs/gpt").fit(resume=True)   # continues a stopped run

``loss_fn(model, batch) -> loss`` replaces the default causal-LM loss (distillation into a
fake-quantized student, for example); ``precision="bf16"``, ``checkpointing=True`` and
``grad_accum`` trade speed, memory and batch size; under ``torchrun`` the same script trains on
several processes (:mod:`slimforge.train.distributed`).
"""

from slimforge._optional import require

require("torch", "slimforge.train")

from slimforge.train.loop import (
    Callback,
    TrainConfig,
    Trainer,
    TrainResult,
    checkpoint_blocks,
    distillation_loss,
    warmup_cosine,
)

__all__ = [
    "Callback",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "checkpoint_blocks",
    "distillation_loss",
    "warmup_cosine",
]
