"""Prompt conditioning for the three families, as diffusers' `encode_prompt` computes it.

Tokenization happens here, in Python; each text encoder is reached through a
`TextEncoderCall` so the same code serves the eager reference and every exported backend.

- SD 1.x / 2.x: the text encoder's last hidden state.
- SDXL: both encoders' penultimate hidden states side by side, the second encoder's projected
  pooled output, and the micro-conditioning `time_ids`; an absent negative prompt is zeros when
  the checkpoint says `force_zeros_for_empty_prompt`.
- SD3: both CLIPs' penultimate states side by side, zero-padded to the T5 width and followed by
  the T5 states (zeros when T5 is skipped); both CLIPs' projected pooled outputs side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflower.errors import ArgumentError


@dataclass(frozen=True)
class TextEncoderOutput:
    """What the pipelines read from one text encoder call (B, T, D) / (B, P)."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_state: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


# (component name such as "text_encoder_2", input_ids (B, T) int64) -> outputs
TextEncoderCall = Callable[[str, torch.Tensor], TextEncoderOutput]


@dataclass(frozen=True)
class Conditioning:
    """The denoiser's conditioning for one batch (CFG: negatives first, then positives)."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled projection
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    pooled_projections: torch.Tensor | None = None  # SD3 pooled projection

    @staticmethod
    def for_guidance(negative: Conditioning, positive: Conditioning) -> Conditioning:
        """Batch the negative and positive halves for one CFG denoiser call."""

        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.cat([a, b], dim=0)

        return Conditioning(
            cat(negative.encoder_hidden_states, positive.encoder_hidden_states),
            cat(negative.text_embeds, positive.text_embeds),
            cat(negative.time_ids, positive.time_ids),
            cat(negative.pooled_projections, positive.pooled_projections),
        )


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


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _repeat(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """Each prompt's row `times` times in a row: (B, ...) -> (B * times, ...), prompt-major."""
    return tensor.repeat_interleave(times, dim=0)


def encode_sd(
    encode: TextEncoderCall,
    tokenizer,
    prompts: list[str],
    negatives: list[str] | None,
    images_per_prompt: int,
) -> tuple[Conditioning, Conditioning | None]:
    """SD 1.x/2.x: (positive, negative or None without guidance)."""
    ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length)
    positive = encode("text_encoder", ids).last_hidden_state
    negative = None
    if negatives is not None:
        negative_ids = _tokenize(tokenizer, negatives, positive.shape[1])
        negative = encode("text_encoder", negative_ids).last_hidden_state
    wrap = lambda x: None if x is None else Conditioning(_repeat(x, images_per_prompt))  # noqa: E731
    return wrap(positive), wrap(negative)


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


def _sdxl_embeds(
    encode: TextEncoderCall, tokenizers: dict, names: list[str], prompts_per_encoder: list[list[str]], max_length
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    for name, prompts in zip(names, prompts_per_encoder, strict=True):
        tokenizer = tokenizers[name]
        out = encode(name, _tokenize(tokenizer, prompts, max_length or tokenizer.model_max_length))
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
        hidden.append(out.penultimate_hidden_state)
    return torch.cat(hidden, dim=-1), pooled


def encode_sdxl(
    encode: TextEncoderCall,
    tokenizers: dict,
    prompts: list[str],
    prompts_2: list[str],
    negatives: tuple[list[str], list[str]] | None,
    images_per_prompt: int,
    zero_negative: bool,
    time_ids: torch.Tensor,
    negative_time_ids: torch.Tensor,
) -> tuple[Conditioning, Conditioning | None]:
    """SDXL: (positive, negative or None); `tokenizers` maps encoder names to their tokenizers.

    With `zero_negative` (no negative prompt and the checkpoint's force_zeros_for_empty_prompt)
    the negative conditioning is zeros instead of the encoding of "".
    """
    names = [n for n in ("text_encoder", "text_encoder_2") if n in tokenizers]
    per_encoder = [prompts, prompts_2][-len(names) :]
    embeds, pooled = _sdxl_embeds(encode, tokenizers, names, per_encoder, None)
    if pooled is None:
        raise ArgumentError("text_encoder_2", "must be a CLIPTextModelWithProjection (SDXL needs its pooled output)")
    batch = embeds.shape[0]

    def build(e: torch.Tensor, p: torch.Tensor, ids: torch.Tensor) -> Conditioning:
        return Conditioning(
            _repeat(e, images_per_prompt),
            text_embeds=_repeat(p, images_per_prompt),
            time_ids=ids.to(e.device, e.dtype).repeat(batch * images_per_prompt, 1),
        )

    positive = build(embeds, pooled, time_ids)
    if negatives is None:
        return positive, None
    if zero_negative:
        return positive, build(torch.zeros_like(embeds), torch.zeros_like(pooled), negative_time_ids)
    negative_per_encoder = [negatives[0], negatives[1]][-len(names) :]
    neg_embeds, neg_pooled = _sdxl_embeds(encode, tokenizers, names, negative_per_encoder, embeds.shape[1])
    return positive, build(neg_embeds, neg_pooled, negative_time_ids)


def _sd3_embeds(
    encode: TextEncoderCall,
    tokenizers: dict,
    prompts: tuple[list[str], list[str], list[str]],
    max_sequence_length: int,
    joint_attention_dim: int,
    skip_t5: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    clip_hidden, clip_pooled = [], []
    for name, texts in (("text_encoder", prompts[0]), ("text_encoder_2", prompts[1])):
        out = encode(name, _tokenize(tokenizers[name], texts, tokenizers["text_encoder"].model_max_length))
        clip_hidden.append(out.penultimate_hidden_state)
        clip_pooled.append(out.text_embeds)
    clip = torch.cat(clip_hidden, dim=-1)  # (B, 77, D1 + D2)
    if skip_t5:
        t5 = torch.zeros(len(prompts[2]), max_sequence_length, joint_attention_dim, dtype=clip.dtype)
    else:
        ids = _tokenize(tokenizers["text_encoder_3"], prompts[2], max_sequence_length)
        t5 = encode("text_encoder_3", ids).last_hidden_state  # (B, L, joint_dim)
    t5 = t5.to(clip.device)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, joint_dim)
    return torch.cat([clip, t5], dim=-2), torch.cat(clip_pooled, dim=-1)  # (B, 77 + L, joint_dim), (B, P1 + P2)


def encode_sd3(
    encode: TextEncoderCall,
    tokenizers: dict,
    prompts: tuple[list[str], list[str], list[str]],
    negatives: tuple[list[str], list[str], list[str]] | None,
    images_per_prompt: int,
    max_sequence_length: int,
    joint_attention_dim: int,
    skip_t5: bool,
) -> tuple[Conditioning, Conditioning | None]:
    """SD3: (positive, negative or None); T5 is replaced by zeros when `skip_t5`."""

    def build(texts: tuple[list[str], list[str], list[str]]) -> Conditioning:
        embeds, pooled = _sd3_embeds(encode, tokenizers, texts, max_sequence_length, joint_attention_dim, skip_t5)
        return Conditioning(_repeat(embeds, images_per_prompt), pooled_projections=_repeat(pooled, images_per_prompt))

    return build(prompts), None if negatives is None else build(negatives)
