"""Load test of `difflower serve` (issue 21): concurrent clients against one server, batching on and
off, and against Ray Serve replicas.

    python benchmarks/serve_load.py                       # the tiny SD checkpoint exported to ONNX (seconds)
    python benchmarks/serve_load.py --artifact DIR --size 256x256 --steps 4 --requests 16 --clients 8 \
        --engine-option arena=false                       # a real-size artifact

Settings, one after another on the same machine: one server with `--max-batch 1` (no batching),
one server with the given batch (each in this process: uvicorn on loopback in a thread, the app
`difflower serve` runs), and `difflower serve --ray --replicas N` (a local Ray cluster in its own
process group; `--ray-replicas 0` skips it). Before each timed load, every client sends one request
(the engines see the load's shapes once). Then every client sends its share of `--requests`
requests (same size and steps, seeds differ) as fast as answers come back. Reported: requests per
second, p50 / p99 latency, the status codes (errors are expected to be zero: the queue is sized
above the clients), the requests each replica answered, the batch sizes a one-machine server ran
(from its /metrics), the batching gain (requests/s with batching over without) and Ray over one
server. The clients and the servers share the machine's cores, as they would on one host.

Writes benchmarks/results/serve-load[-tiny].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from onnx_unet import write_result  # noqa: E402

import difflower  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.reference.tiny import make_tiny_checkpoint  # noqa: E402
from difflower.serve import ServeSettings, create_app  # noqa: E402
from difflower.validate.bench import machine_info  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at sunset"
SIZE = None  # "WxH" of every request (None: the model's native size); set from --size


def drive(url: str, clients: int, requests: int, steps: int) -> dict:
    """`clients` threads send `requests` requests as fast as answers come back; what they saw."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    replicas: dict[str, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=3600) as session:
            for i in range(k, requests, clients):
                start = time.perf_counter()
                answer = session.post(
                    f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": steps, "seed": i, "size": SIZE}
                )
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
                    replica = answer.headers.get("x-difflower-replica", "?")
                    replicas[replica] = replicas.get(replica, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "statuses": statuses,
        "requests_per_replica": sorted(replicas.values(), reverse=True),
    }


def warm_up(url: str, clients: int, steps: int) -> None:
    """Every replica's engines see the sizes of the load once (ORT and OpenVINO plan per shape)."""

    def one(i: int) -> None:
        body = {"prompt": PROMPT, "steps": steps, "seed": i, "size": SIZE}
        httpx.post(f"{url}/v1/images/generations", json=body, timeout=3600)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))


def run_setting(pipe, max_batch: int, clients: int, requests: int, steps: int, wait_ms: float) -> dict:
    """One in-process server (uvicorn in a thread, the app `difflower serve` runs)."""
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=wait_ms, queue_size=max(16, 2 * clients))
    app = create_app(pipe, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    warm_up(url, clients, steps)
    before = _batch_counts(httpx.get(f"{url}/metrics").text)
    row = drive(url, clients, requests, steps)
    after = _batch_counts(httpx.get(f"{url}/metrics").text)
    server.should_exit = True
    thread.join(60)
    return {
        "setting": f"one server, max batch {max_batch}",
        "max_batch": max_batch,
        **row,
        "pipeline_calls": after[0] - before[0],
        "images": after[1] - before[1],
    }


def run_ray(artifact: Path, replicas: int, max_batch: int, clients: int, requests: int, steps: int, wait_ms: float,
            engine_options: list[str]) -> dict:  # fmt: skip
    """`difflower serve --ray --replicas N` in its own process group (a local Ray cluster)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "difflower.cli", "serve", str(artifact), "--ray", "--replicas", str(replicas),
            "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms),
            "--queue-size", str(max(16, 2 * clients))]  # fmt: skip
    for option in engine_options:
        argv += ["--engine-option", option]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"difflower serve --ray exited with {process.returncode}: {shlex.join(argv)}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        warm_up(url, clients, steps)
        row = drive(url, clients, requests, steps)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(300)
    return {"setting": f"Ray Serve, {replicas} replicas, max batch {max_batch}", "max_batch": max_batch, **row}


def _batch_counts(metrics: str) -> tuple[float, float]:
    """(pipeline calls, images) the server has run, from its /metrics."""
    calls = [line for line in metrics.splitlines() if line.startswith("difflower_batch_images_count")]
    images = [line for line in metrics.splitlines() if line.startswith("difflower_batch_images_sum")]
    return float(calls[0].split()[-1]), float(images[0].split()[-1])


def main() -> None:
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None, help="an artifact (default: tiny SD on ONNX)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default=None, help="WxH of every request (default: the model's native size)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4, help="the batched setting (the other is 1)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--ray-replicas", type=int, default=2, help="also on Ray Serve with this many (0: skip)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. arena=false")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    SIZE = args.size
    options = dict(option.split("=", 1) for option in args.engine_option)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="difflower-serve-") as scratch:
        artifact = args.artifact
        if artifact is None:
            tiny = make_tiny_checkpoint(Path(scratch) / "tiny-sd", "sd", seed=0)
            artifact = Path(scratch) / "tiny-sd-onnx"
            export(tiny, "onnx", artifact, progress=False)
        pipe = difflower.load(artifact, **options)
        rows = [
            run_setting(pipe, batch, args.clients, args.requests, args.steps, args.max_wait_ms)
            for batch in (1, args.max_batch)
        ]
        del pipe  # the Ray replicas load their own copies
        gc.collect()
        if args.ray_replicas:
            rows.append(
                run_ray(
                    artifact,
                    args.ray_replicas,
                    args.max_batch,
                    args.clients,
                    args.requests,
                    args.steps,
                    args.max_wait_ms,
                    args.engine_option,
                )  # fmt: skip
            )
    gain = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
    name = "serve-load-tiny" if args.artifact is None else "serve-load"
    result = {
        "benchmark": (
            f"difflower serve on {'tiny SD (ONNX Runtime)' if args.artifact is None else args.artifact}: "
            f"{args.clients} concurrent clients, {args.requests} requests of {args.steps} steps"
            f"{f' at {args.size}' if args.size else ''}, loopback"
        ),
        "rows": rows,
        "batching_gain": gain,
        **({"ray_over_one_server": rows[2]["requests_per_s"] / rows[1]["requests_per_s"]} if args.ray_replicas else {}),
        "command": shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine_info(),
    }
    table = "\n".join(
        [
            "| setting | requests/s | p50 s | p99 s | statuses | requests per replica | pipeline calls | images |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['setting']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
                f"| {r['statuses']} | {r['requests_per_replica']} | {r.get('pipeline_calls', '-')} "
                f"| {r.get('images', '-')} |"
                for r in rows
            ),
            f"\nbatching gain: {gain:.2f}x requests/s",
        ]
    )
    write_result(args.out or HERE / "results" / f"{name}.json", result, table)


if __name__ == "__main__":
    main()
