"""`difflower validate`: an artifact against the eager reference, at three levels.

1. component: each exported component vs the reference module on seeded inputs at the
   artifact's shapes;
2. trajectory: the whole denoising run with the reference's noise, latents compared after
   every step (the drift curve), the final latents gated;
3. image: the final decoded image vs the reference image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.errors import DifflowerError
from difflower.manifest import Bucket, Manifest, source_record
from difflower.validate.gates import component_verdict, image_verdict, trajectory_verdict
from difflower.validate.metrics import compare

DEFAULT_PROMPT = "a watercolor painting of a lighthouse at sunset"


class SourceMismatchError(DifflowerError):
    """The reference checkpoint is not the one the artifact was exported from."""


@dataclass
class ValidationReport:
    """Every number `validate` measured, and whether each gate passed."""

    artifact: str
    reference: str
    family: str
    backend: str
    precision: str
    settings: dict[str, Any]
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    final_latents: dict[str, Any] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Why the denoising run was not compared (a partial artifact), else None.
    not_run: str | None = None

    @property
    def passed(self) -> bool:
        verdicts = [c["passed"] for c in self.components.values()]
        if self.not_run is None:
            verdicts += [self.final_latents.get("passed", False), self.image.get("passed", False)]
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
            "components": self.components,
            "trajectory": self.trajectory,
            "final_latents": self.final_latents,
            "image": self.image,
            "seconds": self.seconds,
            "not_run": self.not_run,
        }


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
) -> ValidationReport:
    """Validate `artifact` against the eager pipeline of `reference` (see the module docstring)."""
    from difflower.exporters.specs import example_inputs, load_export_module, spec_for_record
    from difflower.reference.pipeline import load_pipeline
    from difflower.runtimes.pipeline import load_artifact

    artifact, reference = Path(artifact), Path(reference)
    manifest = Manifest.read(artifact)
    if not allow_source_mismatch:
        check_source(manifest, reference)
    pipe = load_artifact(artifact, engine=engine, device=device, **(engine_options or {}))
    eager = load_pipeline(reference)
    spec = pipe.spec
    bucket = manifest.buckets[0] if manifest.buckets else None
    height = bucket.height if bucket else spec.sample_size * spec.vae_scale_factor
    width = bucket.width if bucket else height
    batch = bucket.batch if bucket else 1
    settings = {
        "prompt": prompt,
        "steps": steps,
        "seed": seed,
        "height": height,
        "width": width,
        "batch": batch,
        "guidance_scale": guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "engine": next(iter(pipe.calls.engines.values())).backend,
    }
    report = ValidationReport(
        str(artifact), str(reference), manifest.family, manifest.backend, manifest.precision, settings
    )

    # 1. component parity at the artifact's shapes
    start = time.perf_counter()
    from difflower.exporters.specs import ShapePlan

    plan = ShapePlan(cfg=manifest.shapes.get("cfg_doubles_denoiser_batch", True))
    dims = plan.dims(Bucket(batch, height, width), spec.vae_scale_factor)
    for name, record in manifest.components.items():
        component = spec_for_record(record)
        inputs = example_inputs(component, dims, seed=seed + 1)
        module = load_export_module(component, reference)
        with torch.no_grad():
            expected = module(*inputs.values())
        got = pipe.calls.engines[name](inputs)
        outputs = {}
        passed = True
        for tensor, ref in zip(record.outputs, expected, strict=True):
            metrics = compare(got[tensor.name], ref)
            verdict = component_verdict(manifest.precision, record.kind, metrics)
            outputs[tensor.name] = {**metrics.to_json(), **verdict.to_json()}
            passed &= verdict.passed
        report.components[name] = {"passed": passed, "outputs": outputs}
        del module
    report.seconds["components"] = time.perf_counter() - start
    if manifest.missing_for_generation():
        report.not_run = f"not measured: the artifact holds {', '.join(manifest.components)} only"
        return report

    # 2 + 3. the same denoising run on both, same noise: drift per step and the final image
    start = time.perf_counter()
    kwargs = dict(
        prompt=[prompt] * batch,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        output_type="np",
        return_trajectory=True,
        progress=progress,
    )
    expected_run = eager(generator=torch.Generator().manual_seed(seed), **kwargs)
    actual_run = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
    report.seconds["trajectory"] = time.perf_counter() - start
    for i, (a, e) in enumerate(zip(actual_run.trajectory, expected_run.trajectory, strict=True)):
        metrics = compare(a, e)
        report.trajectory.append({"step": i, "timestep": expected_run.timesteps[i], **metrics.to_json()})
    final_a, final_e = actual_run.trajectory[-1], expected_run.trajectory[-1]
    final_metrics = compare(final_a, final_e)
    verdict = trajectory_verdict(manifest.precision, final_a, final_e, final_metrics)
    report.final_latents = {**final_metrics.to_json(), **verdict.to_json()}
    image_metrics = compare(np.asarray(actual_run.images), np.asarray(expected_run.images))
    report.image = {**image_metrics.to_json(), **image_verdict(manifest.precision, image_metrics).to_json()}
    return report
