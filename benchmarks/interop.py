"""Can the peers load and run what difflower exports? Tiny SD checkpoint by default.

    python benchmarks/interop.py                       # tiny checkpoint (about two minutes)
    python benchmarks/interop.py --checkpoint DIR      # any SD1.x diffusers folder (real size: long)

Run it with difflower's python (.venv/bin/python); the peers run in their own venvs
(benchmarks/peers.py lists the install commands), each through benchmarks/peers_worker.py.

1. `difflower export CKPT --backend openvino --out ART_OV` and `--backend onnx --out ART_ONNX`
   (dynamic shapes, every component), and difflower's own txt2img on each artifact (prompt,
   seed, steps, native size): the reference images.
2. Each peer loads the artifact as it is and runs the same txt2img with the same initial latents
   (torch.randn on a CPU generator seeded with the seed, as difflower and diffusers draw them;
   `latents=` for the diffusers-style pipelines, `openvino_genai.TorchGenerator(seed)` for GenAI,
   which draws the same numbers):
     optimum-intel  OVStableDiffusionPipeline.from_pretrained(ART_OV)
     OpenVINO GenAI Text2ImagePipeline(ART_OV) (compiled for "CPU")
     optimum-onnx   ORTStableDiffusionPipeline.from_pretrained(ART_ONNX)
   recording whether it loads (the exact error when not) and its image PSNR against difflower's.
3. Where a peer fails, hand-patched COPIES of the artifact add one fix at a time (the folder
   difflower would have to write), re-running the peer after each, until it runs:
     configs        <component>/config.json: the checkpoint's unet/config.json,
                    text_encoder/config.json, and vae/config.json for vae_decoder and vae_encoder
     genai_tokenizer tokenizer/openvino_tokenizer.xml/.bin + openvino_detokenizer.xml/.bin
                    (openvino_tokenizers.convert_tokenizer of the CLIP tokenizer)
     timestep_i64   unet/openvino_model.xml: the `timestep` input declared i64 (a Convert to f32
                    inside), as optimum-intel's own UNet IR takes it and GenAI feeds it

Writes <work>/interop.json (or --json PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import CACHE, Worker, log, machine, native_size, one_shot, psnr, tail, venv_python  # noqa: E402

from difflower.validate.bench import timed  # noqa: E402

PATCHES = {
    "configs": "write <component>/config.json beside each IR/ONNX model: unet/config.json and "
    "text_encoder/config.json copied from the checkpoint, vae_decoder/config.json and vae_encoder/config.json "
    "= the checkpoint's vae/config.json (optimum reads each model part's config with ConfigMixin; GenAI "
    "reads text_encoder/config.json, unet/config.json and vae_decoder/config.json)",
    "genai_tokenizer": "write tokenizer/openvino_tokenizer.xml/.bin and tokenizer/openvino_detokenizer.xml/.bin "
    "(openvino_tokenizers.convert_tokenizer(CLIPTokenizer, with_detokenizer=True); the openvino-tokenizers "
    "package of the same release as openvino); GenAI tokenizes in OpenVINO, not with transformers",
    "timestep_i64": "declare the UNet IR's `timestep` input as i64 (PrePostProcessor: "
    "input('timestep').tensor().set_element_type(i64), a Convert to f32 inside the graph); GenAI's UNet "
    "wrapper sets an i64 tensor (optimum-intel's own export takes i64 too) and OpenVINO refuses the type "
    "mismatch; difflower's engine would then have to feed i64 (fractional timesteps of Karras-sigma "
    "schedulers would be truncated, as in optimum-intel/GenAI)",
}

CASES = [
    {
        "name": "optimum_intel_on_difflower_openvino",
        "venv": "optimum-intel",
        "kind": "optimum_intel",
        "artifact": "openvino",
        "ladder": [[], ["configs"]],
    },
    {
        "name": "genai_on_difflower_openvino",
        "venv": "optimum-intel",
        "kind": "genai",
        "artifact": "openvino",
        "ladder": [[], ["configs"], ["configs", "genai_tokenizer"], ["configs", "genai_tokenizer", "timestep_i64"]],
    },
    {
        "name": "optimum_ort_on_difflower_onnx",
        "venv": "optimum-onnx",
        "kind": "optimum_ort",
        "artifact": "onnx",
        "ladder": [[], ["configs"]],
    },
]


def headline(error: str) -> str:
    """`Type: ... last line`: OpenVINO's C++ errors put the file/check first and the reason last."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) <= 1:
        return error[:200]
    return f"{lines[0].split(':', 1)[0]}: ... {lines[-1]}"[:200]


