"""Parity: an artifact against the eager reference, at three levels.

1. component: each exported component, run by its runtime engine, vs the reference module on
   seeded inputs at the artifact's shapes (`component_parity`: the one function export,
   validate and bench all use, producing the one `ComponentParity` record);
2. trajectory: the whole denoising run with the reference's noise, latents compared after
   every step (the drift curve), the final latents gated;
3. image: the final decoded image vs the reference image.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.artifact.manifest import (
    ComponentRecord,
    Manifest,
    recorded_controlnets,
    recorded_loras,
    source_record,
)
from difflower.artifact.parity import ComponentParity, OutputParity
from difflower.artifact.precision import Precision, precision_class
from difflower.artifact.specs import ShapePlan, example_inputs, load_export_module, spec_for_record
from difflower.errors import DifflowerError
from difflower.reference.control import edge_pattern
from difflower.reference.pipeline import load_pipeline
from difflower.reference.single_file import resolve_model
from difflower.runtimes.engine import Engine
from difflower.runtimes.pipeline import default_engine, engine_class, load_artifact
from difflower.validate.gates import component_verdict, image_verdict, trajectory_verdict
from difflower.validate.metrics import compare

DEFAULT_PROMPT = "a watercolor painting of a lighthouse at sunset"


class SourceMismatchError(DifflowerError):
    """The reference checkpoint is not the one the artifact was exported from."""


# -- component parity: the one function ------------------------------------------------------------


def component_parity(
    engine: Engine,
    inputs: Mapping[str, torch.Tensor],
    expected: Sequence[torch.Tensor],
    precision: Precision,
    kind: str,
    settings: dict[str, Any] | None = None,
) -> ComponentParity:
    """`engine` run on `inputs` against the reference's `expected` outputs, gated for `precision`."""
    got = engine(inputs)
    outputs = {}
    for spec, reference in zip(engine.outputs, expected, strict=True):
        metrics = compare(got[spec.name], reference)
        verdict = component_verdict(precision, kind, metrics, spec.name)
        outputs[spec.name] = OutputParity(**metrics.to_json(), gate=verdict.gate, passed=verdict.passed)
    return ComponentParity.of_outputs(outputs, {"engine": engine.backend, **(settings or {})})


def exported_component_parity(
    manifest: Manifest,
    folder: Path,
    record: ComponentRecord,
    inputs: Mapping[str, torch.Tensor],
    expected: Sequence[torch.Tensor],
    device: str = "cpu",
) -> ComponentParity:
    """A component just written into `folder`, through the engine `generate` would open for it;
    not measured (with the reason) where that engine cannot run on this machine."""
    name = default_engine(manifest.backend)
    cls = engine_class(name)
    reason = cls.unavailable(device)
    if reason is not None:
        return ComponentParity.unmeasured(
            reason, f"{manifest.precision} gates, to be checked with `difflower validate` where it runs"
        )
    options = cls.export_check_options(record, folder)
    engine = cls.open(record, folder, manifest, device=device, **options)
    settings = {"device": device, **options}
    try:
        return component_parity(engine, inputs, expected, manifest.precision, record.kind, settings)
    finally:
        del engine
        gc.collect()


# -- the whole artifact ----------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """Every number `validate` measured, and whether each gate passed."""

    artifact: str
    reference: str
    family: str
    backend: str
    precision: str
    settings: dict[str, Any]
    components: dict[str, ComponentParity] = field(default_factory=dict)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    final_latents: dict[str, Any] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Why the denoising run was not compared (a partial artifact), else None.
    not_run: str | None = None
    # With a step cache: its policy and which steps ran the whole denoiser on each side.
    cache: dict[str, Any] | None = None
    # The final images of both sides (HxWx3 uint8, the first of the batch) for the HTML report; not in the JSON.
    images: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        verdicts = [bool(c.passed) for c in self.components.values()]
        if self.not_run is None:
            verdicts += [self.final_latents.get("passed", False), self.image.get("passed", False)]
            if self.cache is not None:
                verdicts.append(self.cache["passed"])
        return all(verdicts)

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "reference": self.reference,
            "family": self.family,
            "backend": self.backend,
            "precision": self.precision,
            "settings": self.settings,
            "passed": self.passed,
            "components": {name: c.to_json() for name, c in self.components.items()},
            "trajectory": self.trajectory,
            "final_latents": self.final_latents,
            "image": self.image,
            "seconds": self.seconds,
            "not_run": self.not_run,
            "cache": self.cache,
        }


def judged_precision(stored: Precision, engines: Iterable[Engine]) -> Precision:
    """The gates' precision: the artifact's, or an engine's compute precision where an engine
    option takes it lower (fp32 IR run with OpenVINO's bf16 float ops is judged as bf16)."""
    order = ("fp32", "half", "low")
    lowest = stored
    for engine in engines:
        computed = engine.compute_precision
        if computed is not None and order.index(precision_class(computed)) > order.index(precision_class(lowest)):
            lowest = computed
    return lowest


