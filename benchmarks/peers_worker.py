"""One engine in its own process, driven over stdin/stdout by benchmarks/peers.py and interop.py.

Runs under whichever virtual environment's python the driver picks (difflower's .venv, or a
peer's venv under /work/peers), so it imports nothing at module level beyond the standard
library and numpy, and each engine kind imports only its own packages.

Two ways to run it:

    python peers_worker.py serve            # JSON lines: one request per line on stdin, one reply per line
    python peers_worker.py once '{"cmd": "prepare_oi", ...}'   # a single request, reply on stdout

Requests (every reply has "ok"; a failure has "error" = "Type: message" and "traceback"):

    {"cmd": "load", "kind": K, "folder": DIR, ...}   load an engine (kinds below); reply has load_s, rss
    {"cmd": "step", "inputs": NPZ, "save": NPY}      one CFG denoiser call on the inputs in NPZ; reply: seconds
    {"cmd": "e2e", "prompt": P, "seed": S, "steps": N, "guidance": G, "height": H, "width": W, "save": NPY}
                                                     txt2img; reply: seconds (image saved as float [0, 1] HxWx3)
    {"cmd": "versions"}                              library versions of this environment
    {"cmd": "quit"}

Engine kinds: diffusers_eager, difflower (checkpoint: eager reference; artifact: its engines),
optimum_intel (OVStableDiffusionPipeline on a saved IR folder, optional static reshape),
optimum_ort (ORTStableDiffusionPipeline on a saved ONNX folder), genai (OpenVINO GenAI's
Text2ImagePipeline). One-shot preparations: prepare_oi (optimum-intel export, optionally with
its hybrid int8 quantization calibrated on local prompts), prepare_ort (optimum ONNX export),
genai_tokenizer (openvino_tokenizer.xml / openvino_detokenizer.xml beside a tokenizer folder).

Nothing but the protocol goes to stdout: the real stdout is kept for the replies and fd 1 is
pointed at stderr, so library prints (Python or C++) land in the worker's log.

Timing: each request times its one call with time.perf_counter and replies its `seconds`; the
driver interleaves the workers and computes the statistics with difflower.validate.bench's
Timing.of. The stopwatch stays here because difflower (and so difflower.validate.bench) is not
installed in the peers' venvs, and timing inside the worker keeps the pipe out of the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

VERSION_PACKAGES = (
    "difflower",
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "optimum",
    "optimum-intel",
    "optimum-onnx",
    "openvino",
    "openvino-genai",
    "openvino-tokenizers",
    "nncf",
    "onnxruntime",
    "onnx",
    "numpy",
    "safetensors",
)


def rss() -> dict[str, float]:
    """Resident memory now and at its peak (GiB), from /proc/self/status."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = "rss_gib" if line.startswith("VmRSS") else "peak_rss_gib"
                out[key] = round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return out


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def image_to_float(image: Any) -> np.ndarray:
    """One image as float32 HxWx3 in [0, 1] (from a (1, H, W, 3) float or uint8 batch)."""
    array = np.asarray(image)
    if array.ndim == 4:
        array = array[0]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def save_image(path: str | None, image: np.ndarray) -> None:
    if not path:
        return
    np.save(path, image)
    try:
        from PIL import Image

        Image.fromarray((image * 255).round().astype(np.uint8)).save(Path(path).with_suffix(".png"))
    except ImportError:
        pass


