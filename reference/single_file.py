"""Single-file checkpoints in their authors' layouts, converted to a diffusers folder.

Layouts: the original Stable Diffusion 1.x (LDM: `model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`), 2.x (the same with OpenCLIP-H as
`cond_stage_model.model.*`) and SDXL base (SGM: `conditioner.embedders.0.transformer.*` for
CLIP-L and `conditioner.embedders.1.model.*` for OpenCLIP-bigG). A single file holds weights
only: the configs, tokenizers and scheduler come from `config_from`, a diffusers folder (or Hub
repo id) of the same architecture, as diffusers' `from_single_file(config=...)` takes them.

Each target tensor is named by its diffusers key and found in the file by the layout's rules
(below); every tensor the model needs must be there at its shape, and every tensor of a section
the conversion reads must be used (OpenCLIP's unused last block and its logit scale excepted),
so a file of another architecture is refused, never half-converted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from difflower.atomic import atomic_directory
from difflower.errors import ArgumentError, CheckpointError
from difflower.hub import resolve_checkpoint
from difflower.reference.autoencoder_kl import AutoencoderKL
from difflower.reference.config import read_json, sha256_file
from difflower.reference.loading import (
    ModelIndex,
    load_components,
    read_flux_config,
    read_model_index,
    read_sd3_config,
    read_unet_config,
    read_vae_config,
    support_files,
)
from difflower.reference.transformer_flux import FluxConfig, FluxTransformer2DModel
from difflower.reference.transformer_sd3 import SD3Transformer2DModel
from difflower.reference.unet_2d_condition import UNet2DConditionModel

BORROWING = ("sd3", "flux")  # families whose files may lack components: taken from --config-from
MARKER = "difflower_convert.json"  # written beside model_index.json: the folder is a conversion's
# The base repo whose configs and tokenizers a file of each layout takes when none is given, as
# diffusers' from_single_file picks one; SD 2.x has none: its 512 and 768 models differ in their
# prediction type, which the file does not say.
BASES = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}  # fmt: skip

# layout -> (family, {component: (prefix in the file, text encoder kind)})
LAYOUTS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "sd1": ("sd", {"text_encoder": ("cond_stage_model.transformer.", "hf")}),
    "sd2": ("sd", {"text_encoder": ("cond_stage_model.model.", "openclip")}),
    "sdxl": (
        "sdxl",
        {
            "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
            "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
        },
    ),
    # Black Forest Labs' FLUX.1 files hold the transformer alone (dev: with the guidance embedding)
    "flux-dev": ("flux", {}),
    "flux-schnell": ("flux", {}),
}
# Stability's SD3 / SD3.5 files: MMDiT and VAE, the text encoders (transformers' layout) where included
_SD3_ENCODERS = {
    "text_encoder": ("text_encoders.clip_l.transformer.", "hf"),
    "text_encoder_2": ("text_encoders.clip_g.transformer.", "hf"),
    "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5"),
}
LAYOUTS.update({name: ("sd3", _SD3_ENCODERS) for name in ("sd3", "sd35-medium", "sd35-large")})
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
logger = logging.getLogger(__name__)


def detect_layout(keys: set[str], path: Path) -> str:
    """sd1, sd2, sdxl, sd3, sd35-medium, sd35-large, flux-dev or flux-schnell, from the file's key
    names and shapes (as diffusers' from_single_file infers them)."""
    prefix = flux_prefix(keys)
    if prefix is not None:
        if f"{prefix}img_in.weight" not in keys:
            raise CheckpointError(path, "FLUX.1 blocks but no 'img_in.weight': a partial or unknown Flux file")
        return "flux-dev" if f"{prefix}guidance_in.in_layer.weight" in keys else "flux-schnell"
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys):
        if any(".x_block.attn2." in k for k in keys):  # SD3.5 medium's MMDiT-X
            return "sd35-medium"
        return "sd35-large" if f"{UNET_PREFIX}joint_blocks.37.x_block.mlp.fc1.weight" in keys else "sd3"
    if any(k.startswith("joint_blocks.") for k in keys):
        raise CheckpointError(path, "SD3 blocks without 'model.diffusion_model.': a transformer-only file; pass "
                              "the checkpoint as its authors publish it (with the VAE)")  # fmt: skip
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(
            path,
            "no 'model.diffusion_model.*' tensors: not an SD 1.x/2.x or SDXL single file (one component's weights? "
            "pass the checkpoint folder)",
        )
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise CheckpointError(path, "no text encoder tensors (cond_stage_model / conditioner); pass a full checkpoint")


