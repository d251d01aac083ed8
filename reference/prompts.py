"""Prompt conditioning for the three families, as diffusers' `encode_prompt` computes it.

Each family has one typed prompt-inputs object, built once from the call's arguments, that
knows how to encode itself: `SDPrompts`, `SDXLPrompts`, `SD3Prompts`. Tokenization happens
here, in Python; each text encoder is reached through a `TextEncoderCall`, so the same code
serves the eager reference and every exported backend.

- SD 1.x / 2.x: the text encoder's last hidden state.
- SDXL: both encoders' penultimate hidden states side by side, the second encoder's projected
  pooled output, and the micro-conditioning `time_ids`; an absent negative prompt is zeros when
  the checkpoint says `force_zeros_for_empty_prompt`.
- SD3: both CLIPs' penultimate states side by side, zero-padded to the T5 width and followed by
  the T5 states (zeros when T5 is skipped); both CLIPs' projected pooled outputs side by side.
- Flux: the T5 states (`prompt_2`, `max_sequence_length` tokens) and CLIP's pooled output.

A prompt longer than its tokenizer's window is cut, as diffusers cuts it, with a warning that
quotes the part that was dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from difflower.errors import ArgumentError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEncoderOutput:
    """What the pipelines read from one text encoder call (B, T, D) / (B, P)."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_state: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None  # CLIPTextModel's pooled output (Flux reads it)


# (component name such as "text_encoder_2", input_ids (B, T) int64) -> outputs
TextEncoderCall = Callable[[str, torch.Tensor], TextEncoderOutput]


@dataclass(frozen=True)
class Conditioning:
    """The denoiser's conditioning for one batch (CFG: negatives first, then positives)."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled projection
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    pooled_projections: torch.Tensor | None = None  # SD3 / Flux pooled projection
    timestep_cond: torch.Tensor | None = None  # guidance-distilled UNets: the guidance scale's embedding
    guidance: torch.Tensor | None = None  # FLUX.1-dev: the guidance scale per image (B,)

    @staticmethod
    def for_guidance(negative: Conditioning, positive: Conditioning) -> Conditioning:
        """Batch the negative and positive halves for one CFG denoiser call: (B, ...) x 2 -> (2B, ...)."""

        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else torch.cat([a, b], dim=0)

        return Conditioning(
            torch.cat([negative.encoder_hidden_states, positive.encoder_hidden_states], dim=0),
            cat(negative.text_embeds, positive.text_embeds),
            cat(negative.time_ids, positive.time_ids),
            cat(negative.pooled_projections, positive.pooled_projections),
            cat(negative.timestep_cond, positive.timestep_cond),
            cat(negative.guidance, positive.guidance),
        )

    def positive_half(self) -> Conditioning:
        """The positive (second) half of a CFG batch: what guess-mode ControlNets read."""

        def half(a: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else a.chunk(2)[1]

        return Conditioning(
            self.encoder_hidden_states.chunk(2)[1],
            half(self.text_embeds),
            half(self.time_ids),
            half(self.pooled_projections),
            half(self.timestep_cond),
            half(self.guidance),
        )


class PromptInputs(Protocol):
    """One family's prompts and prompt options, checked; encodes to (positive, negative or None)."""

    def encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], images_per_prompt: int
    ) -> tuple[Conditioning, Conditioning | None]: ...


# -- argument checks ---------------------------------------------------------------------------------


