"""Training: the loop every area trains with (pre-training, distillation, QAT, recovery).

    trainer = Trainer(model, train_tokens, val_tokens, TrainConfig(steps=1200, lr=2e-3))
    result = trainer.fit()          # AdamW, linear warm-up + cosine decay, gradient clipping
    result.final_eval.perplexity

``loss_fn(model, batch) -> loss`` replaces the default causal-LM loss (distillation into a
fake-quantized student, for example).
"""

from slimforge.train.loop import (
    TrainConfig,
    Trainer,
    TrainResult,
    distillation_loss,
    warmup_cosine,
)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "distillation_loss", "warmup_cosine"]
