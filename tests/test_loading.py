"""Reading diffusers-format folders: key compatibility, variants, shards, and clear errors."""

from __future__ import annotations

import json
import shutil
import sys

import diffusers  # noqa: E402 - the oracle: missing it fails the suite, never skips it
import pytest
import torch

from difflower.errors import CheckpointError
from difflower.reference.loading import load_components, load_unet, load_vae, read_model_index

VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
)


@pytest.fixture()
def unet_dir(tiny_dirs, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(tiny_dirs["sd"] / "unet", folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_pipeline_saved_by_diffusers_loads_with_every_key(tiny_dirs, tmp_path, family):
    """diffusers' own pipeline class writes the folder; we load every component strictly."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family])
    pipe.save_pretrained(tmp_path / "saved")
    index, parts = load_components(tmp_path / "saved")
    assert index.family == family
    denoiser = "transformer" if family == "sd3" else "unet"
    theirs = getattr(pipe, denoiser).state_dict()
    ours = parts[denoiser].state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert set(parts["vae"].state_dict()) == set(pipe.vae.state_dict())


def test_pipeline_built_from_diffusers_components_loads(tiny_dirs, tmp_path):
    """A StableDiffusionPipeline assembled from diffusers-made models (not ours) loads too."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(**VAE)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dirs["sd"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=reference.text_encoder,
        tokenizer=reference.tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(reference.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "saved")
    _, parts = load_components(tmp_path / "saved")
    assert set(parts["unet"].state_dict()) == set(unet.state_dict())
    assert parts["scheduler"]["_class_name"] == "DDIMScheduler"


def test_fp16_variant_sharded_and_dtype(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**VAE)
    vae.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    original = {k: v.clone() for k, v in vae.state_dict().items()}
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    vae.half().save_pretrained(tmp_path / "variant", variant="fp16", max_shard_size="100KB")
    vae.save_pretrained(tmp_path / "single", variant="fp16")

    full = load_vae(tmp_path / "sharded")
    assert full.dtype == torch.float32
    assert all(torch.equal(full.state_dict()[k], v) for k, v in original.items())
    half = load_vae(tmp_path / "variant", variant="fp16", dtype=torch.float16, honour_force_upcast=False)
    assert half.dtype == torch.float16
    assert all(torch.equal(half.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert load_vae(tmp_path / "single", variant="fp16").dtype == torch.float16  # the file's dtype
    with pytest.raises(CheckpointError, match=r"fp16\.safetensors.*variant"):
        load_vae(tmp_path / "single")


# -- bad input: each error names the file and the field or tensor ---------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: folder not found"):
        read_model_index(tmp_path / "nowhere")


def test_missing_model_index(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_index\.json: file not found"):
        read_model_index(tmp_path)


def test_model_index_missing_component(tiny_dirs, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd"], root)
    index = json.loads((root / "model_index.json").read_text())
    del index["vae"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model_index\.json: component 'vae' is missing"):
        read_model_index(root)


def test_model_index_component_folder_missing(tiny_dirs, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd"], root)
    shutil.rmtree(root / "vae")
    with pytest.raises(CheckpointError, match=r"vae: folder not found"):
        read_model_index(root)


def test_unknown_pipeline_class(tiny_dirs, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd3"], root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    index.pop("text_encoder_3")
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'_class_name' is 'KandinskyPipeline'"):
        read_model_index(root)


def test_missing_config_file(unet_dir):
    (unet_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"unet/config\.json: file not found"):
        load_unet(unet_dir)


def test_config_not_json(unet_dir):
    (unet_dir / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_unet(unet_dir)


def test_config_field_of_wrong_type(unet_dir):
    _edit_config(unet_dir, block_out_channels="abc")
    with pytest.raises(CheckpointError, match=r"config\.json: field 'block_out_channels' must be a list of int"):
        load_unet(unet_dir)


def test_config_unknown_class_name(unet_dir):
    _edit_config(unet_dir, _class_name="UNet3DConditionModel")
    with pytest.raises(CheckpointError, match=r"field '_class_name' is 'UNet3DConditionModel'"):
        load_unet(unet_dir)


def test_config_unsupported_architecture_switch(unet_dir):
    _edit_config(unet_dir, class_embed_type="timestep")
    with pytest.raises(CheckpointError, match=r"field 'class_embed_type' = 'timestep' is not supported"):
        load_unet(unet_dir)


def test_config_inconsistent_lengths(unet_dir):
    _edit_config(unet_dir, block_out_channels=[32, 64, 64])
    with pytest.raises(CheckpointError, match=r"config\.json: field 'block_out_channels' must have 2 entries"):
        load_unet(unet_dir)


def test_tensor_shape_does_not_match_config(unet_dir):
    _edit_config(unet_dir, cross_attention_dim=48)
    with pytest.raises(
        CheckpointError,
        match=r"safetensors: tensor '.*attn2\.to_k\.weight' has shape \(32, 32\) but config\.json implies \(32, 48\)",
    ):
        load_unet(unet_dir)


def test_missing_and_unexpected_keys(unet_dir):
    _edit_config(unet_dir, layers_per_block=1)
    with pytest.raises(CheckpointError, match=r"unexpected \(first: down_blocks\.0\.attentions\.1"):
        load_unet(unet_dir)


def test_truncated_safetensors(unet_dir):
    path = unet_dir / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"diffusion_pytorch_model\.safetensors: cannot read safetensors.*truncated"
    ):
        load_unet(unet_dir)


def test_corrupt_safetensors_header(unet_dir):
    path = unet_dir / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: cannot read safetensors"):
        load_unet(unet_dir)


def test_pickle_weights_are_refused_with_a_conversion_hint(unet_dir):
    path = unet_dir / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(path)), unet_dir / "diffusion_pytorch_model.bin")
    path.unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: .*safetensors only.*save_file"):
        load_unet(unet_dir)


def test_missing_weights(unet_dir):
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: weights not found"):
        load_unet(unet_dir)


def test_missing_shard(tmp_path):
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**VAE).save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-.*shard listed in .*index\.json not found"):
        load_vae(tmp_path)


def test_truncated_text_encoder(tiny_dirs, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd"], root)
    path = root / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"text_encoder/model\.safetensors: cannot read safetensors"):
        load_components(root)


# -- nothing silently wrong: strict text encoders and tokenizers ------------------------------------


def _copy(tiny_dirs, tmp_path, family="sd"):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs[family], root)
    return root


def test_a_text_encoder_missing_a_tensor_is_refused(tiny_dirs, tmp_path):
    """transformers would give the missing tensor a random initialisation: a different image per run."""
    from safetensors.torch import load_file, save_file

    root = _copy(tiny_dirs, tmp_path)
    path = root / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    del state[next(k for k in state if k.endswith("final_layer_norm.weight"))]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"text_encoder: weights do not match.*1 missing.*final_layer_norm"):
        load_components(root)


def test_a_text_encoder_with_an_extra_tensor_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy(tiny_dirs, tmp_path)
    path = root / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(first: .*extra\.weight\)"):
        load_components(root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": "wide"}, r"text_encoder: cannot load CLIPTextModel"),
        ({"hidden_size": 48, "intermediate_size": 96}, r"text_encoder: cannot load CLIPTextModel"),
    ],
)
def test_a_text_encoder_config_that_does_not_fit_is_one_line(tiny_dirs, tmp_path, change, message):
    root = _copy(tiny_dirs, tmp_path)
    _edit_config(root / "text_encoder", **change)
    with pytest.raises(CheckpointError, match=message):
        load_components(root)


def test_a_tokenizer_without_its_vocabulary_is_refused(tiny_dirs, tmp_path):
    """Only tokenizer_config.json: transformers builds a 2-token tokenizer that ignores every prompt."""
    root = _copy(tiny_dirs, tmp_path)
    for path in (root / "tokenizer").iterdir():
        if path.name != "tokenizer_config.json":
            path.unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer: the tokenizer has 2 tokens but its eos token has id"):
        load_components(root)


def test_a_tokenizer_of_another_model_is_refused(tiny_dirs, tmp_path):
    root = _copy(tiny_dirs, tmp_path)
    _edit_config(root / "text_encoder", vocab_size=49408)  # CLIP's real vocabulary; the tiny one is smaller
    from safetensors.torch import load_file, save_file

    path = root / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    state[key] = torch.zeros(49408, state[key].shape[1])
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"tokenizer: the tokenizer has \d+ tokens but text_encoder embeds 49408"):
        load_components(root)


def test_an_empty_tokenizer_folder_is_one_line(tiny_dirs, tmp_path):
    root = _copy(tiny_dirs, tmp_path)
    shutil.rmtree(root / "tokenizer")
    (root / "tokenizer").mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer: holds no tokenizer files"):
        load_components(root)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("FooModel", r"field 'unet' names class 'FooModel', which difflower cannot load"),
        ("CLIPTextModelFoo", None),
    ],
)
def test_an_unknown_class_in_model_index_is_one_line(tiny_dirs, tmp_path, entry, message):
    root = _copy(tiny_dirs, tmp_path)
    index = json.loads((root / "model_index.json").read_text())
    name = "unet" if entry == "FooModel" else "text_encoder"
    index[name] = ["diffusers", entry]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message or rf"field '{name}' names class '{entry}'"):
        read_model_index(root)