def initial_noise(seed: int, shape: tuple[int, ...]):
    """The initial latents exactly as diffusers (and difflower) draw them: torch.randn on a CPU
    generator seeded with `seed`; the pipelines multiply by the scheduler's init_noise_sigma."""
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def pipeline_image(pipe, channels, prompt, seed, steps, guidance, height, width):
    """A diffusers-style pipeline's image (float, 0..1) from our seeded initial noise."""
    scale = pipe.vae_scale_factor
    latents = initial_noise(seed, (1, channels, height // scale, width // scale))
    out = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        latents=latents,
        output_type="np",
    )
    return image_to_float(out.images)


def ov_config(precision: str) -> dict[str, str]:
    """The OpenVINO compile settings difflower uses: latency hint; f32 inference precision for
    fp32 models (a CPU with bf16 units would otherwise run them in bf16)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def ir_weight_types(xml: Path) -> dict[str, float]:
    """MiB of constant data per element type in an OpenVINO IR (f32 / f16 / i8 / u8 ...)."""
    import openvino as ov

    sizes: dict[str, float] = {}
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant":
            out = op.output(0)
            shape = out.get_shape()
            count = int(np.prod([int(d) for d in shape])) if len(shape) else 1
            kind = out.get_element_type().get_type_name()
            sizes[kind] = sizes.get(kind, 0.0) + count * out.get_element_type().bitwidth / 8 / 2**20
    return {k: round(v, 1) for k, v in sorted(sizes.items())}


# -- engines ----------------------------------------------------------------------------------


class Engine:
    """A loaded pipeline: `step(inputs)` runs one denoiser call, `e2e(...)` one txt2img run."""

    def step(self, sample: np.ndarray, timestep: float, context: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no single-UNet-call entry point")

    def e2e(self, prompt: str, seed: int, steps: int, guidance: float, height: int, width: int) -> np.ndarray:
        raise NotImplementedError


class DiffusersEager(Engine):
    """diffusers' own StableDiffusionPipeline, fp32 on the CPU."""

    def __init__(self, folder: str, **_: Any):
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        self.pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            torch_dtype=torch.float32,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def step(self, sample, timestep, context):
        torch = self.torch
        with torch.inference_mode():
            t = torch.full((sample.shape[0],), float(timestep))
            out = self.pipe.unet(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context)).sample
        return out.numpy()

    def e2e(self, prompt, seed, steps, guidance, height, width):
        with self.torch.inference_mode():
            return pipeline_image(
                self.pipe, self.pipe.unet.config.in_channels, prompt, seed, steps, guidance, height, width
            )


class Difflower(Engine):
    """difflower.load: the eager reference for a checkpoint, the artifact's engines for an export."""

    def __init__(self, folder: str, engine_options: dict | None = None, **_: Any):
        import torch

        import difflower

        self.torch = torch
        self.pipe = difflower.load(folder, **(engine_options or {}))
        self.artifact = (Path(folder) / "difflower.json").is_file()

    def step(self, sample, timestep, context):
        torch = self.torch
        t = torch.full((sample.shape[0],), float(timestep))
        if self.artifact:
            out = self.pipe.unet({"sample": sample, "timestep": t.numpy(), "encoder_hidden_states": context})
            return np.asarray(out["out_sample"])
        with torch.inference_mode():
            return self.pipe.unet(torch.from_numpy(sample), t, torch.from_numpy(context)).sample.numpy()

    def e2e(self, prompt, seed, steps, guidance, height, width):
        torch = self.torch
        with torch.inference_mode():
            out = self.pipe(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
                progress=False,
            )
        return image_to_float(out.images)


class OptimumPipeline(Engine):
    """optimum's pipelines (OpenVINO and ONNX Runtime) share diffusers' call; their UNet config is a dict."""

    pipe: Any

    def e2e(self, prompt, seed, steps, guidance, height, width):
        channels = self.pipe.unet.config.get("in_channels", 4)  # optimum's config is a dict
        return pipeline_image(self.pipe, channels, prompt, seed, steps, guidance, height, width)


class OptimumIntel(OptimumPipeline):
    """optimum-intel's OVStableDiffusionPipeline on an IR folder (its own export, or another's)."""

    def __init__(self, folder: str, static: list[int] | None = None, precision: str = "fp32", **_: Any):
        import torch
        from optimum.intel import OVStableDiffusionPipeline

        self.torch = torch
        self.pipe = OVStableDiffusionPipeline.from_pretrained(
            folder, compile=False, ov_config=ov_config(precision), safety_checker=None
        )
        if static:
            batch, height, width = static
            # optimum-intel's documented static path: reshape, then compile
            self.pipe.reshape(batch_size=batch, height=height, width=width, num_images_per_prompt=1)
        self.pipe.compile()
        self.pipe.set_progress_bar_config(disable=True)

    def step(self, sample, timestep, context):
        port = self.pipe.unet.model.input("timestep")
        shape = port.get_partial_shape()
        dtype = port.get_element_type().to_dtype()
        if shape.rank.get_length() == 0:
            t = np.array(timestep, dtype=dtype)
        elif shape[0].is_static:
            t = np.full((shape[0].get_length(),), timestep, dtype=dtype)
        else:
            t = np.full((sample.shape[0],), timestep, dtype=dtype)
        out = self.pipe.unet(sample=sample, timestep=t, encoder_hidden_states=context)
        return np.asarray(out["out_sample"] if "out_sample" in out else next(iter(out.values())))


