"""`difflower serve`: an artifact (or a checkpoint) behind an HTTP API, batched, with metrics and a page.

The engines are loaded once. Requests arrive on an ASGI app (Starlette, served by uvicorn):

- `POST /v1/images/generations`: the request shape image clients already send (`prompt`, `n`,
  `size` "WxH", `response_format` "b64_json") plus difflower's own fields (`negative_prompt`,
  `steps`, `guidance`, `seed`, `scheduler`, `strength`); a multipart form with an `image` (and a
  `mask`) upload makes it img2img (inpainting).
- `GET /health` (the process answers), `GET /ready` (the engines are loaded and the queue takes
  work), `GET /metrics` (Prometheus: requests by status, queue depth, batch sizes, per-stage
  latency, errors), `GET /v1/manifest` (what the artifact is) and `GET /` (a page to use it).

`Batcher` owns the pipeline: one worker thread takes the oldest waiting request, waits at most
`max_wait_ms` for others with the same batch key (size, steps, guidance, scheduler, negative
prompt; uploads never share a batch), and runs them as one pipeline call, each request's images
drawn from its own seed, so an image does not depend on what it was batched with (the same seed
gives `difflower generate`'s image). A static artifact's batch is exact: a short batch is padded
with copies whose images are dropped. The queue is bounded (429 with Retry-After when full), a
request waits at most `timeout_s` (504), a client that goes away has its request dropped before
it reaches the engines, and an engine error fails that batch's requests (500, one line) while
the server goes on. On shutdown new requests get 503 and the queued ones finish.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflower.errors import ArgumentError, DifflowerError

MAX_IMAGES = 10  # per request, as image APIs cap `n`
PAGE = Path(__file__).with_name("serve_page.html")


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and bounds work."""

    max_batch: int = 4  # images per pipeline call (a static artifact: its bucket's batch, exactly)
    max_wait_ms: float = 10.0  # how long the oldest request waits for others to batch with
    queue_size: int = 16  # requests waiting before 429
    timeout_s: float = 600.0  # a request's wait for its images before 504

    def __post_init__(self) -> None:
        for name, minimum in (("max_batch", 1), ("queue_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ArgumentError(name.replace("_", "-"), f"must be an int >= {minimum}, got {value!r}")
        for name in ("max_wait_ms", "timeout_s"):
            if not getattr(self, name) >= 0:
                raise ArgumentError(name.replace("_", "-"), f"must be >= 0, got {getattr(self, name)!r}")


@dataclass
class Job:
    """One HTTP request's generation: its settings, and the future its images arrive on."""

    prompt: str
    n: int
    seed: int
    height: int | None
    width: int | None
    steps: int | None
    guidance: float | None
    negative_prompt: str | None = None
    scheduler: str | None = None
    image: Any = None  # PIL images (img2img / inpainting)
    mask: Any = None
    strength: float | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        """Requests with equal keys run in one pipeline call; an upload runs alone."""
        alone = id(self) if self.image is not None else None
        size = (self.height, self.width)
        return (size, self.steps, self.guidance, self.scheduler, self.negative_prompt, self.strength, alone)


class QueueFull(DifflowerError):
    """The bounded queue holds `queue_size` requests already."""


class ShuttingDown(DifflowerError):
    """The server is draining: no new work."""


class Metrics:
    """The Prometheus series of one server (its own registry, so several servers can share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "difflower_requests", "HTTP generation requests by status code", ["status"], registry=self.registry
        )
        self.queue_depth = Gauge("difflower_queue_depth", "requests waiting for the engines", registry=self.registry)
        self.batch_size = Histogram(
            "difflower_batch_images", "images per pipeline call", buckets=(1, 2, 4, 8, 16, 32), registry=self.registry
        )
        self.latency = Histogram(
            "difflower_stage_seconds", "seconds per stage: queue (waiting), generate (the pipeline call)",
            ["stage"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter("difflower_errors", "failed requests by reason", ["reason"], registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Batcher:
    """The queue of jobs and the one worker thread that runs them on the pipeline in batches."""

    def __init__(self, pipe: Any, settings: ServeSettings, metrics: Metrics):
        self.pipe = pipe
        self.settings = settings
        self.metrics = metrics
        self.static_batch = _static_batch(pipe)
        self.capacity = self.static_batch or settings.max_batch
        self.default_scheduler = pipe.scheduler
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._worker = threading.Thread(target=self._work, name="difflower-batcher", daemon=True)
        self._worker.start()

    # -- the HTTP side ---------------------------------------------------------------------------

    def check(self, job: Job) -> None:
        """Refuse, before it is queued, a job the pipeline would refuse (ArgumentError naming the field)."""
        from difflower.reference.memory import check_memory
        from difflower.reference.request import build_request
        from difflower.reference.schedulers import scheduler_by_name

        if job.n > self.capacity:
            raise ArgumentError("n", f"at most {self.capacity} images per request on this server")
        if job.scheduler is not None:  # the swap the batch will make, tried on its own
            scheduler_by_name(job.scheduler, self.pipe.scheduler_config, self.default_scheduler.is_flow_matching)
        prompts, _ = self._padded([job])
        request = build_request(
            self.pipe.spec,
            self.pipe.calls.has_component("text_encoder_3"),
            **self._call_arguments([job], prompts),
            progress=False,
        )
        self.pipe.calls.prepare_run(request)
        check_memory(self.pipe.spec, request)  # a size this machine cannot hold: 400, not a failed batch

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            self._drop_cancelled()
            if len(self._queue) >= self.settings.queue_size:
                raise QueueFull(f"{len(self._queue)} requests are waiting already")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._lock.notify_all()
        return job.future

    def _drop_cancelled(self) -> None:
        """Forget the jobs whose clients went away or timed out (they hold no place in the queue)."""
        for job in [j for j in self._queue if j.future.cancelled()]:
            self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))

    @property
    def accepting(self) -> bool:
        return self._accepting and self._worker.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs; the queued ones finish (or `timeout` passes)."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        self._worker.join(timeout)

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop the abandoned
            if live:
                self._run(live)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and, within max_wait_ms, the next ones with its key that fit the batch."""
        with self._lock:
            self._drop_cancelled()
            while not self._queue:
                if not self._accepting:
                    return None
                self._lock.wait()
                self._drop_cancelled()
            first = self._queue[0]
            deadline = first.enqueued + self.settings.max_wait_ms / 1000
            while True:
                batch = self._matching(first)
                if sum(j.n for j in batch) >= self.capacity or not self._accepting:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._lock.wait(left)
            for job in batch:
                self._queue.remove(job)
            self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _matching(self, first: Job) -> list[Job]:
        batch, images = [], 0
        for job in self._queue:
            if job.key == first.key and images + job.n <= self.capacity:
                batch.append(job)
                images += job.n
        return batch

    def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            self.metrics.latency.labels("queue").observe(now - job.enqueued)
        prompts, real = self._padded(jobs)
        self.metrics.batch_size.observe(real)
        try:
            name = jobs[0].scheduler
            self.pipe.scheduler = self.default_scheduler
            if name is not None:
                self.pipe.set_scheduler(name)
            out = self.pipe(**self._call_arguments(jobs, prompts), output_type="pil", progress=False)
        except Exception as err:  # noqa: BLE001 - the batch fails, the server goes on
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.metrics.errors.labels("engine").inc(len(jobs))
            for job in jobs:
                job.future.set_exception(EngineFailure(f"{type(err).__name__}: {reason}"))
            return
        self.metrics.latency.labels("generate").observe(time.perf_counter() - now)
        start = 0
        for job in jobs:
            job.future.set_result(list(out.images[start : start + job.n]))
            start += job.n

    def _padded(self, jobs: list[Job]) -> tuple[list[tuple[str, Any]], int]:
        """(prompt, generator) per image, padded to a static artifact's batch; and the real count."""
        import torch

        images: list[tuple[str, Any]] = []
        for job in jobs:
            generator = torch.Generator().manual_seed(job.seed)  # one per request: its n images draw in turn
            images += [(job.prompt, generator)] * job.n
        real = len(images)
        if self.static_batch and real < self.static_batch:
            images += [(images[-1][0], torch.Generator().manual_seed(0))] * (self.static_batch - real)
        return images, real

    @staticmethod
    def _call_arguments(jobs: list[Job], images: list[tuple[str, Any]]) -> dict[str, Any]:
        first = jobs[0]
        arguments: dict[str, Any] = dict(
            prompt=[p for p, _ in images],
            generator=[g for _, g in images],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            height=first.height,
            width=first.width,
        )
        if first.negative_prompt is not None:
            arguments["negative_prompt"] = [first.negative_prompt] * len(images)
        if first.image is not None:
            arguments.update(image=first.image, mask_image=first.mask, strength=first.strength)
        return arguments


class EngineFailure(DifflowerError):
    """The pipeline call of a batch raised."""


def _static_batch(pipe: Any) -> int | None:
    """The batch a static artifact was built for (None: any batch)."""
    manifest = getattr(pipe, "manifest", None)
    buckets = list(getattr(manifest, "buckets", None) or [])
    return buckets[0].batch if buckets else None


# -- the HTTP application ---------------------------------------------------------------------------


def manifest_summary(pipe: Any, source: str) -> dict[str, Any]:
    """What the page shows about the model: backend, precision and the parity recorded at export."""
    manifest = getattr(pipe, "manifest", None)
    spec = pipe.spec
    summary: dict[str, Any] = {
        "source": source,
        "family": spec.family,
        "native_size": spec.native_size,
        "size_multiple": spec.size_multiple,
    }
    if manifest is None:
        return {**summary, "backend": "eager reference", "precision": str(pipe.dtype).removeprefix("torch.")}
    return {
        **summary,
        "backend": manifest.backend,
        "precision": manifest.precision,
        "buckets": [str(b) for b in manifest.buckets],
        "parity": {
            name: {"passed": r.parity.passed, "summary": r.parity.summary, "gate": r.parity.gate}
            for name, r in manifest.components.items()
        },
    }


def create_app(pipe: Any, settings: ServeSettings | None = None, source: str = "", replica: str | None = None) -> Any:
    """The Starlette application serving `pipe` (a loaded artifact or checkpoint pipeline).

    `replica` names this copy of the server in the `X-Difflower-Replica` header of generation
    responses and in `/health` (default: host and process id), so a client behind a load balancer
    (Ray Serve's router) sees which replica answered.
    """
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    settings = settings or ServeSettings()
    metrics = Metrics()
    batcher = Batcher(pipe, settings, metrics)
    summary = manifest_summary(pipe, source)
    replica = replica or f"{socket.gethostname()}:{os.getpid()}"
    stamp = {"X-Difflower-Replica": replica}

    def error(status: int, message: str, field_name: str | None = None, headers: dict | None = None) -> Response:
        metrics.requests.labels(str(status)).inc()
        body = {"error": {"message": message, **({"field": field_name} if field_name else {})}}
        return JSONResponse(body, status_code=status, headers={**stamp, **(headers or {})})

    async def generations(request):
        try:
            job = await _parse_job(request, summary)
            batcher.check(job)
        except ArgumentError as err:
            status = 422 if isinstance(err, FieldError) else 400
            metrics.errors.labels("bad request").inc()
            name = err.name.lstrip("-").replace("-", "_")  # the API's field, where a CLI flag was named
            return error(status, f"{name}: {err.detail}", name)
        try:
            future = batcher.submit(job)
        except QueueFull as err:
            metrics.errors.labels("queue full").inc()
            return error(429, f"busy: {err}; retry later", headers={"Retry-After": "1"})
        except ShuttingDown as err:
            return error(503, str(err))
        waited = asyncio.wrap_future(future)
        deadline = time.perf_counter() + settings.timeout_s
        while True:
            try:
                images = await asyncio.wait_for(asyncio.shield(waited), timeout=0.25)
                break
            except TimeoutError:
                if await request.is_disconnected():  # the client is gone: its job never runs
                    future.cancel()
                    metrics.errors.labels("client gone").inc()
                    return error(499, "client closed the request")
                if time.perf_counter() > deadline:
                    future.cancel()
                    metrics.errors.labels("timeout").inc()
                    return error(504, f"no images within {settings.timeout_s:g} s; the server is busy")
            except EngineFailure as err:
                return error(500, f"generation failed: {err}")
        metrics.requests.labels("200").inc()
        data = [{"b64_json": _png_base64(image), "seed": job.seed} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=stamp)

    async def health(_request):
        return JSONResponse({"status": "ok", "replica": replica, "pid": os.getpid()})

    async def ready(_request):
        if batcher.accepting:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def metrics_endpoint(_request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def manifest(_request):
        return JSONResponse(summary)

    async def page(_request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.to_thread(batcher.stop, settings.timeout_s)  # in-flight and queued requests finish

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics_endpoint),
            Route("/v1/manifest", manifest),
            Route("/v1/images/generations", generations, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    return app


class FieldError(ArgumentError):
    """A malformed request body field (422), as opposed to a value the model refuses (400)."""


async def _parse_job(request: Any, summary: dict[str, Any]) -> Job:
    """The Job of a JSON body or a multipart form (with `image` / `mask` uploads)."""
    content_type = request.headers.get("content-type", "")
    uploads: dict[str, Any] = {}
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        body = {k: v for k, v in form.items() if not hasattr(v, "read")}
        for name in ("image", "mask"):
            if hasattr(form.get(name), "read"):
                uploads[name] = _read_image(name, await form[name].read())
    else:
        try:
            body = await request.json()
        except ValueError:
            raise FieldError("body", "is not JSON; send a JSON object (or a multipart form with uploads)") from None
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    known = {"prompt", "n", "size", "response_format", "negative_prompt", "steps", "guidance", "seed", "scheduler",
             "strength", "model", "user", "image", "mask"}  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise FieldError(unknown[0], f"is not a field of this API; known: {', '.join(sorted(known))}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise FieldError("prompt", "must be a non-empty string")
    if body.get("response_format", "b64_json") != "b64_json":
        raise FieldError("response_format", "only b64_json is served (images come back in the response)")
    height = width = None
    if body.get("size") is not None:
        height, width = _size(body["size"])
    if "mask" in uploads and "image" not in uploads:
        raise FieldError("mask", "needs an image upload too (inpainting)")
    return Job(
        prompt=prompt,
        n=_int(body, "n", 1, 1, MAX_IMAGES),
        seed=_int(body, "seed", 0, 0, 2**63 - 1),
        height=height,
        width=width,
        steps=_int(body, "steps", None, 1, 1000),
        guidance=_float(body, "guidance"),
        negative_prompt=_str(body, "negative_prompt"),
        scheduler=_str(body, "scheduler"),
        image=uploads.get("image"),
        mask=uploads.get("mask"),
        strength=_float(body, "strength"),
    )


def _int(body: dict, name: str, default: int | None, low: int, high: int) -> Any:
    value = body.get(name, default)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise FieldError(name, f"must be an integer, got {value!r}") from None
    if isinstance(value, bool) or isinstance(value, float) or not low <= number <= high:
        raise FieldError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return number


def _float(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(name, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or number != number or abs(number) == float("inf"):
        raise FieldError(name, f"must be a finite number, got {value!r}")
    return number


def _str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise FieldError(name, f"must be a string, got {value!r}")
    return value


def _size(value: Any) -> tuple[int, int]:
    """'WxH' (as image APIs give it) -> (height, width)."""
    if isinstance(value, str):
        w, sep, h = value.lower().partition("x")
        if sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0:
            return int(h), int(w)
    raise FieldError("size", f"must be 'WIDTHxHEIGHT' such as '512x512', got {value!r}")


def _read_image(name: str, data: bytes) -> Any:
    import PIL.Image

    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise FieldError(name, "is not an image PIL can read (PNG, JPEG, WebP)") from None
    return image.convert("L" if name == "mask" else "RGB")


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serve(pipe: Any, host: str, port: int, settings: ServeSettings, source: str = "") -> None:
    """Serve `pipe` with uvicorn until interrupted (SIGINT/SIGTERM drain the queue first)."""
    import uvicorn

    app = create_app(pipe, settings, source)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(settings.timeout_s))
