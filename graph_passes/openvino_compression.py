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

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.exporters.specs import ComponentSpec, ShapePlan
from difflower.graph_passes.base import PassDidNotFire, PassResult

QUANTIZE_MODES = ("int8-weight", "int4-weight", "int8")
PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
DENOISERS = ("unet", "transformer")


def calibration_prompts() -> list[str]:
    """The repository's calibration prompt set."""
    lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


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


@contextlib.contextmanager
def _quiet_nncf():
    """nncf prints tables and progress bars at INFO; difflower reports the PassResult instead."""
    from nncf.common.logging.logger import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nncf_logger.setLevel(level)


def compress_component(model, kind: str, mode: str, dataset: list[dict[str, np.ndarray]] | None):
    """Compress one OpenVINO model in place of `model`; returns (model, PassResult)."""
    with _quiet_nncf():
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
    elif mode == "int8" and kind in DENOISERS:
        if not dataset:
            raise PassDidNotFire(f"openvino int8: no calibration samples for the {kind}")
        model = nncf.quantize(
            model,
            nncf.Dataset(dataset),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(dataset),
            preset=nncf.QuantizationPreset.MIXED,
        )
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        settings.update(activations="int8 (post-training, TRANSFORMER preset, MIXED)", calibration_samples=len(dataset))
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        settings.update(weights="int8 asymmetric, per channel")
    counts = _count_low_bit_constants(model)
    if not counts:
        raise PassDidNotFire(f"openvino {mode}: nothing in the {kind} was compressed")
    return model, PassResult("openvino_compression", counts, settings)


def calibration_dataset(
    root: Path | None, spec: ComponentSpec, plan: ShapePlan, prompts: int = 8, steps: int = 10
) -> list[dict[str, np.ndarray]]:
    """Denoiser inputs recorded while the eager reference pipeline runs `prompts` calibration
    prompts for `steps` steps each, at the artifact's shape (its static bucket, or native size)."""
    from difflower.reference.pipeline import load_pipeline

    if root is None:
        raise PassDidNotFire("openvino int8: the source checkpoint is unknown, cannot calibrate")
    pipe = load_pipeline(root)
    bucket = plan.buckets[0] if plan.buckets else None
    names = [t.name for t in spec.inputs]
    samples: list[dict[str, np.ndarray]] = []
    calls = pipe.calls
    original = calls.denoiser

    def record(sample: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        if spec.kind == "unet":
            values = [sample, timestep, cond.encoder_hidden_states]
            if cond.text_embeds is not None:
                values += [cond.text_embeds, cond.time_ids]
        else:
            values = [sample, cond.encoder_hidden_states, cond.pooled_projections, timestep]
        samples.append({n: v.detach().float().numpy().copy() for n, v in zip(names, values, strict=True)})
        return original(sample, timestep, cond)

    calls.denoiser = record
    try:
        for i, prompt in enumerate(calibration_prompts()[:prompts]):
            size = {} if bucket is None else {"height": bucket.height, "width": bucket.width}
            batch = 1 if bucket is None else bucket.batch
            pipe([prompt] * batch, num_inference_steps=steps, seed=i, output_type="latent", progress=False, **size)
    finally:
        calls.denoiser = original
    return samples
