"""Vision on the edge: depthwise-separable CNNs with real ImageNet weights, BatchNorm folding,
a CNN spec for channel pruning, and ONNX export / INT8 static quantization run by ONNX Runtime.

    from slimforge.models.vision import mobilenet_v2, preprocess, photo, classify
    model = mobilenet_v2()                                  # torchvision's ImageNet weights
    classify(model, preprocess(photo("chelsea"))[None])     # [[(name, index, probability), ...]]

See docs/vision.md.
"""

from slimforge._optional import require

require("torch", "slimforge.models.vision")

from slimforge.models.vision.data import (  # noqa: E402
    IMAGENET_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOS,
    ClassifierEval,
    classify,
    compare_logits,
    digits_dataset,
    evaluate_classifier,
    fine_tune,
    photo,
    photo_crops,
    predict_logits,
    preprocess,
)
from slimforge.models.vision.layers import (  # noqa: E402
    ConvBN,
    DepthwiseSeparableConv,
    InvertedResidual,
    count_macs,
    count_params,
    fold_batchnorm,
)
from slimforge.models.vision.nets import (  # noqa: E402
    ARCHITECTURES,
    ConvNetSpec,
    EfficientNetLite0,
    MobileNetV2,
    VisionConfig,
    VisionNet,
    efficientnet_lite0,
    load_torchvision_mobilenet_v2,
    load_vision_model,
    mobilenet_v2,
    save_vision_model,
    torchvision_mobilenet_v2_keys,
)

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTOS",
    "ClassifierEval",
    "ConvBN",
    "ConvNetSpec",
    "DepthwiseSeparableConv",
    "EfficientNetLite0",
    "InvertedResidual",
    "MobileNetV2",
    "VisionConfig",
    "VisionNet",
    "classify",
    "compare_logits",
    "count_macs",
    "count_params",
    "digits_dataset",
    "efficientnet_lite0",
    "evaluate_classifier",
    "fine_tune",
    "fold_batchnorm",
    "load_torchvision_mobilenet_v2",
    "load_vision_model",
    "mobilenet_v2",
    "photo",
    "photo_crops",
    "predict_logits",
    "preprocess",
    "save_vision_model",
    "torchvision_mobilenet_v2_keys",
]
