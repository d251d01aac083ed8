"""`difflower serve ART --ray --replicas 2`: a local Ray cluster on this machine, driven over loopback.

One server process for the module: requests spread over both replicas and give the same image
for the same seed wherever they ran; a replica killed mid-load is replaced and every request of
that load either succeeds or gets an error status (none hangs, none is dropped without an answer);
Ctrl-C (SIGINT to the process group, as a terminal sends it) drains and stops the whole cluster.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

if not importlib.util.find_spec("ray") or not importlib.util.find_spec("httpx"):
    pytest.skip("Ray Serve is not installed: pip install 'difflower[ray]'", allow_module_level=True)

import httpx  # noqa: E402

from difflower.cli import main  # noqa: E402
from difflower.errors import ArgumentError  # noqa: E402
from difflower.serve_ray import app  # noqa: E402

REQUEST_TIMEOUT = 120  # seconds: a request that gets no answer within this fails the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(sd_onnx, tmp_path_factory):
    """`difflower serve --ray --replicas 2` in its own session; yields (base url, process)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "difflower.cli", "serve", str(sd_onnx), "--ray", "--replicas", "2",
            "--port", str(port), "--max-wait-ms", "20", "--queue-size", "32"]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the replicas did not become ready: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def _generate(url: str, seed: int, steps: int = 2) -> httpx.Response:
    body = {"prompt": "a lighthouse", "steps": steps, "seed": seed, "size": "64x64"}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=REQUEST_TIMEOUT)


def _replicas(url: str, tries: int = 24) -> dict[str, int]:
    """{replica: pid} of the replicas that answered `tries` health checks."""
    seen = {}
    for _ in range(tries):
        body = httpx.get(f"{url}/health", timeout=10).json()
        seen[body["replica"]] = body["pid"]
    return seen


def test_requests_spread_over_both_replicas_with_the_same_images(cluster):
    url, _ = cluster
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: _generate(url, seed=11), range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    by_replica = {}
    for response in responses:
        image = response.json()["data"][0]["b64_json"]
        by_replica.setdefault(response.headers["x-difflower-replica"], set()).add(image)
    assert len(by_replica) == 2, f"one replica took every request: {list(by_replica)}"
    assert len(set.union(*by_replica.values())) == 1  # the same seed, the same image on either replica


def test_a_replica_killed_mid_load_is_replaced_and_no_request_is_lost(cluster):
    url, _ = cluster
    before = _replicas(url)
    assert len(before) == 2
    victim = next(iter(before.values()))
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_generate, url, seed, 50) for seed in range(24)]
        while sum(f.done() for f in futures) < 2:  # the load is running
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        assert not all(f.done() for f in futures), "the load ended before the replica was killed"
        outcomes = []
        for future in futures:  # every request gets an answer: an image or an error status
            try:
                response = future.result(timeout=REQUEST_TIMEOUT + 10)
            except httpx.TransportError as err:  # a dropped connection is an error the client sees, not silence
                outcomes.append(type(err).__name__)
                continue
            outcomes.append(response.status_code)
            if response.status_code == 200:
                assert len(response.json()["data"]) == 1
            else:
                assert response.status_code >= 500 and response.text, response.status_code
    assert outcomes.count(200) >= 12, outcomes  # the surviving replica went on serving
    deadline = time.monotonic() + 90
    while True:  # Ray Serve starts a replacement
        replicas = _replicas(url)
        if len(replicas) == 2 and victim not in replicas.values():
            break
        assert time.monotonic() < deadline, f"no replacement replica: {replicas}"
        time.sleep(1)
    assert _generate(url, seed=3).status_code == 200


def test_ctrl_c_drains_and_stops_the_cluster(cluster):
    url, process = cluster
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_generate, url, 5, 30)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        assert in_flight.result(timeout=REQUEST_TIMEOUT).status_code == 200  # the in-flight request finished
    assert process.wait(120) == 0
    left = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the cluster are still running: {left}"


def test_ray_arguments_are_one_line(sd_onnx, tmp_path, capsys):
    assert main(["serve", str(sd_onnx), "--replicas", "2"]) == 2
    assert "--replicas: needs --ray" in capsys.readouterr().err
    assert main(["serve", str(sd_onnx), "--ray", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "--max-replicas: must be >= --replicas (3), got 2" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--ray"]) == 2
    assert "MODEL: " in capsys.readouterr().err
    # the builder of `serve run difflower.serve_ray:app model=... replicas=2` and of config files
    application = app({"model": str(sd_onnx), "replicas": "2", "max_batch": "2", "max_wait_ms": "5"})
    assert type(application).__name__ == "Application"
    mistakes = [
        ({"replicas": "2"}, "model: is required"),
        ({"model": str(sd_onnx), "replica": "2"}, "replica: is not an argument"),
        ({"model": str(sd_onnx), "replicas": "two"}, "replicas: must be an integer"),
    ]
    for args, words in mistakes:
        with pytest.raises(ArgumentError) as raised:
            app(args)
        assert words in str(raised.value), (args, raised.value)


def test_replica_resources_and_autoscaling_follow_the_flags(sd_onnx):
    from difflower.serve import ServeSettings
    from difflower.serve_ray import build

    settings = ServeSettings(max_batch=2, queue_size=8)
    fixed = build(sd_onnx, settings, replicas=2, threads=1)._bound_deployment
    assert fixed.num_replicas == 2 and fixed.ray_actor_options == {"num_cpus": 1}
    assert fixed.max_ongoing_requests == 10  # what the replica's queue and a batch hold
    assert fixed.max_queued_requests == 8  # then requests wait at the proxy, and beyond that get Ray's 503
    scaled = build(sd_onnx, settings, replicas=1, max_replicas=3)._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 2)
    gpu = build(sd_onnx, settings, replicas=2, device="cuda")._bound_deployment
    assert gpu.ray_actor_options == {"num_gpus": 1, "num_cpus": 1}  # one replica per GPU
    assert gpu.init_args[2] == {"device": "cuda", "engine": None, "threads": None}
