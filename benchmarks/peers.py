"""difflower side by side with its peers on the same SD1.5 weights, each peer in its own venv.

    .venv/bin/python benchmarks/peers.py --tiny --genai   # the plumbing on a tiny checkpoint (~5 min, ~2 cached)
    .venv/bin/python benchmarks/peers.py                  # real-size SD1.5 config, random weights, 512x512
    .venv/bin/python benchmarks/peers.py --genai          # + OpenVINO GenAI's Text2ImagePipeline (one more phase)

Run it with difflower's python on a quiet machine. The peers cannot install beside difflower's
pinned versions, so they live in their own virtual environments (default /work/peers, or
--peers-dir / $DIFFLOWER_PEERS_DIR); INSTALL below holds the commands that worked:

    PEERS/optimum-intel   optimum-intel[openvino] 2.2.0, openvino / openvino-genai / openvino-tokenizers
                          2026.4.1, nncf 3.4.0, diffusers 0.39.0, transformers 5.5.4, torch 2.13.0+cpu
    PEERS/optimum-onnx    optimum-onnx[onnxruntime] 0.1.0, onnxruntime 1.32.0, transformers 4.57.6,
                          diffusers 0.39.0, torch 2.13.0+cpu

Diffusers eager runs in difflower's own venv (diffusers 0.42.1, transformers 5.24).

What it does:

1. Writes the checkpoint once (real: benchmarks/real_configs.py's SD1.5 with random weights in
   $DIFFLOWER_BENCH_DIR/sd15-random, the cache the other benchmarks use; --tiny: `difflower
   tiny`), then a "portable" copy of it (hard links) whose text encoder weights carry the
   `text_model.` key prefix of the published checkpoints: transformers 5.24 saves CLIPTextModel
   without it, and transformers 4.57 / 5.5.4 (the peers' venvs) silently initialise a random
   text encoder from such a file. Every engine, difflower's included, reads the portable copy.
2. Exports it with difflower (cached): onnx (dynamic), openvino static 1xHxW, openvino static
   --quantize int8 (--calibration-prompts 2 --calibration-steps 4, --allow-mismatch: the
   manifest's parity is recorded either way); components text_encoder, unet, vae_decoder.
3. Prepares the peers on the same folder, each with its own venv's python running
   benchmarks/peers_worker.py (cached): optimum-intel export (fp32) and optimum-intel hybrid int8
   (OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=<the first 2 prompts of
   graph_passes/calibration_prompts.txt>, num_samples=10), calibrated on the same 10 UNet calls
   of 2 prompts x 4 PNDM steps that difflower calibrates on, no dataset download);
   optimum's ONNX export (ORTStableDiffusionPipeline export=True); for --genai, openvino_tokenizers'
   tokenizer IR beside optimum-intel's exports (OpenVINO GenAI runs those folders).
4. Runs PHASES (or --phase lists), each engine a long-lived worker process answering JSON lines,
   at most three fp32 real-size engines per phase (24 GiB), diffusers eager in every phase as
   the baseline of that phase's ratios:
     (a) one CFG UNet step (batch 2, 4 x H/8 x W/8 latents, 77 x 768 text states, t=500), the
         engines interleaved (A B C A B C ...), --warmup calls first, median of --step-runs;
     (b) txt2img, --steps steps (the checkpoint's PNDM, guidance 7.5), one prompt and seed, the
         same initial latents everywhere (torch.randn on a seeded CPU generator, as diffusers and
         difflower draw them: `latents=` for the diffusers-style pipelines, GenAI's TorchGenerator,
         which draws the same numbers), a 2-step warm-up run, interleaved, median of --e2e-runs.
   OpenVINO engines (difflower's, optimum-intel's, GenAI's) compile with difflower's settings:
   PERFORMANCE_HINT=LATENCY, and INFERENCE_PRECISION_HINT=f32 for fp32 models (a CPU with bf16
   or AMX units would otherwise run them in bf16). optimum's ORT sessions get difflower's
   no-spinning thread setting. Ratios vs difflower eager are within the phase where it ran,
   else chained through diffusers eager (x / eager_phase * eager_P0 / difflower_eager_P0), marked x*.
   Each run is timed inside its worker (the `seconds` of the reply, so the pipe is not counted);
   the driver computes the median and spread with difflower.validate.bench's Timing.of.
5. Reports each engine's image PSNR against diffusers eager's, each int8 path's image PSNR
   against its own fp32 path, the UNet step's parity against diffusers eager, load time and
   memory (each worker's peak RSS, the machine's lowest MemAvailable per phase), machine facts
   and every venv's versions; a peer that cannot run is listed with its exact error. JSON:
   benchmarks/results/peers-sd15.json (real), <work>/peers-tiny.json (--tiny), or --json PATH.
   GenAI returns uint8 images (it truncates), so its PSNR against a float image tops out near
   50-60 dB; the JSON also gives the largest difference in uint8 levels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from difflower.validate.bench import Timing, machine_info, timed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "peers_worker.py"
CACHE = Path(os.environ.get("DIFFLOWER_BENCH_DIR", "/tmp/difflower-bench"))
PEERS = Path(os.environ.get("DIFFLOWER_PEERS_DIR", "/work/peers"))  # --peers-dir sets it too
PROMPT = "a watercolor painting of a lighthouse at sunset"

INSTALL = {
    "optimum-intel": [
        "python3.11 -m venv PEERS/optimum-intel",
        "echo torch==2.13.0 > PEERS/c.txt   # a bare torch would pull a CUDA build",
        "PEERS/optimum-intel/bin/pip install -c PEERS/c.txt 'optimum-intel[openvino]==2.2.0' diffusers "
        "openvino==2026.4.1 openvino-genai==2026.4.1.0 openvino-tokenizers nncf",
        "PEERS/optimum-intel/bin/pip uninstall -y torchvision   # PyPI torchvision 0.28.0 fails to import beside "
        "torch 2.13.0+cpu (RuntimeError: operator torchvision::nms does not exist), which breaks "
        "`from optimum.intel import OVStableDiffusionPipeline`",
    ],
    "optimum-onnx": [
        "python3.11 -m venv PEERS/optimum-onnx",
        "PEERS/optimum-onnx/bin/pip install -c PEERS/c.txt 'optimum-onnx[onnxruntime]==0.1.0' diffusers",
    ],
}

# engine -> (venv key, int8 partner measured against, label)
ENGINES: dict[str, dict[str, Any]] = {
    "diffusers_eager": {"venv": "difflower", "label": "diffusers eager (fp32, torch)"},
    "difflower_eager": {"venv": "difflower", "label": "difflower eager (fp32, torch)"},
    "optimum_ort": {"venv": "optimum-onnx", "label": "optimum ORTStableDiffusionPipeline (fp32)"},
    "difflower_onnxruntime": {"venv": "difflower", "label": "difflower onnxruntime (fp32, dynamic)"},
    "difflower_openvino_static": {"venv": "difflower", "label": "difflower OpenVINO static (fp32)"},
    "optimum_intel_fp32_static": {"venv": "optimum-intel", "label": "optimum-intel OV static (fp32)"},
    "optimum_intel_int8_static": {
        "venv": "optimum-intel",
        "label": "optimum-intel OV static hybrid int8",
        "fp32": "optimum_intel_fp32_static",
    },
    "difflower_openvino_static_int8": {
        "venv": "difflower",
        "label": "difflower OpenVINO static int8 (hybrid)",
        "fp32": "difflower_openvino_static",
    },
    "genai_fp32_static": {"venv": "optimum-intel", "label": "OpenVINO GenAI Text2Image static (fp32)"},
    "genai_int8_static": {
        "venv": "optimum-intel",
        "label": "OpenVINO GenAI Text2Image static int8",
        "fp32": "genai_fp32_static",
    },
}

# At most three fp32 real-size engines per phase (int8 ones are a quarter of the size).
PHASES = [
    ["diffusers_eager", "difflower_eager", "optimum_ort"],
    ["diffusers_eager", "difflower_openvino_static", "optimum_intel_fp32_static"],
    ["diffusers_eager", "difflower_onnxruntime", "optimum_intel_int8_static", "difflower_openvino_static_int8"],
]
GENAI_PHASE = ["diffusers_eager", "genai_fp32_static", "genai_int8_static"]


# -- helpers ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def venv_python(key: str) -> Path:
    if key == "difflower":
        return Path(sys.executable)
    return PEERS / key / "bin" / "python"


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OPENVINO_TELEMETRY_ENABLED="0",
        DO_NOT_TRACK="1",
    )
    return env


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class MemoryWatch:
    """The machine's lowest MemAvailable while it runs (sampled every 0.5 s)."""

    def __enter__(self) -> MemoryWatch:
        self.lowest = mem_available_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.lowest = min(self.lowest, mem_available_gib())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# The instruction sets earlier peers reports listed under "flags" (all among machine_info's cpu_flags).
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo: the cores without SMT siblings."""
    try:
        chunks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return None
    blocks = (dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in c.splitlines())) for c in chunks)
    return len({(block.get("physical id"), block.get("core id")) for block in blocks}) or None


def machine() -> dict[str, Any]:
    """The driver's machine: difflower.validate.bench's machine_info(), plus the keys earlier peers
    reports had (cpu_model, flags as {flag: present}, physical_cores)."""
    info = machine_info()
    info["cpu_model"] = info.get("cpu")
    info["flags"] = {flag: flag in info.get("cpu_flags", []) for flag in REPORTED_FLAGS}
    info["physical_cores"] = physical_cores()
    return info


def psnr(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    peak = data_range if data_range is not None else float(max(np.abs(b).max(), 1e-12))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def run_logged(cmd: list[str], logfile: Path) -> tuple[int, float]:
    """Run `cmd` with its output appended to `logfile`: its exit code and seconds."""
    codes: list[int] = []
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        seconds = timed(
            lambda: codes.append(subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env()))
        )
    return codes[0], seconds


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Worker:
    """One engine's long-lived process (benchmarks/peers_worker.py under a venv's python)."""

    def __init__(self, name: str, python: Path, logdir: Path):
        self.name = name
        self.logfile = logdir / f"worker-{name}.log"
        self.log = self.logfile.open("a")
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=worker_env(),
            cwd=str(logdir),
        )

    def call(self, **request: Any) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            rc = self.proc.wait()
            why = " (killed: likely out of memory)" if rc in (-9, 137) else ""
            return {"ok": False, "error": f"WorkerDied: exit code {rc}{why}; log tail:\n{tail(self.logfile)}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def one_shot(python: Path, request: dict, logfile: Path) -> dict:
    """A single worker request in a fresh process (exports: their memory goes with the process)."""
    with logfile.open("a") as log_out:
        log_out.write(f"\n$ {python} {WORKER.name} once {json.dumps(request)}\n")
        log_out.flush()
        proc = subprocess.run(
            [str(python), str(WORKER), "once", json.dumps(request)],
            stdout=subprocess.PIPE,
            stderr=log_out,
            text=True,
            env=worker_env(),
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"ok": False, "error": f"WorkerDied: exit code {proc.returncode}; log tail:\n{tail(logfile)}"}
    return json.loads(lines[-1])


def short_error(reply: dict) -> str:
    return str(reply.get("error", "unknown error"))[:2000]


# -- stages -----------------------------------------------------------------------------------


def make_checkpoint(tiny: bool, work: Path) -> Path:
    if tiny:
        path = work / "tiny-sd"
        if not (path / "model_index.json").is_file():
            subprocess.run(
                [str(Path(sys.executable).with_name("difflower")), "tiny", str(path), "--family", "sd"], check=True
            )
        return path
    sys.path.insert(0, str(HERE))
    from real_configs import real_spec

    from difflower.reference.tiny import make_tiny_checkpoint

    path = CACHE / "sd15-random"  # the same cache as benchmarks/onnx_unet.py's checkpoint("sd15")
    if not (path / "model_index.json").is_file():
        log(f"writing a random-weight SD1.5 checkpoint to {path} ...")
        make_tiny_checkpoint(path, spec=real_spec("sd15"), seed=0, overwrite=True)
    return path


def portable_checkpoint(source: Path, out: Path) -> Path:
    """The same checkpoint with its CLIP text encoder's weights under the `text_model.` keys of the
    published SD checkpoints, so every transformers version reads the same weights.

    transformers 5.24 (difflower's) saves CLIPTextModel without the `text_model.` prefix;
    transformers 4.57 (optimum-onnx) and 5.5.4 (optimum-intel) do not map those keys back and
    silently initialise a random text encoder ("newly initialized" warning), so the peers would
    run other weights. The prefixed layout loads identically in all three (checked). Other files
    are hard links (copies across file systems).
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "model_index.json").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        target = partial / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        parts = path.relative_to(source).parts
        if parts[0].startswith("text_encoder") and path.name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                state = {key: f.get_tensor(key) for key in f.keys()}
                metadata = f.metadata() or {"format": "pt"}
            rename = {k: k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k for k in state}
            save_file({rename[k]: v for k, v in state.items()}, str(target), metadata=metadata)
        elif parts[0].startswith("text_encoder") and path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            index["weight_map"] = {
                (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                for k, v in index["weight_map"].items()
            }
            target.write_text(json.dumps(index, indent=2) + "\n")
        else:
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    partial.rename(out)
    return out


def native_size(checkpoint: Path) -> tuple[int, int, int, int]:
    """(height, width, latent channels, text width) of the checkpoint at its native size."""
    unet = json.loads((checkpoint / "unet" / "config.json").read_text())
    vae = json.loads((checkpoint / "vae" / "config.json").read_text())
    size = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    return size, size, int(unet["in_channels"]), int(unet["cross_attention_dim"])


def calibration_prompts(count: int) -> list[str]:
    lines = (REPO / "graph_passes" / "calibration_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")][:count]


