"""Hugging Face Hub repo ids as checkpoints: `org/name` or `org/name@revision`, resolved to a snapshot.

huggingface_hub does the resolving and the downloading, so its cache and settings are the
user's own: HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, the token of `hf auth login` or HF_TOKEN.
A model diffusers already downloaded is read from that cache, not downloaded again. Only what
difflower reads is fetched: model_index.json, the components' configs, the tokenizers and the
safetensors weights of the requested variant (`fp16`, ...), never `.bin` pickles.

Anything that exists on disk is a local folder, whatever its name; a name that does not exist
and looks like `org/name[@revision]` is a repo id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflower.errors import CheckpointError

# `org/name` or `org/name@revision`: what a Hugging Face Hub repo id looks like.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_WEIGHTS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file stems
_FOLDER = re.compile(r"[A-Za-z0-9][\w.-]*")  # a component folder: a plain name


@dataclass(frozen=True)
class HubSnapshot:
    """Where a repo id was resolved to: the revision asked for and the commit it named."""

    repo_id: str
    revision: str
    commit: str
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def is_repo_id(model: str | Path) -> bool:
    """Whether `model` names a Hub repo rather than a local folder (which wins when it exists)."""
    text = str(model)
    if text.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".json")):
        return False  # a file's name, not a repo's: "not found" says more than a Hub lookup
    return not Path(text).exists() and REPO_ID.fullmatch(text) is not None


def component_folders(model_index: Path) -> list[str]:
    """The component folders `model_index.json` lists (read leniently: loading checks it properly)."""
    try:
        raw = json.loads(model_index.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    return sorted(
        name
        for name, value in raw.items()
        if isinstance(value, list) and len(value) == 2 and value[1] and _FOLDER.fullmatch(name)
    )


def allow_patterns(
    folders: list[str], variant: str | None = None, weights: bool = True, skip: Collection[str] = ()
) -> list[str]:
    """The files of a diffusers repo that difflower reads from `folders`, for the weights' `variant`:
    configs and tokenizer files, and (unless not `weights`) safetensors weights, one file or shards,
    but for the folders in `skip`."""
    tag = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for folder in folders:
        patterns += [f"{folder}/*.json", f"{folder}/*.txt", f"{folder}/*.model"]
        for stem in _WEIGHTS if weights and folder not in skip else ():
            patterns += [f"{folder}/{stem}{tag}.safetensors", f"{folder}/{stem}{tag}-*-of-*.safetensors"]
    return patterns


def resolve_checkpoint(
    model: str | Path, variant: str | None = None, weights: bool = True, skip: Collection[str] = ()
) -> tuple[Path, HubSnapshot | None]:
    """The local folder of checkpoint `model`: `model` itself, or the Hub snapshot a repo id names
    (downloaded into the Hub cache where it is not there yet). model_index.json comes first; the
    files of the components it lists follow, from the same commit; `weights=False` fetches the
    configs and tokenizers only (what `difflower convert --config-from` reads), `skip` leaves out
    those components' weights (a FLUX.1 file brings its transformer's)."""
    if not is_repo_id(model):
        return Path(model), None
    repo_id, _, revision = str(model).partition("@")
    revision = revision or "main"
    first = Path(_download(model, repo_id, revision, ["model_index.json"]))
    commit = first.name  # a snapshot folder is named by its commit
    patterns = allow_patterns(component_folders(first / "model_index.json"), variant, weights, skip)
    path = Path(_download(model, repo_id, commit, patterns))
    return path, HubSnapshot(repo_id, revision, commit, path)


def resolve_model_folder(model: str | Path, variant: str | None = None) -> tuple[Path, HubSnapshot | None]:
    """The local folder of a single model (a ControlNet: config.json and its weights at the top):
    `model` itself, or the snapshot of the Hub repo id it names."""
    if not is_repo_id(model):
        return Path(model), None
    repo_id, _, revision = str(model).partition("@")
    revision = revision or "main"
    tag = f".{variant}" if variant else ""
    patterns = ["*.json"] + [
        p for stem in _WEIGHTS for p in (f"{stem}{tag}.safetensors", f"{stem}{tag}-*-of-*.safetensors")
    ]
    path = Path(_download(model, repo_id, revision, patterns))
    return path, HubSnapshot(repo_id, revision, path.name, path)


def _download(model: str | Path, repo_id: str, revision: str, patterns: list[str]) -> str:
    """huggingface_hub's snapshot_download; its failures as one CheckpointError line each."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except GatedRepoError:
        raise CheckpointError(
            model,
            f"a gated Hub repo: accept its conditions on https://huggingface.co/{repo_id}, then log in "
            "(hf auth login) or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            model,
            "no local folder of that name, and no Hub repo either (a private one needs hf auth login or HF_TOKEN)",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(model, f"the Hub repo {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointError(
            model,
            f"no local folder of that name, and not in the Hub cache ({constants.HF_HUB_CACHE}) while {why}; "
            f"download it where there is network (hf download {repo_id} --revision {revision}) into that cache, "
            "or pass the local folder",
        ) from None
    except HFValidationError:
        raise CheckpointError(model, "no local folder of that name, nor a valid Hub repo id") from None
    except HfHubHTTPError as err:  # the Hub's other answers (a full disk is the CLI's, as everywhere)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(model, f"the Hub download failed: {first}") from None
