"""`difflower generate MODEL --prompts FILE --out-dir DIR [--ray]`: a prompt file to a folder of images.

The prompt file holds one prompt per line (blank lines and lines starting with `#` are skipped).
Prompt number i (counting the prompts, from 0) is generated with seed `--seed + i`, exactly as
`difflower generate --prompt P --seed S` would make it: the same pixels and the same PNG bytes.

Its image goes to `DIR/{i:05d}-{words of the prompt}-{fingerprint}.png`, where the fingerprint
hashes everything that decides the image (model, prompt, seed, steps, guidance, scheduler, size,
init images, cache). So a run is resumable: images already in DIR are skipped, a run with other
settings writes new names beside the old ones, and nothing in DIR is ever replaced. Each image is
written through a temporary file, so an interrupted run leaves only whole images.

With `ray=True` the prompts run on Ray Data: `workers` actors (each loads the model once) take the
prompts, return PNG bytes, and this process writes them as they arrive.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflower.errors import ArgumentError, DifflowerError, reason_line

PROMPT_WORDS = 40  # characters of the prompt in a file name


@dataclass(frozen=True)
class Task:
    """One prompt of the file: its place, its seed and the names of its images."""

    index: int
    prompt: str
    seed: int
    names: tuple[str, ...]


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: one per line, blank lines and `#` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArgumentError("--prompts", f"{path} not found") from None
    except IsADirectoryError:
        raise ArgumentError("--prompts", f"{path} is a folder; give a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise ArgumentError("--prompts", f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise ArgumentError("--prompts", f"cannot read {path} ({err.strerror})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ArgumentError("--prompts", f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def plan(prompts: list[str], seed: int, num_images: int, settings: dict[str, Any]) -> list[Task]:
    """A task per prompt, named by its index, its words and the fingerprint of what decides its image."""
    tasks = []
    for index, prompt in enumerate(prompts):
        fingerprint = {**settings, "prompt": prompt, "seed": seed + index, "num_images": num_images}
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:10]
        words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:PROMPT_WORDS].strip("-") or "prompt"
        stem = f"{index:05d}-{words}-{digest}"
        names = (f"{stem}.png",) if num_images == 1 else tuple(f"{stem}-{k}.png" for k in range(num_images))
        tasks.append(Task(index, prompt, seed + index, names))
    return tasks


def image_metadata(model: str, prompt: str, negative_prompt: str | None, seed: int, guidance: float | None,
                   steps: int, scheduler: str) -> dict[str, str]:  # fmt: skip
    """The PNG text of a generated image: what made it."""
    import difflower

    return {
        "difflower": difflower.__version__,
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": str(seed),
        "steps": str(steps),
        "guidance": "default" if guidance is None else str(guidance),
        "scheduler": scheduler,
    }


def encode_image(image: Any, kind: str, metadata: dict[str, str]) -> bytes:
    """The bytes of `image` as PNG (with `metadata` as text chunks), JPEG or WEBP."""
    import PIL.PngImagePlugin

    options: dict[str, Any] = {}
    if kind == "PNG":
        info = PIL.PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


class Generator:
    """Loads the model once and turns a prompt into the PNG bytes of its images."""

    def __init__(self, model: str, load_options: dict[str, Any], call: dict[str, Any]):
        import difflower

        self.model = model
        self.call = call
        self.pipe = difflower.load(model, **load_options)

    def images(self, prompt: str, seed: int) -> list[bytes]:
        result = self.pipe(prompt=prompt, seed=seed, output_type="pil", progress=False, **self.call)
        metadata = image_metadata(
            self.model, prompt, self.call.get("negative_prompt"), seed, self.call.get("guidance_scale"),
            len(result.timesteps), type(self.pipe.scheduler).__name__,
        )  # fmt: skip
        return [encode_image(image, "PNG", metadata) for image in result.images]


def run(
    tasks: list[Task],
    out_dir: Path,
    model: str,
    load_options: dict[str, Any],
    call: dict[str, Any],
    *,
    ray: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Generate the tasks whose images are not in `out_dir` yet; (written, skipped) counts of prompts."""
    from tqdm.auto import tqdm

    from difflower.atomic import atomic_file

    if out_dir.exists() and not out_dir.is_dir():
        raise ArgumentError("--out-dir", f"{out_dir} is a file, not a folder")
    todo = [t for t in tasks if not all((out_dir / name).exists() for name in t.names)]
    results = _on_ray(todo, model, load_options, call, workers) if ray else _here(todo, model, load_options, call)
    with tqdm(total=len(todo), disable=not progress, desc="generate", unit="prompt") as bar:
        for task, pngs in results:
            for name, data in zip(task.names, pngs, strict=True):
                if (out_dir / name).exists():  # written by an earlier run: never replaced
                    continue
                with atomic_file(out_dir / name, argument="--out-dir") as tmp:
                    tmp.write_bytes(data)
            bar.update()
    return len(todo), len(tasks) - len(todo)


def _here(todo: list[Task], model: str, load_options: dict[str, Any], call: dict[str, Any]) -> Iterator:
    if not todo:
        return
    generator = Generator(model, load_options, call)
    for task in todo:
        yield task, generator.images(task.prompt, task.seed)


class _RayWorker:
    """A Ray Data actor: a `Generator` over batches of (index, prompt, seed) rows."""

    def __init__(self, model: str, load_options: dict[str, Any], call: dict[str, Any]):
        self.generator = Generator(model, load_options, call)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        pngs = [self.generator.images(str(p), int(s)) for p, s in zip(batch["prompt"], batch["seed"], strict=True)]
        out: dict[str, Any] = {"index": np.asarray(batch["index"])}
        for k in range(len(pngs[0]) if pngs else 0):
            out[f"png_{k}"] = np.array([images[k] for images in pngs], dtype=object)
        return out


def _on_ray(todo: list[Task], model: str, load_options: dict[str, Any], call: dict[str, Any],
            workers: int | None) -> Iterator:  # fmt: skip
    if not todo:
        return
    import ray
    import ray.data  # noqa: F401 - ray.data.from_items

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning")
    try:
        threads = load_options.get("threads") or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = workers or max(1, cpus // threads)
        options = {**load_options, "threads": threads}
        by_index = {t.index: t for t in todo}
        rows = [{"index": t.index, "prompt": t.prompt, "seed": t.seed} for t in todo]
        ray.data.DataContext.get_current().enable_progress_bars = False  # the bar is ours, per written prompt
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _RayWorker,
            fn_constructor_kwargs={"model": model, "load_options": options, "call": call},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            num_cpus=threads,
        )
        try:
            for row in dataset.iter_rows():
                task = by_index[int(row["index"])]
                yield task, [row[f"png_{k}"] for k in range(len(task.names))]
        except ray.exceptions.RayError as err:
            raise DifflowerError(f"a Ray worker failed: {reason_line(err)}") from None
    finally:
        if started:
            ray.shutdown()