def difflower_exports(
    checkpoint: Path, out_root: Path, size: str, args: argparse.Namespace, wanted: list[str]
) -> dict[str, dict]:
    """difflower's artifacts (CLI, one process each, cached): name -> {folder, seconds, parity...}."""
    from difflower.artifact.manifest import Manifest

    base = ["--components", "text_encoder", "unet", "vae_decoder"]
    plans = {
        "difflower_onnxruntime": ["--backend", "onnx", *base],
        "difflower_openvino_static": ["--backend", "openvino", "--static", size, *base],
        "difflower_openvino_static_int8": [
            "--backend",
            "openvino",
            "--static",
            size,
            "--quantize",
            "int8",
            "--calibration-prompts",
            str(args.calibration_prompts),
            "--calibration-steps",
            str(args.calibration_steps),
            "--allow-mismatch",
            *base,
        ],
    }
    cli = str(Path(sys.executable).with_name("difflower"))
    results = {}
    for name, flags in plans.items():
        if name not in wanted:
            continue
        folder = out_root / name
        entry: dict[str, Any] = {"folder": str(folder), "command": f"difflower export {checkpoint} {' '.join(flags)}"}
        if not (folder / "difflower.json").is_file():
            log(f"exporting {name} ...")
            rc, seconds = run_logged(
                [cli, "export", str(checkpoint), "--out", str(folder), "--overwrite", *flags],
                out_root / f"export-{name}.log",
            )
            entry["seconds"] = round(seconds, 1)
            if rc != 0:
                entry["error"] = f"difflower export exited {rc}: {tail(out_root / f'export-{name}.log', 5)}"
                results[name] = entry
                continue
        manifest = Manifest.read(folder)
        entry["precision"] = manifest.precision
        entry["components"] = {
            comp: {
                "parity": rec.parity.summary,
                "passed": rec.parity.passed,
                "export_seconds": rec.export_seconds,
                "size_mib": round(rec.size_bytes / 2**20, 1),
            }
            for comp, rec in manifest.components.items()
        }
        results[name] = entry
    return results