def export(checkpoint: Path, backend: str, out: Path, logdir: Path) -> dict:
    entry: dict[str, Any] = {
        "folder": str(out),
        "command": f"difflower export {checkpoint} --backend {backend} --out {out}",
    }
    if not (out / "difflower.json").is_file():
        logfile = logdir / f"export-{backend}.log"
        cli = str(Path(sys.executable).with_name("difflower"))
        command = [cli, "export", str(checkpoint), "--backend", backend, "--out", str(out), "--overwrite"]
        codes: list[int] = []
        with logfile.open("a") as f:
            seconds = timed(lambda: codes.append(subprocess.call(command, stdout=f, stderr=subprocess.STDOUT)))
        entry["seconds"] = round(seconds, 1)
        rc = codes[0]
        if rc != 0:
            entry["error"] = f"exit {rc}: {tail(logfile, 5)}"
    return entry


def apply_patch(patch: str, folder: Path, checkpoint: Path, logdir: Path) -> dict:
    if patch == "configs":
        written = []
        for component, source in (
            ("unet", "unet"),
            ("text_encoder", "text_encoder"),
            ("text_encoder_2", "text_encoder_2"),
            ("vae_decoder", "vae"),
            ("vae_encoder", "vae"),
        ):
            if (folder / component).is_dir() and (checkpoint / source / "config.json").is_file():
                shutil.copyfile(checkpoint / source / "config.json", folder / component / "config.json")
                written.append(f"{component}/config.json")
        return {"ok": True, "written": written}
    if patch == "genai_tokenizer":
        return one_shot(
            venv_python("optimum-intel"),
            {"cmd": "genai_tokenizer", "folder": str(folder / "tokenizer")},
            logdir / "patch.log",
        )
    if patch == "timestep_i64":
        return one_shot(
            venv_python("optimum-intel"),
            {"cmd": "timestep_i64", "xml": str(folder / "unet" / "openvino_model.xml")},
            logdir / "patch.log",
        )
    raise ValueError(patch)


