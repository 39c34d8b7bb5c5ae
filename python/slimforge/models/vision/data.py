"""Images in and out of the edge CNNs: ImageNet preprocessing and class names, the photos bundled
with scikit-image, random crops of them (an unlabelled probe set), scikit-learn's digits for
transfer learning, classification accuracy, agreement and a fine-tuning loop on the Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimforge._optional import require
from slimforge.models.vision._imagenet_classes import IMAGENET_CLASSES

__all__ = [
    "IMAGENET_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTOS",
    "ClassifierEval",
    "classify",
    "compare_logits",
    "digits_dataset",
    "evaluate_classifier",
    "fine_tune",
    "photo",
    "photo_crops",
    "predict_logits",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: scikit-image's bundled photos (no download): name -> ImageNet classes that are right for it
#: (empty: no single right class; reported only).
PHOTOS: dict[str, tuple[int, ...]] = {
    "chelsea": (281, 282, 283, 284, 285),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": (504, 967, 968),  # coffee mug, espresso, cup
    "astronaut": (),
    "rocket": (),
    "hubble_deep_field": (),
    "immunohistochemistry": (),
    "retina": (),
    "camera": (),
    "coins": (),
}


def _as_float_image(image: Any) -> torch.Tensor:
    """``(3, h, w)`` float32 in [0, 1] from an ``(h, w)`` / ``(h, w, 3|4)`` uint8 or float array,
    a PIL image or a ``(3, h, w)`` tensor in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().float()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, h, w) in [0, 1], got {tuple(t.shape)}")
        return t
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a NumPy array, PIL image or tensor, got {type(image)}")
    a = image
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image array must be (h, w), (h, w, 3) or (h, w, 4), got {a.shape}")
    a = a[:, :, :3]
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    if a.dtype == np.uint8:
        return t.float() / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"image array must be uint8 or float in [0, 1], got {a.dtype}")
    return t.float()


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).reshape(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).reshape(3, 1, 1)
    return (x - m) / s


def preprocess(
    image: Any,
    size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """ImageNet evaluation preprocessing (as torchvision's weights expect): resize the shorter
    side to ``resize`` (default ``size * 256 / 224``) with antialiased bilinear interpolation,
    centre-crop ``size x size``, scale to [0, 1] and normalise by ``mean`` / ``std``.

    image: ``(h, w)`` or ``(h, w, 3)`` uint8 / float array, PIL image or ``(3, h, w)`` tensor
    in [0, 1]. Returns ``(3, size, size)`` float32."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    resize = int(math.floor(size * 256 / 224)) if resize is None else resize
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size})")
    x = _as_float_image(image)
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = resize, int(resize * w / h)
    else:
        nh, nw = int(resize * h / w), resize
    x = F.interpolate(x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[:, top : top + size, left : left + size]
    return _normalise(x, mean, std).contiguous()


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos (:data:`PHOTOS`) as ``(h, w, 3)`` uint8. Needs
    scikit-image (no download: the photos ship inside it)."""
    require("skimage", "slimforge.models.vision.photo")
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"photo must be one of {sorted(PHOTOS)}, got {name!r}")
    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def photo_crops(
    n: int,
    size: int = 224,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    photos: Sequence[str] | None = None,
) -> torch.Tensor:
    """``n`` random crops of the bundled photos, ``(n, 3, size, size)`` float32 normalised: a
    photo drawn uniformly, a square crop of 20-100 % of its shorter side at a random place,
    flipped half the time, resized to ``size``. Deterministic in ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    names = list(photos) if photos is not None else list(PHOTOS)
    images = [_as_float_image(photo(p)) for p in names]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=g))]
        h, w = img.shape[-2:]
        frac = 0.2 + 0.8 * float(torch.rand((), generator=g))
        side = max(8, int(min(h, w) * frac))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = img[:, top : top + side, left : left + side]
        if float(torch.rand((), generator=g)) < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], (size, size), mode="bilinear", antialias=True)[0]
        out[i] = _normalise(crop, mean, std)
    return out


def digits_dataset(
    size: int = 64,
    test_fraction: float = 0.25,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8x8, bundled with scikit-learn) as RGB images
    for a pretrained CNN: scaled to [0, 1], resized to ``size`` (bilinear), repeated on three
    channels and normalised. Returns ``(train_x, train_y, test_x, test_y)`` with a seeded,
    class-stratified split; images ``(n, 3, size, size)`` float32, labels int64."""
    require("sklearn", "slimforge.models.vision.digits_dataset")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = _normalise(x.repeat(1, 3, 1, 1), mean, std).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=d.target
    )
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return x[tr], y[tr], x[te], y[te]