# the peer preparation each peer engine runs on
PREPARED_BY = {
    "optimum_intel_fp32_static": "optimum_intel_fp32",
    "genai_fp32_static": "optimum_intel_fp32",
    "optimum_intel_int8_static": "optimum_intel_int8",
    "genai_int8_static": "optimum_intel_int8",
    "optimum_ort": "optimum_ort",
}


def peer_preparations(checkpoint: Path, out_root: Path, args: argparse.Namespace, wanted: list[str]) -> dict[str, dict]:
    """The peers' own exports of the same checkpoint (one process each, cached by a marker file)."""
    prompts = calibration_prompts(args.calibration_prompts)
    # PNDM (skip_prk_steps) calls the UNet steps + 1 times per prompt
    samples = args.calibration_prompts * (args.calibration_steps + 1)
    plans = {
        "optimum_intel_fp32": ("optimum-intel", {"cmd": "prepare_oi", "source": str(checkpoint)}),
        "optimum_intel_int8": (
            "optimum-intel",
            {
                "cmd": "prepare_oi",
                "source": str(checkpoint),
                "int8": {"prompts": prompts, "num_samples": samples, "steps": args.calibration_steps},
            },
        ),
        "optimum_ort": ("optimum-onnx", {"cmd": "prepare_ort", "source": str(checkpoint)}),
    }
    results: dict[str, dict] = {}
    needed = {PREPARED_BY[n] for n in wanted if n in PREPARED_BY}
    genai = {PREPARED_BY[n] for n in wanted if n.startswith("genai")}
    for name, (venv, request) in plans.items():
        if name not in needed:
            continue
        folder = out_root / name
        marker = folder / "peers-prepare.json"
        python = venv_python(venv)
        entry: dict[str, Any] = {"folder": str(folder), "venv": venv, "request": request}
        if not python.is_file():
            entry["error"] = f"venv missing: {python} (see INSTALL in benchmarks/peers.py)"
        elif marker.is_file():
            entry.update(json.loads(marker.read_text()))
        else:
            log(f"preparing {name} in {venv} ...")
            reply = one_shot(python, {**request, "out": str(folder)}, out_root / f"prepare-{name}.log")
            if reply.get("ok"):
                entry.update({k: v for k, v in reply.items() if k != "ok"})
                marker.write_text(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2))
            else:
                entry["error"] = short_error(reply)
        results[name] = entry
    for name in sorted(genai):  # OpenVINO GenAI runs optimum-intel's folders, with the tokenizer as IR
        tokenizer = out_root / name / "tokenizer"
        if "error" in results[name]:
            results[name]["genai_tokenizer"] = {"error": "no optimum-intel export to read"}
        elif not (tokenizer / "openvino_tokenizer.xml").is_file():
            request = {"cmd": "genai_tokenizer", "folder": str(tokenizer)}
            reply = one_shot(venv_python("optimum-intel"), request, out_root / f"prepare-{name}.log")
            results[name]["genai_tokenizer"] = {k: v for k, v in reply.items() if k != "traceback"}
    return results


