"""Reading diffusers-format checkpoint folders.

A checkpoint is `model_index.json` plus one folder per component. Our own models (UNet, SD3
transformer, VAE) are built from their `config.json` on the meta device and take the
safetensors weights by assignment, so nothing is allocated twice; every key must match (no
missing, no unexpected, same shapes). Text encoders and tokenizers are `transformers` classes,
loaded as they are. Weights are read from safetensors only.

Every problem with the folder is a `CheckpointError` naming the file and, where there is one,
the field or tensor, and saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from difflower.errors import CheckpointError
from difflower.hub import resolve_model_folder
from difflower.reference.autoencoder_kl import (
    VAE_CLASS_NAMES,
    VAE_DEFAULT_ONLY_FIELDS,
    VAE_IGNORED_FIELDS,
    AutoencoderKL,
    VAEConfig,
)
from difflower.reference.config import load_config, read_json
from difflower.reference.controlnet import (
    CONTROLNET_CLASS_NAMES,
    CONTROLNET_DEFAULT_ONLY_FIELDS,
    CONTROLNET_IGNORED_FIELDS,
    ControlNetConfig,
    ControlNetModel,
    controlnet_mismatch,
)
from difflower.reference.transformer_flux import (
    FLUX_CLASS_NAMES,
    FLUX_IGNORED_FIELDS,
    FluxConfig,
    FluxTransformer2DModel,
)
from difflower.reference.transformer_sd3 import SD3_CLASS_NAMES, SD3_IGNORED_FIELDS, SD3Config, SD3Transformer2DModel
from difflower.reference.unet_2d_condition import (
    UNET_CLASS_NAMES,
    UNET_DEFAULT_ONLY_FIELDS,
    UNET_IGNORED_FIELDS,
    UNet2DConditionModel,
    UNetConfig,
)

logger = logging.getLogger(__name__)

Family = Literal["sd", "sdxl", "sd3", "flux"]
FAMILIES: tuple[Family, ...] = ("sd", "sdxl", "sd3", "flux")
# The families whose denoiser is a transformer (the others': a UNet).
TRANSFORMER_FAMILIES: tuple[Family, ...] = ("sd3", "flux")

WEIGHTS_NAME = "diffusion_pytorch_model"
M = TypeVar("M", bound=nn.Module)

_PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "LatentConsistencyModelImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
}


@dataclass(frozen=True)
class ModelIndex:
    """`model_index.json`: the pipeline class, its family and each component's (library, class)."""

    root: Path
    pipeline_class: str
    family: Family
    components: dict[str, tuple[str, str]]


def read_model_index(root: Path | str) -> ModelIndex:
    """Read and check `root/model_index.json`."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(root, "folder not found")
    if not root.is_dir():
        raise CheckpointError(root, "is a file; pass the checkpoint folder that holds model_index.json")
    path = root / "model_index.json"
    raw = read_json(path)
    components: dict[str, tuple[str, str]] = {}
    for name, value in raw.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
            raise CheckpointError(path, f"field '{name}' must be [library, class_name], got {json.dumps(value)}")
        if value[0] is not None and value[1] is not None:
            confined(root, name, path)
            components[name] = (value[0], value[1])
    pipeline_class = raw.get("_class_name")
    if not isinstance(pipeline_class, str):
        raise CheckpointError(path, "field '_class_name' (the pipeline class) is missing or not a string")
    family = _PIPELINE_FAMILIES.get(pipeline_class)
    if family is None:
        family = _family_from_components(components)
        if family is None:
            raise CheckpointError(
                path,
                f"field '_class_name' is {pipeline_class!r}, which is not a Stable Diffusion 1.x/2.x, XL, 3 "
                "or FLUX.1 pipeline; difflower reads those families",
            )
    for required in _required_components(family):
        if required not in components:
            raise CheckpointError(path, f"component '{required}' is missing (a {family} pipeline needs it)")
        if not (root / required).is_dir():
            raise CheckpointError(root / required, f"folder not found (model_index.json lists '{required}')")
    for name, (_library, class_name) in components.items():
        # A component of a kind difflower reads must be of a class it reads: skipping an unknown
        # text encoder would silently drop its part of the prompt.
        readable = _READABLE_CLASSES.get(re.sub(r"_[23]$", "", name), ())
        if readable and class_name not in readable:
            raise CheckpointError(
                path,
                f"field '{name}' names class {class_name!r}, which difflower cannot load; it reads "
                f"{', '.join(readable)} there",
            )
    return ModelIndex(root, pipeline_class, family, components)


# A component name is a folder of the checkpoint, never a path: no separators, no '..'.
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def confined(root: Path, relative: str, source: Path) -> Path:
    """`root / relative`, refused (naming `source`, the file that listed it) unless it stays inside
    `root`: a plain name or relative path without '..', absolute parts, or links that lead out."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or any(not _COMPONENT_NAME.fullmatch(p) for p in parts):
        raise CheckpointError(source, f"entry {relative!r} is not a plain name inside {root}; refusing to follow it")
    path = root / relative
    if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(source, f"entry {relative!r} leads out of {root} (to {path.resolve()}); refusing it")
    return path


