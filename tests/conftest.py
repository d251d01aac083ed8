"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: more threads only contend; results are the same.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    """No test reaches the Hugging Face Hub: offline, with an empty cache of the test's own (a test
    that needs a cached repo builds one there, see test_hub.py)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hub-cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{family: path} of the three tiny checkpoints (seed 0)."""
    from difflower.reference.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_checkpoint(root / family, family, seed=0) for family in ("sd", "sdxl", "sd3")}


@pytest.fixture(scope="session")
def sd_onnx(tiny_dirs, tmp_path_factory):
    """The tiny sd checkpoint exported to ONNX (dynamic shapes), once per session."""
    from difflower.driver import export

    out = tmp_path_factory.mktemp("art") / "sd-onnx"
    export(tiny_dirs["sd"], "onnx", out, progress=False)
    return out


@pytest.fixture(scope="session")
def sd_torchscript(tiny_dirs, tmp_path_factory):
    """The tiny sd checkpoint traced to TorchScript at its native size, once per session."""
    from difflower.driver import export

    out = tmp_path_factory.mktemp("art") / "sd-ts"
    export(tiny_dirs["sd"], "torchscript", out, progress=False)
    return out
