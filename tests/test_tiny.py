"""Tiny checkpoints: deterministic, complete, loadable by difflower and by diffusers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import diffusers  # noqa: E402 - the oracle: missing it fails the suite, never skips it
import pytest
import torch

from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.loading import load_components
from difflower.reference.tiny import make_tiny_checkpoint


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "sd", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", "sd", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", "sd", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("sd", {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}),
        ("sdxl", {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}),
        (
            "sd3",
            {"transformer", "vae", "scheduler"}
            | {f"{kind}{suffix}" for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")},
        ),
    ],
)
def test_every_component_present_and_loadable(tiny_dirs, family, expected):
    index, parts = load_components(tiny_dirs[family])
    assert index.family == family
    assert set(parts) == expected


def test_structural_features(tiny_dirs):
    _, sdxl = load_components(tiny_dirs["sdxl"])
    assert sdxl["unet"].add_embedding is not None  # text_time
    assert sdxl["unet"].config.use_linear_projection
    assert sdxl["text_encoder_2"].__class__.__name__ == "CLIPTextModelWithProjection"
    _, sd3 = load_components(tiny_dirs["sd3"])
    blocks = sd3["transformer"].transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False, False, True]
    assert sd3["vae"].config.latent_channels == 16
    for parts in (sdxl, sd3):
        assert parts["vae"].config.downscale_factor == 8
    tokens = sd3["tokenizer_3"]("a photo of a cat").input_ids
    assert 2 not in tokens  # no <unk>: the tiny T5 vocabulary covers plain English


@pytest.mark.parametrize(
    ("family", "pipeline_class"),
    [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline"), ("sd3", "StableDiffusion3Pipeline")],
)
def test_diffusers_runs_the_tiny_checkpoint(tiny_dirs, family, pipeline_class):
    pipe = getattr(diffusers, pipeline_class).from_pretrained(tiny_dirs[family])
    result = pipe(
        "a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    image = result.images[0]
    assert image.shape == (64, 64, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_existing_dir_refused_without_overwrite(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt", "sd", seed=0)
    marker = json.loads((out / "model_index.json").read_text())
    with pytest.raises(ArgumentError, match="already exists; pass --overwrite"):
        make_tiny_checkpoint(out, "sd", seed=1)
    assert json.loads((out / "model_index.json").read_text()) == marker
    make_tiny_checkpoint(out, "sdxl", seed=1, overwrite=True)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary siblings left behind


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import difflower.reference.tiny as tiny

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_save_t5", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        make_tiny_checkpoint(tmp_path / "ckpt", "sd3")
    assert list(tmp_path.iterdir()) == []


def test_unknown_family(tmp_path):
    with pytest.raises(ArgumentError, match="--family: unknown family 'sd4'"):
        make_tiny_checkpoint(tmp_path / "x", "sd4")


@pytest.mark.parametrize("family", ["sd", pytest.param("sd3", marks=pytest.mark.slow)])
def test_the_same_seed_gives_the_same_bytes_on_every_cpu_dispatch(tmp_path, family):
    """torch's CPU randn differs between vector instruction sets; the tiny weights must not.
    Each checkpoint is written by a fresh process with its own dispatch setting."""
    digests = {}
    for capability in ("native", "default", "avx2"):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability != "native":
            env["ATEN_CPU_CAPABILITY"] = capability
        code = "import sys, torch.backends.cpu as c; from difflower.reference.tiny import make_tiny_checkpoint as m; "
        code += f"m(sys.argv[1], {family!r}, seed=5); print(c.get_cpu_capability())"
        out = tmp_path / capability
        run = subprocess.run(
            [sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, check=True
        )
        if capability != "native":
            assert run.stdout.strip().lower() == capability
        digests[capability] = {str(p.relative_to(out)): _digest_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    differing = {f for d in digests.values() for f in d if len({x.get(f) for x in digests.values()}) > 1}
    assert not differing, f"files that depend on the CPU dispatch: {sorted(differing)}"


def _digest_file(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_overwrite_replaces_only_a_tiny_checkpoint(tiny_dirs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ArgumentError, match="not a tiny checkpoint difflower wrote"):
        make_tiny_checkpoint(mine, "sd", overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    import shutil

    real = tmp_path / "downloaded"
    shutil.copytree(tiny_dirs["sd"], real)
    index = json.loads((real / "model_index.json").read_text())
    del index["_difflower_tiny"]  # a checkpoint from elsewhere
    (real / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ArgumentError, match="not a tiny checkpoint difflower wrote"):
        make_tiny_checkpoint(real, "sd", overwrite=True)


def test_clip_tensors_carry_the_text_model_prefix_every_transformers_reads(tiny_dirs):
    from safetensors import safe_open

    for family, names in (("sd", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])):
        for name in names:
            with safe_open(str(tiny_dirs[family] / name / "model.safetensors"), "pt") as handle:
                keys = list(handle.keys())
            assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys), keys[:3]


def test_a_real_size_clip_gets_a_tokenizer_of_its_vocabulary(tmp_path):
    # Real-size benchmark checkpoints pair CLIP's 49408-row embedding with the local tokenizer:
    # padded with unused entries, it passes the loader's tokenizer check and keeps every id.
    from difflower.reference.loading import check_tokenizer
    from difflower.reference.tiny import build_clip_tokenizer

    small, padded = build_clip_tokenizer(), build_clip_tokenizer(49408)
    assert len(padded) == 49408
    prompt = "a photograph of an astronaut riding a horse"
    assert padded(prompt).input_ids == small(prompt).input_ids
    check_tokenizer(padded, tmp_path, 49408, "text_encoder")
    with pytest.raises(CheckpointError, match="embeds 49408"):
        check_tokenizer(small, tmp_path, 49408, "text_encoder")
    with pytest.raises(ValueError, match="below"):
        build_clip_tokenizer(10)
