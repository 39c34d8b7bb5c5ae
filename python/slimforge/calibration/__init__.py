"""Calibration: observers of layer inputs, the sequential block-by-block driver, and feature
capture by module path.

GPTQ and AWQ (``slimforge.quant``), and the pruning and distillation areas, are built on it:
``run_sequential`` feeds calibration batches through the model one block at a time, attaching
an observer (``HessianObserver``, ``InputStats``) to each selected linear and handing each group
of linears that share an input to the algorithm.
"""

from slimforge._optional import require

require("torch", "slimforge.calibration")

from slimforge.calibration.capture import FeatureCapture
from slimforge.calibration.driver import (
    Batch,
    LinearGroup,
    call_model,
    prepare_calibration,
    resolve_spec,
    run_sequential,
)
from slimforge.calibration.observers import HessianObserver, InputStats, all_finite

__all__ = [
    "Batch",
    "FeatureCapture",
    "HessianObserver",
    "InputStats",
    "LinearGroup",
    "all_finite",
    "call_model",
    "prepare_calibration",
    "resolve_spec",
    "run_sequential",
]
