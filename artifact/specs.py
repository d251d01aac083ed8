"""Per component: what is exported, under which names and shapes, and how it is checked.

Every backend exports the same wrapper modules (positional inputs, tuple outputs) with the
same tensor names, following optimum's where one exists, so tools built for those layouts can
read ours. Shapes are symbolic (`batch`, `height`, ...) for dynamic artifacts and concrete for
a single static bucket; `ShapePlan.dims` gives the concrete value of every symbol for a bucket,
with the classifier-free-guidance doubling of the denoiser batch accounted for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from difflower.artifact.manifest import Bucket, TensorSpec
from difflower.reference.config import read_json
from difflower.reference.control import controlnet_name
from difflower.reference.controlnet import ControlNetConfig
from difflower.reference.embeddings import guidance_scale_embedding
from difflower.reference.loading import (
    ControlNetSource,
    ModelIndex,
    load_controlnet,
    load_flux_transformer,
    load_sd3_transformer,
    load_text_encoder,
    load_unet,
    load_vae,
    read_flux_config,
    read_sd3_config,
    read_unet_config,
    read_vae_config,
)
from difflower.reference.lora import Lora, LoraSlotted, fuse_loras
from difflower.reference.step_cache import CacheGraphs
from difflower.reference.streaming import Skeleton, skeleton
from difflower.reference.transformer_flux import FluxTransformer2DModel, image_ids, text_ids
from difflower.reference.transformer_sd3 import SD3Transformer2DModel
from difflower.reference.unet_2d_condition import UNetConfig, skip_shapes

ComponentKind = Literal[
    "text_encoder",
    "unet",
    "unet_shallow",
    "transformer",
    "transformer_first",
    "transformer_tail",
    "vae_encoder",
    "vae_decoder",
    "controlnet",
]
# Every kind that is (part of) the denoiser: what fuse_qkv, int8 calibration and CFG batching reach.
DENOISERS = ("unet", "unet_shallow", "transformer", "transformer_first", "transformer_tail")
# How many times the down path can halve a latent size (the residual shapes' symbolic dims).
MAX_HALVINGS = 4


@dataclass(frozen=True)
class ComponentSpec:
    """One exportable component of a checkpoint."""

    name: str  # the artifact folder: text_encoder_2, unet, vae_decoder, ...
    kind: ComponentKind
    source: str  # the checkpoint folder it is built from
    class_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    facts: dict[str, Any]  # what example inputs need: vocab size, eos id, channels, ...


@dataclass(frozen=True)
class ShapePlan:
    """The shapes an artifact is built for: dynamic (no buckets) or static buckets."""

    buckets: tuple[Bucket, ...] = ()
    cfg: bool = True  # the denoiser runs negative and positive prompts as one doubled batch
    t5_sequence_length: int = 256

    @property
    def static(self) -> bool:
        """One bucket gives a graph with fixed dims; several share one dynamic graph."""
        return len(self.buckets) == 1

    def dims(self, bucket: Bucket, vae_scale_factor: int, clip_length: int = 77) -> dict[str, int]:
        """The concrete value of every symbolic dim for `bucket`."""
        latent_h, latent_w = bucket.height // vae_scale_factor, bucket.width // vae_scale_factor
        return {
            **latent_dims(latent_h, latent_w),
            "batch": bucket.batch,
            "denoiser_batch": bucket.batch * (2 if self.cfg else 1),
            "height": bucket.height,
            "width": bucket.width,
            "latent_height": latent_h,
            "latent_width": latent_w,
            "clip_sequence": clip_length,
            "t5_sequence": self.t5_sequence_length,
            "context_sequence": clip_length,
            "joint_sequence": clip_length + self.t5_sequence_length,
            "image_tokens": (latent_h // 2) * (latent_w // 2),  # Flux: 2x2 latent patches
        }

    def parity_bucket(self, native_size: int) -> Bucket:
        """Where a component's parity is measured: the first bucket, else the model's native size
        at one image (the one definition of that default for export, validate, bench and
        calibration)."""
        return self.buckets[0] if self.buckets else Bucket(1, native_size, native_size)

    @staticmethod
    def of_manifest(shapes: dict[str, Any]) -> ShapePlan:
        """The plan a manifest's `shapes` section records."""
        return ShapePlan(
            tuple(Bucket(*b) for b in shapes.get("buckets", [])),
            cfg=bool(shapes.get("cfg_doubles_denoiser_batch", True)),
            t5_sequence_length=int(shapes.get("t5_sequence_length", 256)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": "static" if self.static else "dynamic",
            "buckets": [[b.batch, b.height, b.width] for b in self.buckets],
            "cfg_doubles_denoiser_batch": self.cfg,
            "t5_sequence_length": self.t5_sequence_length,
        }


def latent_dims(latent_height: int, latent_width: int) -> dict[str, int]:
    """The latent size's dims, and those of each halving of it on a UNet's down path (a stride-2
    3x3 conv with padding 1 gives ceil(n / 2)): `latent_height_div2`, `latent_width_div4`, ..."""
    dims = {"latent_height": latent_height, "latent_width": latent_width}
    h, w = latent_height, latent_width
    for k in range(1, MAX_HALVINGS + 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        dims[f"latent_height_div{2**k}"], dims[f"latent_width_div{2**k}"] = h, w
    return dims


def _t(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


# -- the specs ---------------------------------------------------------------------------------


def component_specs(
    index: ModelIndex, controlnets: Sequence[ControlNetSource] = (), cache_graphs: CacheGraphs | None = None
) -> list[ComponentSpec]:
    """Every exportable component of a checkpoint, in export order, with symbolic shapes; with
    `controlnets`, the UNet also takes their residuals and each ControlNet is a component. With
    DeepCache's `cache_graphs`, the UNet also returns the deep feature of their skip branch and
    `unet_shallow` (the shallow path fed that feature) is a component; with the first-block
    cache's, the transformer also returns its tail residual, and `transformer_first` (the first
    block alone) and `transformer_tail` (the output from the first block plus a cached tail
    residual) are components."""
    root = index.root
    specs: list[ComponentSpec] = []
    for suffix in ("", "_2", "_3"):
        name = "text_encoder" + suffix
        if name in index.components:
            pooled = index.family == "flux"  # Flux reads CLIP's pooled output
            specs.append(_text_encoder_spec(name, index.components[name][1], root / name, pooled))
    deepcache_branch = cache_graphs.branch if cache_graphs is not None and cache_graphs.kind == "deepcache" else None
    first_block = cache_graphs is not None and cache_graphs.kind == "first-block"
    if index.family == "flux":
        specs += _flux_transformer_specs(root / "transformer", first_block)
    elif index.family == "sd3":
        specs += _transformer_specs(root / "transformer", first_block)
    else:
        specs.append(_unet_spec(root / "unet", residuals=bool(controlnets), deepcache_branch=deepcache_branch))
        if deepcache_branch is not None:
            specs.append(_unet_shallow_spec(specs[-1], read_unet_config(root / "unet"), deepcache_branch))
        for k, source in enumerate(controlnets):
            specs.append(_controlnet_spec(controlnet_name(k), source.folder, source.config))
    vae = read_vae_config(root / "vae")
    factor = vae.downscale_factor
    facts = {"latent_channels": vae.latent_channels, "vae_scale_factor": factor}
    c = vae.latent_channels
    specs.append(
        ComponentSpec(
            "vae_encoder",
            "vae_encoder",
            "vae",
            "AutoencoderKL",
            (_t("sample", "float32", "batch", 3, "height", "width"),),
            (_t("latent_parameters", "float32", "batch", 2 * c, "latent_height", "latent_width"),),
            facts,
        )
    )
    specs.append(
        ComponentSpec(
            "vae_decoder",
            "vae_decoder",
            "vae",
            "AutoencoderKL",
            (_t("latent_sample", "float32", "batch", c, "latent_height", "latent_width"),),
            (_t("sample", "float32", "batch", 3, "height", "width"),),
            facts,
        )
    )
    return specs


def _text_encoder_spec(name: str, class_name: str, folder: Path, pooled: bool = False) -> ComponentSpec:
    config = read_json(folder / "config.json")
    if class_name == "T5EncoderModel":
        facts = {"vocab_size": config.get("vocab_size", 32128), "eos_token_id": config.get("eos_token_id", 1)}
        return ComponentSpec(
            name,
            "text_encoder",
            name,
            class_name,
            (_t("input_ids", "int64", "batch", "t5_sequence"),),
            (_t("last_hidden_state", "float32", "batch", "t5_sequence", config.get("d_model")),),
            facts,
        )
    layers = config.get("num_hidden_layers")
    hidden = config.get("hidden_size")
    outputs = [
        _t("last_hidden_state", "float32", "batch", "clip_sequence", hidden),
        # hidden_states[-2] (SDXL and SD3 read the penultimate layer); optimum's name for that index
        _t(f"hidden_states.{layers - 1}", "float32", "batch", "clip_sequence", hidden),
    ]
    if class_name == "CLIPTextModelWithProjection":
        outputs.append(_t("text_embeds", "float32", "batch", config.get("projection_dim")))
    elif pooled:
        outputs.append(_t("pooler_output", "float32", "batch", hidden))
    facts = {
        "vocab_size": config.get("vocab_size"),
        "eos_token_id": config.get("eos_token_id"),
        "num_hidden_layers": layers,
        "with_projection": class_name == "CLIPTextModelWithProjection",
        **({"pooled_output": True} if pooled and class_name == "CLIPTextModel" else {}),
    }
    return ComponentSpec(
        name,
        "text_encoder",
        name,
        class_name,
        (_t("input_ids", "int64", "batch", "clip_sequence"),),
        tuple(outputs),
        facts,
    )


def _residual_specs(config: UNetConfig | ControlNetConfig, batch: str) -> list[TensorSpec]:
    """The ControlNet residuals: one per skip connection of the down path, then the mid block's."""
    unet = config if isinstance(config, UNetConfig) else config.unet_view()
    shapes = skip_shapes(unet, 1 << MAX_HALVINGS, 1 << MAX_HALVINGS)  # sizes as powers of two name the halvings
    specs = []
    for k, (channels, h, _) in enumerate([*shapes, (unet.block_out_channels[-1], shapes[-1][1], 0)]):
        div = (1 << MAX_HALVINGS) // h
        height, width = (
            ("latent_height", "latent_width") if div == 1 else (f"latent_height_div{div}", f"latent_width_div{div}")
        )
        name = f"down_block_res_sample_{k}" if k < len(shapes) else "mid_block_res_sample"
        specs.append(_t(name, "float32", batch, channels, height, width))
    return specs


def deepcache_feature(config: UNetConfig, branch: int, batch: str) -> TensorSpec:
    """The deep feature DeepCache keeps for skip `branch` (see UNet2DConditionModel.deepcache_split):
    the hidden state entering the up path's layer that mirrors layer l of down block b, at block
    b's resolution; the previous up block's (or the mid block's) width when that layer is the
    block's first, block b's own otherwise."""
    channels = config.block_out_channels
    per = config.per_block("layers_per_block")[0] + 1
    b, layer = branch // per, branch % per
    if b >= len(channels):
        raise ValueError(f"DeepCache branch must be in [0, {per * len(channels)}) for this UNet")
    first_layer = layer == per - 1  # the fresh path starts at the up block's first resnet
    width = channels[min(b + 1, len(channels) - 1)] if first_layer else channels[b]
    div = 2**b
    h, w = ("latent_height", "latent_width") if div == 1 else (f"latent_height_div{div}", f"latent_width_div{div}")
    return _t("deepcache_feature", "float32", batch, width, h, w)


def _unet_shallow_spec(unet: ComponentSpec, config: UNetConfig, branch: int) -> ComponentSpec:
    """DeepCache's shallow path: the UNet's inputs and the cached deep feature -> its prediction."""
    feature = deepcache_feature(config, branch, "denoiser_batch")
    return ComponentSpec(
        "unet_shallow",
        "unet_shallow",
        "unet",
        "UNet2DConditionModel",
        (*unet.inputs, feature),
        unet.outputs[:1],
        {**unet.facts, "deepcache_branch": branch},
    )


def _unet_spec(folder: Path, residuals: bool = False, deepcache_branch: int | None = None) -> ComponentSpec:
    config = read_unet_config(folder)
    cross = config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else config.cross_attention_dim[0]
    inputs = [
        _t("sample", "float32", "denoiser_batch", config.in_channels, "latent_height", "latent_width"),
        _t("timestep", "float32", "denoiser_batch"),
        _t("encoder_hidden_states", "float32", "denoiser_batch", "context_sequence", cross),
    ]
    text_time = config.addition_embed_type == "text_time"
    if text_time:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs.append(_t("text_embeds", "float32", "denoiser_batch", pooled))
        inputs.append(_t("time_ids", "float32", "denoiser_batch", 6))
    if config.time_cond_proj_dim is not None:  # guidance-distilled (LCM): the guidance scale's embedding
        inputs.append(_t("timestep_cond", "float32", "denoiser_batch", config.time_cond_proj_dim))
    if residuals:  # driven by ControlNets: their summed residuals are inputs
        inputs += _residual_specs(config, "denoiser_batch")
    outputs = [_t("out_sample", "float32", "denoiser_batch", config.out_channels, "latent_height", "latent_width")]
    if deepcache_branch is not None:  # DeepCache's full pass also returns the feature it keeps
        outputs.append(deepcache_feature(config, deepcache_branch, "denoiser_batch"))
    return ComponentSpec(
        "unet",
        "unet",
        "unet",
        "UNet2DConditionModel",
        tuple(inputs),
        tuple(outputs),
        {
            **({"deepcache_branch": deepcache_branch} if deepcache_branch is not None else {}),
            "text_time": text_time,
            "in_channels": config.in_channels,
            "guidance_embedded": config.time_cond_proj_dim is not None,
            "controlnet_residuals": len(_residual_specs(config, "denoiser_batch")) if residuals else 0,
        },
    )


def _controlnet_spec(name: str, folder: Path, config: ControlNetConfig) -> ComponentSpec:
    """A ControlNet: the scaled residuals of the latents, the prompt and the control image."""
    residuals = _residual_specs(config, "denoiser_batch")
    inputs = [
        _t("sample", "float32", "denoiser_batch", config.in_channels, "latent_height", "latent_width"),
        _t("timestep", "float32", "denoiser_batch"),
        _t("encoder_hidden_states", "float32", "denoiser_batch", "context_sequence", config.cross_attention_dim),
        _t("controlnet_cond", "float32", "denoiser_batch", config.conditioning_channels, "height", "width"),
        # each residual's factor: the conditioning scale, or guess mode's ramp times it
        _t("conditioning_scales", "float32", len(residuals)),
    ]
    text_time = config.addition_embed_type == "text_time"
    if text_time:
        assert config.projection_class_embeddings_input_dim is not None and config.addition_time_embed_dim is not None
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs.append(_t("text_embeds", "float32", "denoiser_batch", pooled))
        inputs.append(_t("time_ids", "float32", "denoiser_batch", 6))
    return ComponentSpec(
        name,
        "controlnet",
        str(folder.absolute()),  # its own folder, outside the checkpoint
        "ControlNetModel",
        tuple(inputs),
        tuple(residuals),
        {
            "text_time": text_time,
            "residuals": len(residuals),
            "global_pool_conditions": config.global_pool_conditions,
        },
    )


def _transformer_specs(folder: Path, first_block: bool = False) -> list[ComponentSpec]:
    """The transformer; with `first_block`, also the parts the first-block cache runs. Their token
    grids are (B, D, h, w) with h = latent_height / patch_size."""
    config = read_sd3_config(folder)
    inputs = (
        _t("hidden_states", "float32", "denoiser_batch", config.in_channels, "latent_height", "latent_width"),
        _t("encoder_hidden_states", "float32", "denoiser_batch", "joint_sequence", config.joint_attention_dim),
        _t("pooled_projections", "float32", "denoiser_batch", config.pooled_projection_dim),
        _t("timestep", "float32", "denoiser_batch"),
    )
    out = _t("out_hidden_states", "float32", "denoiser_batch", config.out_channels, "latent_height", "latent_width")
    facts = {"in_channels": config.in_channels}
    if not first_block:
        return [
            ComponentSpec("transformer", "transformer", "transformer", "SD3Transformer2DModel", inputs, (out,), facts)
        ]
    p = config.patch_size
    if p & (p - 1) or p > 2**MAX_HALVINGS:
        raise ValueError(f"the first-block cache's graphs need a power-of-two patch_size, this one is {p}")
    grid = ("denoiser_batch", config.inner_dim, f"latent_height_div{p}", f"latent_width_div{p}")
    tail, first, residual = (
        _t(n, "float32", *grid) for n in ("tail_residual", "first_block_hidden", "first_block_residual")
    )
    cached = {**facts, "first_block_cache": True}
    cls = "SD3Transformer2DModel"
    return [
        ComponentSpec("transformer", "transformer", "transformer", cls, inputs, (out, tail), cached),
        ComponentSpec("transformer_first", "transformer_first", "transformer", cls, inputs, (first, residual), cached),
        ComponentSpec(
            "transformer_tail", "transformer_tail", "transformer", cls, (first, tail, *inputs[2:]), (out,), cached
        ),
    ]


def _flux_transformer_specs(folder: Path, first_block: bool = False) -> list[ComponentSpec]:
    """The Flux transformer on packed latents: (B, image_tokens, 64) tokens with their position ids;
    with `first_block`, also the parts the first-block cache runs, on (B, image_tokens, D) tokens."""
    config = read_flux_config(folder)
    inputs = [
        _t("hidden_states", "float32", "denoiser_batch", "image_tokens", config.in_channels),
        _t("encoder_hidden_states", "float32", "denoiser_batch", "t5_sequence", config.joint_attention_dim),
        _t("pooled_projections", "float32", "denoiser_batch", config.pooled_projection_dim),
        _t("timestep", "float32", "denoiser_batch"),
        _t("img_ids", "float32", "image_tokens", 3),
        _t("txt_ids", "float32", "t5_sequence", 3),
    ]
    conditioning = [inputs[2], inputs[3]]
    if config.guidance_embeds:
        inputs.append(_t("guidance", "float32", "denoiser_batch"))
        conditioning.append(inputs[-1])
    out = _t("out_hidden_states", "float32", "denoiser_batch", "image_tokens", config.channels_out)
    facts = {"in_channels": config.in_channels, "guidance_embeds": config.guidance_embeds}
    cls = "FluxTransformer2DModel"
    if not first_block:
        return [ComponentSpec("transformer", "transformer", "transformer", cls, tuple(inputs), (out,), facts)]
    tail, first, residual = (
        _t(n, "float32", "denoiser_batch", "image_tokens", config.inner_dim)
        for n in ("tail_residual", "first_block_hidden", "first_block_residual")
    )
    cached = {**facts, "first_block_cache": True}
    return [
        ComponentSpec("transformer", "transformer", "transformer", cls, tuple(inputs), (out, tail), cached),
        ComponentSpec(
            "transformer_first", "transformer_first", "transformer", cls, tuple(inputs), (first, residual), cached
        ),
        ComponentSpec(
            "transformer_tail", "transformer_tail", "transformer", cls, (first, tail, *conditioning), (out,), cached
        ),
    ]


def concrete(spec: TensorSpec, dims: dict[str, int]) -> TensorSpec:
    """`spec` with every symbolic dim replaced by its value in `dims`."""
    return TensorSpec(spec.name, spec.dtype, tuple(dims[d] if isinstance(d, str) else d for d in spec.shape))


# -- wrapper modules: positional inputs in spec order, tuple outputs ---------------------------


class TextEncoderExport(nn.Module):
    """input_ids -> (last_hidden_state, hidden_states[-2][, text_embeds | pooler_output]) or T5's
    last_hidden_state."""

    def __init__(self, model: nn.Module, is_t5: bool, with_projection: bool, pooled_output: bool = False):
        super().__init__()
        self.model = model
        self.is_t5 = is_t5
        self.with_projection = with_projection
        self.pooled_output = pooled_output

    def forward(self, input_ids: torch.Tensor):
        if self.is_t5:
            return (self.model(input_ids).last_hidden_state,)
        out = self.model(input_ids, output_hidden_states=True)
        if self.with_projection:
            return out.last_hidden_state, out.hidden_states[-2], out.text_embeds
        if self.pooled_output:
            return out.last_hidden_state, out.hidden_states[-2], out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2]


class UNetExport(nn.Module):
    """sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, timestep_cond][, ControlNet
    residuals: one per skip, then the mid block's] -> (out_sample,)."""

    def __init__(
        self,
        unet: nn.Module,
        text_time: bool,
        guidance_embedded: bool = False,
        residuals: int = 0,
        deepcache_branch: int | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.text_time = text_time
        self.guidance_embedded = guidance_embedded
        self.residuals = residuals
        self.deepcache_branch = deepcache_branch

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        conditions, residuals = (rest[: len(rest) - self.residuals], rest[len(rest) - self.residuals :])
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if self.text_time else None
        timestep_cond = conditions[-1] if self.guidance_embedded else None
        if self.deepcache_branch is not None:  # (out_sample, deepcache_feature)
            return self.unet.forward_deepcache(
                sample,
                timestep,
                encoder_hidden_states,
                self.deepcache_branch,
                added_cond_kwargs=added,
                timestep_cond=timestep_cond,
            )
        out = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=list(residuals[:-1]) if residuals else None,
            mid_block_additional_residual=residuals[-1] if residuals else None,
        )
        return (out[0],)


class UNetShallowExport(nn.Module):
    """sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, timestep_cond],
    deepcache_feature -> (out_sample,): DeepCache's shallow path."""

    def __init__(self, unet: nn.Module, text_time: bool, guidance_embedded: bool, branch: int):
        super().__init__()
        self.unet = unet
        self.text_time = text_time
        self.guidance_embedded = guidance_embedded
        self.branch = branch

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        conditions, feature = rest[:-1], rest[-1]
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if self.text_time else None
        timestep_cond = conditions[-1] if self.guidance_embedded else None
        out, _ = self.unet.forward_deepcache(
            sample,
            timestep,
            encoder_hidden_states,
            self.branch,
            feature,
            added_cond_kwargs=added,
            timestep_cond=timestep_cond,
        )
        return (out,)


class ControlNetExport(nn.Module):
    """sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scales[, text_embeds,
    time_ids] -> the scaled residuals (one per skip, then the mid block's)."""

    def __init__(self, controlnet: nn.Module, text_time: bool):
        super().__init__()
        self.controlnet = controlnet
        self.text_time = text_time

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scales, *conditions):
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if self.text_time else None
        return self.controlnet.residuals(
            sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scales, added
        )


class TransformerExport(nn.Module):
    """hidden_states, encoder_hidden_states, pooled_projections, timestep -> (out_hidden_states,);
    with `with_tail` also the tail residual the first-block cache keeps."""

    def __init__(self, transformer: nn.Module, with_tail: bool = False):
        super().__init__()
        self.transformer = transformer
        self.with_tail = with_tail

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        if self.with_tail:
            return self.transformer.forward_with_tail(
                hidden_states, encoder_hidden_states, pooled_projections, timestep
            )
        return (self.transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep)[0],)