def _family_from_components(components: dict[str, tuple[str, str]]) -> Family | None:
    if "transformer" in components and "text_encoder_3" in components:
        return "sd3"
    if components.get("transformer", ("", ""))[1] in FLUX_CLASS_NAMES:
        return "flux"
    if "unet" in components and "text_encoder_2" in components:
        return "sdxl"
    if "unet" in components and "text_encoder" in components:
        return "sd"
    return None


def _required_components(family: Family) -> tuple[str, ...]:
    if family == "sd":
        return ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if family == "sdxl":
        return ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
    if family == "flux":
        return ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    return ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


# ---------------------------------------------------------------------------------------------
# safetensors weights


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding a component's weights (one file, or the shards of an index)."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{WEIGHTS_NAME}{suffix}.safetensors"
    index = folder / f"{WEIGHTS_NAME}.safetensors.index{suffix}.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index, "field 'weight_map' is missing or empty")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or not (folder / shard).is_file():
                raise CheckpointError(folder / str(shard), f"shard listed in {index.name} not found")
        return [folder / shard for shard in shards]
    pickles = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*.bin"))
    if pickles:
        raise CheckpointError(folder / pickles[0], _convert_hint(pickles[0], f"{WEIGHTS_NAME}{suffix}.safetensors"))
    others = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*.safetensors"))
    hint = f"; found {', '.join(others)} (choose it with variant=...)" if others else ""
    raise CheckpointError(single, f"weights not found{hint}")


def _convert_hint(pickle_name: str, target: str) -> str:
    """How to turn a pickle into safetensors, as a shell line safe to paste whatever the file is called."""
    code = (
        "import sys, torch, safetensors.torch as s; "
        "s.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])"
    )
    command = shlex.join(["python", "-c", code, pickle_name, target])
    return f"difflower loads weights from safetensors only, not pickles; convert with `{command}` in that folder"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load one safetensors file, turning a truncated or corrupt file into a clear error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            path, f"cannot read safetensors ({err}); the file is truncated or corrupt, re-download or re-save it"
        ) from None