def load_requests(
    checkpoint: Path, exports: dict, peers: dict, static: list[int]
) -> tuple[dict[str, dict], dict[str, str]]:
    """The worker `load` request of every engine, and the reason for each one that cannot run."""
    requests: dict[str, dict] = {
        "diffusers_eager": {"kind": "diffusers_eager", "folder": str(checkpoint)},
        "difflower_eager": {"kind": "difflower", "folder": str(checkpoint)},
    }
    missing: dict[str, str] = {}
    for name in exports:
        if "error" in exports[name]:
            missing[name] = exports[name]["error"]
        else:
            requests[name] = {"kind": "difflower", "folder": exports[name]["folder"]}
    peer_engines = {
        "optimum_intel_fp32_static": ("optimum_intel_fp32", {"kind": "optimum_intel", "precision": "fp32"}),
        "optimum_intel_int8_static": ("optimum_intel_int8", {"kind": "optimum_intel", "precision": "int8"}),
        "optimum_ort": ("optimum_ort", {"kind": "optimum_ort"}),
        "genai_fp32_static": ("optimum_intel_fp32", {"kind": "genai", "precision": "fp32"}),
        "genai_int8_static": ("optimum_intel_int8", {"kind": "genai", "precision": "int8"}),
    }
    for engine, (prep, request) in peer_engines.items():
        if prep not in peers:
            continue
        entry = peers[prep]
        if "error" in entry:
            missing[engine] = f"{prep} preparation failed: {entry['error']}"
            continue
        if request["kind"] == "genai" and "error" in entry.get("genai_tokenizer", {}):
            missing[engine] = f"tokenizer conversion failed: {entry['genai_tokenizer']['error']}"
            continue
        req = {**request, "folder": entry.get("folder")}
        if request["kind"] in ("optimum_intel", "genai"):
            req["static"] = static
        requests[engine] = req
    return requests, missing