class OptimumORT(OptimumPipeline):
    """optimum's ORTStableDiffusionPipeline (optimum-onnx) on an ONNX folder, CPU provider."""

    def __init__(self, folder: str, **_: Any):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        self.torch = torch
        options = ort.SessionOptions()
        # as difflower's engine: workers do not busy-wait between calls (other engines share the cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=options, safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)

    def step(self, sample, timestep, context):
        torch = self.torch
        out = self.pipe.unet(
            sample=torch.from_numpy(sample),
            timestep=torch.tensor(float(timestep)),
            encoder_hidden_states=torch.from_numpy(context),
        )
        return np.asarray(out.out_sample if hasattr(out, "out_sample") else out[0])


class GenAI(Engine):
    """OpenVINO GenAI's Text2ImagePipeline (C++ loop); noise from its TorchGenerator, which draws
    torch.randn's numbers for a seed (checked equal), so the initial latents are difflower's."""

    def __init__(
        self, folder: str, static: list[int] | None = None, precision: str = "fp32", guidance: float = 7.5, **_: Any
    ):
        import openvino_genai

        self.genai = openvino_genai
        self.pipe = openvino_genai.Text2ImagePipeline(folder)
        if static:
            batch, height, width = static
            self.pipe.reshape(batch, height, width, guidance)
        self.pipe.compile("CPU", **ov_config(precision))

    def e2e(self, prompt, seed, steps, guidance, height, width):
        image = self.pipe.generate(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=self.genai.TorchGenerator(seed),
        )
        return image_to_float(image.data)


KINDS = {
    "diffusers_eager": DiffusersEager,
    "difflower": Difflower,
    "optimum_intel": OptimumIntel,
    "optimum_ort": OptimumORT,
    "genai": GenAI,
}


# -- one-shot preparations --------------------------------------------------------------------


def prepare_oi(source: str, out: str, int8: dict | None = None, **_: Any) -> dict:
    """optimum-intel export of a diffusers folder (export=True), saved with save_pretrained.

    int8: {"prompts": [...], "num_samples": N, "steps": S} applies optimum-intel's hybrid
    quantization (OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts)):
    the UNet's activations and weights quantized with nncf, calibrated on N UNet calls collected
    while the pipeline runs the prompts, int8 weights for the other models. optimum-intel runs
    its calibration pipeline with the pipeline's default 50 steps; `steps` makes it run S steps
    per prompt instead (difflower's --calibration-steps), by overriding __call__'s default.
    """
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    cls = OVStableDiffusionPipeline
    if int8:
        calibration_steps = int(int8.get("steps", 0)) or None

        class CalibratedSteps(OVStableDiffusionPipeline):
            def __call__(self, *args, **kw):
                if calibration_steps and "num_inference_steps" not in kw and len(args) < 3:
                    kw["num_inference_steps"] = calibration_steps
                return super().__call__(*args, **kw)

        cls = CalibratedSteps
        kwargs["quantization_config"] = OVWeightQuantizationConfig(
            bits=8, quant_method="hybrid", dataset=list(int8["prompts"]), num_samples=int(int8["num_samples"])
        )
    pipe = cls.from_pretrained(source, export=True, compile=False, safety_checker=None, **kwargs)
    pipe.save_pretrained(out)
    seconds = time.perf_counter() - start
    del pipe
    info = {"seconds": seconds, **rss()}
    unet_xml = Path(out) / "unet" / "openvino_model.xml"
    if unet_xml.is_file():
        info["unet_constants_mib"] = ir_weight_types(unet_xml)
    return info