@torch.no_grad()
def predict_logits(model: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits ``(n, classes)`` float32 of ``model`` (an ``nn.Module``, put in eval mode, or any
    callable on image batches, e.g. an ONNX Runtime model) over ``images`` ``(n, 3, h, w)``."""
    if images.dim() != 4:
        raise ValueError(f"images must be (n, 3, h, w), got {tuple(images.shape)}")
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            out.append(torch.as_tensor(model(images[i : i + batch_size])).float())
    finally:
        if isinstance(model, nn.Module):
            model.train(was)
    return torch.cat(out)


def classify(
    model: Any, images: torch.Tensor, top: int = 5, classes: Sequence[str] = IMAGENET_CLASSES
) -> list[list[tuple[str, int, float]]]:
    """Top-``top`` ``(class name, index, probability)`` per image of ``images``
    ``(n, 3, h, w)``, from ``model``'s logits."""
    probs = predict_logits(model, images).softmax(-1)
    if probs.shape[1] != len(classes):
        raise ValueError(f"the model has {probs.shape[1]} classes, {len(classes)} names given")
    p, idx = probs.topk(min(top, probs.shape[1]), dim=-1)
    return [
        [(classes[int(j)], int(j), float(q)) for q, j in zip(pr, ix, strict=True)]
        for pr, ix in zip(p, idx, strict=True)
    ]


@dataclass
class ClassifierEval:
    """agreement: fraction of inputs whose top-1 class equals the reference's; kl: mean
    KL(p_ref || p) in nats; max_abs: largest absolute logit difference."""

    agreement: float
    kl: float
    max_abs: float


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> ClassifierEval:
    """Top-1 agreement, mean KL and max |difference| of ``logits`` against ``reference``, both
    ``(n, classes)``."""
    from slimforge.eval import mean_kl

    if reference.shape != logits.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(logits.shape)}")
    ref, got = reference.float(), logits.float()
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    kl = mean_kl(ref.log_softmax(-1), got.log_softmax(-1))
    return ClassifierEval(agree, kl, float((ref - got).abs().max()))


def evaluate_classifier(
    model: Any, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(n, 3, h, w)`` with int ``labels`` ``(n,)``."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    pred = predict_logits(model, images, batch_size).argmax(-1)
    return float((pred == labels).float().mean())


def _cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


class _ShuffledBatches(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """``steps`` mini-batches over seeded per-epoch permutations, built when asked for."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, seed: int
    ) -> None:
        self.images, self.labels, self.batch_size, self.steps = images, labels, batch_size, steps
        self.per_epoch = images.shape[0] // batch_size
        self.seed = seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.images.shape[0], generator=g)
        idx = self._order[j * self.batch_size : (j + 1) * self.batch_size]
        return self.images[idx], self.labels[idx]


def fine_tune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Trains ``model`` (a classifier: images -> logits) with cross-entropy on ``images``
    ``(n, 3, h, w)`` / ``labels`` ``(n,)`` for ``steps`` AdamW steps (warm-up + cosine) on
    :class:`slimforge.train.Trainer`, over seeded shuffled mini-batches; returns the
    ``TrainResult``. The model is left in eval mode."""
    from slimforge.train import TrainConfig, Trainer

    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        log_every=max(1, steps // 10),
        seed=seed,
        progress=progress,
    )
    result = Trainer(
        model,
        _ShuffledBatches(images, labels, batch_size, steps, seed),
        config=cfg,
        loss_fn=_cross_entropy,
    ).fit()
    model.eval()
    return result