def interleave(
    workers: dict[str, Worker],
    request: dict,
    rounds: int,
    failed: dict[str, str],
    first_round: Callable[[str], dict] | None = None,
) -> dict[str, list[float]]:
    """`rounds` rounds of `request` across the workers (A B C A B C ...): name -> seconds per run.

    The cross-process form of difflower.validate.bench's `interleaved`: each run is timed inside
    its worker (the reply's `seconds`), so the pipe is not counted; Timing.of gives the
    statistics. `first_round(name)` adds fields to each engine's first request (e.g. `save`)."""
    times: dict[str, list[float]] = {name: [] for name in workers}
    for round_index in range(rounds):
        for name, worker in workers.items():
            if name in failed:
                continue
            extra = first_round(name) if first_round is not None and round_index == 0 else {}
            reply = worker.call(**request, **extra)
            if reply.get("ok"):
                times[name].append(reply["seconds"])
            else:
                failed[name] = short_error(reply)
    return times


def timing_json(samples: list[float]) -> dict[str, Any]:
    """median_s, min_s, max_s and runs (difflower.validate.bench's Timing.of), and the samples as runs_s."""
    return {**Timing.of(samples).to_json(), "runs_s": samples}


def run_phase(
    index: int,
    engines: list[str],
    requests: dict,
    work: Path,
    inputs: Path,
    args: argparse.Namespace,
    size: tuple[int, int],
) -> dict[str, Any]:
    height, width = size
    phase: dict[str, Any] = {"engines": engines, "load": {}, "errors": {}}
    failed: dict[str, str] = phase["errors"]
    workers: dict[str, Worker] = {}
    outdir = work / f"phase{index}"
    outdir.mkdir(parents=True, exist_ok=True)
    with MemoryWatch() as watch:
        phase["mem_available_before_gib"] = round(mem_available_gib(), 2)
        try:
            for name in engines:
                log(f"phase {index}: loading {name} (MemAvailable {mem_available_gib():.1f} GiB)")
                worker = Worker(name, venv_python(ENGINES[name]["venv"]), outdir)
                reply = worker.call(cmd="load", **requests[name])
                if not reply.get("ok"):
                    failed[name] = short_error(reply)
                    log(f"  {name} failed to load: {failed[name].splitlines()[0]}")
                    worker.close()
                    continue
                phase["load"][name] = {k: v for k, v in reply.items() if k != "ok"}
                phase["load"][name]["versions"] = worker.call(cmd="versions").get("versions")
                workers[name] = worker

            # (a) one CFG UNet step, interleaved
            # GenAI has no single-UNet entry point: its UNet is optimum-intel's IR, timed as optimum-intel
            steppers = {n: w for n, w in workers.items() if not n.startswith("genai")}
            step_failed: dict[str, str] = phase.setdefault("step_errors", {})
            log(f"phase {index}: UNet step, {args.warmup} warm-up + {args.step_runs} runs per engine")
            for name, worker in steppers.items():  # first call: output saved for parity
                reply = worker.call(cmd="step", inputs=str(inputs), save=str(outdir / f"step-{name}.npy"))
                if not reply.get("ok"):
                    step_failed[name] = short_error(reply)
            interleave(steppers, {"cmd": "step", "inputs": str(inputs)}, args.warmup - 1, step_failed)
            step_times = interleave(steppers, {"cmd": "step", "inputs": str(inputs)}, args.step_runs, step_failed)
            for name, worker in workers.items():
                if worker.proc.poll() is not None:
                    failed[name] = step_failed.get(name, f"worker exited {worker.proc.returncode}")
            phase["unet_step"] = {n: timing_json(t) for n, t in step_times.items() if t}
            log(
                f"phase {index}: UNet step medians "
                + ", ".join(f"{n} {v['median_s']:.3f}s" for n, v in phase["unet_step"].items())
            )

            # (b) txt2img end to end, interleaved
            e2e = {
                "cmd": "e2e",
                "prompt": args.prompt,
                "seed": args.seed,
                "guidance": args.guidance,
                "height": height,
                "width": width,
            }
            log(f"phase {index}: txt2img {args.steps} steps, a 2-step warm-up + {args.e2e_runs} runs per engine")
            interleave(workers, {**e2e, "steps": 2}, 1, failed)
            times = interleave(
                workers,
                {**e2e, "steps": args.steps},
                args.e2e_runs,
                failed,
                first_round=lambda name: {"save": str(outdir / f"image-{name}.npy")},
            )
            phase["e2e"] = {n: timing_json(t) for n, t in times.items() if t}
            log(
                f"phase {index}: txt2img medians "
                + ", ".join(f"{n} {v['median_s']:.2f}s" for n, v in phase["e2e"].items())
            )
            for name, worker in workers.items():
                phase["load"][name]["peak_rss_gib"] = peak_rss_gib(worker.proc.pid)
        finally:
            for worker in workers.values():
                worker.close()
    phase["mem_available_lowest_gib"] = round(watch.lowest, 2)
    phase["outdir"] = str(outdir)
    return phase