def flux_prefix(keys: set[str]) -> str | None:
    """What a FLUX.1 file's tensor names start with ('' as BFL publishes them, 'model.diffusion_model.'
    as ComfyUI saves them), or None for another layout."""
    for prefix in ("", UNET_PREFIX):
        if any(k.startswith(prefix + "double_blocks.") for k in keys):
            return prefix
    return None


def unet_source(key: str, layers: int, with_attention: list[bool]) -> str:
    """The LDM/SGM name (without prefix) of diffusers UNet tensor `key`; `layers` per down block."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "mid_block":
        index = {"resnets": [0, 2], "attentions": [1]}[parts[1]][int(parts[2])]
        return f"middle_block.{index}.{_resnet_rest(parts[1], parts[3:])}"
    block, kind, rest = int(parts[1]), parts[2], parts[3:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{'.'.join(rest[2:])}"
        layer = 1 + block * (layers + 1) + int(rest[0])
        return f"input_blocks.{layer}.{0 if kind == 'resnets' else 1}.{_resnet_rest(kind, rest[1:])}"
    if kind == "upsamplers":
        slot = 2 if with_attention[block] else 1  # after the layer's resnet (and its attention)
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{rest[2]}"
    layer = block * (layers + 1) + int(rest[0])
    return f"output_blocks.{layer}.{0 if kind == 'resnets' else 1}.{_resnet_rest(kind, rest[1:])}"


def _resnet_rest(kind: str, rest: list[str]) -> str:
    if kind != "resnets":
        return ".".join(rest)
    return f"{_RESNET.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"


def vae_source(key: str, blocks: int) -> str:
    """The LDM name (without prefix) of diffusers VAE tensor `key`; `blocks` down (= up) blocks."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{coder}.norm_out.{rest[1]}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{coder}.mid.block_{int(rest[2]) + 1}.{_vae_resnet(rest[3:])}"
        module = ".".join(rest[3:-1])
        return f"{coder}.mid.attn_1.{_VAE_ATTENTION[module]}.{rest[-1]}"
    block = int(rest[1])
    stage, name = ("down", "downsample") if coder == "encoder" else ("up", "upsample")
    index = block if coder == "encoder" else blocks - 1 - block
    if rest[2] in ("downsamplers", "upsamplers"):
        return f"{coder}.{stage}.{index}.{name}.conv.{rest[-1]}"
    return f"{coder}.{stage}.{index}.block.{rest[3]}.{_vae_resnet(rest[4:])}"


def _vae_resnet(rest: list[str]) -> str:
    return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])


