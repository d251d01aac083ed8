"""LoRA fused into the reference modules' weights, as diffusers' `load_lora_weights` + `fuse_lora` does.

Fusing before export gives every backend the adapted model at no run-time cost. Formats: the
diffusers/peft one (`<component>.<module>.lora_A.weight` / `lora_B.weight`, with the adapter
config diffusers writes in the safetensors metadata), diffusers' older one (`.lora.down.weight` /
`.lora.up.weight`) and kohya's (`lora_unet_<module>` / `lora_te[12]_<module>` with `lora_down`,
`lora_up` and `alpha`, module paths written with underscores, in diffusers' block names or the
original SD/SGM ones, `input_blocks_4_1_...`, that SDXL kohya files use).

A module's update is W += scale x (alpha / rank) x (up @ down), where alpha and rank follow
diffusers' rules: the metadata's `lora_alpha` / `r` (and their per-module patterns); else the
file's per-module alphas (kohya), the most common one for modules without; else alpha = rank.
A LoRA whose keys do not all match a Linear or Conv2d of the model is an error, never a partial fuse.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.single_file import Piece, canonical_clip_key, flux_source, unet_source
from difflower.reference.transformer_flux import FluxTransformer2DModel
from difflower.reference.unet_2d_condition import UNet2DConditionModel

DENOISER = "denoiser"  # the UNet or the transformer, whichever the model has
_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KOHYA = {
    "lora_unet_": DENOISER,
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_PAIRS = (  # (down suffix, up suffix, format)
    (".lora_A.weight", ".lora_B.weight", "peft"),
    (".lora.down.weight", ".lora.up.weight", "diffusers"),
    (".lora_down.weight", ".lora_up.weight", "kohya"),
)


@dataclass
class LoraUpdate:
    """One module's low-rank update: up (out, rank[, 1, 1]) @ down (rank, in[, kh, kw]), times `scaling`."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it updates: (out, in[, kh, kw])."""
        return (int(self.up.shape[0]), *map(int, self.down.shape[1:]))

    def fused(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """weight + scale x scaling x (up @ down), computed in fp32 by one addmm into a new tensor
        of the weight's dtype (writing into the loaded weight would copy its memory-mapped pages)."""
        flat = weight.reshape(weight.shape[0], -1).float()
        out = torch.addmm(flat, self.up.flatten(1).float(), self.down.flatten(1).float(), alpha=scale * self.scaling)
        return out.reshape(weight.shape).to(weight.dtype)


@dataclass
class Lora:
    """A LoRA file read for fusing: its updates by component and module path."""

    path: Path
    scale: float
    format: str
    # component -> module key -> update; kohya keys are module paths with '.' written as '_'
    updates: dict[str, dict[str, LoraUpdate]] = field(default_factory=dict)

    @property
    def flat_keys(self) -> bool:
        return self.format == "kohya"

    def to_json(self) -> dict[str, Any]:
        modules = {component: len(self.updates[component]) for component in sorted(self.updates)}
        return {"path": str(self.path.absolute()), "scale": self.scale, "format": self.format, "modules": modules}


def parse_lora_argument(value: str) -> tuple[Path, float]:
    """`FILE` or `FILE:SCALE` (the command line's --lora) -> (path, scale)."""
    path, sep, scale = value.rpartition(":")
    if not sep or not path or Path(value).exists():
        return Path(value), 1.0
    try:
        number = float(scale)
    except ValueError:
        raise ArgumentError("--lora", f"expected FILE or FILE:SCALE, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ArgumentError("--lora", f"the scale must be a finite number, got {scale!r}")
    return Path(path), number


def read_loras(values: Iterable[str | Path | tuple[str | Path, float]] | None) -> tuple[Lora, ...]:
    """LoRAs given as `FILE`, `FILE:SCALE` or (file, scale), read in order."""
    loras = []
    for value in values or ():
        path, scale = value if isinstance(value, tuple) else parse_lora_argument(str(value))
        loras.append(read_lora(path, float(scale)))
    return tuple(loras)


def read_lora(path: Path | str, scale: float = 1.0) -> Lora:
    """The LoRA at `path` (a .safetensors file), checked and split by component."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a folder; --lora takes the LoRA's .safetensors file")
    if not path.is_file():
        raise CheckpointError(path, "LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            path, f"not a readable safetensors file ({str(err)[:120]}); pass a LoRA .safetensors"
        ) from None
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in tensors):
        raise CheckpointError(path, "a DoRA adapter; difflower fuses plain LoRA only")
    fmt = next((f for down, _, f in _PAIRS if any(key.endswith(down) for key in tensors)), None)
    if fmt is None:
        sample = ", ".join(sorted(tensors)[:3]) or "none"
        raise CheckpointError(path, f"no LoRA weights in the diffusers/peft or kohya format (keys like {sample})")
    config = _adapter_config(path, metadata)
    lora = Lora(path, scale, fmt)
    down_suffix, up_suffix, _ = next(p for p in _PAIRS if p[2] == fmt)
    pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]] = {}
    for key in sorted(k for k in tensors if k.endswith(down_suffix)):
        stem = key[: -len(down_suffix)]
        up = tensors.get(stem + up_suffix)
        if up is None:
            raise CheckpointError(path, f"'{key}' has no '{stem + up_suffix}'; the LoRA file is incomplete")
        alpha = tensors.get(stem + ".alpha")
        component, module = _split(stem, fmt)
        pairs.setdefault(component, {})[module] = (tensors[key], up, None if alpha is None else float(alpha))
    for component, modules in pairs.items():
        lora.updates[component] = _with_scaling(modules, config.get(component))
    return lora


def _split(stem: str, fmt: str) -> tuple[str, str]:
    """(component, module key) of a LoRA key's stem."""
    if fmt == "kohya":
        for prefix, component in _KOHYA.items():
            if stem.startswith(prefix):
                return component, stem[len(prefix) :]
        return DENOISER, stem
    head, _, rest = stem.partition(".")
    if head in ("unet", "transformer"):
        return DENOISER, rest
    if head in _PREFIXES:
        return head, rest
    return DENOISER, stem  # saved from the bare denoiser (no prefix), as diffusers assumes


def _adapter_config(path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' adapter config from the safetensors metadata, by component ({} when absent)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise CheckpointError(path, "its 'lora_adapter_metadata' is not JSON; the file is damaged") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        prefix, _, name = key.partition(".")
        component = DENOISER if prefix in ("unet", "transformer") else prefix
        out.setdefault(component, {})[name] = value
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module pattern lookup: a pattern matches a module path's tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _with_scaling(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]], config: dict[str, Any] | None
) -> dict[str, LoraUpdate]:
    """Each module's update with its alpha / rank, by diffusers' rules (see the module docstring)."""
    alphas = [alpha for _, _, alpha in modules.values() if alpha is not None]
    common_alpha = collections.Counter(alphas).most_common(1)[0][0] if alphas else None
    out = {}
    for module, (down, up, alpha) in modules.items():
        rank = int(down.shape[0])
        if config:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
            rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        elif alpha is None:
            alpha = common_alpha if common_alpha is not None else rank
        out[module] = LoraUpdate(down, up, float(alpha) / float(rank))
    return out


def check_components(loras: Sequence[Lora], available: set[str]) -> None:
    """Refuse a LoRA that updates a component the model does not have (an SDXL LoRA on SD 1.5...)."""
    for lora in loras:
        missing = sorted(c for c in lora.updates if c != DENOISER and c not in available)
        if missing:
            raise CheckpointError(
                lora.path, f"updates {', '.join(missing)}, which this model does not have; is it for another family?"
            )


Layer = nn.Linear | nn.Conv2d


def _flat_targets(model: nn.Module, layers: dict[str, Layer]) -> dict[str, Layer]:
    """kohya's module names: the diffusers path with '.' written as '_', and for a UNet also the
    original SD/SGM path (`input_blocks_4_1_...`, what SDXL kohya files use), as diffusers maps them."""
    config = model.config if isinstance(model, UNet2DConditionModel) else None
    return {flat: layers[name] for flat, name in flat_names(list(layers), config).items()}


def flat_names(names: Sequence[str], unet_config: Any = None) -> dict[str, str]:
    """kohya's flat name -> the diffusers module path, for modules `names` (with a UNet's config,
    its original SD/SGM names too)."""
    targets = {name.replace(".", "_"): name for name in names}
    if unet_config is not None and isinstance(unet_config.layers_per_block, int):
        attention = ["CrossAttn" in t for t in unet_config.up_block_types]
        for name in names:
            try:
                original = unet_source(f"{name}.weight", unet_config.layers_per_block, attention)
            except (KeyError, ValueError, IndexError):  # a layer the original layout has no name for
                continue
            targets.setdefault(original.removesuffix(".weight").replace(".", "_"), name)
    return targets


def slot_matrices(
    loras: Sequence[Lora], slots: dict[str, tuple[int, int]], rank: int, unet_config: Any = None
) -> dict[str, torch.Tensor]:
    """The inputs of an artifact's LoRA slots (`slots`: module path -> (in, out), each slot of
    `rank`) that run `loras`: per module, down (in, rank) and up (rank, out) with the LoRAs side by
    side along the rank, each scale x scaling folded into up, zero-padded; zeros where none."""
    downs = {name: [torch.zeros(i, 0)] for name, (i, _) in slots.items()}
    ups = {name: [torch.zeros(0, o)] for name, (_, o) in slots.items()}
    for lora in loras:
        text = sorted(c for c in lora.updates if c != DENOISER)
        if text:
            raise CheckpointError(
                lora.path,
                f"also updates {', '.join(text)}; an artifact's LoRA slots are in its denoiser only: fuse this LoRA "
                "at export (export --lora)",
            )
        updates = lora.updates.get(DENOISER, {})
        targets = flat_names(list(slots), unet_config) if lora.flat_keys else {name: name for name in slots}
        outside = sorted(set(updates) - set(targets))
        if outside:
            raise CheckpointError(
                lora.path,
                f"{len(outside)} of {len(updates)} modules have no LoRA slot in this artifact "
                f"({', '.join(outside[:3])}); the slots are the attention projections: fuse this LoRA at export "
                "(export --lora)",
            )
        for key, update in updates.items():
            name = targets[key]
            if update.shape != (slots[name][1], slots[name][0]):
                raise CheckpointError(
                    lora.path,
                    f"layer '{name}' is {slots[name][1]}x{slots[name][0]} but the LoRA update is {update.shape}; "
                    "the LoRA is for another model",
                )
            downs[name].append(update.down.float().t())
            ups[name].append(update.up.float().t() * (lora.scale * update.scaling))
    out: dict[str, torch.Tensor] = {}
    for name, (inner, outer) in slots.items():
        down, up = torch.cat(downs[name], dim=1), torch.cat(ups[name], dim=0)
        if down.shape[1] > rank:
            raise CheckpointError(
                loras[-1].path,
                f"rank {down.shape[1]} at '{name}' (the LoRAs' ranks added up) exceeds this artifact's slots "
                f"({rank}); export with --lora-slots {down.shape[1]} or more",
            )
        out["lora_down." + name] = torch.cat([down, torch.zeros(inner, rank - down.shape[1])], dim=1)
        out["lora_up." + name] = torch.cat([up, torch.zeros(rank - up.shape[0], outer)], dim=0)
    return out


def _bfl_named(updates: dict[str, LoraUpdate]) -> bool:
    """Whether a kohya Flux LoRA names Black Forest Labs' modules (double_blocks_0_img_attn_qkv...),
    as most Flux LoRAs do, rather than diffusers' (transformer_blocks_0_attn_to_q...)."""
    return any(k.startswith(("double_blocks_", "single_blocks_")) for k in updates)


def _bfl_updates(
    lora: Lora, updates: dict[str, LoraUpdate], model: FluxTransformer2DModel, layers: dict[str, Layer]
) -> dict[str, LoraUpdate]:
    """A BFL-named Flux LoRA's updates on diffusers' layers: a fused q|k|v (or a single block's
    q|k|v|MLP) update split by rows of `up`, the final modulation's halves exchanged, as diffusers'
    kohya Flux conversion does."""
    sources: dict[str, list[tuple[str, Piece | None]]] = {}
    for name in layers:
        try:
            bfl, piece = flux_source(f"{name}.weight", model.config)
        except (KeyError, ValueError):  # a layer the BFL layout has no name for
            continue
        sources.setdefault(bfl.removesuffix(".weight").replace(".", "_"), []).append((name, piece))
    out: dict[str, LoraUpdate] = {}
    for flat, update in updates.items():
        for name, piece in sources.get(flat, [(flat, None)]):  # unknown names stay, to be refused by count
            if piece is None:
                out[name] = update
                continue
            try:
                up = piece.take(update.up)
            except ValueError as err:
                raise CheckpointError(lora.path, f"denoiser module '{flat}': {err}; is the LoRA for FLUX.1?") from None
            out[name] = LoraUpdate(update.down, up, update.scaling)
    return out


def fuse_loras(model: nn.Module, component: str, loras: Sequence[Lora]) -> int:
    """Fuse every LoRA's updates for `component` into `model`'s weights in place; returns the
    number of modules updated. `component` is the model's folder name (unet, text_encoder, ...)."""
    key = DENOISER if component in ("unet", "transformer") else component
    layers: dict[str, Layer] = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if key != DENOISER:  # LoRA files name CLIP's layers with the `text_model.` level transformers 5 drops
        layers.update({canonical_clip_key(name): m for name, m in list(layers.items())})
    fused = 0
    for lora in loras:
        updates = lora.updates.get(key, {})
        if lora.flat_keys and isinstance(model, FluxTransformer2DModel) and _bfl_named(updates):
            updates = _bfl_updates(lora, updates, model, layers)
            targets = layers
        else:
            targets = _flat_targets(model, layers) if lora.flat_keys else layers
        unmatched = sorted(set(updates) - set(targets))
        if unmatched:
            sample = ", ".join(unmatched[:3])
            raise CheckpointError(
                lora.path,
                f"{len(unmatched)} of {len(updates)} {component} modules match no layer of this model ({sample}); "
                "refusing a partial fuse. Is the LoRA for this model family (and in the diffusers, peft or kohya "
                "layout)?",
            )
        with torch.no_grad():
            for name, update in updates.items():
                layer = targets[name]
                if update.shape != tuple(layer.weight.shape):
                    raise CheckpointError(
                        lora.path,
                        f"{component} layer '{name}' has weight {tuple(layer.weight.shape)} but the LoRA update is "
                        f"{update.shape} (rank {update.rank}); the LoRA is for another model",
                    )
                layer.weight.data = update.fused(layer.weight, lora.scale)
                fused += 1
    return fused


# -- LoRA slots (export --lora-slots): the matrices arrive as inputs instead of being fused

TARGETS = re.compile(r"\.attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")


def slot_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The projections that get a slot, by module path in diffusers' names."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and TARGETS.search(name)
    }


class LoraSlot(nn.Module):
    """A Linear plus a low-rank update whose matrices arrive per call (set by LoraSlotted)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.down is None or self.up is None:
            return out
        return out + torch.matmul(torch.matmul(x, self.down), self.up)


class LoraSlotted(nn.Module):
    """An export wrapper whose projections take their LoRA matrices as its trailing inputs."""

    def __init__(self, wrapper: nn.Module):
        super().__init__()
        self.wrapper = wrapper
        self.slots: list[LoraSlot] = []
        for name, layer in slot_layers(wrapper).items():
            parent_name, _, child = name.rpartition(".")
            slot = LoraSlot(layer)
            setattr(wrapper.get_submodule(parent_name), child, slot)
            self.slots.append(slot)

    def forward(self, *inputs: torch.Tensor):
        count = len(inputs) - 2 * len(self.slots)
        matrices = inputs[count:]
        for k, slot in enumerate(self.slots):
            slot.down, slot.up = matrices[2 * k], matrices[2 * k + 1]
        try:
            return self.wrapper(*inputs[:count])
        finally:
            for slot in self.slots:
                slot.down = slot.up = None
