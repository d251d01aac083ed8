"""Activation functions by diffusers' config names (`act_fn`, `resnet_act_fn`, ...)."""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}
ACTIVATION_NAMES = tuple(_ACTIVATIONS)


def activation(name: str) -> nn.Module:
    """A fresh activation module for a config name such as "silu"."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATION_NAMES}") from None
