"""Calibration data for post-training quantization: denoiser inputs recorded while the eager
reference pipeline runs the repository's prompt set (graph_passes/calibration_prompts.txt)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from difflower.artifact.manifest import TensorSpec
from difflower.artifact.specs import ComponentSpec, ShapePlan, latent_dims
from difflower.graph_passes.base import PassDidNotFire
from difflower.reference.control import edge_pattern
from difflower.reference.pipeline import load_pipeline

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
DENOISERS = ("unet", "transformer")
# The export options of the backends that calibrate (their --quantize and the calibration size).
CALIBRATED = frozenset({"quantize", "calibration_prompts", "calibration_steps"})


def calibration_prompts() -> list[str]:
    """The repository's calibration prompt set."""
    lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def calibration_dataset(
    root: Path | None,
    spec: ComponentSpec,
    plan: ShapePlan,
    prompts: int = 8,
    steps: int = 10,
    controlnets: Sequence[str] = (),
) -> list[dict[str, np.ndarray]]:
    """Denoiser inputs recorded while the eager reference pipeline runs `prompts` calibration
    prompts for `steps` steps each, at the artifact's shape (its static bucket, or native size);
    with `controlnets`, they run on an edge pattern and their residuals are recorded too."""
    if root is None:
        raise PassDidNotFire("int8 calibration: the source checkpoint is unknown, cannot calibrate")
    pipe = load_pipeline(root, controlnets=controlnets)
    bucket = plan.parity_bucket(pipe.spec.native_size)
    names = [t.name for t in spec.inputs]
    samples: list[dict[str, np.ndarray]] = []
    calls = pipe.calls
    original = calls.denoiser

    def record(sample: torch.Tensor, timestep: torch.Tensor, cond, residuals=None) -> torch.Tensor:
        if spec.kind == "unet":
            values = [sample, timestep, cond.encoder_hidden_states]
            if cond.text_embeds is not None:
                values += [cond.text_embeds, cond.time_ids]
            if cond.timestep_cond is not None:
                values.append(cond.timestep_cond)
            if residuals is not None:
                values += [*residuals.down, residuals.mid]
            elif len(names) > len(values):  # no ControlNet on at this step: it adds zeros
                values += [torch.zeros(concrete_shape(t, sample)) for t in spec.inputs[len(values) :]]
        else:
            values = [sample, cond.encoder_hidden_states, cond.pooled_projections, timestep]
        samples.append({n: v.detach().float().numpy().copy() for n, v in zip(names, values, strict=True)})
        return original(sample, timestep, cond, residuals)

    calls.denoiser = record
    try:
        for i, prompt in enumerate(calibration_prompts()[:prompts]):
            pipe(
                [prompt] * bucket.batch,
                num_inference_steps=steps,
                seed=i,
                output_type="latent",
                progress=False,
                height=bucket.height,
                width=bucket.width,
                **(
                    {"control_image": edge_pattern(bucket.height, bucket.width, len(controlnets))}
                    if controlnets
                    else {}
                ),
            )
    finally:
        calls.denoiser = original
    del pipe, calls
    gc.collect()  # the eager pipeline's weights go before the caller loads the quantizer's
    return samples


def denoiser_calibration(options, spec: ComponentSpec) -> list[dict[str, np.ndarray]]:
    """`calibration_dataset` for an export: its source checkpoint, shapes, and the
    `calibration_prompts` / `calibration_steps` options (default 8 prompts x 10 steps)."""
    return calibration_dataset(
        options.source_root,
        spec,
        options.plan,
        prompts=int(options.extra.get("calibration_prompts") or 8),
        steps=int(options.extra.get("calibration_steps") or 10),
        controlnets=options.controlnets,
    )


def concrete_shape(tensor: TensorSpec, sample: torch.Tensor) -> tuple[int, ...]:
    """The shape of a residual input at `sample`'s batch and latent size."""
    dims = {"denoiser_batch": sample.shape[0], **latent_dims(sample.shape[2], sample.shape[3])}
    return tuple(dims[d] if isinstance(d, str) else d for d in tensor.shape)
