"""FLUX.1 (dev and schnell) on the eager reference, against diffusers on the same weights.

Our FluxTransformer2DModel against diffusers' module (written by diffusers, loaded by us), and
our pipeline against diffusers' FluxPipeline on tiny checkpoints `difflower tiny --family flux`
and `flux-schnell` write: latents after every step and the image.
"""

from __future__ import annotations

import diffusers  # the oracle: missing it fails the suite, never skips it
import numpy as np
import pytest
import torch

from difflower.cli import main
from difflower.errors import ArgumentError
from difflower.reference.loading import load_flux_transformer
from difflower.reference.pipeline import load_pipeline
from difflower.reference.tiny import make_tiny_checkpoint
from difflower.reference.transformer_flux import image_ids, pack_latents, text_ids, unpack_latents

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)


def _inputs(config: dict, grid: tuple[int, int], text_tokens: int, guidance: bool, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    height, width = 2 * grid[0], 2 * grid[1]  # the latent size whose packed tokens form `grid`
    return dict(
        hidden_states=torch.randn(2, grid[0] * grid[1], config["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(2, text_tokens, config["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(2, config["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.0325, 0.87]),
        img_ids=image_ids(height, width),
        txt_ids=text_ids(text_tokens),
        guidance=torch.tensor([3.5, 1.0]) if guidance else None,
    )


def _compare(config: dict, tmp_path, grid: tuple[int, int], text_tokens: int, atol: float) -> None:
    torch.manual_seed(0)
    theirs = diffusers.FluxTransformer2DModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we could hide behind; widen the weights anyway
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    theirs.save_pretrained(tmp_path)
    ours = load_flux_transformer(tmp_path)
    inputs = _inputs(config, grid, text_tokens, config.get("guidance_embeds", False))
    with torch.no_grad():
        expected = theirs(**inputs).sample
        actual = ours(**inputs).sample
    assert actual.shape == expected.shape == inputs["hidden_states"].shape[:2] + (config["in_channels"],)
    assert expected.abs().max() > 0.1  # a real signal, not an all-zero output
    assert (actual - expected).abs().max().item() <= atol


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_flux_transformer_matches_diffusers(tmp_path, guidance_embeds, grid):
    _compare(dict(TINY, guidance_embeds=guidance_embeds), tmp_path, grid, text_tokens=7, atol=1e-5)


@pytest.mark.slow
def test_flux_transformer_at_real_width_matches_diffusers(tmp_path):
    """The FLUX.1-dev config (width 3072, 24 heads of 128, T5 and CLIP-L widths) at depth 1 + 1."""
    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    _compare(config, tmp_path, grid=(8, 8), text_tokens=16, atol=1e-4)


def test_packing_round_trips_and_matches_diffusers():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, diffusers.FluxPipeline._pack_latents(latents, 2, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    expected_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), expected_ids)


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {family: make_tiny_checkpoint(root / family, family, seed=0) for family in ("flux", "flux-schnell")}


@pytest.mark.parametrize(
    "family, options",
    [
        ("flux", dict(num_inference_steps=4, height=64, width=48)),  # dev: guidance 3.5, dynamic shift
        ("flux", dict(num_inference_steps=3, height=32, width=64, guidance_scale=5.0, num_images_per_prompt=2)),
        ("flux", dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, prompt_2="a blue lake")),
        ("flux-schnell", dict(num_inference_steps=2, height=48, width=32, guidance_scale=0.0)),
        # true CFG: the negative prompts through the transformer too, mixed at true_cfg_scale
        ("flux", dict(num_inference_steps=3, height=32, width=48, true_cfg_scale=2.5, negative_prompt=["dark", "a"])),
    ],
)
def test_flux_pipeline_matches_diffusers(flux_dirs, family, options):
    theirs = diffusers.FluxPipeline.from_pretrained(flux_dirs[family])
    theirs.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []

    def keep(_pipe, _step, _t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    prompts = ["a red castle", "a watercolor lighthouse"]
    expected = theirs(
        prompts, generator=torch.Generator().manual_seed(3), output_type="np", callback_on_step_end=keep, **options
    ).images
    ours = load_pipeline(flux_dirs[family])
    result = ours(prompts, seed=3, output_type="np", return_trajectory=True, progress=False, **options)
    assert len(result.trajectory) == len(seen) == options["num_inference_steps"]
    for step, (theirs_latents, our_latents) in enumerate(zip(seen, result.trajectory, strict=True)):
        assert (pack_latents(our_latents) - theirs_latents).abs().max().item() <= 1e-4, step
    assert result.images.shape == expected.shape
    assert np.abs(result.images - expected).max() <= 1e-3
    assert expected.std() > 0.01  # an image, not a flat field


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_flux_img2img_and_inpainting_match_diffusers(flux_dirs, task):
    import PIL.Image

    rng = np.random.default_rng(0)
    init = PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    options: dict = dict(image=init, num_inference_steps=5, height=48, width=64, strength=0.7)
    cls = diffusers.FluxImg2ImgPipeline
    if task == "inpaint":
        mask = (np.arange(64)[None, :].repeat(48, 0) > 30).astype(np.uint8) * 255  # repaint the right half
        options["mask_image"] = PIL.Image.fromarray(mask)
        cls = diffusers.FluxInpaintPipeline
    theirs = cls.from_pretrained(flux_dirs["flux"])
    theirs.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []

    def keep(_pipe, _step, _t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    generator = torch.Generator().manual_seed(3)
    expected = theirs("a red castle", generator=generator, output_type="np", callback_on_step_end=keep, **options)
    ours = load_pipeline(flux_dirs["flux"])
    result = ours("a red castle", seed=3, output_type="np", return_trajectory=True, progress=False, **options)
    assert len(result.trajectory) == len(seen) == 4  # strength 0.7 of 5 steps: diffusers' rounding
    for step, (theirs_latents, our_latents) in enumerate(zip(seen, result.trajectory, strict=True)):
        assert (pack_latents(our_latents) - theirs_latents).abs().max().item() <= 1e-4, step
    assert np.abs(result.images - expected.images).max() <= 1e-3


def test_flux_refuses_what_it_does_not_run_yet(flux_dirs, tmp_path, capsys):
    pipe = load_pipeline(flux_dirs["flux"])
    cases = [
        (dict(negative_prompt="blurry"), "negative_prompt"),  # read only under true CFG: never ignored silently
        (dict(true_cfg_scale=2.0), "true_cfg_scale"),  # true CFG without a negative prompt
        (dict(cache="deepcache"), "cache"),  # a UNet's cache
        # FluxPipeline decides per CFG half; the loop would decide for the doubled batch
        (dict(cache="first-block:threshold=0.5", true_cfg_scale=2.0, negative_prompt="dark"), "cache"),
        (dict(max_sequence_length=600), "max_sequence_length"),
        (dict(height=40), "height"),  # Flux sizes are multiples of 16 (8 for the VAE, 2 for the packing)
    ]
    for options, argument in cases:
        with pytest.raises(ArgumentError) as refused:
            pipe("a red castle", num_inference_steps=1, progress=False, **options)
        assert refused.value.name == argument, refused.value
    out = tmp_path / "art"
    argv = ["export", str(flux_dirs["flux"]), "--backend", "onnx", "--out", str(out), "--cache-graphs", "deepcache"]
    assert main(argv) == 2
    assert "--cache-graphs: deepcache splits a UNet; Flux is a transformer: use first-block" in capsys.readouterr().err
    assert not out.exists()


def test_generate_and_tiny_commands_run_flux(flux_dirs, tmp_path, capsys):
    out = tmp_path / "flux.png"
    argv = ["generate", str(flux_dirs["flux"]), "--prompt", "a red castle", "--steps", "2", "--seed", "5"]
    threads = str(torch.get_num_threads())  # float sums depend on how the work is split
    assert main([*argv, "--height", "32", "--width", "48", "--threads", threads, "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    import PIL.Image

    expected = load_pipeline(flux_dirs["flux"])(
        "a red castle", num_inference_steps=2, seed=5, height=32, width=48, progress=False
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))


# -- export: every component through the backend, parity checked, and the one loop on the engines


@pytest.mark.parametrize(
    "backend, options",
    [
        ("onnx", dict(fuse_qkv=True)),
        ("openvino", {}),
        pytest.param("torchscript", {}, marks=pytest.mark.slow),
    ],
)
def test_flux_exports_and_validates(flux_dirs, tmp_path, backend, options):
    import difflower
    from difflower.driver import export

    out = tmp_path / backend
    manifest = export(flux_dirs["flux"], backend, out, static=["1x64x64"], progress=False, **options)
    assert manifest.shapes["cfg_doubles_denoiser_batch"] is False  # distilled guidance: no doubled batch
    assert manifest.shapes["t5_sequence_length"] == 512  # FluxPipeline's window
    names = [t.name for t in manifest.components["transformer"].inputs]
    assert names == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"
    ]  # fmt: skip
    assert "pooler_output" in [t.name for t in manifest.components["text_encoder"].outputs]
    if options.get("fuse_qkv"):  # 2 double-stream blocks (both streams) and 2 single-stream blocks
        fused = next(p for p in manifest.passes if p["name"] == "fuse_qkv")
        assert fused["rewrites"] == {"joint image q|k|v": 4, "joint context q|k|v": 2}
        assert fused["parity"]["max_abs_vs_unfused"] <= 1e-5
    report = difflower.validate(out, flux_dirs["flux"], steps=4)
    assert report.passed, report


@pytest.mark.slow
def test_flux_aoti_bf16_validates(flux_dirs, tmp_path):
    """--precision bf16 where the backend computes in it on this CPU: AOTInductor's bf16 kernels
    (fp32 in and out), every component within the bf16 gates and the whole run too."""
    import difflower
    from difflower.driver import export

    out = tmp_path / "aoti-bf16"
    manifest = export(flux_dirs["flux"], "aoti", out, precision="bf16", progress=False)
    assert manifest.precision == "bf16"
    assert all(r.parity.passed for r in manifest.components.values())
    report = difflower.validate(out, flux_dirs["flux"], steps=4)
    assert report.passed and report.precision == "bf16", report.to_json()


def test_flux_dynamic_onnx_serves_several_sizes_and_img2img(flux_dirs, tmp_path):
    import difflower
    from difflower.driver import export

    out = tmp_path / "dynamic"
    export(
        flux_dirs["flux"], "onnx", out, static=["1x64x64", "1x32x48", "1x48x32"], progress=False
    )  # one dynamic graph
    artifact, eager = difflower.load(out), load_pipeline(flux_dirs["flux"])
    rng = np.random.default_rng(1)
    init = rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)
    for options in (
        dict(height=32, width=48),
        dict(height=64, width=64),
        dict(image=init, strength=0.8, height=48, width=32),
    ):
        run = dict(num_inference_steps=3, seed=4, output_type="np", progress=False, **options)
        expected = eager("a red castle", **run).images
        actual = artifact("a red castle", **run).images
        assert actual.shape == expected.shape and np.abs(actual - expected).max() <= 1e-3, options


HOT_LAYER = "transformer_blocks.0.ff_context.net."


def _hot_checkpoint(source, root):
    """A copy of `source` whose first double block's text feed-forward overflows fp16 inside."""
    import shutil

    from safetensors.torch import save_file

    from difflower.reference.loading import read_safetensors, weight_files

    shutil.copytree(source, root)
    path = weight_files(root / "transformer")[0]
    state = read_safetensors(path)
    for key in (f"{HOT_LAYER}0.proj.weight", f"{HOT_LAYER}0.proj.bias"):
        state[key] = state[key] * 1e7
    state[f"{HOT_LAYER}2.weight"] = state[f"{HOT_LAYER}2.weight"] / 1e7
    save_file(state, str(path))
    return root


def test_flux_fp16_export_keeps_the_overflowing_feed_forward_in_fp32(flux_dirs, tmp_path):
    """Flux's activations pass fp16's range in known places (diffusers clips the text stream for
    it); here one is planted: the first double block's text feed-forward gets its input projection
    scaled up 1e7 and its output projection down as much, so its hidden activations (and that
    projection's weights) pass 65504 while what it adds to the stream stays in range. The island
    analysis must find that layer, the manifest name it, and the fp16 graph keep it in fp32."""
    import onnx

    from difflower.driver import export
    from difflower.graph_passes.fp16 import FP16_MAX

    root = _hot_checkpoint(flux_dirs["flux"], tmp_path / "hot")
    out = tmp_path / "fp16"
    manifest = export(root, "onnx", out, components=["transformer"], static=["1x64x64"], precision="fp16",
                      progress=False)  # fmt: skip
    fp16 = next(p for p in manifest.passes if p["name"] == "fp16" and p["component"] == "transformer")
    islands = {i["module"]: i for i in fp16["settings"]["islands"]}
    hot = {name: i for name, i in islands.items() if "transformer_blocks.0.ff_context.net" in name}
    assert hot and all(i["nodes"] >= 1 for i in hot.values()), sorted(islands)
    assert any("activations reach" in i["reason"] for i in hot.values())
    assert manifest.components["transformer"].parity.passed  # fp16 gate against the fp32 reference

    graph = onnx.load(str(out / "transformer" / "model.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    scope = "/transformer_blocks.0/ff_context/net.0/proj/"  # a Gemm once the static pass folded MatMul + Add
    projection = next(n for n in graph.node if scope in n.name and n.op_type in ("MatMul", "Gemm"))
    kept = weights[projection.input[1]]
    assert kept.data_type == onnx.TensorProto.FLOAT
    assert np.abs(onnx.numpy_helper.to_array(kept)).max() > FP16_MAX  # fp16 could not even store it
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in weights.values()}  # the rest is fp16


@pytest.mark.parametrize(
    "mode, options",
    [
        ("int8-weight", {}),
        ("int8", {}),  # hybrid: activations calibrated on the default prompts and steps too
    ],
)
def test_flux_openvino_compression_validates(flux_dirs, tmp_path, mode, options):
    import difflower
    from difflower.driver import export

    out = tmp_path / mode
    manifest = export(flux_dirs["flux"], "openvino", out, static=["1x64x64"], quantize=mode, progress=False, **options)
    rewrites = {p["component"]: p["rewrites"] for p in manifest.passes if p["name"] == "openvino_compression"}
    assert rewrites["transformer"]["int8 weight tensors"] > 0
    assert rewrites["text_encoder_2"]["int8 weight tensors"] > 0  # T5 too
    if mode == "int8":
        assert rewrites["transformer"]["int8 activation quantizers"] > 0
        assert "int8 activation quantizers" not in rewrites["vae_decoder"]  # weight-only
    assert manifest.precision == "int8"
    report = difflower.validate(out, flux_dirs["flux"], steps=3)
    assert report.passed, report


def test_flux_openvino_int4_weights_keep_the_transformer_within_its_gate(flux_dirs, tmp_path):
    """optimum-intel's default for Flux. The transformer alone: the tiny checkpoints' 32-wide text
    encoders miss the int8 gates in int4 (see the README), real ones are 768 and 4096 wide."""
    from difflower.driver import export

    manifest = export(flux_dirs["flux"], "openvino", tmp_path / "int4", components=["transformer"],
                      static=["1x64x64"], quantize="int4-weight", progress=False)  # fmt: skip
    compression = next(p for p in manifest.passes if p["name"] == "openvino_compression")
    assert compression["rewrites"]["int4 weight tensors"] > 0
    assert manifest.components["transformer"].parity.passed


def test_flux_static_onnx_int8_quantizes_the_projections(flux_dirs, tmp_path):
    """onnxslim folds each projection's MatMul + Add into a Gemm in a static graph; static QDQ
    quantizes those too (Flux's static transformer has no other weighted MatMul) and validates."""
    import difflower
    from difflower.driver import export

    out = tmp_path / "int8"
    manifest = export(flux_dirs["flux"], "onnx", out, static=["1x64x64"], quantize="int8", calibration_prompts=2,
                      calibration_steps=3, progress=False)  # fmt: skip
    record = next(p for p in manifest.passes if p["name"] == "onnx_quantize" and p["component"] == "transformer")
    assert record["rewrites"]["Gemm (QDQ)"] > 0
    assert "activation x activation MatMul (attention)" in record["settings"]["excluded"]["why"]
    report = difflower.validate(out, flux_dirs["flux"], steps=3)
    assert report.passed, report


# -- --stream-weights: the transformer traced without its weights, written from the checkpoint


def _transformer_case(root, batch: int, height: int, width: int, seed: int):
    """The transformer's export spec and seeded inputs for an image of height x width."""
    from difflower.artifact.manifest import Bucket
    from difflower.artifact.specs import ShapePlan, component_specs, example_inputs
    from difflower.reference.loading import read_model_index
    from difflower.reference.spec import spec_from_configs

    index = read_model_index(root)
    spec = next(s for s in component_specs(index) if s.name == "transformer")
    plan = ShapePlan((), cfg=False, t5_sequence_length=512)
    dims = plan.dims(Bucket(batch, height, width), spec_from_configs(index).vae_scale_factor)
    return spec, example_inputs(spec, dims, seed=seed)


def test_streamed_forward_holds_one_layer_at_a_time(flux_dirs):
    """The forward that gives a streamed export its reference outputs equals the loaded model's,
    and when a module with weights starts, the only weights in memory are its own and its
    ancestors' (the layer before it is dropped then, not when it returns)."""
    from difflower.artifact.specs import export_skeleton, load_export_module
    from difflower.reference.streaming import streamed_forward

    spec, inputs = _transformer_case(flux_dirs["flux"], 1, 48, 64, seed=3)
    with torch.no_grad():
        expected = load_export_module(spec, flux_dirs["flux"])(*inputs.values())
    sk = export_skeleton(spec, flux_dirs["flux"])
    names = {module: name for name, module in sk.module.named_modules()}
    resident: list[set[str]] = []

    def check(module, _args):
        here = names[module]
        loaded = {n.rsplit(".", 1)[0] for n, p in sk.module.named_parameters() if not p.is_meta}
        resident.append(loaded)
        assert all(here == owner or here.startswith(owner + ".") for owner in loaded), (here, loaded)

    owners = [m for m in sk.module.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(check) for m in owners]
    with streamed_forward(sk) as module, torch.no_grad():
        streamed = module(*inputs.values())
    for handle in handles:
        handle.remove()
    assert torch.equal(streamed[0], expected[0])
    assert max(len(r) for r in resident) == 1  # Flux's weights all sit in leaves: one at a time
    assert all(p.is_meta for p in sk.module.parameters())  # nothing kept once the context closes


def test_streamed_onnx_export_matches_the_reference_at_every_size(flux_dirs, tmp_path):
    import onnxruntime

    import difflower
    from difflower.artifact.specs import load_export_module
    from difflower.driver import export

    out = tmp_path / "streamed"
    manifest = export(flux_dirs["flux"], "onnx", out, static=["1x64x64", "1x32x48"], stream_weights=True,
                      progress=False)  # fmt: skip
    record = manifest.components["transformer"]
    assert record.config["streamed_weights"] and record.parity.passed
    assert "transformer/model.onnx_data" in record.files
    streamed = next(p for p in manifest.passes if p["name"] == "streamed_weights")
    spec, _ = _transformer_case(flux_dirs["flux"], 1, 64, 64, seed=0)
    module = load_export_module(spec, flux_dirs["flux"])
    assert streamed["rewrites"]["weights streamed"] == len(list(module.parameters()))
    session = onnxruntime.InferenceSession(str(out / "transformer" / "model.onnx"))
    for batch, height, width in ((1, 32, 48), (2, 48, 16)):  # neither is the traced 64x64
        _, inputs = _transformer_case(flux_dirs["flux"], batch, height, width, seed=5)
        with torch.no_grad():
            expected = module(*inputs.values())[0].numpy()
        (actual,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert np.abs(actual - expected).max() <= 1e-4, (batch, height, width)
    report = difflower.validate(out, flux_dirs["flux"], steps=2)
    assert report.passed, report


def test_streamed_fp16_export_keeps_the_overflowing_feed_forward_in_fp32(flux_dirs, tmp_path):
    """As the converter's islands do, fp16 decided per module before tracing keeps the planted
    overflow's projection in fp32, and writes that weight (past fp16's range) as fp32."""
    import onnx

    from difflower.driver import export
    from difflower.graph_passes.fp16 import FP16_MAX

    root = _hot_checkpoint(flux_dirs["flux"], tmp_path / "hot")
    out = tmp_path / "fp16"
    manifest = export(root, "onnx", out, components=["transformer"], static=["1x64x64"], precision="fp16",
                      stream_weights=True, progress=False)  # fmt: skip
    fp16 = next(p for p in manifest.passes if p["name"] == "fp16")
    islands = {i["module"] for i in fp16["settings"]["islands"]}
    assert any(HOT_LAYER in name for name in islands), sorted(islands)
    assert manifest.components["transformer"].parity.passed
    graph = onnx.load(str(out / "transformer" / "model.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    hot = weights[f"transformer.{HOT_LAYER}0.proj.weight"]
    assert hot.data_type == onnx.TensorProto.FLOAT
    assert np.abs(onnx.numpy_helper.to_array(hot)).max() > FP16_MAX
    kinds = {t.data_type for name, t in weights.items() if name.startswith("transformer.")}
    assert onnx.TensorProto.FLOAT16 in kinds  # the rest is fp16


@pytest.mark.parametrize("quantize", ["int8-weight", pytest.param("int4-weight", marks=pytest.mark.slow)])
def test_streamed_openvino_export_compresses_and_validates(flux_dirs, tmp_path, quantize):
    """OpenVINO reads the streamed graph (weights in fp16 behind casts) and nncf compresses it,
    within the gate of the mode; the intermediate ONNX files are gone from the artifact."""
    from difflower.driver import export

    out = tmp_path / "ov"
    manifest = export(flux_dirs["flux"], "openvino", out, components=["transformer"], stream_weights=True,
                      quantize=quantize, progress=False)  # fmt: skip
    record = manifest.components["transformer"]
    assert record.config["streamed_weights"] and record.parity.passed, record.parity
    streamed = next(p for p in manifest.passes if p["name"] == "streamed_weights")
    assert streamed["rewrites"]["weights stored fp16 for fp32"] > 0
    compression = next(p for p in manifest.passes if p["name"] == "openvino_compression")
    assert sum(compression["rewrites"].values()) > 0, compression
    assert sorted(p.name for p in (out / "transformer").iterdir()) == [
        "config.json", "openvino_model.bin", "openvino_model.xml"
    ]  # fmt: skip


def test_stream_weights_refuses_what_it_cannot_do(flux_dirs, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    from difflower.reference.loading import read_safetensors, weight_files

    base = ["export", str(flux_dirs["flux"]), "--stream-weights", "--out"]
    cases = [
        (
            ["--backend", "torchscript"],
            "--stream-weights: torchscript cannot write streamed weights yet; use onnx or openvino",
        ),
        (["--backend", "openvino", "--quantize", "int8"], "is not combined with --quantize int8; use int8-weight"),
        (["--backend", "onnx", "--quantize", "int8"], "is not combined with --quantize on onnx"),
        (["--backend", "onnx", "--fuse-qkv"], "--stream-weights: is not combined with --fuse-qkv yet"),
        (["--backend", "onnx", "--components", "vae_decoder"], "no component exported here has one"),
    ]
    for flags, message in cases:
        out = tmp_path / "art"
        assert main([*base, str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    broken = tmp_path / "broken"
    shutil.copytree(flux_dirs["flux"], broken)
    path = weight_files(broken / "transformer")[0]
    state = read_safetensors(path)
    state["proj_out.weight"] = state["proj_out.weight"][:, :-1].contiguous()
    save_file(state, str(path))
    out = tmp_path / "art"
    assert main(["export", str(broken), "--stream-weights", "--backend", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "tensor 'proj_out.weight' has shape" in err and "Traceback" not in err, err
    assert not out.exists()
