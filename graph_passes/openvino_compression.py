"""Artifact-level pass: nncf compression of OpenVINO components (opt-in, `--quantize`).

- `int8-weight`: int8 weights (asymmetric, per channel) of the denoiser and the text encoders;
- `int4-weight`: int4 weights (symmetric, groups of 64) of the same; layers nncf keeps at int8
  for accuracy stay int8;
- `int8`: hybrid quantization of the denoiser: int8 activations and weights on its convolutions
  and matmuls (post-training, calibrated on denoiser inputs recorded while the eager reference
  pipeline runs the repository's prompt set), then int8 weights on what that left in float;
  the VAE and the text encoders get int8 weights only.

Every mode returns a PassResult counting what it compressed and raises PassDidNotFire when it
compressed nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from difflower.graph_passes.base import PassDidNotFire, PassResult, quieter
from difflower.graph_passes.calibration import DENOISERS, QUANTIZED_DENOISERS

QUANTIZE_MODES = ("int8-weight", "int4-weight", "int8")


def compression_applies(mode: str, kind: str) -> bool:
    """Which components a mode touches: weight modes the denoiser and text encoders; int8 all."""
    if mode == "int8":
        return True
    return kind in DENOISERS or kind == "text_encoder"


def _count_low_bit_constants(model) -> dict[str, int]:
    import openvino as ov

    low = {ov.Type.u8: "int8", ov.Type.i8: "int8", ov.Type.u4: "int4", ov.Type.i4: "int4"}
    counts: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() in low:
            key = f"{low[op.get_element_type()]} weight tensors"
            counts[key] = counts.get(key, 0) + 1
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if fake_quantize:
        counts["int8 activation quantizers"] = fake_quantize
    return counts


def compress_component(model, kind: str, mode: str, dataset: list[dict[str, np.ndarray]] | None):
    """Compress one OpenVINO model in place of `model`; returns (model, PassResult)."""
    from nncf.common.logging.logger import nncf_logger

    with quieter(nncf_logger, logging.ERROR):  # nncf prints tables and progress bars at INFO
        return _compress(model, kind, mode, dataset)


def _compress(model, kind: str, mode: str, dataset: list[dict[str, np.ndarray]] | None):
    import nncf

    settings: dict[str, Any] = {"mode": mode}
    if mode == "int4-weight":
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

        # Layers whose width 64 does not divide get the largest group size that does (nncf's ADJUST).
        adjust = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64, ratio=1.0, advanced_parameters=adjust
        )
        settings.update(weights="int4 symmetric, groups of 64 (smaller where 64 does not divide)")
    elif mode == "int8" and kind in QUANTIZED_DENOISERS:
        if not dataset:
            raise PassDidNotFire(f"openvino int8: no calibration samples for the {kind}")
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        # Every layer's weights in 7 bits (nncf's overflow fix; its default covers the first layer only):
        # without VNNI, OpenVINO's u8 x s8 products saturate 16-bit sums (vpmaddubsw) on AVX2 CPUs.
        overflow = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
        model = nncf.quantize(
            model,
            nncf.Dataset(dataset),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(dataset),
            preset=nncf.QuantizationPreset.MIXED,
            advanced_parameters=overflow,
        )
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        settings.update(
            activations="int8 (post-training, TRANSFORMER preset, MIXED)",
            weights="int8, 7-bit range on every quantized layer (overflow fix)",
            calibration_samples=len(dataset),
        )
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        settings.update(weights="int8 asymmetric, per channel")
    counts = _count_low_bit_constants(model)
    if not counts:
        raise PassDidNotFire(f"openvino {mode}: nothing in the {kind} was compressed")
    return model, PassResult("openvino_compression", counts, settings)