def read_state_dict(folder: Path, variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a component, and the file each came from."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(folder, variant):
        for key, tensor in read_safetensors(path).items():
            state[key] = tensor
            origin[key] = path
    return state, origin


def check_weights(model: nn.Module, shapes: dict[str, tuple[int, ...]], origin: dict[str, Path], folder: Path) -> None:
    """CheckpointError unless the file's tensors (`shapes`, by key) are exactly `model`'s state."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        path = origin[unexpected[0]] if unexpected else folder / "config.json"
        raise CheckpointError(
            path, f"weights do not match config.json: {'; '.join(parts)} keys; is config.json from this model?"
        )
    for key, shape in shapes.items():
        if shape != tuple(expected[key].shape):
            raise CheckpointError(
                origin[key],
                f"tensor '{key}' has shape {shape} but config.json implies "
                f"{tuple(expected[key].shape)}; the config and the weights disagree",
            )


def assign_weights(model: M, state: dict[str, torch.Tensor], origin: dict[str, Path], folder: Path) -> M:
    """Load `state` into a meta-device `model` by assignment; every key and shape must match."""
    check_weights(model, {key: tuple(t.shape) for key, t in state.items()}, origin, folder)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _build(cls: type[M], config: Any, folder: Path, dtype: torch.dtype | None, variant: str | None) -> M:
    state, origin = read_state_dict(folder, variant)
    with torch.device("meta"):
        model = cls(config)
    model = assign_weights(model, state, origin, folder)
    if dtype is not None:
        model = model.to(dtype)
    else:
        # Weights keep the file's dtype; buffers like SD3's position table stay fp32 anyway.
        model = model.to(next(iter(state.values())).dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# our models


def read_unet_config(folder: Path) -> UNetConfig:
    return load_config(
        UNetConfig,
        folder / "config.json",
        class_names=UNET_CLASS_NAMES,
        ignored=UNET_IGNORED_FIELDS,
        must_be_default=UNET_DEFAULT_ONLY_FIELDS,
    )


def read_vae_config(folder: Path) -> VAEConfig:
    return load_config(
        VAEConfig,
        folder / "config.json",
        class_names=VAE_CLASS_NAMES,
        ignored=VAE_IGNORED_FIELDS,
        must_be_default=VAE_DEFAULT_ONLY_FIELDS,
    )


def read_sd3_config(folder: Path) -> SD3Config:
    return load_config(SD3Config, folder / "config.json", class_names=SD3_CLASS_NAMES, ignored=SD3_IGNORED_FIELDS)


def read_flux_config(folder: Path) -> FluxConfig:
    return load_config(FluxConfig, folder / "config.json", class_names=FLUX_CLASS_NAMES, ignored=FLUX_IGNORED_FIELDS)


def load_unet(folder: Path | str, dtype: torch.dtype | None = None, variant: str | None = None) -> UNet2DConditionModel:
    """Our UNet2DConditionModel from a diffusers `unet/` folder."""
    folder = Path(folder)
    return _build(UNet2DConditionModel, read_unet_config(folder), folder, dtype, variant)


def read_controlnet_config(folder: Path) -> ControlNetConfig:
    return load_config(
        ControlNetConfig,
        folder / "config.json",
        class_names=CONTROLNET_CLASS_NAMES,
        ignored=CONTROLNET_IGNORED_FIELDS,
        must_be_default=CONTROLNET_DEFAULT_ONLY_FIELDS,
    )


def load_controlnet(
    folder: Path | str, dtype: torch.dtype | None = None, variant: str | None = None
) -> ControlNetModel:
    """Our ControlNetModel from a diffusers ControlNet folder (config.json and its weights)."""
    folder = Path(folder)
    return _build(ControlNetModel, read_controlnet_config(folder), folder, dtype, variant)


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet folder, checked against the UNet it drives; `origin` is its Hub snapshot, if any."""

    folder: Path
    config: ControlNetConfig
    origin: dict[str, Any] | None


def resolve_controlnet(source: Path | str, index: ModelIndex) -> ControlNetSource:
    """The ControlNet at `source` (a folder or a Hub repo id), refused in one line when the
    checkpoint has no UNet or the ControlNet does not fit it (naming both)."""
    folder, snapshot = resolve_model_folder(source)
    if not (folder / "config.json").is_file():
        raise CheckpointError(folder, "is not a ControlNet folder (no config.json); pass a diffusers ControlNet folder")
    config = read_controlnet_config(folder)
    if index.family in TRANSFORMER_FAMILIES:
        raise CheckpointError(
            folder, f"ControlNets drive SD and SDXL UNets; {index.root} is an {index.family.upper()} checkpoint"
        )
    unet = read_unet_config(index.root / "unet")
    latent_channels = read_vae_config(index.root / "vae").latent_channels
    why = controlnet_mismatch(unet, config, latent_channels)
    if why is not None:
        raise CheckpointError(folder, f"does not fit the UNet of {index.root}: {why}")
    return ControlNetSource(folder, config, None if snapshot is None else {"hub": snapshot.to_json()})


def load_sd3_transformer(
    folder: Path | str, dtype: torch.dtype | None = None, variant: str | None = None
) -> SD3Transformer2DModel:
    """Our SD3Transformer2DModel from a diffusers `transformer/` folder."""
    folder = Path(folder)
    return _build(SD3Transformer2DModel, read_sd3_config(folder), folder, dtype, variant)


def load_flux_transformer(
    folder: Path | str, dtype: torch.dtype | None = None, variant: str | None = None
) -> FluxTransformer2DModel:
    """Our FluxTransformer2DModel from a diffusers `transformer/` folder."""
    folder = Path(folder)
    return _build(FluxTransformer2DModel, read_flux_config(folder), folder, dtype, variant)


def load_vae(
    folder: Path | str, dtype: torch.dtype | None = None, variant: str | None = None, honour_force_upcast: bool = True
) -> AutoencoderKL:
    """Our AutoencoderKL from a diffusers `vae/` folder.

    With `force_upcast` in its config (the SDXL VAE overflows in fp16) and an fp16 `dtype`,
    the VAE is kept in fp32 unless `honour_force_upcast=False`.
    """
    folder = Path(folder)
    config = read_vae_config(folder)
    if honour_force_upcast and config.force_upcast and dtype == torch.float16:
        logger.info("%s: force_upcast is set, keeping the VAE in float32", folder)
        dtype = torch.float32
    return _build(AutoencoderKL, config, folder, dtype, variant)


# ---------------------------------------------------------------------------------------------
# transformers components


_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
_TOKENIZER_CLASSES = {
    "CLIPTokenizer": "CLIPTokenizer",
    "CLIPTokenizerFast": "CLIPTokenizer",
    "T5Tokenizer": "T5Tokenizer",
    "T5TokenizerFast": "T5Tokenizer",
}
# What each kind of model_index.json entry may name (by its name without the _2/_3 suffix).
_READABLE_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": UNET_CLASS_NAMES,
    "transformer": SD3_CLASS_NAMES + FLUX_CLASS_NAMES,
    "vae": VAE_CLASS_NAMES,
    "text_encoder": _TEXT_ENCODER_CLASSES,
    "tokenizer": tuple(_TOKENIZER_CLASSES),
}
# The tokenizer files transformers reads; an artifact copies these and nothing else.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-file progress bars and load reports: difflower reports its own
    progress, and a load problem as one line of its own."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def load_text_encoder(
    folder: Path | str, class_name: str, dtype: torch.dtype | None = None, variant: str | None = None
) -> nn.Module:
    """A transformers text encoder (CLIPTextModel, CLIPTextModelWithProjection or T5EncoderModel)."""
    import transformers

    folder = Path(folder)
    if class_name not in _TEXT_ENCODER_CLASSES:
        raise CheckpointError(
            folder, f"text encoder class {class_name!r} is not supported; expected one of {_TEXT_ENCODER_CLASSES}"
        )
    read_json(folder / "config.json")  # a clear error for a missing or malformed config
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")):
            raise CheckpointError(folder, "holds only a pickle (.bin); difflower loads safetensors only, re-save it")
        raise CheckpointError(folder / "model.safetensors", "weights not found")
    for path in sorted(folder.glob("*.safetensors")):
        read_safetensors(path)  # a clear error for a truncated file, before transformers' own
    cls = getattr(transformers, class_name)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                folder,
                dtype=dtype,
                variant=variant,
                local_files_only=True,
                use_safetensors=True,
                output_loading_info=True,
            )
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config or file
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(
            folder, f"cannot load {class_name} ({first_line}); check config.json and the weights"
        ) from None
    _refuse_partial_load(folder, info)
    return model.eval().requires_grad_(False)