def check_source(manifest: Manifest, reference: Path) -> None:
    """Raise SourceMismatchError unless `reference` holds the weights the artifact came from."""
    recorded = manifest.source.get("files", {})
    actual = source_record(reference)["files"]
    differing = sorted(k for k in recorded if actual.get(k) != recorded[k])
    if differing:
        raise SourceMismatchError(
            f"{reference}: not the checkpoint this artifact was exported from ({len(differing)} weight files "
            f"differ, first {differing[0]}); pass the original checkpoint, or --allow-mismatch to compare anyway"
        )


def validate_artifact(
    artifact: Path | str,
    reference: Path | str,
    *,
    steps: int = 4,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    guidance_scale: float | None = None,
    engine: str | None = None,
    device: str = "cpu",
    allow_source_mismatch: bool = False,
    progress: bool = False,
    engine_options: dict[str, Any] | None = None,
    cache: str | None = None,
) -> ValidationReport:
    """Validate `artifact` against the eager pipeline of `reference` (see the module docstring)."""
    artifact, (reference, _) = Path(artifact), resolve_model(reference)
    manifest = Manifest.read(artifact)
    if not allow_source_mismatch:
        check_source(manifest, reference)
    pipe = load_artifact(artifact, engine=engine, device=device, **(engine_options or {}))
    precision = judged_precision(manifest.precision, pipe.engines.values())
    loras = recorded_loras(manifest)  # fused into the artifact, so into the reference it is held to
    eager = load_pipeline(reference, loras=loras, controlnets=recorded_controlnets(manifest))
    plan = ShapePlan.of_manifest(manifest.shapes)
    bucket = plan.parity_bucket(pipe.spec.native_size)
    settings = {
        "prompt": prompt,
        "steps": steps,
        "seed": seed,
        "height": bucket.height,
        "width": bucket.width,
        "batch": bucket.batch,
        "guidance_scale": guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "engine": next(iter(pipe.engines.values())).backend,
        "cache": cache,
    }
    if precision != manifest.precision:  # an engine option computes below what the artifact stores
        settings["judged_as"] = f"{precision}: the engines compute in it (the artifact is {manifest.precision})"
    report = ValidationReport(str(artifact), str(reference), manifest.family, manifest.backend, precision, settings)

    # 1. component parity at the artifact's shapes
    start = time.perf_counter()
    dims = plan.dims(bucket, pipe.spec.vae_scale_factor)
    for name, record in manifest.components.items():
        component = spec_for_record(record)
        inputs = example_inputs(component, dims, seed=seed + 1)
        module = load_export_module(component, reference, loras)
        with torch.no_grad():
            expected = tuple(module(*inputs.values()))
        del module
        report.components[name] = component_parity(pipe.engines[name], inputs, expected, precision, record.kind)
    report.seconds["components"] = time.perf_counter() - start
    if manifest.missing_for_generation():
        report.not_run = f"not measured: the artifact holds {', '.join(manifest.components)} only"
        return report

    # 2 + 3. the same denoising run on both, same noise: drift per step and the final image
    start = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        prompt=[prompt] * bucket.batch,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=bucket.height,
        width=bucket.width,
        output_type="np",
        return_trajectory=True,
        progress=progress,
        cache=cache,
    )
    if pipe.spec.controlnets:  # the same edge pattern into both sides' ControlNets
        kwargs["control_image"] = edge_pattern(bucket.height, bucket.width, pipe.spec.controlnets)
    expected_run = eager(generator=torch.Generator().manual_seed(seed), **kwargs)
    actual_run = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
    report.seconds["trajectory"] = time.perf_counter() - start
    assert actual_run.trajectory is not None and expected_run.trajectory is not None
    for i, (a, e) in enumerate(zip(actual_run.trajectory, expected_run.trajectory, strict=True)):
        metrics = compare(a, e)
        report.trajectory.append({"step": i, "timestep": expected_run.timesteps[i], **metrics.to_json()})
    final_a, final_e = actual_run.trajectory[-1], expected_run.trajectory[-1]
    final_metrics = compare(final_a, final_e)
    verdict = trajectory_verdict(precision, final_a, final_e, final_metrics)
    report.final_latents = {**final_metrics.to_json(), **verdict.to_json()}
    image_metrics = compare(np.asarray(actual_run.images), np.asarray(expected_run.images))
    report.image = {**image_metrics.to_json(), **image_verdict(precision, image_metrics).to_json()}
    report.images = {
        side: (np.clip(np.asarray(run.images)[0], 0, 1) * 255).round().astype(np.uint8)
        for side, run in (("reference", expected_run), ("artifact", actual_run))
    }
    if cache is not None:  # the same decisions on both sides, or the comparison means little
        full, expected_full = actual_run.full_steps, expected_run.full_steps
        report.cache = {"policy": cache, "full_steps": full, "reference_full_steps": expected_full}
        report.cache["passed"] = full == expected_full
    return report