def as_prompt_list(prompt: str | list[str] | None, argument: str = "prompt") -> list[str]:
    """A prompt or list of prompts as a non-empty list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ArgumentError(argument, f"must be a string or a non-empty list of strings, got {prompt!r}")


def as_negative_list(negative: str | list[str] | None, batch_size: int, argument: str = "negative_prompt") -> list[str]:
    """The negative prompts matching `batch_size` prompts ("" when none)."""
    if negative is None:
        return [""] * batch_size
    if isinstance(negative, str):
        return [negative] * batch_size
    negatives = as_prompt_list(negative, argument)
    if len(negatives) != batch_size:
        raise ArgumentError(
            argument,
            f"has {len(negatives)} entries but prompt has {batch_size}; give one per prompt or a single string",
        )
    return negatives


def finite(value: float, argument: str) -> float:
    """`value` as a float, refused unless finite (inf or nan would silently break the image)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(argument, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ArgumentError(argument, f"must be a finite number, got {value!r}")
    return number


def _size_pair(value: Any, argument: str) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ArgumentError(argument, f"must be two non-negative ints (height, width), got {value!r}")
    return int(value[0]), int(value[1])


# -- tokenization ------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (B, max_length), padded; a prompt longer than `max_length` is cut with a warning
    quoting what was dropped, as diffusers warns."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids
    if full.shape[-1] > max_length:
        for row, prompt in enumerate(prompts):
            kept = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
            every = tokenizer(prompt, verbose=False).input_ids
            if len(every) > len(kept):
                # The kept part ends with the end-of-text token; what follows it in `every` was dropped.
                dropped = tokenizer.decode(every[len(kept) - 1 : -1], skip_special_tokens=True)
                logger.warning(
                    "The following part of prompt %d was truncated because the text encoder reads at most %d "
                    "tokens: %r",
                    row,
                    max_length,
                    dropped,
                )
    return ids.input_ids


def _penultimate(out: TextEncoderOutput, name: str) -> torch.Tensor:
    """The penultimate hidden state SDXL and SD3 read; a CLIP encoder always returns it."""
    if out.penultimate_hidden_state is None:
        raise ArgumentError(name, "must return its hidden states (SDXL and SD3 read the penultimate layer)")
    return out.penultimate_hidden_state


def _pooled(out: TextEncoderOutput, name: str) -> torch.Tensor:
    """The projected pooled output SD3 reads from both CLIP encoders."""
    if out.text_embeds is None:
        raise ArgumentError(name, "must be a CLIPTextModelWithProjection (SD3 reads its pooled output)")
    return out.text_embeds


def _repeat(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """Each prompt's row `times` times in a row: (B, ...) -> (B * times, ...), prompt-major."""
    return tensor.repeat_interleave(times, dim=0)


# -- SD 1.x / 2.x ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDPrompts:
    """SD 1.x/2.x: the prompts, and the negatives when guidance is on."""

    prompts: list[str]
    negatives: list[str] | None

    @staticmethod
    def build(prompts: list[str], do_cfg: bool, *, negative_prompt: str | list[str] | None = None) -> SDPrompts:
        return SDPrompts(prompts, as_negative_list(negative_prompt, len(prompts)) if do_cfg else None)

    def encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], images_per_prompt: int
    ) -> tuple[Conditioning, Conditioning | None]:
        tokenizer = tokenizers["text_encoder"]
        positive = text("text_encoder", tokenize(tokenizer, self.prompts, tokenizer.model_max_length))
        states = positive.last_hidden_state  # (B, 77, D)
        negative = None
        if self.negatives is not None:
            negative_ids = tokenize(tokenizer, self.negatives, states.shape[1])
            negative = Conditioning(_repeat(text("text_encoder", negative_ids).last_hidden_state, images_per_prompt))
        return Conditioning(_repeat(states, images_per_prompt)), negative


# -- SDXL --------------------------------------------------------------------------------------------


def sdxl_time_ids(
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int],
    target_size: tuple[int, int],
    aesthetic_score: float | None = None,
) -> torch.Tensor:
    """SDXL micro-conditioning (1, 6): original size, crop corner, target size (refiners: aesthetic score)."""
    if aesthetic_score is not None:
        return torch.tensor([list(original_size) + list(crops_coords_top_left) + [aesthetic_score]])
    return torch.tensor([list(original_size) + list(crops_coords_top_left) + list(target_size)])


