"""`difflower serve`: the HTTP API on a tiny ONNX artifact, served by uvicorn on loopback.

Each behaviour of the server (the same image as `difflower generate`, batching, the bounded
queue, timeouts, abandoned requests, engine errors, malformed requests, metrics, shutdown) is
driven with a bounded number of requests; the page is loaded in headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest
from parity_helpers import sample_image

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'difflower[serve]'")

from difflower.cli import main  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.runtimes.pipeline import load_artifact  # noqa: E402
from difflower.serve import ServeSettings, create_app  # noqa: E402

PROMPT = "a lighthouse on a cliff"


@contextlib.contextmanager
def serving(pipe, **settings):
    """The app on a free loopback port in a thread; yields (base url, uvicorn server)."""
    app = create_app(pipe, ServeSettings(**settings), source="tiny-sd-onnx")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)


class Gate:
    """Holds every pipeline run until opened, counting the images each run generated."""

    def __init__(self, pipe, monkeypatch, fail_first: bool = False):
        self.opened = threading.Event()
        self.started = threading.Event()
        self.batches: list[int] = []
        self.fail_first = fail_first
        original = pipe.run

        def run(request, check_memory=True):
            self.started.set()
            assert self.opened.wait(60)
            self.batches.append(request.batch)
            if self.fail_first and len(self.batches) == 1:
                raise RuntimeError("engine exploded\nsecond line")
            return original(request, check_memory=check_memory)

        monkeypatch.setattr(pipe, "run", run)


def _image(item) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def _post(url, **body):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 3, **body}, timeout=120)


@pytest.fixture
def pipe(sd_onnx):
    return load_artifact(sd_onnx)


def test_the_same_seed_gives_generates_image(pipe, sd_onnx, tmp_path):
    """One request alone, and each of four batched together, equal `difflower generate` with its seed."""
    seeds = [3, 4, 5, 6]
    expected = {}
    for seed in seeds:
        out = tmp_path / f"{seed}.png"
        assert main(["generate", str(sd_onnx), "--prompt", PROMPT, "--steps", "3", "--seed", str(seed),
                     "-o", str(out)]) == 0  # fmt: skip
        expected[seed] = np.asarray(PIL.Image.open(out).convert("RGB"))
    with serving(pipe, max_batch=4, max_wait_ms=2000) as (url, _):
        alone = _post(url, seed=3)
        assert alone.status_code == 200, alone.text
        assert np.array_equal(_image(alone.json()["data"][0]), expected[3])
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: _post(url, seed=s), seeds))
        metrics = httpx.get(f"{url}/metrics").text
    assert all(a.status_code == 200 for a in answers)
    for seed, answer in zip(seeds, answers, strict=True):
        got = _image(answer.json()["data"][0]).astype(int)
        assert answer.json()["data"][0]["seed"] == seed
        assert np.abs(got - expected[seed]).max() <= 1, seed  # batched GEMMs may round differently
    # two pipeline calls in all: the lone request, then the four together
    assert 'difflower_batch_images_bucket{le="1.0"} 1.0' in metrics
    assert 'difflower_batch_images_bucket{le="4.0"} 2.0' in metrics
    assert "difflower_batch_images_count 2.0" in metrics


def test_n_images_of_one_request_are_generates_num_images(pipe, sd_onnx, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", str(sd_onnx), "--prompt", PROMPT, "--steps", "3", "--seed", "9", "--num-images", "2",
                 "-o", str(out)]) == 0  # fmt: skip
    with serving(pipe) as (url, _):
        answer = _post(url, seed=9, n=2)
    assert answer.status_code == 200
    images = [_image(item) for item in answer.json()["data"]]
    for k, path in enumerate([tmp_path / "x-0.png", tmp_path / "x-1.png"]):
        expected = np.asarray(PIL.Image.open(path).convert("RGB")).astype(int)
        assert np.abs(images[k].astype(int) - expected).max() <= 1  # the prompt encoded twice, not once


def test_img2img_upload(pipe, sd_onnx, tmp_path):
    init = tmp_path / "init.png"
    sample_image().save(init)
    out = tmp_path / "i2i.png"
    assert main(["generate", str(sd_onnx), "--prompt", PROMPT, "--steps", "4", "--image", str(init),
                 "--strength", "0.5", "-o", str(out)]) == 0  # fmt: skip
    with serving(pipe) as (url, _):
        answer = httpx.post(
            f"{url}/v1/images/generations",
            data={"prompt": PROMPT, "steps": "4", "strength": "0.5"},
            files={"image": ("init.png", init.read_bytes(), "image/png")},
            timeout=120,
        )
        broken = httpx.post(f"{url}/v1/images/generations", data={"prompt": PROMPT},
                            files={"image": ("x.png", b"not an image", "image/png")})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert np.array_equal(_image(answer.json()["data"][0]), np.asarray(PIL.Image.open(out).convert("RGB")))
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "image"


def test_malformed_requests_name_the_field(pipe, tmp_path):
    cases = [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": PROMPT, "size": "big"}, 422, "size"),
        ({"prompt": PROMPT, "n": 0}, 422, "n"),
        ({"prompt": PROMPT, "n": 2.5}, 422, "n"),
        ({"prompt": PROMPT, "steps": "many"}, 422, "steps"),
        ({"prompt": PROMPT, "guidance": "nan"}, 422, "guidance"),
        ({"prompt": PROMPT, "response_format": "url"}, 422, "response_format"),
        ({"prompt": PROMPT, "colour": "red"}, 422, "colour"),
        ({"prompt": PROMPT, "size": "60x64"}, 400, "width"),  # not a multiple of 8: the pipeline's own check
        ({"prompt": PROMPT, "scheduler": "nope"}, 400, None),
        ({"prompt": PROMPT, "n": 9}, 400, "n"),  # over --max-batch
        ({"prompt": PROMPT, "size": "65536x65536"}, 400, "height"),  # more memory than this machine has
    ]
    with serving(pipe, max_batch=4) as (url, _):
        for body, status, field in cases:
            answer = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
            assert answer.status_code == status, (body, answer.text)
            error = answer.json()["error"]
            assert "\n" not in error["message"] and (field is None or error["field"] == field), (body, error)
        not_json = httpx.post(
            f"{url}/v1/images/generations", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422 and not_json.json()["error"]["field"] == "body"
        assert _post(url, seed=1).status_code == 200  # and the server serves on


def test_a_static_artifact_refuses_other_sizes_with_the_built_ones(tiny_dirs, tmp_path):
    export(tiny_dirs["sd"], "onnx", tmp_path / "static", static=["1x64x64"], progress=False)
    with serving(load_artifact(tmp_path / "static")) as (url, _):
        wrong = _post(url, size="128x64")
        right = _post(url, size="64x64")
    assert wrong.status_code == 400 and "built for 1x64x64" in wrong.json()["error"]["message"]
    assert right.status_code == 200


def test_queue_full_is_429_and_timeouts_are_504(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with serving(pipe, queue_size=1, max_wait_ms=0, timeout_s=3) as (url, _), ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, url, seed=1)  # runs, held at the gate
        assert gate.started.wait(30)
        second = pool.submit(_post, url, seed=2)  # waits in the queue
        deadline = time.monotonic() + 30
        while "difflower_queue_depth 1.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        third = _post(url, seed=3)
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert first.result().status_code == 504 and second.result().status_code == 504  # held past 3 s
        gate.opened.set()
        assert _post(url, seed=4).status_code == 200
    assert gate.batches == [1, 1]  # the held run and the last; the timed-out queued one never ran


def test_an_engine_error_fails_its_batch_and_the_server_goes_on(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch, fail_first=True)
    gate.opened.set()
    with serving(pipe) as (url, _):
        failed = _post(url, seed=1)
        ok = _post(url, seed=1)
        metrics = httpx.get(f"{url}/metrics").text
    assert failed.status_code == 500
    assert failed.json()["error"]["message"] == "generation failed: RuntimeError: engine exploded"
    assert ok.status_code == 200
    assert 'difflower_errors_total{reason="engine"} 1.0' in metrics and 'status="500"' in metrics


def test_a_client_that_goes_away_never_reaches_the_engines(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with serving(pipe, max_wait_ms=0) as (url, _), ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, url, seed=1)
        assert gate.started.wait(30)
        with pytest.raises(httpx.TimeoutException):  # this client gives up after 0.5 s and closes
            httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "seed": 2}, timeout=0.5)
        deadline = time.monotonic() + 30
        while 'difflower_errors_total{reason="client gone"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the abandoned request was not noticed"
            time.sleep(0.05)
        gate.opened.set()
        assert held.result().status_code == 200
        assert _post(url, seed=3).status_code == 200
    assert gate.batches == [1, 1]  # the abandoned request was dropped before it ran


def test_health_ready_manifest_and_shutdown_drains(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch)
    with serving(pipe) as (url, server), ThreadPoolExecutor(1) as pool:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["replica"].endswith(f":{health['pid']}")  # who answered
        assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
        manifest = httpx.get(f"{url}/v1/manifest").json()
        assert manifest["backend"] == "onnx" and manifest["precision"] == "fp32" and manifest["family"] == "sd"
        assert all(p["passed"] for p in manifest["parity"].values())
        in_flight = pool.submit(_post, url, seed=1)
        assert gate.started.wait(30)
        server.should_exit = True  # a graceful shutdown starts while the request is in flight
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # new connections are refused
            httpx.get(f"{url}/health", timeout=5)
        gate.opened.set()
        assert in_flight.result().status_code == 200  # the in-flight request finished


def test_serve_arguments_are_checked_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # the parser refuses it
        main(["serve", str(tmp_path / "missing"), "--max-wait-ms", "-1"])
    assert stopped.value.code == 2 and "--max-wait-ms: must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["serve", str(tmp_path / "missing"), "--port", "99999"])
    assert stopped.value.code == 2 and "--port: a TCP port is 1-65535, got 99999" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


# -- the page, in a real browser -------------------------------------------------------------------


def _chromium():
    """A headless Chromium driven by selenium through Debian's chromium-driver."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("needs Chromium and its driver from Debian's packages: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_generates_an_image_in_chromium(pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        with serving(pipe) as (url, _):
            browser.get(url + "/")
            wait = WebDriverWait(browser, 120)
            wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "model"), "onnx"))
            assert "parity at export" in browser.find_element(By.ID, "manifest").text
            assert browser.find_element(By.ID, "size").get_attribute("value") == "64x64"
            browser.find_element(By.ID, "steps").clear()
            browser.find_element(By.ID, "steps").send_keys("3")
            browser.find_element(By.ID, "submit").click()
            image = wait.until(expected_conditions.presence_of_element_located((By.ID, "image")))
            wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
            assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
            assert "seed 0" in browser.find_element(By.ID, "status").text
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors
    finally:
        browser.quit()


def test_the_validate_page_shows_images_heat_map_and_drift_in_chromium(tiny_dirs, sd_onnx, tmp_path):
    """`validate --html`: one self-contained file; in the browser its three images load and the drift
    plot has a point per step, without console errors."""
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    assert main(["validate", str(sd_onnx), "--reference", str(tiny_dirs["sd"]), "--steps", "4",
                 "--html", str(page)]) == 0  # fmt: skip
    text = page.read_text()
    assert 'src="http' not in text and text.count("data:image/png;base64,") == 3  # nothing outside the file
    browser = _chromium()
    try:
        browser.get(page.as_uri())
        assert browser.find_element(By.ID, "verdict").text == "PASSED"
        for key in ("reference", "artifact", "difference"):
            image = browser.find_element(By.ID, key)
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64
        points = browser.find_element(By.CSS_SELECTOR, "#drift polyline").get_attribute("points").split()
        assert len(points) == 5  # PNDM: 4 steps run as 5 timesteps
        assert "unet" in browser.find_element(By.ID, "components").text
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        browser.quit()