@pytest.mark.parametrize("name", ["../../../../etc", "/etc", "unet/../../x", "a b"])
def test_component_names_that_leave_the_folder_are_refused(tiny_dirs, tmp_path, name):
    root = _copy(tiny_dirs, tmp_path)
    index = json.loads((root / "model_index.json").read_text())
    index[name] = ["transformers", "CLIPTextModel"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model_index\.json: entry .* (is not a plain name|leads out)"):
        read_model_index(root)


def test_a_component_linked_out_of_the_folder_is_refused(tiny_dirs, tmp_path):
    root = _copy(tiny_dirs, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(root / "vae", outside)
    (root / "vae").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"entry 'vae' leads out of"):
        read_model_index(root)


def test_the_pickle_conversion_hint_is_safe_to_paste(unet_dir):
    """A crafted file name must not become a shell command when the suggested line is pasted."""
    import shlex
    import subprocess

    from safetensors.torch import load_file

    path = unet_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    path.unlink()
    evil = "diffusion_pytorch_model$(touch PWNED).bin"
    torch.save(state, unet_dir / evil)
    with pytest.raises(CheckpointError) as caught:
        load_unet(unet_dir)
    command = str(caught.value).split("`")[1]
    assert shlex.split(command)[3] == evil  # one argument, quoted
    subprocess.run(["sh", "-c", command.replace("python", shlex.quote(sys.executable), 1)], cwd=unet_dir, check=True)
    assert not (unet_dir / "PWNED").exists()
    assert (unet_dir / "diffusion_pytorch_model.safetensors").is_file()  # and the command works
    load_unet(unet_dir)


def test_a_negative_sample_size_names_the_field(unet_dir):
    _edit_config(unet_dir, sample_size=-8)
    with pytest.raises(CheckpointError, match=r"unet/config\.json: field 'sample_size' must be positive, got -8"):
        load_unet(unet_dir)