def peak_rss_gib(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM), GiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


# -- report -----------------------------------------------------------------------------------


def summarize(phases: list[dict], unavailable: dict[str, str], wanted: list[str]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    anchor = "diffusers_eager"
    # difflower eager relative to diffusers eager, from the first phase holding both
    dl_rel: dict[str, float] = {}
    for kind in ("unet_step", "e2e"):
        for phase in phases:
            m = phase.get(kind, {})
            if anchor in m and "difflower_eager" in m:
                dl_rel[kind] = m["difflower_eager"]["median_s"] / m[anchor]["median_s"]
                break
    for name in wanted:
        entry: dict[str, Any] = {"label": ENGINES[name]["label"]}
        for index, phase in enumerate(phases):
            if name not in phase["engines"] or name == anchor and entry.get("phase") is not None:
                continue
            entry["phase"] = index
            if name in phase["errors"]:
                entry["error"] = phase["errors"][name]
            if name in phase.get("step_errors", {}):
                entry["unet_step_error"] = phase["step_errors"][name]
            for kind in ("unet_step", "e2e"):
                m = phase.get(kind, {})
                if name not in m:
                    continue
                median = m[name]["median_s"]
                result = {"median_s": round(median, 4)}
                if anchor in m:
                    result["vs_diffusers_eager"] = round(median / m[anchor]["median_s"], 3)
                    if "difflower_eager" in m:
                        result["vs_difflower_eager"] = round(median / m["difflower_eager"]["median_s"], 3)
                    elif kind in dl_rel:
                        result["vs_difflower_eager"] = round(median / m[anchor]["median_s"] / dl_rel[kind], 3)
                        result["vs_difflower_eager_chained"] = True
                entry[kind] = result
            outdir = Path(phase["outdir"])
            ref_step, own_step = outdir / f"step-{anchor}.npy", outdir / f"step-{name}.npy"
            if ref_step.is_file() and own_step.is_file() and name != anchor:
                a, b = np.load(own_step), np.load(ref_step)
                entry.setdefault("unet_step", {})["vs_diffusers_eager_output"] = {
                    "max_abs": float(np.abs(a - b).max()),
                    "psnr_db": round(psnr(a, b), 2),
                }
            ref_img, own_img = outdir / f"image-{anchor}.npy", outdir / f"image-{name}.npy"
            if ref_img.is_file() and own_img.is_file():
                entry["image"] = str(own_img.with_suffix(".png"))
                if name != anchor:
                    own, ref = np.load(own_img), np.load(ref_img)
                    entry["image_psnr_vs_diffusers_eager_db"] = round(psnr(own, ref, 1.0), 2)
                    # GenAI returns uint8 images (at best ~50-60 dB against a float image): uint8 levels too
                    entry["image_max_diff_uint8_levels_vs_diffusers_eager"] = int(
                        np.abs(np.round(own * 255) - np.round(ref * 255)).max()
                    )
        if name in unavailable:
            entry["error"] = unavailable[name]
        summary[name] = entry
    # int8 vs its own fp32 path (images from any phase)
    for name, entry in summary.items():
        partner = ENGINES[name].get("fp32")
        if partner and entry.get("image") and summary.get(partner, {}).get("image"):
            own = np.load(Path(entry["image"]).with_suffix(".npy"))
            ref = np.load(Path(summary[partner]["image"]).with_suffix(".npy"))
            entry["image_psnr_vs_own_fp32_db"] = round(psnr(own, ref, 1.0), 2)
            entry["own_fp32"] = partner
    return summary


def render(summary: dict[str, dict]) -> str:
    def fmt(v: Any, spec: str = ".2f", suffix: str = "") -> str:
        return "-" if v is None else f"{v:{spec}}{suffix}"

    header = (
        "engine",
        "ph",
        "UNet step",
        "vs diffusers",
        "vs difflower",
        "txt2img",
        "vs diffusers",
        "vs difflower",
        "img dB vs diffusers",
        "int8 dB vs own fp32",
    )
    rows = [header]
    notes = []
    for name, e in summary.items():
        s, t = e.get("unet_step", {}), e.get("e2e", {})
        rows.append(
            (
                name,
                fmt(e.get("phase"), "d"),
                fmt(s.get("median_s"), ".3f", " s"),
                fmt(s.get("vs_diffusers_eager"), ".2f", "x"),
                fmt(s.get("vs_difflower_eager"), ".2f", "x*" if s.get("vs_difflower_eager_chained") else "x"),
                fmt(t.get("median_s"), ".2f", " s"),
                fmt(t.get("vs_diffusers_eager"), ".2f", "x"),
                fmt(t.get("vs_difflower_eager"), ".2f", "x*" if t.get("vs_difflower_eager_chained") else "x"),
                fmt(e.get("image_psnr_vs_diffusers_eager_db"), ".1f"),
                fmt(e.get("image_psnr_vs_own_fp32_db"), ".1f"),
            )
        )
        if e.get("error"):
            notes.append(f"  {name}: {e['error'].splitlines()[0][:300]}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("x*: chained through diffusers eager (difflower eager ran in another phase)")
    if notes:
        lines += ["could not run:", *notes]
    return "\n".join(lines)


def main() -> None:
    global PEERS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint: checks the plumbing in minutes")
    parser.add_argument("--genai", action="store_true", help="add OpenVINO GenAI's Text2ImagePipeline (a phase)")
    parser.add_argument(
        "--phase",
        action="append",
        default=None,
        metavar="E1,E2,...",
        help=f"run these engines as one phase (repeatable); engines: {', '.join(ENGINES)}",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-runs", type=int, default=5, help="timed UNet steps per engine")
    parser.add_argument("--warmup", type=int, default=2, help="UNet warm-up calls per engine")
    parser.add_argument("--e2e-runs", type=int, default=3, help="timed txt2img runs per engine")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--calibration-prompts", type=int, default=2)
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument(
        "--work", type=Path, default=None, help="cache and outputs (default: $DIFFLOWER_BENCH_DIR/peers[-tiny])"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--prepare-only", action="store_true", help="write the checkpoint and every export, then stop (no timing)"
    )
    parser.add_argument("--peers-dir", type=Path, default=None, help=f"the peers' venvs (default {PEERS})")
    args = parser.parse_args()
    if args.peers_dir:
        PEERS = args.peers_dir
    work = args.work or CACHE / ("peers-tiny" if args.tiny else "peers-sd15")
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.json or (work / "peers-tiny.json" if args.tiny else HERE / "results" / "peers-sd15.json")
    started = time.time()

    phases_wanted = (
        [p.split(",") for p in args.phase] if args.phase else [*PHASES, *([GENAI_PHASE] if args.genai else [])]
    )
    for phase in phases_wanted:
        for name in phase:
            if name not in ENGINES:
                parser.error(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")
    wanted = list(dict.fromkeys(n for p in phases_wanted for n in p))

    checkpoint = portable_checkpoint(
        make_checkpoint(args.tiny, work), work / ("tiny-sd-portable" if args.tiny else "sd15-portable")
    )
    height, width, channels, context_dim = native_size(checkpoint)
    size = f"1x{height}x{width}"
    log(f"checkpoint {checkpoint} at {size}; work dir {work}")

    exports = difflower_exports(checkpoint, work, size, args, wanted)
    peers = peer_preparations(checkpoint, work, args, wanted)
    if args.prepare_only:
        log(f"prepared in {time.time() - started:.0f} s; run again without --prepare-only on a quiet machine")
        return
    requests, unavailable = load_requests(checkpoint, exports, peers, [1, height, width])

    import torch

    gen = torch.Generator().manual_seed(0)
    inputs = work / "step-inputs.npz"
    np.savez(
        inputs,
        sample=torch.randn(2, channels, height // 8, width // 8, generator=gen).numpy(),
        encoder_hidden_states=torch.randn(2, 77, context_dim, generator=gen).numpy(),
        timestep=np.array(500.0),
    )

    phases = []
    for index, engines in enumerate(phases_wanted):
        runnable = [n for n in engines if n in requests]
        if "diffusers_eager" not in runnable:
            runnable.insert(0, "diffusers_eager")
        phase = run_phase(index, runnable, requests, work, inputs, args, (height, width))
        phases.append(phase)

    summary = summarize(phases, unavailable, wanted)
    versions = {}
    for venv in ("difflower", "optimum-intel", "optimum-onnx"):
        python = venv_python(venv)
        if python.is_file():
            versions[venv] = one_shot(python, {"cmd": "versions"}, work / "versions.log").get("versions")
        else:
            versions[venv] = f"missing: {python}"
    result = {
        "benchmark": "difflower vs peers, SD1.5 "
        + ("tiny checkpoint" if args.tiny else "real-size config with random weights")
        + f", {size}, fp32 unless int8",
        "protocol": {
            "unet_step": f"one CFG call, batch 2, {channels}x{height // 8}x{width // 8} latents, 77x{context_dim} "
            f"text states, t=500; {args.warmup} warm-up calls, median of {args.step_runs}, engines interleaved",
            "txt2img": f"{args.steps} steps (scheduler of the checkpoint: PNDM), guidance {args.guidance}, seed "
            f"{args.seed}, prompt {args.prompt!r}; a 2-step warm-up run, median of {args.e2e_runs}, interleaved",
            "phases": "one worker process per engine; diffusers eager in every phase is the baseline",
            "openvino_compile": "PERFORMANCE_HINT=LATENCY everywhere; difflower's engine compiles every artifact "
            "with INFERENCE_PRECISION_HINT=f32; optimum-intel and GenAI get f32 for fp32 models and OpenVINO's default "
            "for int8 (bf16 for the float ops on a CPU with bf16 units, as optimum-intel runs them)",
        },
        "checkpoint": str(checkpoint),
        "machine": machine(),
        "versions": versions,
        "install": INSTALL,
        "difflower_exports": exports,
        "peer_exports": peers,
        "phases": phases,
        "summary": summary,
        "unavailable": unavailable,
        "wall_seconds": round(time.time() - started, 1),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(render(summary))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
