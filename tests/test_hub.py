"""Hub repo ids as checkpoints (difflower.hub), offline against a Hub cache built on disk here.

The cache has the Hub's own layout (models--org--name/{refs,snapshots,blobs}, snapshot files
linked to blobs named by their sha256 or git hash), so huggingface_hub resolves it as it would
a cache that a download or diffusers filled; conftest's `offline_hub` points it there, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import difflower
from difflower.artifact.manifest import Manifest, source_record
from difflower.cli import main
from difflower.errors import CheckpointError
from difflower.hub import allow_patterns, is_repo_id, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """`source`'s files as repo `repo_id` at COMMIT in the Hub cache at `cache`; its snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        lfs = file.suffix == ".safetensors"  # the Hub names LFS blobs by sha256, others by git's sha1
        blob = storage / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest())
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_sd(tiny_dirs, offline_hub):
    """The tiny sd checkpoint as the cached repo test-org/tiny-sd (refs main and v1.0)."""
    return cache_repo(offline_hub, "test-org/tiny-sd", tiny_dirs["sd"], refs=("main", "v1.0"))


def _image(pipe) -> np.ndarray:
    return np.asarray(pipe("a lighthouse", num_inference_steps=2, seed=0, output_type="np", progress=False).images)


def test_a_repo_id_runs_the_cached_snapshot_offline(tiny_dirs, hub_sd):
    path, snapshot = resolve_checkpoint("test-org/tiny-sd")
    assert path == hub_sd and snapshot.commit == COMMIT and snapshot.revision == "main"
    assert resolve_checkpoint("test-org/tiny-sd@v1.0")[1].to_json() == {
        "repo_id": "test-org/tiny-sd",
        "revision": "v1.0",
        "commit": COMMIT,
    }
    np.testing.assert_array_equal(_image(difflower.load("test-org/tiny-sd")), _image(difflower.load(tiny_dirs["sd"])))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_repo_ids_of_the_other_families_run_as_their_folders(tiny_dirs, offline_hub, tmp_path, family):
    from difflower.reference.tiny import make_tiny_checkpoint

    folder = tiny_dirs.get(family) or make_tiny_checkpoint(tmp_path / family, family, seed=0)
    cache_repo(offline_hub, f"test-org/tiny-{family}", folder)
    size = {"height": 32, "width": 32} if family == "flux" else {}  # tiny Flux's native size is 1024
    run = dict(num_inference_steps=2, seed=0, output_type="np", progress=False, **size)
    from_hub = difflower.load(f"test-org/tiny-{family}")("a lighthouse", **run).images
    np.testing.assert_array_equal(from_hub, difflower.load(folder)("a lighthouse", **run).images)


def test_the_weights_are_the_ones_diffusers_reads_from_the_same_cache(hub_sd, offline_hub):
    """The oracle: diffusers' own from_pretrained on the same repo id and cache."""
    from diffusers import UNet2DConditionModel

    ours = difflower.load("test-org/tiny-sd").unet.state_dict()
    theirs = UNet2DConditionModel.from_pretrained(
        "test-org/tiny-sd", subfolder="unet", cache_dir=offline_hub, local_files_only=True
    ).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_export_records_the_repo_and_commit_and_validates_against_the_repo_id(tiny_dirs, hub_sd, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["export", "test-org/tiny-sd@v1.0", "--backend", "torchscript", "--out", str(out)]) == 0
    manifest = Manifest.read(out)
    assert manifest.source["hub"] == {"repo_id": "test-org/tiny-sd", "revision": "v1.0", "commit": COMMIT}
    # the sha256 taken from the blobs' names is the files' own sha256
    assert manifest.source["files"] == source_record(tiny_dirs["sd"])["files"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"from test-org/tiny-sd@{COMMIT} (revision v1.0)" in capsys.readouterr().out
    assert main(["validate", str(out), "--reference", "test-org/tiny-sd", "--steps", "2"]) == 0
    assert main(["validate", str(out), "--reference", str(tiny_dirs["sd"]), "--steps", "2"]) == 0


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["sd"], tmp_path / "org" / "model")
    assert not is_repo_id("org/model") and is_repo_id("org/other@v2")
    assert not is_repo_id("models/dreamshaper_8.safetensors")  # a missing file is "not found", not a Hub lookup
    assert resolve_checkpoint("org/model") == (Path("org/model"), None)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_what_is_not_cached_offline_is_one_line(hub_sd, tmp_path, capsys):
    png = str(tmp_path / "x.png")
    assert main(["generate", "test-org/missing", "--prompt", "a", "-o", png]) == 2
    line = _error(capsys)
    assert line.startswith("difflower generate: error: test-org/missing: no local folder of that name, and not in")
    assert "HF_HUB_OFFLINE is set" in line and "hf download test-org/missing --revision main" in line
    assert main(["generate", "test-org/tiny-sd@v9", "--prompt", "a", "-o", png]) == 2
    assert "hf download test-org/tiny-sd --revision v9" in _error(capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("GatedRepoError", "a gated Hub repo: accept its conditions on https://huggingface.co/org/gated, then log in"),
        ("RepositoryNotFoundError", "no Hub repo either (a private one needs hf auth login or HF_TOKEN)"),
        ("RevisionNotFoundError", "the Hub repo org/gated has no revision 'main'"),
        ("HfHubHTTPError", "the Hub download failed: 503 Service Unavailable"),
    ],
)
def test_the_hubs_answers_are_one_line_each(monkeypatch, error, expected):
    import huggingface_hub
    from huggingface_hub import errors

    response = SimpleNamespace(headers={}, request=None)

    def refuse(*args, **kwargs):
        raise getattr(errors, error)("503 Service Unavailable\nmore detail", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match="^org/gated: ") as caught:
        resolve_checkpoint("org/gated")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_only_what_difflower_reads_is_downloaded():
    """The patterns against the file list of a real diffusers repo (SDXL base's layout)."""
    from huggingface_hub.utils import filter_repo_objects

    listing = [
        "model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
        "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/model.onnx",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "tokenizer_2/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin", "unet/openvino_model.xml", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]  # fmt: skip
    folders = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "unet", "vae"]
    fetched = set(filter_repo_objects(listing, allow_patterns=allow_patterns(folders)))
    weights = {f for f in fetched if f.endswith((".safetensors", ".bin", ".onnx"))}
    assert weights == {
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    }
    small = {"model_index.json", "tokenizer/merges.txt", "tokenizer/vocab.json", "scheduler/scheduler_config.json"}
    assert small <= fetched
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in fetched
    assert not any(f.startswith("vae_1_0/") or f == "README.md" for f in fetched)
    configs_only = set(filter_repo_objects(listing, allow_patterns=allow_patterns(folders, weights=False)))
    assert small <= configs_only and not any(f.endswith(".safetensors") for f in configs_only)
    fp16 = {f for f in filter_repo_objects(listing, allow_patterns=allow_patterns(folders, "fp16")) if "model" in f}
    assert {f for f in fp16 if f.endswith(".safetensors")} == {
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }


def test_model_index_lists_the_folders_fetched(tmp_path):
    from difflower.hub import component_folders

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "U"], "safety_checker": [None, None]}))
    assert component_folders(index) == ["unet"]
    index.write_text("not json")
    assert component_folders(index) == []
