"""`difflower serve --ray`: the same HTTP application as a Ray Serve deployment, scaled out in replicas.

Each replica loads the engines once and runs `serve.create_app` (batcher, queue, metrics, page)
unchanged; Ray Serve's proxy takes the HTTP requests and its router spreads them over the replicas,
restarts a replica that dies and, with `max_replicas`, adds and removes replicas with the load. So
the one-machine server's contract holds per replica (504, 499, 500 for an engine error), and Ray
adds its own: a replica takes at most its queue and a batch, then up to `queue_size` requests wait
at the proxy and the next ones get Ray's 503 (where one server answers 429); a replica that dies
with requests in flight fails them with a 500 from the proxy (the client may retry).

On the command line: `difflower serve ART --ray --replicas 2 [--max-replicas 4]` starts (or, with
`RAY_ADDRESS`, joins) a Ray cluster. With Ray's own CLI: `serve run difflower.serve_ray:app
model=ART replicas=2`, or a `serve deploy` config whose application has `import_path:
difflower.serve_ray:app` and `args: {model: ART, ...}` (the README shows one).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from ray import serve

from difflower.errors import ArgumentError, DifflowerError, reason_line
from difflower.serve import ServeSettings, create_app

APP_NAME = "difflower"


@serve.deployment(name="difflower")
@serve.ingress()
class DifflowerReplica:
    """One replica: the engines, loaded once, behind the one-machine application."""

    def __init__(self, model: str, settings: ServeSettings, load_options: dict[str, Any], source: str):
        import difflower

        self.pipe = difflower.load(model, **load_options)
        self.settings = settings
        self.source = source
        self._app: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        replica = serve.get_replica_context().replica_id.unique_id
        self._app = create_app(self.pipe, self.settings, self.source, replica=f"{replica}:{os.getpid()}")
        return self._app

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose batch worker has stopped."""
        if self._app is not None and not self._app.state.batcher.accepting:
            raise DifflowerError("the replica's batch worker has stopped")


def build(
    model: Path | str,
    settings: ServeSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    device: str = "cpu",
    engine: str | None = None,
    threads: int | None = None,
    engine_options: dict[str, Any] | None = None,
) -> Any:
    """The Ray Serve application: `replicas` copies of the server (autoscaled up to `max_replicas`)."""
    if replicas < 1:
        raise ArgumentError("--replicas", f"must be >= 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ArgumentError("--max-replicas", f"must be >= --replicas ({replicas}), got {max_replicas}")
    model = Path(model).absolute()  # replicas do not share the driver's working directory
    if not model.is_dir():
        raise ArgumentError("MODEL", f"{model} not found: give an artifact or checkpoint folder")
    if threads is None and device == "cpu":  # the machine's cores shared out between the replicas
        threads = max(1, (os.cpu_count() or 1) // (max_replicas or replicas))
    actor = {"num_gpus": 1, "num_cpus": 1} if device.startswith("cuda") else {"num_cpus": threads}
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": settings.max_batch,  # a full batch per replica, then scale up
            }
        }
    deployment = DifflowerReplica.options(
        ray_actor_options=actor,
        max_ongoing_requests=settings.queue_size + settings.max_batch,  # what a replica's queue and batch hold
        max_queued_requests=settings.queue_size,  # waiting for a replica past that: beyond, Ray's 503
        graceful_shutdown_timeout_s=settings.timeout_s,  # in-flight requests finish on shutdown
        health_check_period_s=5,
        **scaling,
    )
    load_options = {"device": device, "engine": engine, "threads": threads, **(engine_options or {})}
    return deployment.bind(str(model), settings, load_options, str(model))


def app(args: dict[str, Any]) -> Any:
    """The application builder of `serve run difflower.serve_ray:app model=ART ...` and of config files.

    Fields: `model` (required), `replicas`, `max_replicas`, `device`, `engine`, `threads`, and the
    server settings `max_batch`, `max_wait_ms`, `queue_size`, `timeout_s`.
    """
    fields = {"model", "replicas", "max_replicas", "device", "engine", "threads"} | set(
        ServeSettings.__dataclass_fields__
    )
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ArgumentError(
            unknown[0], f"is not an argument of difflower.serve_ray:app; known: {', '.join(sorted(fields))}"
        )
    if "model" not in args:
        raise ArgumentError("model", "is required: the artifact (or checkpoint) folder to serve")

    def number(name: str, kind: type) -> Any:
        value = args.get(name)
        if value is None:
            return None
        try:
            return kind(value)  # `serve run` passes every argument as a string
        except (TypeError, ValueError):
            raise ArgumentError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None

    settings = ServeSettings(
        **{
            name: number(name, type(getattr(ServeSettings, name)))
            for name in ServeSettings.__dataclass_fields__
            if name in args
        }
    )
    return build(
        args["model"],
        settings,
        replicas=number("replicas", int) or 1,
        max_replicas=number("max_replicas", int),
        device=str(args.get("device", "cpu")),
        engine=args.get("engine"),
        threads=number("threads", int),
    )


def run(application: Any, host: str, port: int, settings: ServeSettings) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy, and serve until SIGINT/SIGTERM."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a CLI run
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # a replica failed to start: Ray's message ends with the reason
            raise DifflowerError(f"the replicas did not start: {reason_line(err)}") from None
        print(f"serving on http://{host}:{port}/ with Ray Serve (Ctrl-C drains and stops)", flush=True)
        _wait_for_signal()
        serve.delete(APP_NAME)  # replicas finish their in-flight requests (graceful_shutdown_timeout_s)
        serve.shutdown()
    finally:
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = False

    def handler(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
