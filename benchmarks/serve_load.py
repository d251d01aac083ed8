"""Load test of `difflower serve` (issue 21): concurrent clients against one server, batching on and off.

    python benchmarks/serve_load.py                       # the tiny SD checkpoint exported to ONNX (seconds)
    python benchmarks/serve_load.py --artifact DIR --steps 4 --requests 16 --clients 8

One process: the server runs in a thread (uvicorn on loopback, the same app `difflower serve`
runs), the clients in a thread pool. Per setting (`--max-batch 1`: no batching, and the given
batch), every client sends its share of `--requests` requests (same size and steps, seeds
differ) as fast as answers come back. Reported: requests per second, p50 / p99 latency, the
status codes (errors are expected to be zero: the queue is sized above the clients), the batch
sizes the server ran (from its /metrics), and the batching gain (requests/s with batching over
without). The clients and the server share the machine's cores, as they would on one host.

Writes benchmarks/results/serve-load[-tiny].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
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


def run_setting(pipe, max_batch: int, clients: int, requests: int, steps: int, wait_ms: float) -> dict:
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=wait_ms, queue_size=max(16, 2 * clients))
    app = create_app(pipe, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=3600) as session:
            for i in range(k, requests, clients):
                start = time.perf_counter()
                answer = session.post(
                    f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": steps, "seed": i}
                )
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1

    httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 1}, timeout=3600)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    metrics = httpx.get(f"{url}/metrics").text
    server.should_exit = True
    thread.join(60)
    calls = [line for line in metrics.splitlines() if line.startswith("difflower_batch_images_count")]
    images = [line for line in metrics.splitlines() if line.startswith("difflower_batch_images_sum")]
    ordered = sorted(latencies)
    return {
        "max_batch": max_batch,
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "statuses": statuses,
        "pipeline_calls": float(calls[0].split()[-1]) - 1,  # less the warm-up
        "images": float(images[0].split()[-1]) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None, help="an artifact (default: tiny SD on ONNX)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4, help="the batched setting (the other is 1)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="difflower-serve-") as scratch:
        artifact = args.artifact
        if artifact is None:
            tiny = make_tiny_checkpoint(Path(scratch) / "tiny-sd", "sd", seed=0)
            artifact = Path(scratch) / "tiny-sd-onnx"
            export(tiny, "onnx", artifact, progress=False)
        pipe = difflower.load(artifact)
        rows = [
            run_setting(pipe, batch, args.clients, args.requests, args.steps, args.max_wait_ms)
            for batch in (1, args.max_batch)
        ]
    gain = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
    name = "serve-load-tiny" if args.artifact is None else "serve-load"
    result = {
        "benchmark": (
            f"difflower serve on {'tiny SD (ONNX Runtime)' if args.artifact is None else args.artifact}: "
            f"{args.clients} concurrent clients, {args.requests} requests of {args.steps} steps, loopback"
        ),
        "rows": rows,
        "batching_gain": gain,
        "command": shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine_info(),
    }
    table = "\n".join(
        [
            "| max batch | requests/s | p50 s | p99 s | statuses | pipeline calls | images |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['max_batch']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
                f"| {r['statuses']} | {r['pipeline_calls']:.0f} | {r['images']:.0f} |"
                for r in rows
            ),
            f"\nbatching gain: {gain:.2f}x requests/s",
        ]
    )
    write_result(args.out or HERE / "results" / f"{name}.json", result, table)


if __name__ == "__main__":
    main()