def run_engine(name: str, venv: str, load: dict, e2e: dict, logdir: Path, save: Path) -> dict:
    python = venv_python(venv)
    if not python.is_file():
        return {"loads": False, "error": f"venv missing: {python}"}
    worker = Worker(name, python, logdir)
    try:
        reply = worker.call(cmd="load", **load)
        if not reply.get("ok"):
            return {"loads": False, "error": reply.get("error"), "traceback_tail": reply.get("traceback", "")[-1500:]}
        result: dict[str, Any] = {"loads": True, "load_s": round(reply["load_s"], 2)}
        reply = worker.call(cmd="e2e", save=str(save), **e2e)
        if not reply.get("ok"):
            result.update(runs=False, error=reply.get("error"), traceback_tail=reply.get("traceback", "")[-1500:])
            return result
        result.update(runs=True, seconds=round(reply["seconds"], 3), image=str(save.with_suffix(".png")))
        return result
    finally:
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a tiny SD checkpoint (difflower tiny)")
    parser.add_argument("--prompt", default="a red castle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--work", type=Path, default=CACHE / "interop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / "tiny-sd"
        if not (checkpoint / "model_index.json").is_file():
            subprocess.run(
                [str(Path(sys.executable).with_name("difflower")), "tiny", str(checkpoint), "--family", "sd"],
                check=True,
            )
    height, width, _, _ = native_size(checkpoint)
    e2e = {
        "prompt": args.prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "height": height,
        "width": width,
    }

    artifacts = {
        "openvino": export(checkpoint, "openvino", work / "difflower-openvino", work),
        "onnx": export(checkpoint, "onnx", work / "difflower-onnx", work),
    }
    references: dict[str, Any] = {}
    for backend, entry in artifacts.items():
        if "error" in entry:
            continue
        log(f"difflower generate on its {backend} artifact")
        references[backend] = run_engine(
            f"difflower-{backend}",
            "difflower",
            {"kind": "difflower", "folder": entry["folder"]},
            e2e,
            work,
            work / f"image-difflower-{backend}.npy",
        )

    results: dict[str, Any] = {}
    for case in CASES:
        name, backend = case["name"], case["artifact"]
        attempts = []
        ref = references.get(backend, {})
        for ladder in case["ladder"]:
            label = "+".join(ladder) or "as exported"
            if "error" in artifacts[backend]:
                attempts.append(
                    {"patches": ladder, "loads": False, "error": f"export failed: {artifacts[backend]['error']}"}
                )
                break
            folder = Path(artifacts[backend]["folder"])
            if ladder:
                copy = work / f"patched-{name}-{'+'.join(ladder)}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(folder, copy)
                patch_log = {}
                for patch in ladder:
                    reply = apply_patch(patch, copy, checkpoint, work)
                    patch_log[patch] = {k: v for k, v in reply.items() if k not in ("traceback",)}
                folder = copy
            log(f"{name}: {label}")
            load = {"kind": case["kind"], "folder": str(folder)}
            if case["kind"] in ("optimum_intel", "genai"):
                load["precision"] = "fp32"
            attempt = {"patches": ladder, "folder": str(folder)}
            if ladder:
                attempt["patch_results"] = patch_log
            attempt.update(run_engine(name, case["venv"], load, e2e, work, work / f"image-{name}-{label}.npy"))
            if attempt.get("runs") and ref.get("runs"):
                own = np.load(Path(attempt["image"]).with_suffix(".npy"))
                reference = np.load(Path(ref["image"]).with_suffix(".npy"))
                attempt["image_psnr_vs_difflower_db"] = round(psnr(own, reference, 1.0), 2)
                attempt["image_max_abs_vs_difflower"] = float(np.abs(own - reference).max())
                # GenAI returns uint8 images: compare in uint8 levels too (difflower's rounded)
                levels = np.abs(np.round(own * 255) - np.round(reference * 255))
                attempt["image_max_diff_uint8_levels"] = int(levels.max())
                attempt["image_pixels_differing_uint8"] = int((levels > 0).sum())
            attempts.append(attempt)
            if attempt.get("runs"):
                break
        results[name] = {
            "artifact": backend,
            "attempts": attempts,
            "needed": attempts[-1]["patches"] if attempts and attempts[-1].get("runs") else None,
        }

    versions = {
        v: one_shot(venv_python(v), {"cmd": "versions"}, work / "versions.log").get("versions")
        for v in ("difflower", "optimum-intel", "optimum-onnx")
        if venv_python(v).is_file()
    }
    report = {
        "checkpoint": str(checkpoint),
        "txt2img": e2e,
        "artifacts": artifacts,
        "difflower_reference_runs": references,
        "cases": results,
        "patches": PATCHES,
        "machine": machine(),
        "versions": versions,
    }
    out = args.json or work / "interop.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print(f"\n{'peer on difflower artifact':40} {'patches':40} {'loads':6} {'runs':5} {'PSNR vs difflower':18} error")
    for name, entry in results.items():
        for a in entry["attempts"]:
            err = headline(a.get("error") or "")
            db = a.get("image_psnr_vs_difflower_db")
            print(
                f"{name:40} {'+'.join(a['patches']) or 'as exported':40} {str(a.get('loads')):6} "
                f"{str(a.get('runs', '-')):5} {'-' if db is None else f'{db:.1f} dB':18} {err}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