class FluxExport(nn.Module):
    """hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids[, guidance]
    -> (out_hidden_states,): the Flux transformer on packed latents; with `with_tail` also the tail
    residual the first-block cache keeps."""

    def __init__(self, transformer: nn.Module, with_tail: bool = False):
        super().__init__()
        self.transformer = transformer
        self.with_tail = with_tail

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):  # fmt: skip
        inputs = (hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        if self.with_tail:
            return self.transformer.forward_with_tail(*inputs)
        return (self.transformer(*inputs)[0],)


class FluxFirstExport(nn.Module):
    """The Flux transformer's inputs -> (first_block_hidden, first_block_residual): its first block alone."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):  # fmt: skip
        return self.transformer.first_block(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )


class FluxTailExport(nn.Module):
    """first_block_hidden, tail_residual, pooled_projections, timestep[, guidance] -> (out_hidden_states,):
    the packed output with every block after the first skipped."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, first_block_hidden, tail_residual, pooled_projections, timestep, guidance=None):
        return (self.transformer.forward_from_cache(first_block_hidden, tail_residual, pooled_projections, timestep,
                                                    guidance),)  # fmt: skip


class TransformerFirstExport(nn.Module):
    """The transformer's inputs -> (first_block_hidden, first_block_residual): its first block alone."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer.first_block(hidden_states, encoder_hidden_states, pooled_projections, timestep)


class TransformerTailExport(nn.Module):
    """first_block_hidden, tail_residual, pooled_projections, timestep -> (out_hidden_states,): the
    output with the blocks after the first skipped."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, first_block_hidden, tail_residual, pooled_projections, timestep):
        return (self.transformer.forward_from_cache(first_block_hidden, tail_residual, pooled_projections, timestep),)


class VAEEncoderExport(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return (self.vae.encode(sample)[0],)


class VAEDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return (self.vae.decode(latent_sample)[0],)


def wrap_module(spec: ComponentSpec, model: nn.Module) -> nn.Module:
    """An already-loaded component (text encoder, denoiser or whole VAE) in its export wrapper,
    in eval mode. The wrapper shares the model's weights; it copies nothing."""
    if spec.kind == "text_encoder":
        module: nn.Module = TextEncoderExport(
            model,
            spec.class_name == "T5EncoderModel",
            bool(spec.facts.get("with_projection")),
            bool(spec.facts.get("pooled_output")),
        )
    elif spec.kind == "unet":
        module = UNetExport(
            model,
            spec.facts["text_time"],
            bool(spec.facts.get("guidance_embedded")),
            int(spec.facts.get("controlnet_residuals", 0)),
            spec.facts.get("deepcache_branch"),
        )
    elif spec.kind == "unet_shallow":
        module = UNetShallowExport(
            model, spec.facts["text_time"], bool(spec.facts.get("guidance_embedded")), spec.facts["deepcache_branch"]
        )
    elif spec.kind == "controlnet":
        module = ControlNetExport(model, spec.facts["text_time"])
    elif spec.class_name == "FluxTransformer2DModel" and spec.kind == "transformer":
        module = FluxExport(model, bool(spec.facts.get("first_block_cache")))
    elif spec.class_name == "FluxTransformer2DModel":
        module = (FluxFirstExport if spec.kind == "transformer_first" else FluxTailExport)(model)
    elif spec.kind == "transformer":
        module = TransformerExport(model, bool(spec.facts.get("first_block_cache")))
    elif spec.kind == "transformer_first":
        module = TransformerFirstExport(model)
    elif spec.kind == "transformer_tail":
        module = TransformerTailExport(model)
    elif spec.kind == "vae_encoder":
        module = VAEEncoderExport(model)
    else:
        module = VAEDecoderExport(model)
    # torch.onnx.export restores the wrapper's train/eval mode recursively afterwards: a wrapper left
    # in training mode would switch dropout on in the wrapped model (T5's).
    return module.eval().requires_grad_(False)


def load_export_module(spec: ComponentSpec, root: Path, loras: Sequence[Lora] = ()) -> nn.Module:
    """The reference module of `spec`, loaded fp32 on the CPU with `loras` fused, wrapped for export."""
    folder = Path(root) / spec.source
    if spec.kind == "text_encoder":
        model = load_text_encoder(folder, spec.class_name, torch.float32)
    elif spec.kind in ("unet", "unet_shallow"):
        model = load_unet(folder, torch.float32)
    elif spec.class_name == "FluxTransformer2DModel":
        model = load_flux_transformer(folder, torch.float32)
    elif spec.kind in ("transformer", "transformer_first", "transformer_tail"):
        model = load_sd3_transformer(folder, torch.float32)
    elif spec.kind == "controlnet":
        model = load_controlnet(folder, torch.float32)
    else:
        model = load_vae(folder, torch.float32)
        if spec.kind == "vae_encoder":
            model.decoder = model.post_quant_conv = None  # only the encoder half is exported (and carried)
        else:
            model.encoder = model.quant_conv = None  # only the decoder half is exported (and carried)
    if loras and spec.kind not in ("vae_encoder", "vae_decoder", "controlnet"):  # LoRAs reach the rest
        fuse_loras(model, spec.source, loras)
    module = wrap_module(spec, model)
    if spec.facts.get("lora_slots"):  # export --lora-slots: the projections' LoRA matrices are inputs
        return LoraSlotted(module).eval().requires_grad_(False)
    return module


STREAMABLE = ("FluxTransformer2DModel", "SD3Transformer2DModel")  # the classes traced without their weights


def export_skeleton(spec: ComponentSpec, root: Path) -> Skeleton:
    """`spec`'s export wrapper as `load_export_module` builds it, on the meta device, checked
    against its weights, which stay in the checkpoint's files (`reference.streaming`)."""
    if spec.class_name not in STREAMABLE or spec.facts.get("lora_slots"):
        raise ValueError(f"{spec.name} ({spec.class_name}) cannot be exported with streamed weights")
    folder = Path(root) / spec.source
    model: nn.Module
    with torch.device("meta"):
        if spec.class_name == "FluxTransformer2DModel":
            model = FluxTransformer2DModel(read_flux_config(folder))
        else:
            model = SD3Transformer2DModel(read_sd3_config(folder))
    return skeleton(wrap_module(spec, model), model.eval(), folder, "transformer.")


# -- example inputs --------------------------------------------------------------------------


def example_inputs(spec: ComponentSpec, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs at concrete shapes, with realistic ranges for each tensor."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for tensor in spec.inputs:
        shape = concrete(tensor, dims).shape
        if tensor.name == "input_ids":
            vocab = int(spec.facts.get("vocab_size") or 1000)
            ids = torch.randint(2, max(vocab - 1, 3), shape, generator=gen)
            eos = spec.facts.get("eos_token_id")
            if eos is not None:
                ids[:, shape[1] // 2 :] = int(eos)  # a prompt, then end-of-text padding as the tokenizer pads
            out[tensor.name] = ids
        elif tensor.name == "timestep" and spec.class_name == "FluxTransformer2DModel":
            out[tensor.name] = torch.full(shape, 0.6375)  # FluxPipeline passes t / 1000
        elif tensor.name == "timestep":
            out[tensor.name] = torch.full(shape, 637.5)
        elif tensor.name == "img_ids":  # the packed tokens' (row, column) positions
            out[tensor.name] = image_ids(dims["latent_height"], dims["latent_width"])
        elif tensor.name == "txt_ids":
            out[tensor.name] = text_ids(shape[0])
        elif tensor.name == "guidance":  # FLUX.1-dev's distilled guidance scale
            out[tensor.name] = torch.full(shape, 3.5)
        elif tensor.name == "timestep_cond":  # the embedding of a guidance scale of 7.5 (w - 1 = 6.5)
            out[tensor.name] = guidance_scale_embedding(torch.full((shape[0],), 6.5), shape[1])
        elif tensor.name == "conditioning_scales":  # guess mode's ramp at a scale of 0.8
            out[tensor.name] = torch.logspace(-1, 0, shape[0]) * 0.8
        elif tensor.name.startswith(("lora_down.", "lora_up.")):  # a LoRA slot's matrices, small as trained ones
            out[tensor.name] = torch.randn(shape, generator=gen) * 0.05
        elif tensor.name == "controlnet_cond":  # a control image in [0, 1]
            out[tensor.name] = torch.rand(shape, generator=gen)
        elif tensor.name == "time_ids":
            h, w = dims["height"], dims["width"]
            out[tensor.name] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(shape[0], 1)
        elif spec.kind == "vae_encoder":
            out[tensor.name] = torch.rand(shape, generator=gen) * 2 - 1
        else:
            out[tensor.name] = torch.randn(shape, generator=gen)
    return out


def spec_for_record(record) -> ComponentSpec:
    """The ComponentSpec an artifact's manifest record was exported from."""
    config = dict(record.config)
    class_name = config.pop("class_name")
    source = config.pop("source")
    return ComponentSpec(
        record.name, record.kind, source, class_name, tuple(record.inputs), tuple(record.outputs), config
    )