def _refuse_partial_load(folder: Path, info: dict[str, Any]) -> None:
    """A tensor the file lacks would keep transformers' random initialisation (a different image
    for the same seed); one it has but the model does not means the wrong config: refuse both."""
    parts = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of the wrong shape"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            parts.append(f"{len(names)} {label} (first: {', '.join(names[:3])})")
    if parts:
        raise CheckpointError(
            folder, f"weights do not match config.json: {'; '.join(parts)} tensors; is this config from this model?"
        )


def load_tokenizer(folder: Path | str, class_name: str) -> Any:
    """A transformers tokenizer from its folder."""
    import transformers

    folder = Path(folder)
    if class_name not in _TOKENIZER_CLASSES:
        raise CheckpointError(
            folder, f"tokenizer class {class_name!r} is not supported; expected one of {tuple(_TOKENIZER_CLASSES)}"
        )
    if not folder.is_dir():
        raise CheckpointError(folder, "folder not found")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(folder, f"holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    cls = getattr(transformers, _TOKENIZER_CLASSES[class_name])
    try:
        with quiet_transformers():
            return cls.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - tokenizers raise OverflowError, KeyError, ... on bad files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(folder, f"cannot load {class_name} ({first_line})") from None


def check_tokenizer(tokenizer: Any, folder: Path, vocab_size: int | None, encoder: str) -> None:
    """Refuse a tokenizer that cannot be the one `encoder` was trained with.

    A folder holding only tokenizer_config.json loads as a tokenizer of two tokens that turns
    every prompt into padding: the image would ignore the prompt, with exit status 0. Token ids
    must exist in the encoder's embedding table, and the tokenizer must cover most of it.
    """
    size = len(tokenizer)
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    bad = {name: i for name, i in specials.items() if i is not None and not 0 <= i < size}
    if bad:
        name, i = next(iter(bad.items()))
        raise CheckpointError(
            folder, f"the tokenizer has {size} tokens but its {name} token has id {i}; its vocabulary files are missing"
        )
    if vocab_size is not None and size > vocab_size:
        raise CheckpointError(
            folder, f"the tokenizer has {size} tokens, more than the {vocab_size} of {encoder}; it is not this model's"
        )
    if vocab_size is not None and size < vocab_size // 2:
        raise CheckpointError(
            folder,
            f"the tokenizer has {size} tokens but {encoder} embeds {vocab_size}; it is not this model's tokenizer "
            "(are its vocabulary files missing?)",
        )


def read_scheduler_config(folder: Path | str) -> dict[str, Any]:
    """The raw `scheduler_config.json` dict; the scheduler classes check its fields."""
    return read_json(Path(folder) / "scheduler_config.json")


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def load_components(
    root: Path | str, dtype: torch.dtype | None = None, variant: str | None = None
) -> tuple[ModelIndex, dict[str, Any]]:
    """Every model and tokenizer of a checkpoint, keyed by their model_index.json names.

    The scheduler is returned as its raw config dict (the `scheduler` key).
    """
    index = read_model_index(root)
    root = index.root
    parts: dict[str, Any] = {}
    for name, (_library, class_name) in index.components.items():
        folder = root / name
        if class_name in UNET_CLASS_NAMES:
            parts[name] = load_unet(folder, dtype, variant)
        elif class_name in SD3_CLASS_NAMES:
            parts[name] = load_sd3_transformer(folder, dtype, variant)
        elif class_name in FLUX_CLASS_NAMES:
            parts[name] = load_flux_transformer(folder, dtype, variant)
        elif class_name in VAE_CLASS_NAMES:
            parts[name] = load_vae(folder, dtype, variant)
        elif class_name in _TEXT_ENCODER_CLASSES:
            parts[name] = load_text_encoder(folder, class_name, dtype, variant)
        elif class_name in _TOKENIZER_CLASSES:
            parts[name] = load_tokenizer(folder, class_name)
        elif name == "scheduler":
            parts[name] = read_scheduler_config(folder)
        else:
            logger.info("%s: component '%s' (%s) is not used by difflower", root, name, class_name)
    for suffix in ("", "_2", "_3"):
        tokenizer, encoder = parts.get("tokenizer" + suffix), parts.get("text_encoder" + suffix)
        if tokenizer is not None and encoder is not None:
            check_tokenizer(
                tokenizer, root / ("tokenizer" + suffix), encoder.config.vocab_size, "text_encoder" + suffix
            )
    return index, parts


def support_files(index: ModelIndex) -> list[str]:
    """The files a pipeline reads besides the models (relative to the checkpoint): model_index.json,
    the scheduler config and the tokenizers' files."""
    files = ["model_index.json"]
    if (index.root / "scheduler" / "scheduler_config.json").is_file():
        files.append("scheduler/scheduler_config.json")
    for name in sorted(index.components):
        if name.startswith("tokenizer"):
            files += [f"{name}/{f}" for f in TOKENIZER_FILES if (index.root / name / f).is_file()]
    return files
