"""Running an exported artifact: its engines plugged into the one denoising loop.

The loop itself is `difflower.reference.pipeline.DiffusionPipeline` (the golden pipeline); here
`EngineModelCalls` routes its model calls to the artifact's engines, tensors crossing as
numpy arrays without copies. Tokenizers and the scheduler are the artifact's copies of the
checkpoint's, and the PipelineSpec comes from the manifest, so the loop does exactly what the
eager reference does with the same seed.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.artifact.manifest import MANIFEST_NAME, Manifest, verify_files
from difflower.artifact.specs import latent_dims
from difflower.errors import ArgumentError, CheckpointError
from difflower.graph_passes.lora_slots import slot_shapes
from difflower.reference.config import parse_config, read_json
from difflower.reference.controlnet import controlnet_scales
from difflower.reference.loading import check_tokenizer, load_tokenizer, read_unet_config
from difflower.reference.lora import Lora, slot_matrices
from difflower.reference.model_calls import Residuals
from difflower.reference.pipeline import DiffusionPipeline, flux_inputs, tokenizers_by_encoder
from difflower.reference.prompts import Conditioning, TextEncoderOutput
from difflower.reference.request import GenerateRequest
from difflower.reference.schedulers import load_scheduler
from difflower.reference.spec import PipelineSpec
from difflower.reference.step_cache import CacheGraphs, CachePolicy, DeepCache
from difflower.reference.transformer_flux import cached_inputs, tokens_to_grid, unpack_latents
from difflower.runtimes import ENGINES
from difflower.runtimes.engine import Array, Engine, EngineInputError

# The UNet inputs that take ControlNet residuals (artifact.specs names them).
RESIDUAL_PREFIXES = ("down_block_res_sample_", "mid_block_res_sample")


def _torch(x: Array) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


class EngineModelCalls:
    """ModelCalls over an artifact's engines (keyed by component folder name)."""

    def __init__(self, engines: dict[str, Engine], manifest: Manifest):
        self.engines = engines
        self.manifest = manifest
        self.flux = "transformer" in engines and any(t.name == "img_ids" for t in engines["transformer"].inputs)
        self.denoiser = self._flux if self.flux else self._unet if "unet" in engines else self._transformer
        unet_inputs = engines["unet"].inputs if "unet" in engines else []
        self._residual_specs = [t for t in unet_inputs if t.name.startswith(RESIDUAL_PREFIXES)]
        # an export with --lora-slots: the denoiser's LoRA matrices, zeros until set_loras
        self.lora_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.set_loras(())

    def lora_slots(self) -> tuple[str, int, dict[str, tuple[int, int]]] | None:
        """(engine, rank, module path -> (in, out)) of this artifact's LoRA slots, or None."""
        for name in ("unet", "transformer"):
            rank = self.engines[name].record.config.get("lora_slots") if name in self.engines else None
            if rank:
                return name, int(rank), slot_shapes(self.engines[name].inputs)
        return None

    def set_loras(self, loras: Sequence[Lora], unet_config: Any = None) -> None:
        """Run `loras` through the LoRA slots from now on (none: zeros). An artifact without slots
        takes no LoRA here: its LoRAs are fused at export."""
        found = self.lora_slots()
        if found is None:
            if loras:
                raise ArgumentError(
                    "--lora",
                    "this artifact has its LoRAs fused at export (difflower info lists them); export with "
                    "--lora-slots RANK to switch LoRAs without re-export",
                )
            return
        engine, rank, slots = found
        self.lora_inputs[engine] = slot_matrices(loras, slots, rank, unet_config)

    def has_component(self, name: str) -> bool:
        return name in self.engines

    def prepare_run(self, request: GenerateRequest) -> None:
        """Refuse, before any work, a request this artifact cannot serve: a component it lacks, a
        size outside its static buckets, guidance its denoiser batch was not built for."""
        if request.cache is not None:
            self._check_cache_graphs(request.cache)
        needed = self.manifest.missing_for_generation()
        if request.task != "txt2img" and "vae_encoder" not in self.engines:
            needed.append("vae_encoder")
        if request.output_type == "latent" and "vae_decoder" in needed:
            needed.remove("vae_decoder")
        if needed:
            raise EngineInputError(
                f"this artifact holds {', '.join(self.engines)} only; {request.task} needs {', '.join(needed)} too: "
                "export them (drop --components, or add them to it)"
            )
        batch, height, width, guidance = request.batch, request.height, request.width, request.do_cfg
        buckets = list(self.manifest.buckets)
        reshaped = {getattr(e, "bucket", None) for e in self.engines.values()} - {None}
        if reshaped:  # engines fixed to a size at load (OpenVINO's static reshape)
            buckets = sorted(reshaped, key=str)
        if not buckets:
            return
        cfg = self.manifest.shapes.get("cfg_doubles_denoiser_batch", True)
        request = f"{batch}x{height}x{width}"
        if not any((b.batch, b.height, b.width) == (batch, height, width) for b in buckets):
            built = ", ".join(str(b) for b in buckets)
            raise ArgumentError(
                "height", f"this artifact was built for {built} (BxHxW); asked for {request}. Export it for this size"
            )
        if cfg != guidance:
            raise ArgumentError(
                "guidance_scale",
                "this artifact's denoiser batch was built "
                + ("with" if cfg else "without")
                + " classifier-free guidance doubling; use guidance_scale "
                + ("> 1" if cfg else "<= 1")
                + " (Flux: true_cfg_scale with a negative prompt) or re-export",
            )

    def _run(self, name: str, inputs: dict[str, Array]) -> dict[str, torch.Tensor]:
        if name in self.lora_inputs:
            inputs = {**inputs, **self.lora_inputs[name]}
        return {k: _torch(v) for k, v in self.engines[name](inputs).items()}

    def text_encoder(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput:
        engine = self.engines[name]
        out = self._run(name, {"input_ids": input_ids.to(torch.int64)})
        names = [t.name for t in engine.outputs]
        penultimate = next((out[n] for n in names if n.startswith("hidden_states.")), None)
        return TextEncoderOutput(
            out["last_hidden_state"], penultimate, out.get("text_embeds"), out.get("pooler_output")
        )

    def _unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, residuals: Residuals | None = None
    ) -> torch.Tensor:
        inputs = self._unet_inputs(sample, timestep, cond)
        residual_specs = self._residual_specs
        if residuals is not None and not residual_specs:
            raise EngineInputError("this artifact's UNet takes no ControlNet residuals: export it with --controlnet")
        if residual_specs:  # a UNet exported for ControlNets: their residuals, or zeros (none of them on)
            dims = {"denoiser_batch": sample.shape[0], **latent_dims(sample.shape[2], sample.shape[3])}
            given = [*residuals.down, residuals.mid] if residuals is not None else [None] * len(residual_specs)
            for spec, value in zip(residual_specs, given, strict=True):
                shape = tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
                inputs[spec.name] = value.float() if value is not None else torch.zeros(shape)
        return self._run("unet", inputs)["out_sample"]

    def _check_cache_graphs(self, policy: CachePolicy) -> None:
        """Refuse a step cache this artifact has no graphs for, naming the export flag that adds them."""
        built = self._cache_graphs()
        if built is not None and built.serves(policy):
            return
        if isinstance(policy, DeepCache) and built is not None and built.kind == "deepcache":
            raise ArgumentError(
                "cache",
                f"this artifact's DeepCache graphs split at branch {built.branch}; use deepcache:branch={built.branch} "
                f"or export with --cache-graphs deepcache:branch={policy.branch}",
            )
        wanted = "deepcache[:branch=K]" if isinstance(policy, DeepCache) else "first-block"
        kind = "DeepCache" if isinstance(policy, DeepCache) else "first-block cache"
        raise ArgumentError("cache", f"this artifact has no {kind} graphs; export it with --cache-graphs {wanted}")

    def _cache_graphs(self) -> CacheGraphs | None:
        """The step-cache graphs this artifact holds, from its denoiser records."""
        if "unet" in self.engines and "unet_shallow" in self.engines:
            branch = self.engines["unet"].record.config.get("deepcache_branch")
            return CacheGraphs("deepcache", branch) if branch is not None else None
        parts = ("transformer", "transformer_first", "transformer_tail")
        if all(p in self.engines for p in parts) and self.engines["transformer"].record.config.get("first_block_cache"):
            return CacheGraphs("first-block")
        return None

    def denoiser_deepcache(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        branch: int,
        feature: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full UNet graph (it also returns the deep feature) or the shallow one fed the feature."""
        inputs = self._unet_inputs(sample, timestep, cond)
        if feature is None:
            out = self._run("unet", inputs)
            return out["out_sample"], out["deepcache_feature"]
        return self._run("unet_shallow", {**inputs, "deepcache_feature": feature.float()})["out_sample"], None

    def controlnet(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        conditioning_scale: float,
        guess_mode: bool,
    ) -> Residuals:
        """A ControlNet engine's residuals. Its graph was built for the denoiser's batch: guess
        mode's conditional half (B of the 2B) runs doubled, and the second half is kept."""
        engine = self.engines[name]
        facts = engine.record.config
        half = guess_mode and bool(self.manifest.shapes.get("cfg_doubles_denoiser_batch", True))
        if half:
            sample, timestep, image = (torch.cat([x, x]) for x in (sample, timestep, image))
            cond = Conditioning.for_guidance(cond, cond)
        pooled = bool(facts.get("global_pool_conditions"))
        count = int(facts["residuals"]) - 1
        inputs = {
            "sample": sample.float(),
            "timestep": timestep.float(),
            "encoder_hidden_states": cond.encoder_hidden_states.float(),
            "controlnet_cond": image.float(),
            "conditioning_scales": controlnet_scales(count, conditioning_scale, guess_mode and not pooled),
            **self._conditions(cond),
        }
        out = self._run(name, inputs)
        values = [out[t.name] for t in engine.outputs]  # the down residuals in skip order, then the mid one
        if half:
            values = [v.chunk(2)[1] for v in values]
        return Residuals(values[:-1], values[-1])

    def _unet_inputs(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        inputs = {
            "sample": sample.float(),
            "timestep": timestep.float(),
            "encoder_hidden_states": cond.encoder_hidden_states.float(),
            **self._conditions(cond),
        }
        if cond.timestep_cond is not None:
            inputs["timestep_cond"] = cond.timestep_cond.float()
        return inputs

    @staticmethod
    def _conditions(cond: Conditioning) -> dict[str, torch.Tensor]:
        """SDXL's text-time conditioning, when the run has it."""
        if cond.text_embeds is None:
            return {}
        assert cond.time_ids is not None
        return {"text_embeds": cond.text_embeds.float(), "time_ids": cond.time_ids.float()}

    def _transformer(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, residuals: Residuals | None = None
    ) -> torch.Tensor:
        return self._run("transformer", self._transformer_inputs(sample, timestep, cond))["out_hidden_states"]

    def _flux(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, residuals: Residuals | None = None
    ) -> torch.Tensor:
        """The Flux transformer on the loop's (B, C, h, w) latents: packed in, unpacked out."""
        out = self._run("transformer", _flux_inputs(sample, timestep, cond))
        return unpack_latents(out["out_hidden_states"], *sample.shape[-2:])

    def first_block(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.flux:
            out = self._run("transformer_first", self._transformer_inputs(sample, timestep, cond))
            return out["first_block_hidden"], out["first_block_residual"]
        out = self._run("transformer_first", _flux_inputs(sample, timestep, cond))
        grid = sample.shape[-2:]
        return tokens_to_grid(out["first_block_hidden"], *grid), tokens_to_grid(out["first_block_residual"], *grid)

    def denoiser_with_tail(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.flux:
            out = self._run("transformer", self._transformer_inputs(sample, timestep, cond))
            return out["out_hidden_states"], out["tail_residual"]
        out = self._run("transformer", _flux_inputs(sample, timestep, cond))
        grid = sample.shape[-2:]
        return unpack_latents(out["out_hidden_states"], *grid), tokens_to_grid(out["tail_residual"], *grid)

    def denoiser_from_cache(
        self, first: torch.Tensor, tail_residual: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        assert cond.pooled_projections is not None  # SD3 and Flux prompts always set it
        if self.flux:
            inputs = cached_inputs(first, tail_residual, timestep, cond.pooled_projections, cond.guidance)
            out = self._run("transformer_tail", {name: value.float() for name, value in inputs.items()})
            return unpack_latents(out["out_hidden_states"], first.shape[2] * 2, first.shape[3] * 2)
        inputs = {
            "first_block_hidden": first.float(),
            "tail_residual": tail_residual.float(),
            "pooled_projections": cond.pooled_projections.float(),
            "timestep": timestep.float(),
        }
        return self._run("transformer_tail", inputs)["out_hidden_states"]

    @staticmethod
    def _transformer_inputs(
        sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> dict[str, torch.Tensor]:
        return {
            "hidden_states": sample.float(),
            "encoder_hidden_states": cond.encoder_hidden_states.float(),
            "pooled_projections": cond.pooled_projections.float(),
            "timestep": timestep.float(),
        }

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        self._require("vae_encoder", "img2img and inpainting")
        return self._run("vae_encoder", {"sample": image.float()})["latent_parameters"]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._require("vae_decoder", "decoding images (use output_type='latent' without it)")
        return self._run("vae_decoder", {"latent_sample": latents.float()})["sample"]

    def _require(self, name: str, what: str) -> None:
        if name not in self.engines:
            raise EngineInputError(f"this artifact has no {name}, which {what} needs; export it with that component")


def engine_class(name: str):
    """The engine class named `name` (module `difflower.runtimes.<name>_engine`, attribute ENGINE)."""
    if name not in ENGINES:
        raise ArgumentError("--engine", f"must be one of {', '.join(ENGINES)}, got {name!r}")
    try:
        module = importlib.import_module(f"difflower.runtimes.{name}_engine")
    except ModuleNotFoundError as err:
        if err.name == f"difflower.runtimes.{name}_engine":
            raise ArgumentError("--engine", f"the {name} engine is not part of this difflower yet") from None
        raise ArgumentError("--engine", f"the {name} engine needs the {err.name!r} package; install it") from None
    return module.ENGINE


def default_engine(backend: str) -> str:
    """The engine that runs an artifact of `backend` when none is asked for."""
    return {"onnx": "onnxruntime"}.get(backend, backend)


def engines_for(backend: str) -> list[str]:
    """The engines that can run an artifact of `backend` (its own, and the torch reference)."""
    return [default_engine(backend), "torch"]


def make_engines(
    manifest: Manifest,
    folder: Path,
    engine: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    **options: Any,
) -> dict[str, Engine]:
    """One engine per exported component; `options` are the engine's own (e.g. a cache dir).

    An engine that executes code stored in the artifact (TorchScript, Neuron, TensorRT) opens
    its files only after they match the sha256 the export recorded."""
    name = engine or default_engine(manifest.backend)
    if name not in engines_for(manifest.backend):
        usable = ", ".join(engines_for(manifest.backend))
        raise ArgumentError("--engine", f"{name} cannot run this {manifest.backend} artifact; its engines are {usable}")
    cls = engine_class(name)
    if getattr(cls, "executes_code", False):
        verify_files(manifest, folder, list(manifest.components))
    return {
        component: cls.open(record, folder, manifest, device=device, threads=threads, **options)
        for component, record in manifest.components.items()
    }


class ArtifactPipeline(DiffusionPipeline):
    """The one loop over an artifact's engines; `manifest` and `engines` say what it runs."""

    def __init__(self, manifest: Manifest, engines: dict[str, Engine], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.manifest = manifest
        self.engines = engines


def load_artifact(
    path: Path | str,
    engine: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    scheduler: str | None = None,
    loras: Sequence[Lora] = (),
    **engine_options: Any,
) -> ArtifactPipeline:
    """The pipeline of an exported artifact folder, running on `engine` (default: the backend's own);
    `loras` run through its LoRA slots (an export with --lora-slots)."""
    folder = Path(path)
    manifest = Manifest.read(folder)
    spec = parse_config(PipelineSpec, manifest.pipeline, folder / MANIFEST_NAME)
    engines = make_engines(manifest, folder, engine, device, threads, **engine_options)
    tokenizers = _load_tokenizers(manifest, folder)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    components: dict[str, Any] = {**engines, **tokenizers}
    calls = EngineModelCalls(engines, manifest)
    if loras:
        unet_config = folder / "unet" / "config.json"
        calls.set_loras(loras, read_unet_config(unet_config.parent) if unet_config.is_file() else None)
    pipe = ArtifactPipeline(
        manifest,
        engines,
        spec,
        calls,
        tokenizers_by_encoder(tokenizers),
        load_scheduler(scheduler_config, source=scheduler_path),
        scheduler_config,
        components=components,
        device=device if str(device).startswith("cuda") else "cpu",  # the loop's tensors live beside the engines
    )
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    return pipe


def _load_tokenizers(manifest: Manifest, folder: Path) -> dict[str, Any]:
    """The tokenizer of every text encoder the artifact holds, checked against that encoder."""
    model_index = read_json(folder / "model_index.json")
    tokenizers: dict[str, Any] = {}
    for suffix in ("", "_2", "_3"):
        name, encoder = "tokenizer" + suffix, "text_encoder" + suffix
        if encoder not in manifest.components:
            continue
        entry = model_index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], str):
            raise CheckpointError(folder / "model_index.json", f"field '{name}' is missing; {encoder} needs it")
        if not (folder / name).is_dir():
            raise CheckpointError(
                folder / name, f"folder not found; {encoder} needs its tokenizer: re-export the artifact"
            )
        tokenizers[name] = load_tokenizer(folder / name, entry[1])
        vocab_size = manifest.components[encoder].config.get("vocab_size")
        check_tokenizer(tokenizers[name], folder / name, vocab_size if isinstance(vocab_size, int) else None, encoder)
    return tokenizers


def _flux_inputs(sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
    """The Flux graphs' inputs, in fp32."""
    return {name: value.float() for name, value in flux_inputs(sample, timestep, cond).items()}