def openclip_source(key: str) -> tuple[str, int | None]:
    """The OpenCLIP name of transformers CLIP tensor `key`, and which third of a fused q/k/v
    projection it is (None when it is the whole tensor)."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}  # fmt: skip
    if key in fixed:
        return fixed[key], None
    match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if match is None:
        raise KeyError(key)
    layer, module, leaf = match.groups()
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{layer}.attn.in_proj_{leaf}", "qkv".index(module[10])
    return f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{leaf}", None


@dataclass(frozen=True)
class Piece:
    """A target tensor made from part of a file tensor: piece `index` of its split along dim 0 into
    `sizes`, or (`swap`) the whole with its two halves exchanged (BFL's final modulation gives
    (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift))."""

    index: int = 0
    sizes: tuple[int, ...] = ()  # () for three equal pieces (q|k|v)
    swap: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.swap:
            first, second = tensor.chunk(2, dim=0)
            return torch.cat([second, first])
        sizes = list(self.sizes) or [tensor.shape[0] // 3] * 3
        if sum(sizes) != tensor.shape[0]:
            raise ValueError(f"{tuple(tensor.shape)} does not split into {sizes}")
        return tensor.split(sizes, dim=0)[self.index]


_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}  # fmt: skip
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}  # fmt: skip
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}  # fmt: skip


def flux_source(key: str, config: FluxConfig) -> tuple[str, Piece | None]:
    """Where a diffusers FluxTransformer2DModel tensor lies in Black Forest Labs' layout
    (`double_blocks.*`, `single_blocks.*`, ...): q|k|v fused per stream, a single block's
    q|k|v|MLP-in fused in `linear1`, RMS norm weights named `scale`."""
    inner, mlp = config.inner_dim, config.mlp_dim
    module, leaf = key.rsplit(".", 1)
    if module == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", Piece(swap=True)
    if module in _FLUX_TOP:
        return f"{_FLUX_TOP[module]}.{leaf}", None
    kind, index, rest = module.split(".", 2)
    if kind == "transformer_blocks":
        qkv = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
        if rest in qkv:
            stream = "img" if qkv.index(rest) < 3 else "txt"
            return f"double_blocks.{index}.{stream}_attn.qkv.{leaf}", Piece(qkv.index(rest) % 3, (inner,) * 3)
        return f"double_blocks.{index}.{_FLUX_DOUBLE[rest]}.{_norm_leaf(rest, leaf)}", None
    if kind == "single_transformer_blocks":
        fused = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        if rest in fused:
            return f"single_blocks.{index}.linear1.{leaf}", Piece(fused.index(rest), (inner, inner, inner, mlp))
        return f"single_blocks.{index}.{_FLUX_SINGLE[rest]}.{_norm_leaf(rest, leaf)}", None
    raise KeyError(key)


def _norm_leaf(module: str, leaf: str) -> str:
    """BFL names an RMS norm's weight `scale`."""
    return "scale" if module.startswith("attn.norm_") else leaf


_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
}  # fmt: skip
_SD3_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}  # fmt: skip
_SD3_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def sd3_source(key: str, num_layers: int) -> tuple[str, Piece | None]:
    """Where a diffusers SD3Transformer2DModel tensor lies in Stability's layout (without the
    'model.diffusion_model.' prefix): q|k|v fused per stream, the final modulations (the output's
    and the last block's context-only one) with (shift, scale) where diffusers has (scale, shift)."""
    if key == "pos_embed.pos_embed":
        return "pos_embed", None
    module, leaf = key.rsplit(".", 1)
    if module == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", Piece(swap=True)
    if module in _SD3_TOP:
        return f"{_SD3_TOP[module]}.{leaf}", None
    _, index, rest = module.split(".", 2)
    for head, fused in _SD3_QKV.items():
        if rest.startswith(head) and rest.endswith(("q", "k", "v", "q_proj", "k_proj", "v_proj")):
            third = "qkv".index(rest.removeprefix(head)[0])
            return f"joint_blocks.{index}.{fused}.{leaf}", Piece(third)
    swap = rest == "norm1_context.linear" and int(index) == num_layers - 1  # the last block's text stream ends
    return f"joint_blocks.{index}.{_SD3_BLOCK[rest]}.{leaf}", Piece(swap=True) if swap else None


