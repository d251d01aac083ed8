"""LoRA fused before export (reference.lora), against diffusers' load_lora_weights + fuse_lora.

The LoRA files are written by the field's own tools on the tiny checkpoints: peft adapters with
random weights (init_lora_weights=False, so B is not zero) saved by diffusers' save_lora_weights
(with the adapter config in the metadata), and the same weights renamed to kohya's layout with
per-module alphas. diffusers, with peft as its LoRA backend, is the oracle.
"""

from __future__ import annotations

import diffusers  # the oracle: missing it fails the suite, never skips it
import numpy as np
import pytest
import torch
from parity_helpers import assert_same_as_diffusers, diffusers_run, ours_run
from safetensors.torch import load_file, save_file

from difflower.artifact.manifest import Manifest
from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.loading import read_unet_config
from difflower.reference.lora import parse_lora_argument, read_lora
from difflower.reference.pipeline import load_pipeline
from difflower.reference.single_file import unet_source
from difflower.validate.parity import validate_artifact

PROMPT = "a watercolor painting of a red castle"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: a 3x3 conv LoRA
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _add_adapter(model, rank: int, alpha: int, targets: list[str], seed: int) -> tuple[dict, dict]:
    """A random peft adapter injected into `model`: (its state dict, its LoraConfig as a dict)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)  # keep the tiny model's activations in range
    settings = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", "task_type")}
    settings["target_modules"] = sorted(settings["target_modules"])
    return get_peft_model_state_dict(model), settings


def _peft_fused(model, state_dict: dict, settings: dict, scale: float):
    """`model` with the adapter merged by peft itself (its set_scale and merge)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_adapter_in_model(LoraConfig(**settings), model)
    set_peft_model_state_dict(model, state_dict)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("default", scale)
            module.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def lora_files(tiny_dirs, tmp_path_factory):
    """{'peft': file, 'kohya': file, 'text_settings': ...}: one adapter on the tiny sd UNet (rank 4,
    alpha 8) and text encoder (rank 2, alpha 2), in diffusers' peft layout and renamed to kohya's.

    transformers 5.24 wants peft >= 0.22 for its own adapter methods and PyPI's newest is 0.21.2,
    so the text encoder's adapter is injected, and its oracle merged, by peft directly."""
    root = tmp_path_factory.mktemp("lora")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dirs["sd"], safety_checker=None)
    unet_layers, unet_config = _add_adapter(pipe.unet, 4, 8, UNET_TARGETS, seed=1)
    text_layers, text_config = _add_adapter(pipe.text_encoder, 2, 2, TEXT_TARGETS, seed=2)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root / "peft",
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config,
        text_encoder_lora_adapter_metadata=text_config,
    )
    peft = root / "peft" / "pytorch_lora_weights.safetensors"
    kohya: dict[str, torch.Tensor] = {}
    for key, value in load_file(peft).items():
        component, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
        name = prefix + (sf_name(module) if component == "text_encoder" else module.replace(".", "_"))
        kohya[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        rank = value.shape[0] if which.startswith("A") else value.shape[1]
        kohya[f"{name}.alpha"] = torch.tensor(float(rank * (2 if component == "unet" else 1)))  # peft's alphas
    save_file(kohya, root / "kohya.safetensors")
    # the same in the original SD block names (input_blocks_1_1_...), as SDXL kohya files come
    config = read_unet_config(tiny_dirs["sd"] / "unet")
    attention = ["CrossAttn" in t for t in config.up_block_types]
    sgm = {}
    for key, value in kohya.items():
        name, _, leaf = key.partition(".")
        if name.startswith("lora_unet_"):
            module = next(m for m, _ in pipe.unet.named_modules() if "lora_unet_" + m.replace(".", "_") == name)
            original = unet_source(module.removesuffix(".base_layer") + ".weight", config.layers_per_block, attention)
            name = "lora_unet_" + original.removesuffix(".weight").replace(".", "_")
        sgm[f"{name}.{leaf}"] = value
    save_file(sgm, root / "kohya-sgm.safetensors")
    text = {k.removeprefix("text_encoder."): v for k, v in text_layers.items()}
    files = {"peft": peft, "kohya": root / "kohya.safetensors", "kohya-sgm": root / "kohya-sgm.safetensors"}
    return {**files, "text": (text, text_config)}


def _fused_by_diffusers(checkpoint, files, fmt, scale):
    """diffusers' pipeline with the LoRA fused: the UNet by diffusers (lora_state_dict converts kohya,
    load_lora_adapter, fuse_lora), the text encoder by peft (see lora_files)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    state, alphas, metadata = pipe.lora_state_dict(
        str(files[fmt]), unet_config=pipe.unet.config, return_lora_metadata=True
    )  # unet_config: diffusers maps kohya's original block names with it
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    pipe.unet.load_lora_adapter(
        unet_state, prefix="unet", network_alphas=alphas, adapter_name="x", metadata=metadata, _pipeline=pipe
    )
    pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=["x"])
    pipe.unet.unload_lora()
    text_state, text_settings = files["text"]
    merged = _peft_fused(pipe.text_encoder, text_state, text_settings, scale)
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None).text_encoder
    fresh.load_state_dict(merged)
    pipe.text_encoder = fresh
    return pipe


@pytest.mark.parametrize("fmt", ["peft", "kohya", "kohya-sgm"])
def test_fused_weights_equal_diffusers_fuse_lora(tiny_dirs, lora_files, fmt):
    theirs = _fused_by_diffusers(tiny_dirs["sd"], lora_files, fmt, 0.7)
    ours = load_pipeline(tiny_dirs["sd"], loras=[read_lora(lora_files[fmt], 0.7)])
    base = load_pipeline(tiny_dirs["sd"])
    for name in ("unet", "text_encoder"):
        mine, reference = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == reference.keys()
        worst = max((mine[k] - reference[k]).abs().max().item() for k in mine)
        assert worst <= 1e-5, (name, worst)
        before = getattr(base, name).state_dict()
        changed = sum(not torch.equal(mine[k], before[k]) for k in mine)
        assert changed >= {"unet": 20, "text_encoder": 8}[name]  # every targeted layer moved


def test_images_equal_diffusers_with_the_fused_lora(tiny_dirs, lora_files):
    theirs = _fused_by_diffusers(tiny_dirs["sd"], lora_files, "peft", 0.8)
    images, latents = diffusers_run(theirs, PROMPT, 3, generator=torch.Generator().manual_seed(3))
    ours = load_pipeline(tiny_dirs["sd"], loras=[read_lora(lora_files["peft"], 0.8)])
    out = ours_run(ours, PROMPT, 3, generator=torch.Generator().manual_seed(3))
    assert_same_as_diffusers(out, images, latents)
    plain = ours_run(load_pipeline(tiny_dirs["sd"]), PROMPT, 3, generator=torch.Generator().manual_seed(3))
    assert (out.images - plain.images).__abs__().max() > 1e-2  # the LoRA changes the picture


def test_an_export_carries_the_lora_and_validates_against_it(tiny_dirs, lora_files, tmp_path, capsys):
    out = tmp_path / "art"
    argv = ["export", str(tiny_dirs["sd"]), "--backend", "torchscript", "--out", str(out)]
    assert main([*argv, "--lora", f"{lora_files['kohya']}:0.6"]) == 0
    manifest = Manifest.read(out)
    [record] = manifest.source["loras"]
    assert record["format"] == "kohya" and record["scale"] == 0.6 and len(record["sha256"]) == 64
    assert record["modules"] == {"denoiser": 66, "text_encoder": 8}
    assert all(r.parity.passed for r in manifest.components.values())
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = f"LoRA fused: {lora_files['kohya']} x 0.6 (kohya; denoiser 66, text_encoder 8 modules"
    assert shown in capsys.readouterr().out
    report = validate_artifact(out, tiny_dirs["sd"], steps=2)  # the reference fuses the recorded LoRA too
    assert report.passed
    # the artifact is the LoRA'd model: against the plain checkpoint its text encoder differs
    plain = export(tiny_dirs["sd"], "torchscript", tmp_path / "plain", components=["text_encoder"], progress=False)
    assert plain.source.get("loras") is None


def test_a_lora_for_another_model_is_refused_with_counts(tiny_dirs, lora_files, tmp_path):
    tensors = load_file(lora_files["kohya"])
    renamed = {k.replace("lora_unet_down_blocks_0", "lora_unet_down_blocks_7"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "other.safetensors")
    unmatched = r"other\.safetensors: \d+ of 66 unet modules match no layer .*down_blocks_7"
    with pytest.raises(CheckpointError, match=unmatched):
        load_pipeline(tiny_dirs["sd"], loras=[read_lora(tmp_path / "other.safetensors")])
    with pytest.raises(CheckpointError, match="updates text_encoder_2, which this model does not have"):
        te2 = {k.replace("lora_te_", "lora_te2_"): v for k, v in tensors.items()}
        save_file(te2, tmp_path / "te2.safetensors")
        load_pipeline(tiny_dirs["sd"], loras=[read_lora(tmp_path / "te2.safetensors")])
    # the same module names at another width: the shape is named
    wide = {k: torch.cat([v, v]) if k.endswith("attn1_to_q.lora_up.weight") else v for k, v in tensors.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"unet layer '.*attn1_to_q' has weight \(\d+, \d+\) but the LoRA"):
        load_pipeline(tiny_dirs["sd"], loras=[read_lora(tmp_path / "wide.safetensors")])


def test_bad_lora_input_is_one_line(tiny_dirs, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    png = str(tmp_path / "x.png")
    base = ["generate", str(tiny_dirs["sd"]), "--prompt", "a", "--steps", "1", "-o", png]
    assert main([*base, "--lora", str(junk)]) == 2
    assert "junk.safetensors: not a readable safetensors file" in capsys.readouterr().err
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert main([*base, "--lora", str(tmp_path / "plain.safetensors")]) == 2
    assert "no LoRA weights in the diffusers/peft or kohya format (keys like some.weight)" in capsys.readouterr().err
    assert main([*base, "--lora", str(tmp_path)]) == 2
    assert "is a folder; --lora takes the LoRA's .safetensors file" in capsys.readouterr().err
    assert main([*base, "--lora", f"{tmp_path / 'missing.safetensors'}:0.5"]) == 2
    assert "missing.safetensors: LoRA file not found" in capsys.readouterr().err
    with pytest.raises(ArgumentError, match="expected FILE or FILE:SCALE"):
        parse_lora_argument("a.safetensors:strong")
    assert parse_lora_argument("a.safetensors:0.5") == (tmp_path.__class__("a.safetensors"), 0.5)
    assert not (tmp_path / "x.png").exists()


def test_generate_with_a_lora_writes_the_lora_image(tiny_dirs, lora_files, tmp_path):
    import numpy as np
    from PIL import Image

    png = tmp_path / "x.png"
    argv = ["generate", str(tiny_dirs["sd"]), "--prompt", PROMPT, "--steps", "2", "-o", str(png)]
    assert main([*argv, "--lora", f"{lora_files['peft']}:0.5"]) == 0
    expected = load_pipeline(tiny_dirs["sd"], loras=[read_lora(lora_files["peft"], 0.5)])(
        PROMPT, num_inference_steps=2, seed=0, progress=False
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_denoiser_loras_of_the_other_families_equal_diffusers(tiny_dirs, tmp_path, family):
    """A peft adapter on the SDXL UNet / SD3 transformer, saved and fused by diffusers' own
    pipeline class, against ours."""
    cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline}[family]
    name = {"sdxl": "unet", "sd3": "transformer"}[family]
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (["add_q_proj", "proj_out"] if family == "sd3" else ["proj_in"])
    pipe = cls.from_pretrained(tiny_dirs[family])
    layers, config = _add_adapter(getattr(pipe, name), 4, 6, targets, seed=5)
    cls.save_lora_weights(tmp_path, **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config})
    file = tmp_path / "pytorch_lora_weights.safetensors"
    theirs = cls.from_pretrained(tiny_dirs[family])
    theirs.load_lora_weights(str(file), adapter_name="x")  # the user's API (it reads the file's adapter config)
    theirs.fuse_lora(components=[name], lora_scale=0.9, adapter_names=["x"])
    getattr(theirs, name).unload_lora()
    ours = load_pipeline(tiny_dirs[family], loras=[read_lora(file, 0.9)])
    mine, reference = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
    before = getattr(load_pipeline(tiny_dirs[family]), name).state_dict()
    assert mine.keys() == reference.keys()
    assert max((mine[k] - reference[k]).abs().max().item() for k in mine) <= 1e-5
    assert sum(not torch.equal(mine[k], before[k]) for k in mine) >= 8


def test_flux_loras_equal_diffusers(tmp_path):
    """A peft adapter on a tiny FLUX.1-dev transformer (both streams' projections, a single-stream
    block's MLP and output), saved, loaded and fused by diffusers' FluxPipeline, against ours."""
    from difflower.reference.tiny import make_tiny_checkpoint

    flux = make_tiny_checkpoint(tmp_path / "flux", "flux", seed=0)
    cls = diffusers.FluxPipeline
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out"]
    layers, config = _add_adapter(cls.from_pretrained(flux).transformer, 4, 8, targets, seed=9)
    cls.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    theirs = cls.from_pretrained(flux)
    theirs.load_lora_weights(str(file), adapter_name="x")
    theirs.fuse_lora(components=["transformer"], lora_scale=0.9, adapter_names=["x"])
    theirs.transformer.unload_lora()
    mine = load_pipeline(flux, loras=[read_lora(file, 0.9)]).transformer.state_dict()
    reference = theirs.transformer.state_dict()
    before = load_pipeline(flux).transformer.state_dict()
    assert mine.keys() == reference.keys()
    assert max((mine[k] - reference[k]).abs().max().item() for k in mine) <= 1e-5
    assert sum(not torch.equal(mine[k], before[k]) for k in mine) >= 16


def test_an_lcm_lora_run_matches_diffusers(tiny_dirs, lora_files):
    """LCM-LoRA's recipe (issue 19): a LoRA fused into an ordinary SD UNet, sampled by LCM with a
    low guidance, against diffusers' pipeline with the same LoRA and LCMScheduler."""
    theirs = _fused_by_diffusers(tiny_dirs["sd"], lora_files, "kohya", 1.0)
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    images, latents = diffusers_run(theirs, PROMPT, 4, generator=torch.Generator().manual_seed(6), guidance_scale=1.5)
    ours = load_pipeline(tiny_dirs["sd"], scheduler="lcm", loras=[read_lora(lora_files["kohya"])])
    out = ours_run(ours, PROMPT, 4, generator=torch.Generator().manual_seed(6), guidance_scale=1.5)
    assert_same_as_diffusers(out, images, latents)


def test_sdxl_kohya_text_encoder_loras_equal_peft_merges(tiny_dirs, tmp_path):
    """lora_te1_ / lora_te2_ modules of an SDXL kohya file, against peft's own merge per encoder."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"])
    kohya, expected, modules = {}, {}, {}
    for name, prefix, seed in (("text_encoder", "lora_te1_", 7), ("text_encoder_2", "lora_te2_", 8)):
        layers, settings = _add_adapter(getattr(pipe, name), 2, 4, TEXT_TARGETS, seed=seed)
        modules[name] = sorted({canonical_module(k.rpartition(".lora_")[0]) for k in layers})
        for key, value in layers.items():
            module, _, which = key.rpartition(".lora_")
            flat = prefix + sf_name(module)
            kohya[f"{flat}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
            kohya[f"{flat}.alpha"] = torch.tensor(4.0)
        fresh = getattr(diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"]), name)
        expected[name] = _peft_fused(fresh, layers, settings, 0.6)
    save_file(kohya, tmp_path / "te.safetensors")
    # the same in diffusers' peft layout as transformers 4 named the layers (text_model. first)
    peft = {}
    for key, value in kohya.items():
        flat, _, leaf = key.partition(".")
        if leaf == "alpha":
            continue
        name = "text_encoder" if flat.startswith("lora_te1_") else "text_encoder_2"
        module = next(m for m in modules[name] if sf_name(m) == flat[len("lora_te1_") :])
        peft[f"{name}.{module}.lora_{'A' if 'down' in leaf else 'B'}.weight"] = value
    save_file(peft, tmp_path / "te-peft.safetensors")
    for file, scale in (("te.safetensors", 0.6), ("te-peft.safetensors", 0.6 * 4 / 2)):  # no alphas: scale 1, not 4 / 2
        ours = load_pipeline(tiny_dirs["sdxl"], loras=[read_lora(tmp_path / file, scale)])
        for name, reference in expected.items():
            mine = getattr(ours, name).state_dict()
            assert mine.keys() == reference.keys()
            assert max((mine[k] - reference[k]).abs().max().item() for k in mine) <= 1e-5, (file, name)


def test_sd3_text_encoder_loras_equal_peft_merges(tiny_dirs, tmp_path):
    """An SD3 LoRA on the transformer and both CLIP encoders, saved by diffusers' own
    StableDiffusion3Pipeline (peft layout, adapter configs in the metadata): each encoder against
    peft's own merge (see lora_files on transformers 5 and peft); the transformer's adapter rides
    along in the same file (its fuse is held to diffusers' in the test above)."""
    cls = diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(tiny_dirs["sd3"])
    saved, expected = {}, {}
    for name, seed in (("text_encoder", 3), ("text_encoder_2", 4)):
        layers, settings = _add_adapter(getattr(pipe, name), 2, 4, TEXT_TARGETS, seed=seed)
        saved[f"{name}_lora_layers"], saved[f"{name}_lora_adapter_metadata"] = layers, settings
        expected[name] = _peft_fused(getattr(cls.from_pretrained(tiny_dirs["sd3"]), name), layers, settings, 0.7)
    layers, settings = _add_adapter(pipe.transformer, 2, 2, ["to_q", "to_v"], seed=5)
    cls.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=settings, **saved)
    ours = load_pipeline(tiny_dirs["sd3"], loras=[read_lora(tmp_path / "pytorch_lora_weights.safetensors", 0.7)])
    before = load_pipeline(tiny_dirs["sd3"])
    for name, reference in expected.items():
        mine = getattr(ours, name).state_dict()
        assert mine.keys() == reference.keys()
        assert max((mine[k] - reference[k]).abs().max().item() for k in mine) <= 1e-5, name
        assert sum(not torch.equal(mine[k], v) for k, v in getattr(before, name).state_dict().items()) >= 8, name


def canonical_module(module: str) -> str:
    from difflower.reference.single_file import canonical_clip_key

    return canonical_clip_key(module)


def sf_name(module: str) -> str:
    """kohya's flat name of a transformers module path (canonical `text_model.` level first)."""
    from difflower.reference.single_file import canonical_clip_key

    return canonical_clip_key(module).replace(".", "_")


# -- LoRA slots: an ONNX export that switches LoRAs without re-export ------------------------------


def _attention_lora(tiny_dirs, family: str, root, rank: int, seed: int):
    """A peft adapter on the attention projections of the tiny `family` denoiser, saved by diffusers."""
    cls = {"sd": diffusers.StableDiffusionPipeline, "sd3": diffusers.StableDiffusion3Pipeline}[family]
    name = "unet" if family == "sd" else "transformer"
    extra = {"safety_checker": None} if family == "sd" else {}
    pipe = cls.from_pretrained(tiny_dirs[family], **extra)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (["add_k_proj", "to_add_out"] if family == "sd3" else [])
    layers, config = _add_adapter(getattr(pipe, name), rank, 2 * rank, targets, seed=seed)
    cls.save_lora_weights(root, **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config})
    return root / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_lora_slots_run_any_lora_as_the_fused_reference(tiny_dirs, tmp_path, capsys, family):
    """export --lora-slots 8: the denoiser's attention projections take their LoRA matrices as inputs;
    the artifact loaded with one LoRA, with two at once, or with none, makes the eager pipeline's
    run with the same LoRAs fused (latents within the fp32 gates), without re-export."""
    from parity_helpers import assert_run_matches

    import difflower

    first = _attention_lora(tiny_dirs, family, tmp_path / "a", 4, seed=11)
    second = _attention_lora(tiny_dirs, family, tmp_path / "b", 2, seed=12)
    out = tmp_path / "slots"
    manifest = export(tiny_dirs[family], "onnx", out, lora_slots=8, progress=False)
    denoiser = manifest.components["unet" if family == "sd" else "transformer"]
    assert main(["info", str(out)]) == 0  # the slots are listed
    assert f"LoRA slots: rank 8 on {sum(t.name.startswith('lora_down.') for t in denoiser.inputs)} projections" in (
        capsys.readouterr().out
    )
    slots = [t for t in denoiser.inputs if t.name.startswith("lora_down.")]
    assert denoiser.config["lora_slots"] == 8 and len(slots) >= 8 and slots[0].shape[1] == 8
    assert denoiser.parity.passed  # the slot path itself, fed random matrices at export
    for engine in ("onnxruntime", "torch"):  # validate's component check feeds the slots too, on either engine
        assert validate_artifact(out, tiny_dirs[family], steps=2, engine=engine).passed, engine
    run = dict(prompt=PROMPT, num_inference_steps=3, progress=False)
    for loras in ([], [(first, 0.8)], [(first, 0.8), (second, 1.3)]):
        eager = load_pipeline(tiny_dirs[family], loras=[read_lora(f, s) for f, s in loras])
        artifact = difflower.load(out, lora=loras)
        a, e = assert_run_matches(eager, artifact, **run)
        if loras:  # the LoRA really moved the image
            plain = load_pipeline(tiny_dirs[family])(seed=11, output_type="np", **run).images
            assert np.abs(plain - a.images).max() > 1e-3
    if family == "sd":  # the same LoRA in kohya's layout, diffusers' and the original SD block names
        for layout in ("diffusers", "sgm"):
            kohya = tmp_path / f"kohya-{layout}.safetensors"
            save_file(_as_kohya(load_file(first), tiny_dirs["sd"], alpha=8.0, original=layout == "sgm"), kohya)
            again = difflower.load(out, lora=[(kohya, 0.8)])(seed=11, output_type="np", **run).images
            expected = difflower.load(out, lora=[(first, 0.8)])(seed=11, output_type="np", **run).images
            np.testing.assert_array_equal(again, expected)


def _as_kohya(state: dict, checkpoint, alpha: float, original: bool) -> dict:
    """A diffusers-saved UNet LoRA renamed to kohya's layout (lora_unet_<module>), in diffusers'
    block names or (`original`) the SD ones kohya's SDXL files use, with `alpha` per module."""
    config = read_unet_config(checkpoint / "unet")
    attention = ["CrossAttn" in t for t in config.up_block_types]
    out = {}
    for key, value in state.items():
        module, _, which = key.removeprefix("unet.").rpartition(".lora_")
        if original:
            module = unet_source(module + ".weight", config.layers_per_block, attention).removesuffix(".weight")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_lora_slot_errors_are_one_line(tiny_dirs, lora_files, tmp_path, capsys):
    attention = _attention_lora(tiny_dirs, "sd", tmp_path / "a", 4, seed=11)
    sd = str(tiny_dirs["sd"])
    export(sd, "onnx", tmp_path / "slots", lora_slots=2, progress=False)
    export(sd, "onnx", tmp_path / "plain", components=["unet"], progress=False)
    x = str(tmp_path / "x")
    gen = ["generate", "--prompt", "x", "--steps", "1", "-o", x + ".png", "--lora"]
    capsys.readouterr()  # diffusers' progress bars while the LoRA was made
    cases = [
        (["export", sd, "--backend", "openvino", "--lora-slots", "4", "--out", x],
         "argument --lora-slots: LoRA slots are ONNX Runtime inputs: export with --backend onnx"),
        (["export", sd, "--backend", "onnx", "--lora-slots", "4", "--fuse-qkv", "--out", x],
         "argument --lora-slots: is not combined with --fuse-qkv yet"),
        (["export", sd, "--backend", "onnx", "--lora-slots", "0", "--out", x],
         "argument --lora-slots: takes the slots' rank, an integer in [1, 1024], got 0"),
        ([gen[0], str(tmp_path / "slots"), *gen[1:], str(attention)],
         "rank 4 at 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' (the LoRAs' ranks added up) "
         "exceeds this artifact's slots (2); export with --lora-slots 4 or more"),
        ([gen[0], str(tmp_path / "slots"), *gen[1:], str(lora_files["peft"])],
         "also updates text_encoder; an artifact's LoRA slots are in its denoiser only"),
        ([gen[0], str(tmp_path / "plain"), *gen[1:], str(attention)],
         "argument --lora: this artifact has its LoRAs fused at export"),
    ]  # fmt: skip
    for args, expected in cases:
        assert main(args) == 2, args
        err_text = capsys.readouterr().err
        assert expected in err_text and len(err_text.strip().splitlines()) == 1, err_text
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.png").exists()


def test_bfl_named_kohya_flux_loras_equal_diffusers(tmp_path):
    """Most Flux LoRAs are kohya files in Black Forest Labs' module names, one low-rank update on a
    fused q|k|v (or a single block's q|k|v|MLP): ours splits it over diffusers' layers as diffusers'
    own kohya conversion does (load_lora_weights + fuse_lora on FluxPipeline), within 1e-5."""
    from difflower.reference.tiny import make_tiny_checkpoint

    flux = make_tiny_checkpoint(tmp_path / "flux", "flux", seed=0)
    config = load_pipeline(flux).transformer.config
    inner, rank = config.inner_dim, 4
    outs = {"double_blocks_0_img_attn_qkv": 3 * inner, "double_blocks_0_txt_attn_qkv": 3 * inner,
            "double_blocks_1_img_attn_proj": inner, "double_blocks_1_img_mlp_0": 4 * inner,
            "double_blocks_0_img_mod_lin": 6 * inner, "single_blocks_0_linear1": 3 * inner + 4 * inner,
            "single_blocks_1_linear2": inner, "single_blocks_1_modulation_lin": 3 * inner}  # fmt: skip
    ins = {"double_blocks_1_img_mlp_0": inner, "single_blocks_1_linear2": inner + 4 * inner}
    gen = torch.Generator().manual_seed(4)
    state = {}
    for name, out in outs.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, ins.get(name, inner), generator=gen) * 0.1
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
        state[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    # diffusers' converter splits a single block's linear1 at FLUX.1's real widths (3072 x 3 + 12288):
    # that module is checked by its definition below instead, on a file of its own
    single = {k: state.pop(k) for k in list(state) if k.startswith("lora_unet_single_blocks_0_linear1.")}
    save_file(state, tmp_path / "bfl-kohya.safetensors")
    save_file(single, tmp_path / "bfl-linear1.safetensors")
    theirs = diffusers.FluxPipeline.from_pretrained(flux)
    theirs.load_lora_weights(str(tmp_path / "bfl-kohya.safetensors"), adapter_name="x")
    theirs.fuse_lora(components=["transformer"], lora_scale=0.7, adapter_names=["x"])
    theirs.transformer.unload_lora()
    ours = load_pipeline(flux, loras=[read_lora(tmp_path / "bfl-kohya.safetensors", 0.7)]).transformer.state_dict()
    reference, before = theirs.transformer.state_dict(), load_pipeline(flux).transformer.state_dict()
    assert ours.keys() == reference.keys()
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) <= 1e-5
    # q, k, v of both streams (6), proj, mlp_0, img_mod, linear2, modulation: 11 weights
    assert sum(not torch.equal(ours[k], before[k]) for k in ours) == 11
    # linear1 = [to_q; to_k; to_v; proj_mlp]: each gets its rows of scale x alpha / rank x up @ down
    fused = load_pipeline(flux, loras=[read_lora(tmp_path / "bfl-linear1.safetensors", 0.7)]).transformer.state_dict()
    prefix = "lora_unet_single_blocks_0_linear1"
    update = 0.7 * (2.0 / rank) * single[f"{prefix}.lora_up.weight"] @ single[f"{prefix}.lora_down.weight"]
    rows = update.split([inner, inner, inner, 4 * inner])
    for name, delta in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], rows, strict=True):
        key = f"single_transformer_blocks.0.{name}.weight"
        torch.testing.assert_close(fused[key], before[key] + delta, atol=1e-6, rtol=0)