@dataclass(frozen=True)
class SDXLPrompts:
    """SDXL: prompts for both encoders, their negatives, and the micro-conditioning."""

    prompts: list[str]
    prompts_2: list[str]
    negatives: tuple[list[str], list[str]] | None
    zero_negative: bool  # no negative prompt and force_zeros_for_empty_prompt: zeros, not the encoding of ""
    time_ids: torch.Tensor  # (1, 6)
    negative_time_ids: torch.Tensor  # (1, 6)

    @staticmethod
    def build(
        prompts: list[str],
        do_cfg: bool,
        size: tuple[int, int],
        *,
        force_zeros_for_empty_prompt: bool,
        requires_aesthetics_score: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> SDXLPrompts:
        n = len(prompts)
        prompts_2 = as_negative_list(prompt_2, n, "prompt_2") if prompt_2 is not None else prompts
        negatives = None
        if do_cfg:
            first = as_negative_list(negative_prompt, n)
            second = as_negative_list(negative_prompt_2, n, "negative_prompt_2") if negative_prompt_2 else first
            negatives = (first, second)
        original = _size_pair(original_size or size, "original_size")
        target = _size_pair(target_size or size, "target_size")
        crops = _size_pair(crops_coords_top_left, "crops_coords_top_left")
        if requires_aesthetics_score:
            ids = sdxl_time_ids(original, crops, target, finite(aesthetic_score, "aesthetic_score"))
            negative_score = finite(negative_aesthetic_score, "negative_aesthetic_score")
            negative_ids = sdxl_time_ids(original, crops, target, negative_score)
        else:
            ids = negative_ids = sdxl_time_ids(original, crops, target)
        zero_negative = negative_prompt is None and force_zeros_for_empty_prompt
        return SDXLPrompts(prompts, prompts_2, negatives, zero_negative, ids, negative_ids)

    def encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], images_per_prompt: int
    ) -> tuple[Conditioning, Conditioning | None]:
        names: list[str] = [n for n in ("text_encoder", "text_encoder_2") if n in tokenizers]
        per_encoder = [self.prompts, self.prompts_2][-len(names) :]
        embeds, pooled = _sdxl_embeds(text, tokenizers, names, per_encoder, None)
        if pooled is None:
            raise ArgumentError(
                "text_encoder_2", "must be a CLIPTextModelWithProjection (SDXL needs its pooled output)"
            )
        batch = embeds.shape[0]

        def build(e: torch.Tensor, p: torch.Tensor, ids: torch.Tensor) -> Conditioning:
            return Conditioning(
                _repeat(e, images_per_prompt),
                text_embeds=_repeat(p, images_per_prompt),
                time_ids=ids.to(e.device, e.dtype).repeat(batch * images_per_prompt, 1),  # (1, 6) -> (B * n, 6)
            )

        positive = build(embeds, pooled, self.time_ids)
        if self.negatives is None:
            return positive, None
        if self.zero_negative:
            return positive, build(torch.zeros_like(embeds), torch.zeros_like(pooled), self.negative_time_ids)
        negative_per_encoder = [self.negatives[0], self.negatives[1]][-len(names) :]
        neg_embeds, neg_pooled = _sdxl_embeds(text, tokenizers, names, negative_per_encoder, embeds.shape[1])
        assert neg_pooled is not None  # the same encoders as the positive pass
        return positive, build(neg_embeds, neg_pooled, self.negative_time_ids)