def prepare_ort(source: str, out: str, **_: Any) -> dict:
    """optimum's ONNX export of a diffusers folder (ORTStableDiffusionPipeline export=True), saved."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    start = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(source, export=True, safety_checker=None)
    pipe.save_pretrained(out)
    return {"seconds": time.perf_counter() - start, **rss()}


def genai_tokenizer(folder: str, **_: Any) -> dict:
    """openvino_tokenizers' IR of a transformers tokenizer folder, as OpenVINO GenAI reads it."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(Path(folder) / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(Path(folder) / "openvino_detokenizer.xml"))
    return {"tokenizer_class": type(tokenizer).__name__}


def timestep_i64(xml: str, **_: Any) -> dict:
    """Declare an IR's `timestep` input as i64 (a Convert to its element type inside the graph),
    written in place: how optimum-intel's UNet IR takes it, and what OpenVINO GenAI feeds."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    path = Path(xml)
    model = ov.Core().read_model(str(path))
    before = model.input("timestep").get_element_type().get_type_name()
    ppp = PrePostProcessor(model)
    ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
    model = ppp.build()
    tmp = path.with_name(path.stem + ".patched.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    del model
    os.replace(tmp, path)
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
    return {"timestep": f"{before} -> i64"}


ONE_SHOT = {
    "prepare_oi": prepare_oi,
    "prepare_ort": prepare_ort,
    "genai_tokenizer": genai_tokenizer,
    "timestep_i64": timestep_i64,
}


# -- the loop ---------------------------------------------------------------------------------


class Worker:
    def __init__(self) -> None:
        self.engine: Engine | None = None

    def handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "versions":
            return {"versions": versions()}
        if cmd in ONE_SHOT:
            args = {k: v for k, v in request.items() if k != "cmd"}
            return ONE_SHOT[cmd](**args)
        if cmd == "load":
            start = time.perf_counter()
            options = {k: v for k, v in request.items() if k not in ("cmd", "kind")}
            self.engine = KINDS[request["kind"]](**options)
            return {"load_s": time.perf_counter() - start, **rss()}
        if self.engine is None:
            raise RuntimeError("no engine loaded")
        if cmd == "step":
            data = np.load(request["inputs"])
            sample, context = data["sample"], data["encoder_hidden_states"]
            timestep = float(data["timestep"])
            start = time.perf_counter()
            out = self.engine.step(sample, timestep, context)
            seconds = time.perf_counter() - start
            if request.get("save"):
                np.save(request["save"], np.asarray(out, dtype=np.float32))
            return {"seconds": seconds, **rss()}
        if cmd == "e2e":
            start = time.perf_counter()
            image = self.engine.e2e(
                request["prompt"],
                int(request["seed"]),
                int(request["steps"]),
                float(request["guidance"]),
                int(request["height"]),
                int(request["width"]),
            )
            seconds = time.perf_counter() - start
            save_image(request.get("save"), image)
            return {"seconds": seconds, "shape": list(image.shape), **rss()}
        raise ValueError(f"unknown command {cmd!r}")

    def reply(self, request: dict) -> dict:
        try:
            return {"ok": True, **self.handle(request)}
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the driver
            if isinstance(err, KeyboardInterrupt):
                raise
            message = str(err).strip()
            return {
                "ok": False,
                "error": f"{type(err).__name__}: {message}",
                "traceback": traceback.format_exc()[-4000:],
            }


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker()
    if len(sys.argv) >= 3 and sys.argv[1] == "once":
        protocol.write(json.dumps(worker.reply(json.loads(sys.argv[2])), default=str) + "\n")
        return
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            protocol.write(json.dumps({"ok": True}) + "\n")
            break
        print(f"[worker] {json.dumps(request)[:300]}", file=sys.stderr, flush=True)
        protocol.write(json.dumps(worker.reply(request), default=str) + "\n")


if __name__ == "__main__":
    main()