def write_single_file(checkpoint: Path, layout: str, path: Path) -> Path:
    """The inverse of the conversion: `checkpoint`'s weights as one file in `layout` (sd1, sd2,
    sdxl, sd3 with its three text encoders; flux-dev or flux-schnell: the transformer alone), laid
    out as their authors lay them out (tests and benchmarks make single files with it; diffusers'
    from_single_file reading them back is what the tests check it by)."""
    from safetensors.torch import save_file

    family = LAYOUTS[layout][0]
    _, components = load_components(checkpoint)
    if family == "flux":
        config = read_flux_config(checkpoint / "transformer")
        names = partial(flux_source, config=config)
        save_file(_unsplit(components["transformer"].state_dict(), names), str(path))
        return path
    blocks = len(read_vae_config(checkpoint / "vae").block_out_channels)
    state: dict[str, torch.Tensor] = {}
    if family == "sd3":
        layers = read_sd3_config(checkpoint / "transformer").num_layers
        transformer = _unsplit(components["transformer"].state_dict(), partial(sd3_source, num_layers=layers))
        state.update({UNET_PREFIX + name: value for name, value in transformer.items()})
    else:
        unet_config = read_unet_config(checkpoint / "unet")
        if not isinstance(unet_config.layers_per_block, int):
            raise CheckpointError(
                checkpoint / "unet" / "config.json", "per-block layers_per_block has no single-file layout"
            )
        attention = ["CrossAttn" in t for t in unet_config.up_block_types]
        for key, value in components["unet"].state_dict().items():
            state[UNET_PREFIX + unet_source(key, unet_config.layers_per_block, attention)] = value
    for key, value in components["vae"].state_dict().items():
        name = VAE_PREFIX + vae_source(key, blocks)
        state[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
    for name, (prefix, kind) in LAYOUTS[layout][1].items():
        fused: dict[str, list[torch.Tensor]] = {}
        for key, value in components[name].state_dict().items():
            if kind == "t5":  # the input embedding is tied to `shared`: saved once, as Stability's files have it
                if key != "encoder.embed_tokens.weight":
                    state[prefix + key] = value
                continue
            canonical = canonical_clip_key(key)
            if kind == "hf":
                state[prefix + canonical] = value
                continue
            source, third = openclip_source(canonical)
            if third is None:
                state[prefix + source] = value.t() if source == "text_projection" else value
            else:
                fused.setdefault(prefix + source, [value] * 3)[third] = value
        state.update({k: torch.cat(parts) for k, parts in fused.items()})
        if kind == "openclip":  # what OpenCLIP files carry beyond the text model
            state[prefix + "logit_scale"] = torch.tensor(4.6)
            if layout == "sd2":  # SD 2.x uses the penultimate layer: the file has one block more
                width = components[name].config.hidden_size
                last = components[name].config.num_hidden_layers
                state[prefix + f"transformer.resblocks.{last}.ln_1.weight"] = torch.ones(width)
                state[prefix + "text_projection"] = torch.zeros(width, width)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _unsplit(
    state: dict[str, torch.Tensor], source: Callable[[str], tuple[str, Piece | None]]
) -> dict[str, torch.Tensor]:
    """A diffusers state dict in a fused layout: each tensor at its `source` name, pieces concatenated."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        name, piece = source(key)
        if piece is None:
            out[name] = value
        elif piece.swap:
            out[name] = piece.take(value)  # exchanging the halves is its own inverse
        else:
            pieces.setdefault(name, {})[piece.index] = value
    out.update({name: torch.cat([parts[i] for i in sorted(parts)]) for name, parts in pieces.items()})
    return {k: v.contiguous() for k, v in out.items()}


class SingleFile:
    """A single-file checkpoint, read tensor by tensor, remembering which tensors were used."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        if path.suffix != ".safetensors":
            raise CheckpointError(path, "difflower converts .safetensors single files only (a .ckpt is a pickle)")
        try:
            self.handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(path, f"not a readable safetensors file ({str(err)[:120]})") from None
        self.path = path
        self.keys = set(self.handle.keys())  # noqa: SIM118 - not a dict
        self.used: set[str] = set()

    def take(self, name: str, component: str, key: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(self.path, f"{component} tensor '{key}' needs '{name}', which the file lacks")
        self.used.add(name)
        return self.handle.get_tensor(name)

    def unused(self, prefix: str, allowed: Callable[[str], bool] = lambda _: False) -> list[str]:
        return sorted(k for k in self.keys if k.startswith(prefix) and k not in self.used and not allowed(k))


def _converted(
    file: SingleFile,
    component: str,
    model: torch.nn.Module,
    source: Callable[[str], tuple[str, int | Piece | None]],
) -> dict[str, torch.Tensor]:
    """`model`'s state dict (it lives on the meta device: names and shapes) filled from `file`."""
    out = {}
    for key, meta in model.state_dict().items():
        name, third = source(key)
        tensor = file.take(name, component, key)
        if isinstance(third, Piece):
            try:
                tensor = third.take(tensor)
            except ValueError as err:
                raise CheckpointError(file.path, f"{component} tensor '{key}' ({name}): {err}; is --config-from this "
                                      "model's architecture?") from None  # fmt: skip
        elif third is not None:
            tensor = tensor.chunk(3, dim=0)[third]
        if name.endswith(".text_projection"):
            tensor = tensor.t()  # OpenCLIP multiplies by it from the right
        elif tensor.ndim == 4 and meta.ndim == 2 and tensor.numel() == meta.numel():
            tensor = tensor.reshape(meta.shape)  # LDM's VAE attention projections are 1x1 convolutions
        if tensor.shape != meta.shape:
            raise CheckpointError(
                file.path,
                f"{component} tensor '{key}' ({name}) is {tuple(tensor.shape)}, the config wants {tuple(meta.shape)}; "
                "is --config-from this model's architecture?",
            )
        out[key] = tensor.contiguous()
    return out


def _text_encoder(folder: Path, class_name: str) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return getattr(transformers, class_name)(config)


def cache_root() -> Path:
    """Where files given directly to a command are converted: $DIFFLOWER_CACHE or ~/.cache/difflower."""
    return Path(os.environ.get("DIFFLOWER_CACHE") or Path.home() / ".cache" / "difflower") / "single-file"


def resolve_model(model: str | Path, variant: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """The diffusers folder of `model` and where it came from: a folder as it is, a Hub repo id
    resolved in the Hub cache, or a single .safetensors file converted once into cache_root(),
    keyed by the file's sha256, with its layout's base repo for configs (BASES)."""
    path = Path(model)
    if not (path.is_file() and path.suffix == ".safetensors"):
        folder, snapshot = resolve_checkpoint(model, variant)
        return folder, None if snapshot is None else {"hub": snapshot.to_json()}
    digest = sha256_file(path)
    out = cache_root() / digest[:32]
    origin = {"single_file": {"path": str(path.absolute()), "sha256": digest}}
    if not_a_conversion(out) is None:
        return out, origin
    file = SingleFile(path)
    layout = detect_layout(file.keys, path)
    if layout not in BASES:
        raise CheckpointError(
            path,
            f"an {layout} single file: its configs (and SD 2.x's prediction type) cannot be told from it; run "
            "difflower convert FILE --config-from MODEL [--prediction-type ...] --out DIR and pass DIR",
        )
    logger.info("%s: converting to a diffusers folder in %s (configs from %s)", path, out, BASES[layout])
    convert_single_file(path, BASES[layout], out, overwrite=out.exists())
    return out, origin


def convert_single_file(
    path: Path | str,
    config_from: Path | str,
    out: Path | str,
    *,
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the diffusers folder of single-file checkpoint `path` at `out` (atomically); the
    configs, tokenizers and scheduler come from `config_from`, a diffusers folder or Hub repo id."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    if path.is_dir():
        raise CheckpointError(path, "is a folder; convert takes a single .safetensors file (a folder is read as it is)")
    if not path.is_file():
        raise CheckpointError(path, "not found")
    file = SingleFile(path)
    layout = detect_layout(file.keys, path)
    family, encoders = LAYOUTS[layout]
    # A FLUX.1 file holds the transformer only, an SD3 file its text encoders only at times: what the
    # file lacks comes from config_from, as diffusers' from_single_file takes it from the base repo
    own = _components_in_file(family, encoders, file.keys)
    folder, _ = resolve_checkpoint(config_from, weights=family in BORROWING, skip=own)
    index = read_model_index(folder)
    if index.family != family:
        raise ArgumentError(
            "--config-from", f"{index.root} is an {index.family} checkpoint; this file is {layout}: pass a {family} one"
        )
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ArgumentError("--prediction-type", f"epsilon or v_prediction, got {prediction_type!r}")
    if prediction_type is not None and family == "flux":
        raise ArgumentError("--prediction-type", "FLUX.1 is a flow-matching model: it has no prediction type to set")
    with atomic_directory(out, overwrite, "--out", replaceable=not_a_conversion, protected=(index.root, path)) as tmp:
        _copy_configs(index, tmp)
        if family == "flux":
            parts = {"transformer": _flux_transformer(file, index)}
        elif family == "sd3":
            parts = {"transformer": _sd3_transformer(file, index)}
            if "vae" in own:
                parts["vae"] = _vae(file, index)
        else:
            parts = {"unet": _unet(file, index), "vae": _vae(file, index)}
        if family in BORROWING:
            _link_weights(index, [name for name in index.components if name not in own], tmp)
            encoders = {name: where for name, where in encoders.items() if name in own}
        for name, (prefix, kind) in encoders.items():
            if name not in index.components:
                raise ArgumentError("--config-from", f"{index.root} has no {name}, which this {layout} file holds")
            model = _text_encoder(index.root / name, index.components[name][1])
            parts[name] = _converted(file, name, model, _text_source(prefix, kind, file.keys))
            if kind == "t5":  # tied to `shared`: transformers saves and reloads it once
                parts[name].pop("encoder.embed_tokens.weight", None)
        _refuse_unused(file, encoders)
        for name, state in parts.items():
            stem = "diffusion_pytorch_model" if name in ("unet", "vae", "transformer") else "model"
            save_file(state, str(tmp / name / f"{stem}.safetensors"), metadata={"format": "pt"})
        if prediction_type is not None:
            scheduler = tmp / "scheduler" / "scheduler_config.json"
            config = read_json(scheduler)
            config["prediction_type"] = prediction_type
            scheduler.write_text(json.dumps(config, indent=2) + "\n")
        record = {"source": str(path.absolute()), "layout": layout, "config_from": str(index.root)}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _unet(file: SingleFile, index: ModelIndex) -> dict[str, torch.Tensor]:
    """An SD 1.x/2.x/SDXL file's UNet in diffusers' names, at the shapes of `index`'s config."""
    unet_config = read_unet_config(index.root / "unet")
    layers = unet_config.layers_per_block
    if not isinstance(layers, int):
        raise CheckpointError(index.root / "unet" / "config.json", "per-block layers_per_block is not converted")
    attention = ["CrossAttn" in t for t in unet_config.up_block_types]
    with torch.device("meta"):
        unet = UNet2DConditionModel(unet_config)
    return _converted(file, "unet", unet, lambda k: (UNET_PREFIX + unet_source(k, layers, attention), None))


def _vae(file: SingleFile, index: ModelIndex) -> dict[str, torch.Tensor]:
    """A file's VAE (`first_stage_model.*`, LDM's layout) in diffusers' names."""
    vae_config = read_vae_config(index.root / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config)
    blocks = len(vae_config.block_out_channels)
    return _converted(file, "vae", vae, lambda k: (VAE_PREFIX + vae_source(k, blocks), None))


def _sd3_transformer(file: SingleFile, index: ModelIndex) -> dict[str, torch.Tensor]:
    """An SD3 / SD3.5 file's MMDiT in diffusers' names, at the shapes of `index`'s config."""
    config = read_sd3_config(index.root / "transformer")
    with torch.device("meta"):
        model = SD3Transformer2DModel(config)

    def source(key: str) -> tuple[str, Piece | None]:
        name, piece = sd3_source(key, config.num_layers)
        return UNET_PREFIX + name, piece

    return _converted(file, "transformer", model, source)


def _components_in_file(family: str, encoders: dict[str, tuple[str, str]], keys: set[str]) -> set[str]:
    """The components a file of `family` brings (the others come from --config-from)."""
    if family == "flux":
        return {"transformer"}
    if family != "sd3":  # SD 1.x/2.x and SDXL files hold every weight
        return {"unet", "vae", *encoders}
    own = {"transformer"} | {name for name, (prefix, _) in encoders.items() if any(k.startswith(prefix) for k in keys)}
    return own | {"vae"} if any(k.startswith(VAE_PREFIX) for k in keys) else own


def _flux_transformer(file: SingleFile, index: ModelIndex) -> dict[str, torch.Tensor]:
    """A FLUX.1 file's transformer in diffusers' names, at the shapes of `index`'s config."""
    config = read_flux_config(index.root / "transformer")
    prefix = flux_prefix(file.keys) or ""
    with torch.device("meta"):
        model = FluxTransformer2DModel(config)

    def source(key: str) -> tuple[str, Piece | None]:
        name, piece = flux_source(key, config)
        return prefix + name, piece

    return _converted(file, "transformer", model, source)


def _link_weights(index: ModelIndex, names: list[str], out: Path) -> None:
    """The weight files of components `names` of `index` into `out`: hard links where the file
    system allows (a Hub cache entry is a link to its blob: the blob is linked), else copies."""
    for name in names:
        for source in sorted((index.root / name).glob("*.safetensors*")):
            target = out / name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(os.path.realpath(source), target)
            except OSError:
                shutil.copyfile(source, target)


def canonical_clip_key(key: str) -> str:
    """A transformers CLIP tensor name in the layout single files use (`text_model.` first):
    transformers 5 names CLIPTextModel's tensors without that level, WithProjection's with it."""
    return key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key


def _text_source(prefix: str, kind: str, keys: set[str]) -> Callable[[str], tuple[str, int | None]]:
    if kind == "openclip":

        def source(key: str) -> tuple[str, int | None]:
            name, third = openclip_source(canonical_clip_key(key))
            return prefix + name, third

        return source
    if kind == "t5":  # transformers' names; the tied input embedding may be saved once, as shared.weight
        return lambda k: (prefix + ("shared.weight" if k.endswith("embed_tokens.weight") and prefix + k not in keys
                                    else k), None)  # fmt: skip
    # transformers CLIP names; older files lack the 'text_model.' level
    bare = not any(k.startswith(prefix + "text_model.") for k in keys)
    return lambda k: (
        prefix + (canonical_clip_key(k).removeprefix("text_model.") if bare else canonical_clip_key(k)),
        None,
    )


def _refuse_unused(file: SingleFile, encoders: dict[str, tuple[str, str]]) -> None:
    """Every tensor of a section read must have been used: leftovers mean another architecture."""
    prefix = flux_prefix(file.keys)
    if prefix is not None:  # every tensor of a FLUX.1 file belongs to its transformer
        leftovers = file.unused("")
    else:
        leftovers = file.unused(UNET_PREFIX) + file.unused(VAE_PREFIX, lambda n: "loss" in n)
    for prefix, kind in encoders.values():
        leftovers += file.unused(prefix, _ignorable(file, prefix, kind))
    if leftovers:
        raise CheckpointError(
            file.path,
            f"{len(leftovers)} tensors have no place in the --config-from architecture (first: "
            f"{', '.join(leftovers[:3])}); is the config from this model?",
        )


def _ignorable(file: SingleFile, prefix: str, kind: str) -> Callable[[str], bool]:
    """A text encoder's tensors a conversion may leave: transformers rebuilds CLIP's position_ids;
    SD 2.x leaves OpenCLIP's last block out (it reads the penultimate layer), and logit_scale is
    CLIP's training loss."""
    if kind != "openclip":
        return lambda name: name.endswith("position_ids")
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    last = max((int(m.group(1)) for n in file.used if (m := block.match(n))), default=-1)

    def ignorable(name: str) -> bool:
        match = block.match(name)
        return name.endswith(("logit_scale", "attn_mask", "text_projection")) or (
            match is not None and int(match.group(1)) > last
        )

    return ignorable


def _copy_configs(index: ModelIndex, out: Path) -> None:
    """model_index.json, the scheduler and tokenizers, and each model's config.json."""
    files = support_files(index)
    files += [f"{name}/config.json" for name in index.components if (index.root / name / "config.json").is_file()]
    for relative in files:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(index.root / relative, out / relative)


def not_a_conversion(folder: Path) -> str | None:
    """None when `folder` is a folder `difflower convert` wrote, else why it may not be replaced."""
    if (Path(folder) / MARKER).is_file() and (Path(folder) / "model_index.json").is_file():
        return None
    return "it is not a folder difflower convert wrote; remove it yourself or choose another --out"