def _sdxl_embeds(
    text: TextEncoderCall,
    tokenizers: dict[str, Any],
    names: list[str],
    prompts_per_encoder: list[list[str]],
    max_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden: list[torch.Tensor] = []
    pooled = None
    for name, prompts in zip(names, prompts_per_encoder, strict=True):
        tokenizer = tokenizers[name]
        out = text(name, tokenize(tokenizer, prompts, max_length or tokenizer.model_max_length))
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
        hidden.append(_penultimate(out, name))
    return torch.cat(hidden, dim=-1), pooled  # (B, 77, D1 + D2), (B, P)


# -- SD3 ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SD3Prompts:
    """SD3: prompts for the two CLIPs and T5, their negatives, and the T5 options."""

    prompts: tuple[list[str], list[str], list[str]]
    negatives: tuple[list[str], list[str], list[str]] | None
    max_sequence_length: int
    joint_attention_dim: int
    skip_t5: bool

    @staticmethod
    def build(
        prompts: list[str],
        do_cfg: bool,
        *,
        joint_attention_dim: int,
        has_t5: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        max_sequence_length: int = 256,
        skip_t5: bool = False,
    ) -> SD3Prompts:
        n = len(prompts)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise ArgumentError("max_sequence_length", f"must be an int, got {max_sequence_length!r}")
        if not 1 <= max_sequence_length <= 512:
            raise ArgumentError("max_sequence_length", f"must be in 1..512 (T5's window), got {max_sequence_length}")
        prompts_2 = as_negative_list(prompt_2, n, "prompt_2") if prompt_2 is not None else prompts
        prompts_3 = as_negative_list(prompt_3, n, "prompt_3") if prompt_3 is not None else prompts
        negatives = None
        if do_cfg:
            first = as_negative_list(negative_prompt, n)
            second = as_negative_list(negative_prompt_2, n, "negative_prompt_2") if negative_prompt_2 else first
            third = as_negative_list(negative_prompt_3, n, "negative_prompt_3") if negative_prompt_3 else first
            negatives = (first, second, third)
        return SD3Prompts(
            (prompts, prompts_2, prompts_3), negatives, max_sequence_length, joint_attention_dim, skip_t5 or not has_t5
        )

    def encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], images_per_prompt: int
    ) -> tuple[Conditioning, Conditioning | None]:
        def build(texts: tuple[list[str], list[str], list[str]]) -> Conditioning:
            embeds, pooled = self._embeds(text, tokenizers, texts)
            return Conditioning(
                _repeat(embeds, images_per_prompt), pooled_projections=_repeat(pooled, images_per_prompt)
            )

        return build(self.prompts), None if self.negatives is None else build(self.negatives)

    def _embeds(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], prompts: tuple[list[str], list[str], list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clip_hidden: list[torch.Tensor] = []
        clip_pooled: list[torch.Tensor] = []
        for name, texts in (("text_encoder", prompts[0]), ("text_encoder_2", prompts[1])):
            out = text(name, tokenize(tokenizers[name], texts, tokenizers["text_encoder"].model_max_length))
            clip_hidden.append(_penultimate(out, name))
            clip_pooled.append(_pooled(out, name))
        clip = torch.cat(clip_hidden, dim=-1)  # (B, 77, D1 + D2)
        if self.skip_t5:
            t5 = torch.zeros(len(prompts[2]), self.max_sequence_length, self.joint_attention_dim, dtype=clip.dtype)
        else:
            ids = tokenize(tokenizers["text_encoder_3"], prompts[2], self.max_sequence_length)
            t5 = text("text_encoder_3", ids).last_hidden_state  # (B, L, joint_dim)
        t5 = t5.to(clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, joint_dim)
        # (B, 77 + L, joint_dim), (B, P1 + P2)
        return torch.cat([clip, t5], dim=-2), torch.cat(clip_pooled, dim=-1)


# -- Flux --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FluxPrompts:
    """FLUX.1: prompts for CLIP (pooled) and T5 (the sequence); negatives only for true CFG."""

    prompts: tuple[list[str], list[str]]
    negatives: tuple[list[str], list[str]] | None
    max_sequence_length: int

    @staticmethod
    def build(
        prompts: list[str],
        do_cfg: bool,
        *,
        negative_prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        max_sequence_length: int = 512,
    ) -> FluxPrompts:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise ArgumentError("max_sequence_length", f"must be an int, got {max_sequence_length!r}")
        if not 1 <= max_sequence_length <= 512:
            raise ArgumentError("max_sequence_length", f"must be in 1..512 (T5's window), got {max_sequence_length}")
        n = len(prompts)
        prompts_2 = as_negative_list(prompt_2, n, "prompt_2") if prompt_2 is not None else prompts
        negatives = None
        if do_cfg:  # true CFG (the request checked that a negative prompt is given)
            first = as_negative_list(negative_prompt, n)
            second = as_negative_list(negative_prompt_2, n, "negative_prompt_2") if negative_prompt_2 else first
            negatives = (first, second)
        elif negative_prompt_2 is not None:
            raise ArgumentError("negative_prompt_2", "Flux reads it only with true CFG (true_cfg_scale > 1)")
        return FluxPrompts((prompts, prompts_2), negatives, max_sequence_length)

    def encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], images_per_prompt: int
    ) -> tuple[Conditioning, Conditioning | None]:
        positive = self._encode(text, tokenizers, self.prompts, images_per_prompt)
        if self.negatives is None:
            return positive, None
        return positive, self._encode(text, tokenizers, self.negatives, images_per_prompt)

    def _encode(
        self, text: TextEncoderCall, tokenizers: dict[str, Any], prompts: tuple[list[str], list[str]], repeat: int
    ) -> Conditioning:
        clip_tokenizer = tokenizers["text_encoder"]
        clip = text("text_encoder", tokenize(clip_tokenizer, prompts[0], clip_tokenizer.model_max_length))
        if clip.pooler_output is None:
            raise ArgumentError("text_encoder", "must return its pooled output (Flux reads CLIP's pooler_output)")
        ids = tokenize(tokenizers["text_encoder_2"], prompts[1], self.max_sequence_length)
        t5 = text("text_encoder_2", ids).last_hidden_state  # (B, L, joint_dim)
        pooled = clip.pooler_output.to(t5.device, t5.dtype)
        return Conditioning(_repeat(t5, repeat), pooled_projections=_repeat(pooled, repeat))
