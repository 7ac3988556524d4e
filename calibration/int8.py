"""INT8 post-training quantization of the feature graph with NNCF, on normal images.

Calibration images go through the shared preprocessing, so the activations NNCF
observes are exactly the ones the camera will produce. The optional
accuracy-aware mode bounds the drop of a torch-free, label-free metric: the
mean cosine similarity of the INT8 patch embeddings to the fp32 ones.
"""
from __future__ import annotations

import numpy as np

# One implementation of "which normal images calibrate", shared with TensorRT's on-camera build.
from edgecore.runtime.frames import DEFAULT_NUM_CALIB, calibration_crops

__all__ = ["DEFAULT_NUM_CALIB", "KEPT_FP32", "PORTABLE_KEPT_FP32", "calibration_crops", "mean_cosine", "quantize"]


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity of matching patch embeddings (N×P×D each)."""
    num = np.sum(reference * candidate, axis=-1)
    den = np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1) + 1e-12
    return float(np.mean(num / den))


# The PatchCore head (3×3 pooling, upsampling, concatenation, reduction) produces the
# embeddings that are compared to the coreset. Quantizing it rounds the features
# themselves to 256 levels per tensor: on bottle with Lite0 that alone dropped the
# embedding cosine to 0.86 and image AUROC from 1.00 to 0.73 (benchmarks/RESULTS.md).
# The backbone is quantized; the head stays fp32 (it is a few % of the FLOPs): every op from the
# per-layer 3×3 averages (the first head ops) to the output, whatever the reduction is made of.
HEAD_START_TYPE = "AvgPool"

# A portable engine has 7-bit weights (NNCF's overflow fix, so CPUs without VNNI do not saturate). Rounding every
# convolution to 7 bits broke the host-vs-camera contract on bottle (image-score Spearman < 0.99 on an AVX2-only AMD
# EPYC: Lite0 0.984, Lite1 0.980, Lite2 0.983). Kept fp32: the depthwise convolutions (one 3x3 filter per channel)
# and the convolutions at the first convolution's output resolution (the stem and what follows it before the first
# downsampling: few channels, little redundancy) -> Lite0 0.999, Lite2 0.998, at no measurable engine cost
# (benchmarks/RESULTS.md #11, "A real AVX2-only CPU").
PORTABLE_FP32_TYPES = ["GroupConvolution"]
# What the manifest records as kept fp32 (``calibration.kept_fp32``; the runtime warns about portable engines without it).
KEPT_FP32 = ("head",)
PORTABLE_KEPT_FP32 = KEPT_FP32 + ("full-resolution convolutions", "depthwise convolutions")


def _head_ops(model) -> list[str]:
    """Names (as NNCF's ignored scope takes them) of the head: the 3×3 averages and every op after them."""
    pending = [op for op in model.get_ordered_ops() if op.get_type_name() == HEAD_START_TYPE]
    names: set[str] = set()
    while pending:
        op = pending.pop()
        if op.get_type_name() == "Result" or op.get_friendly_name() in names:
            continue
        names.add(op.get_friendly_name())
        pending.extend(target.get_node() for output in op.outputs() for target in output.get_target_inputs())
    return sorted(names)


def _spatial_size(op) -> tuple[int, ...] | None:
    """Height × width of an op's output, None where the shape is dynamic."""
    shape = op.get_output_partial_shape(0)
    return tuple(shape.to_shape())[2:] if shape.is_static else None


def _full_resolution_convolutions(model) -> list[str]:
    """Names (as NNCF's ignored scope takes them) of the first convolution in execution order and of every
    convolution whose output has its spatial size; the first alone where shapes are dynamic."""
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    if not convolutions:
        return []
    size = _spatial_size(convolutions[0])
    if size is None:
        return [convolutions[0].get_friendly_name()]
    return [op.get_friendly_name() for op in convolutions if _spatial_size(op) == size]


def quantize(model, crops: np.ndarray, max_drop: float | None = None, vnni: bool = False):
    """NNCF PTQ of the backbone (mixed preset: symmetric weights, asymmetric activations).

    ``vnni=True`` keeps full 8-bit weights (NNCF's overflow fix off): measured cosine
    0.997 vs 0.991 with it, but the engine is then only correct on VNNI/AMX CPUs —
    the manifest records that and the runtime refuses such an engine elsewhere.
    Without it (portable) the full-resolution and the depthwise convolutions stay fp32 (see above).
    With ``max_drop``, the accuracy-aware variant keeps more layers in fp32 until the
    mean embedding cosine drop is within bounds.
    """
    import nncf
    import openvino as ov  # only here: a Jetson image has no OpenVINO but still calibrates for TensorRT
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    items = [crop[None] for crop in crops]
    dataset = nncf.Dataset(items)
    head = _head_ops(model)
    kept_fp32 = (nncf.IgnoredScope(names=head, validate=False) if vnni else
                 nncf.IgnoredScope(names=head + _full_resolution_convolutions(model),
                                   types=PORTABLE_FP32_TYPES, validate=False))
    common = dict(preset=nncf.QuantizationPreset.MIXED, subset_size=len(items), ignored_scope=kept_fp32)
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE if vnni else OverflowFix.ENABLE)
    if max_drop is None:
        return nncf.quantize(model, dataset, advanced_parameters=advanced, **common)

    core = ov.Core()
    reference = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [reference(item)[0] for item in items]

    def validate(compiled, data) -> float:
        return float(np.mean([mean_cosine(ref, compiled(item)[0]) for ref, item in zip(expected, data)]))

    return nncf.quantize_with_accuracy_control(
        model, dataset, dataset, validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=advanced, **common,
    )
