"""Tiny random-weight checkpoints in diffusers format: the embedded default.

`make_tiny_checkpoint(dir, family, seed)` writes a complete pipeline folder (model_index.json,
every component with config and safetensors weights, scheduler config, tokenizers built
locally) that both difflower and diffusers load, with no downloads. Each is a few megabytes
and runs a full pipeline in seconds on two cores, yet keeps every structural feature of their family: cross-attention
transformers in down/mid/up blocks with skip connections (SD), linear projections, per-block
transformer depths and the text_time embedding with two text encoders (SDXL), joint attention
with a context-pre-only last block and three text encoders (SD3). The VAE downsamples 8x,
like every real SD VAE.

The same seed gives the same bytes on any CPU: every random weight is drawn by numpy's PCG64
generator (integer arithmetic, no vector dispatch), not by torch's CPU `randn`/`uniform_`,
whose output depends on the instruction set torch dispatches to (AVX2, AVX-512, or none).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflower.atomic import atomic_directory
from difflower.errors import ArgumentError, DifflowerError
from difflower.reference.autoencoder_kl import AutoencoderKL, VAEConfig
from difflower.reference.config import config_to_dict, read_json
from difflower.reference.controlnet import ControlNetConfig, ControlNetModel
from difflower.reference.loading import (
    FAMILIES,
    WEIGHTS_NAME,
    Family,
    quiet_transformers,
    read_unet_config,
    read_vae_config,
)
from difflower.reference.transformer_flux import FluxConfig, FluxTransformer2DModel
from difflower.reference.transformer_sd3 import SD3Config, SD3Transformer2DModel
from difflower.reference.unet_2d_condition import UNet2DConditionModel, UNetConfig

# The diffusers release whose file layout these folders follow (written as `_diffusers_version`).
DIFFUSERS_LAYOUT_VERSION = "0.42.1"
# model_index.json's record that difflower wrote the folder (diffusers ignores `_` keys): the
# only kind of checkpoint `difflower tiny --overwrite` replaces.
TINY_MARKER = "_difflower_tiny"
M = TypeVar("M", bound=nn.Module)

# Words whose BPE merges the tiny CLIP vocabulary holds, so tokenization is not byte-per-token.
_WORDS = (
    "a photo of the an in on with and cat dog horse astronaut red blue green painting portrait "
    "landscape city night sky mountain river forest oil watercolor style high quality detailed "
    "blurry low ugly cartoon sunset beach robot castle flower tree"
).split()


@dataclass(frozen=True)
class TinyCLIP:
    """A CLIP text encoder config (transformers' CLIPTextConfig fields we set); tiny by default."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    projection_dim: int = 32
    with_projection: bool = False
    hidden_act: str = "quick_gelu"
    vocab_size: int | None = None  # None: the local tokenizer's size; real-size benchmarks use CLIP's 49408


@dataclass(frozen=True)
class TinySpec:
    """Everything that defines one tiny checkpoint."""

    family: Family
    pipeline_class: str
    scheduler: dict[str, Any]
    vae: VAEConfig
    unet: UNetConfig | None = None
    transformer: SD3Config | FluxConfig | None = None
    clips: tuple[TinyCLIP, ...] = ()
    t5_d_model: int | None = None
    extra_index: dict[str, Any] = field(default_factory=dict)


_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev's scheduler_config.json (schnell: no dynamic shifting, shift 1).
_FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_FLUX_SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

_VAE4 = VAEConfig(
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    force_upcast=False,
)


# `difflower tiny --family`: the families, and FLUX.1-schnell beside dev (no guidance embedding).
TINY_FAMILIES = (*FAMILIES, "flux-schnell")


def tiny_spec(family: str) -> TinySpec:
    """The tiny checkpoint definition of a family."""
    if family == "sd":
        return TinySpec(
            family="sd",
            pipeline_class="StableDiffusionPipeline",
            scheduler=_SD_SCHEDULER,
            vae=_VAE4,
            unet=UNetConfig(
                sample_size=8,
                block_out_channels=(32, 64),
                layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
                norm_num_groups=8,
            ),
            clips=(TinyCLIP(),),
            extra_index={
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
            },
        )
    if family == "sdxl":
        clip_1, clip_2 = TinyCLIP(), TinyCLIP(with_projection=True)
        time_dim = 8
        return TinySpec(
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            scheduler=_SDXL_SCHEDULER,
            vae=replace(_VAE4, force_upcast=True),
            unet=UNetConfig(
                sample_size=8,
                block_out_channels=(32, 64, 64),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=clip_1.hidden_size + clip_2.hidden_size,
                attention_head_dim=(2, 4, 4),
                transformer_layers_per_block=(1, 1, 2),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=clip_2.projection_dim + 6 * time_dim,
                norm_num_groups=8,
            ),
            clips=(clip_1, clip_2),
            extra_index={
                "force_zeros_for_empty_prompt": True,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
            },
        )
    if family == "sd3":
        clip = TinyCLIP(with_projection=True, projection_dim=16)
        t5_d_model = 64  # >= the two CLIP widths side by side, which SD3 pads up to the T5 width
        return TinySpec(
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            scheduler=_SD3_SCHEDULER,
            vae=replace(
                _VAE4,
                latent_channels=16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            transformer=SD3Config(
                sample_size=8,
                patch_size=2,
                in_channels=16,
                num_layers=3,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=t5_d_model,
                caption_projection_dim=32,
                pooled_projection_dim=2 * clip.projection_dim,
                out_channels=16,
                pos_embed_max_size=32,
            ),
            clips=(clip, clip),
            t5_d_model=t5_d_model,
            extra_index={"feature_extractor": [None, None], "image_encoder": [None, None]},
        )
    if family in ("flux", "flux-schnell"):
        dev = family == "flux"
        return TinySpec(
            family="flux",
            pipeline_class="FluxPipeline",
            scheduler=_FLUX_SCHEDULER if dev else _FLUX_SCHNELL_SCHEDULER,
            vae=replace(
                _VAE4,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            transformer=FluxConfig(
                in_channels=64,
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=TinyCLIP().hidden_size,
                guidance_embeds=dev,
                axes_dims_rope=(4, 6, 6),
            ),
            clips=(TinyCLIP(),),
            t5_d_model=32,
        )
    raise ArgumentError("--family", f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def make_tiny_checkpoint(
    out: Path | str, family: str = "sd", seed: int = 0, overwrite: bool = False, spec: TinySpec | None = None
) -> Path:
    """Write a tiny random checkpoint of `family` to `out` (atomically) and return its path.

    `spec` overrides the family's default definition (tests use it for variants such as
    SD2-style or SD3.5-style configs).
    """
    spec = spec or tiny_spec(family)
    out = Path(out)
    with atomic_directory(out, overwrite, argument="DIR", replaceable=not_a_tiny_checkpoint) as tmp:
        with quiet_transformers():
            _write_checkpoint(tmp, spec, seed)
    return out


def make_tiny_controlnet(out: Path | str, checkpoint: Path | str, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random ControlNet that fits `checkpoint`'s UNet to `out` (atomically).

    Its zero convolutions are drawn at random like every other weight, so its residuals are
    not zero: a test through it checks that the residuals are used."""
    checkpoint = Path(checkpoint)
    unet = read_unet_config(checkpoint / "unet")
    vae = read_vae_config(checkpoint / "vae")
    config = ControlNetConfig.from_unet(unet, vae.latent_channels, vae.downscale_factor)
    out = Path(out)
    with atomic_directory(out, overwrite, argument="DIR", replaceable=not_a_tiny_controlnet) as tmp:
        tmp.rmdir()
        _save_model(tmp, ControlNetModel, config, "ControlNetModel", seed)
        raw = read_json(tmp / "config.json")
        raw[TINY_MARKER] = {"family": "controlnet", "seed": seed}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def not_a_tiny_controlnet(folder: Path) -> str | None:
    """None when `folder` is a tiny ControlNet difflower wrote, else why it is not."""
    path = Path(folder) / "config.json"
    try:
        marked = path.is_file() and TINY_MARKER in read_json(path)
    except DifflowerError:
        marked = False
    return (
        None if marked else "it is not a tiny ControlNet difflower wrote; remove it yourself or choose another folder"
    )


def not_a_tiny_checkpoint(folder: Path) -> str | None:
    """None when `folder` is a tiny checkpoint difflower wrote, else why it is not."""
    path = Path(folder) / "model_index.json"
    try:
        marked = path.is_file() and TINY_MARKER in read_json(path)
    except DifflowerError:
        marked = False
    if not marked or (Path(folder) / "difflower.json").exists():
        return "it is not a tiny checkpoint difflower wrote; remove it yourself or choose another folder"
    return None


def portable_init_(model: M, seed: int) -> M:
    """Redraw `model`'s random parameters with numpy's PCG64 (the same numbers on every CPU).

    A parameter its constructor set to one constant (norm scales 1, biases 0) keeps it; any
    other is drawn uniformly in +-1/sqrt(fan_in), the bound of torch's default Linear and Conv
    initialisation, from a stream seeded by (seed, the parameter's name).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().flatten()
            constant = bool((flat == flat[0]).all()) if flat.numel() > 1 else flat.numel() == 0 or flat[0] in (0, 1)
            if constant:
                continue
            fan_in = param[0].numel() if param.ndim > 1 else param.numel()
            bound = 1.0 / math.sqrt(fan_in)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            values = rng.uniform(-bound, bound, size=tuple(param.shape)).astype(np.float32)
            param.copy_(torch.from_numpy(values).to(param.dtype))
    return model


def _construct(cls: Any, config: Any) -> Any:
    """`cls(config)`, leaving the caller's torch random state as it was (its draws are replaced)."""
    with torch.random.fork_rng(devices=[]):
        return cls(config)


def _write_checkpoint(root: Path, spec: TinySpec, seed: int) -> None:
    index: dict[str, Any] = {"_class_name": spec.pipeline_class, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
    index[TINY_MARKER] = {"family": spec.family, "seed": seed}
    index.update(spec.extra_index)

    # 1. denoiser and VAE (our modules; same keys as diffusers)
    if spec.unet is not None:
        _save_model(root / "unet", UNet2DConditionModel, spec.unet, "UNet2DConditionModel", seed)
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if isinstance(spec.transformer, FluxConfig):
        _save_model(root / "transformer", FluxTransformer2DModel, spec.transformer, "FluxTransformer2DModel", seed)
        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    elif spec.transformer is not None:
        _save_model(root / "transformer", SD3Transformer2DModel, spec.transformer, "SD3Transformer2DModel", seed)
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    _save_model(root / "vae", AutoencoderKL, spec.vae, "AutoencoderKL", seed + 1)
    index["vae"] = ["diffusers", "AutoencoderKL"]

    # 2. text encoders and tokenizers (transformers classes)
    suffixes = ["", "_2", "_3"]
    clip_vocab = {clip.vocab_size for clip in spec.clips}
    if len(clip_vocab) > 1:
        sizes = ", ".join(str(size) for size in clip_vocab)
        raise ValueError(f"the CLIP encoders of one checkpoint share a tokenizer; their vocab sizes differ ({sizes})")
    clip_tokenizer = build_clip_tokenizer(next(iter(clip_vocab), None))
    for i, clip in enumerate(spec.clips):
        name = "text_encoder" + suffixes[i]
        class_name = _save_clip(root / name, clip, clip_tokenizer, seed + 2 + i)
        index[name] = ["transformers", class_name]
        clip_tokenizer.save_pretrained(root / ("tokenizer" + suffixes[i]))
        _write_clip_vocab_files(root / ("tokenizer" + suffixes[i]), clip_tokenizer)
        index["tokenizer" + suffixes[i]] = ["transformers", "CLIPTokenizer"]
    if spec.t5_d_model is not None:
        t5_tokenizer = build_t5_tokenizer()
        name = "text_encoder" + suffixes[len(spec.clips)]
        _save_t5(root / name, spec.t5_d_model, t5_tokenizer, seed + 5)
        index[name] = ["transformers", "T5EncoderModel"]
        t5_tokenizer.save_pretrained(root / ("tokenizer" + suffixes[len(spec.clips)]))
        index["tokenizer" + suffixes[len(spec.clips)]] = ["transformers", "T5TokenizerFast"]

    # 3. scheduler and index
    (root / "scheduler").mkdir()
    scheduler = dict(spec.scheduler)
    scheduler.setdefault("_diffusers_version", DIFFUSERS_LAYOUT_VERSION)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_model(folder: Path, cls: type[nn.Module], config: Any, class_name: str, seed: int) -> None:
    model = portable_init_(_construct(cls, config), seed)
    folder.mkdir()
    raw = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION, **config_to_dict(config)}
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    save_weights(state, folder)


# safetensors serializes a whole file in memory: real-size models are written in shards.
MAX_SHARD_BYTES = 2 * 1024**3


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `state` as diffusers does: one safetensors file, or shards with an index past `max_shard_bytes`."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, str(folder / f"{WEIGHTS_NAME}.safetensors"))
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_clip_tokenizer(vocab_size: int | None = None) -> Any:
    """A byte-level BPE CLIP tokenizer over every byte plus merges for a few common words.

    `vocab_size` pads the vocabulary with entries no text produces (`<|unused_N|>`), so a
    real-size text encoder (CLIP's 49408 rows) gets a tokenizer of its own size; the ids of
    the real entries do not change.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(pair)
            pieces = [merged] + pieces[2:]
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} is below the tiny tokenizer's {len(vocab)} entries")
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), vocab_size)})
    # transformers annotates merges as strings; its BPE takes the (left, right) pairs as well
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _write_clip_vocab_files(folder: Path, tokenizer: Any) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for tools that read CLIP's classic files."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _save_clip(folder: Path, spec: TinyCLIP, tokenizer: Any, seed: int) -> str:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=77,
        projection_dim=spec.projection_dim,
        hidden_act=spec.hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    model = portable_init_(_construct(cls, config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    _prefix_clip_keys(folder / "model.safetensors")
    return cls.__name__


def _prefix_clip_keys(path: Path) -> None:
    """Name a CLIP text encoder's tensors `text_model.*`, as published checkpoints do.

    transformers 5.24 saves a CLIPTextModel's tensors without the prefix; transformers 4.x and
    5.5 (optimum's, optimum-intel's) then find none of them and keep random weights without a
    word. With the prefix every version loads the same numbers.
    """
    state = load_file(str(path))
    if all(key.startswith("text_model.") or key == "text_projection.weight" for key in state):
        return
    renamed = {
        k if k.startswith("text_model.") or k == "text_projection.weight" else f"text_model.{k}": v
        for k, v in state.items()
    }
    save_file(renamed, str(path), metadata={"format": "pt"})


def build_t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over lowercase words' characters (with and without the word marker)."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -3.0) for word in _WORDS]
    vocab += [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _save_t5(folder: Path, d_model: int, tokenizer: Any, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]  # a PretrainedConfig kwarg
    )
    model = portable_init_(_construct(T5EncoderModel, config), seed)
    model.save_pretrained(folder, safe_serialization=True)
