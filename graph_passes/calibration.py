"""Calibration data for post-training quantization: denoiser inputs recorded while the eager
reference pipeline runs the repository's prompt set (graph_passes/calibration_prompts.txt).

A step cache's graphs are calibrated on what they see in a cached run: DeepCache's shallow UNet
on the cached steps of a `deepcache:interval=2` run (fed the kept feature), the first-block
cache's tail on the reusing steps of a `first-block:interval=2` run; the first block alone sees
the transformer's own inputs."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from difflower.artifact.manifest import TensorSpec
from difflower.artifact.specs import DENOISERS, ComponentSpec, ShapePlan, latent_dims
from difflower.graph_passes.base import PassDidNotFire
from difflower.reference.control import edge_pattern
from difflower.reference.pipeline import load_pipeline
from difflower.reference.step_cache import CachePolicy, DeepCache, FirstBlockCache
from difflower.reference.transformer_flux import cached_inputs, packed_inputs

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
# The denoiser graphs int8 quantizes with calibrated activations: all but the first-block cache's
# tail, which is only the output head (time embedding, final norm, proj_out) that int8 keeps in
# float elsewhere too; there it gets at most int8 weights.
QUANTIZED_DENOISERS = tuple(kind for kind in DENOISERS if kind != "transformer_tail")
__all__ = ["CALIBRATED", "DENOISERS", "QUANTIZED_DENOISERS", "calibration_dataset", "denoiser_calibration"]
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
    method, cache = _recorded_call(spec)
    original = getattr(calls, method)

    def record(*args):
        values = _input_values(spec, names, method, args)
        if values is not None:  # (DeepCache's full steps are the UNet's, not the shallow path's)
            samples.append({n: v.detach().float().numpy().copy() for n, v in zip(names, values, strict=True)})
        return original(*args)

    setattr(calls, method, record)
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
                cache=cache,
                **(
                    {"control_image": edge_pattern(bucket.height, bucket.width, len(controlnets))}
                    if controlnets
                    else {}
                ),
            )
    finally:
        setattr(calls, method, original)
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


def _recorded_call(spec: ComponentSpec) -> tuple[str, CachePolicy | None]:
    """Which ModelCalls method sees `spec`'s inputs, and the step cache the calibration run uses."""
    if spec.kind == "unet_shallow":
        return "denoiser_deepcache", DeepCache(interval=2, branch=int(spec.facts["deepcache_branch"]))
    if spec.kind == "transformer_tail":
        return "denoiser_from_cache", FirstBlockCache(interval=2)
    assert spec.kind in DENOISERS
    return "denoiser", None


def _input_values(spec: ComponentSpec, names: list[str], method: str, args: tuple) -> list[torch.Tensor] | None:
    """`spec`'s inputs, in order, from the arguments of a ModelCalls `method` (None: not this graph's call)."""
    if method == "denoiser_from_cache":
        first, tail, timestep, cond = args
        if spec.class_name == "FluxTransformer2DModel":
            return list(cached_inputs(first, tail, timestep, cond.pooled_projections, cond.guidance).values())
        return [first, tail, cond.pooled_projections, timestep]
    if method == "denoiser_deepcache":
        sample, timestep, cond, _branch, feature = args
        return None if feature is None else [*_unet_values(sample, timestep, cond), feature]
    sample, timestep, cond, *rest = args
    if spec.class_name == "FluxTransformer2DModel":  # packed, as the engine call packs them
        inputs = packed_inputs(sample, timestep, cond.encoder_hidden_states, cond.pooled_projections, cond.guidance)
        return list(inputs.values())
    if spec.kind not in ("unet", "unet_shallow"):  # the transformer, or its first block
        return [sample, cond.encoder_hidden_states, cond.pooled_projections, timestep]
    values = _unet_values(sample, timestep, cond)
    residuals = rest[0] if rest else None
    if residuals is not None:
        values += [*residuals.down, residuals.mid]
    elif len(names) > len(values):  # no ControlNet on at this step: it adds zeros
        values += [torch.zeros(concrete_shape(t, sample)) for t in spec.inputs[len(values) :]]
    return values


def _unet_values(sample: torch.Tensor, timestep: torch.Tensor, cond) -> list[torch.Tensor]:
    values = [sample, timestep, cond.encoder_hidden_states]
    if cond.text_embeds is not None:
        values += [cond.text_embeds, cond.time_ids]
    if cond.timestep_cond is not None:
        values.append(cond.timestep_cond)
    return values
