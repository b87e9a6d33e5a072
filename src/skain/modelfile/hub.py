"""Hugging Face-style model folders: `model.safetensors` + `config.json` + `README.md` (the model card).

A folder in that shape is a model wherever `--model` or `skain.load` takes one (`skain.modelfile.load.resolve_path`
finds its `model.safetensors`); `hf://org/name[@revision]` downloads one from the Hugging Face Hub through
`huggingface_hub` (the optional `hub` extra) into the normal Hugging Face cache. `HF_HUB_OFFLINE=1` serves it from
the cache; `HF_ENDPOINT`, `HF_HOME` / `HF_HUB_CACHE` and `HF_TOKEN` are read when a model is loaded, not when
the library is imported, so a notebook can set them at any time.

Writing such a folder (`skain export --format hf`) needs the model card's text, so it lives in
`skain.evaluation.hub_export`; this module only names the files and reads and downloads folders.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from skain.modelfile.bundle import BundleError

log = logging.getLogger(__name__)

SCHEME = "hf://"
WEIGHTS = "model.safetensors"  # the portable, pickle-free bundle (skain.modelfile.portable)
CONFIG = "config.json"
CARD = "README.md"
LIBRARY = "skain"              # config.json's "library_name": what marks a skAIn model repository
HUB_EXTRA = "pip install 'skain[hub]'"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = ("1", "on", "yes", "true")


def is_hub_uri(model: str | Path) -> bool:
    return isinstance(model, str) and model.startswith(SCHEME)


def parse_uri(uri: str) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` -> (repo id, revision or None for the default branch)."""
    rest = uri[len(SCHEME):] if uri.startswith(SCHEME) else uri
    repo, _, revision = rest.partition("@")
    repo = repo.strip("/")
    if not _REPO.fullmatch(repo) or ".." in repo or (_ and not revision):
        raise BundleError(f"{uri!r} is not a Hugging Face model address: write hf://ORG/NAME or "
                          "hf://ORG/NAME@REVISION (a branch, tag or commit)")
    return repo, revision or None


def folder_weights(folder: Path) -> Path | None:
    """The weights file of a Hugging Face-style folder, or None when `folder` is not one."""
    path = folder / WEIGHTS
    return path if path.is_file() else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, read now: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def download(uri: str) -> Path:
    """`hf://org/name[@revision]` -> the local folder (in the Hugging Face cache) holding its model.safetensors.

    Fetches config.json and model.safetensors only (the card is for people); files already cached are not
    fetched again. Offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the cached copy is used; without one,
    a BundleError says so."""
    repo, revision = parse_uri(uri)
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise BundleError(f"{uri}: loading from the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}") from None
    where = f"{repo}" + (f"@{revision}" if revision else "")

    def fetch(filename: str) -> Path:
        return Path(str(huggingface_hub.hf_hub_download(
            repo, filename, revision=revision, cache_dir=str(cache_dir()), local_files_only=offline(),
            endpoint=os.environ.get("HF_ENDPOINT") or None, library_name=LIBRARY)))
    try:
        check_config(fetch(CONFIG), uri)
        weights = fetch(WEIGHTS)
    except errors.RevisionNotFoundError:
        raise BundleError(f"{uri}: the Hub repository {repo} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise BundleError(f"{uri}: no Hub repository {repo} (or it is private or gated: set HF_TOKEN)") from None
    except errors.RemoteEntryNotFoundError as exc:
        raise BundleError(f"{uri}: {where} has no {_missing(exc)}: not a skAIn model folder "
                          "(write one with `skain export --format hf`)") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached"
        raise BundleError(f"{uri}: {why} and {where} is not in the Hugging Face cache ({cache_dir()}); "
                          "connect once (unset HF_HUB_OFFLINE) to download it") from None
    except errors.HfHubHTTPError as exc:
        raise BundleError(f"{uri}: the Hub answered {(str(exc).splitlines() or ['an error'])[0][:200]}") from None
    except OSError as exc:  # connection refused, timeouts, a cache that cannot be written
        raise BundleError(f"{uri}: could not download {where} ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})") \
            from None
    log.info("model %s: %s", uri, weights.parent)
    return weights.parent


def _missing(exc: Exception) -> str:
    return CONFIG if CONFIG in str(exc) else WEIGHTS


def check_config(path: Path, origin: str) -> dict:
    """config.json of a skAIn folder: a JSON object naming skain as its library."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{origin}: {CONFIG} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or config.get("library_name") != LIBRARY:
        raise BundleError(f"{origin}: {CONFIG} does not describe a skAIn model (library_name is not "
                          f"{LIBRARY!r}); skAIn loads folders written by `skain export --format hf`")
    return config
