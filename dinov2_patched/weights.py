"""Finding, downloading and loading the official weight files.

Resolution order: an explicit path -> the torch hub cache `<torch.hub.get_dir()>/checkpoints/<file>` ->
a download from `<base URL><official path>` (base URL: argument, else `$DINO_WEIGHTS_BASE_URL`, else
https://dl.fbaipublicfiles.com) written atomically into that cache -> WeightsNotFoundError.
"""

import functools
import hashlib
import http.client
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from dinov2_patched.models import model_spec

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com"
BASE_URL_ENV = "DINO_WEIGHTS_BASE_URL"
_CHUNK = 1 << 20


class WeightsNotFoundError(FileNotFoundError):
    """No weight file at the given path, in the cache, or at the download URL."""


class WeightsLoadError(RuntimeError):
    """A weight file exists but cannot be used (corrupt, truncated, or for another architecture)."""


def cache_dir() -> Path:
    """The folder torch hub keeps checkpoints in (follows $TORCH_HOME at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_url(name: str, base_url: str | None = None) -> str:
    """Download URL of the official weights of `name`."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + model_spec(name)["url_path"]


def download(url: str, destination: Path, progress: bool = True, timeout_s: float = 60.0) -> None:
    """Streams `url` into a temporary file next to `destination`, then renames it into place (atomic).

    Raises OSError (incl. urllib.error.URLError) on any failure; a partial download never reaches
    `destination`.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=destination.name, disable=not progress) as bar:
                written = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and written != expected:
                raise OSError(f"the connection closed after {written} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, destination)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def resolve_weights(name: str, weights: str | os.PathLike | None, base_url: str | None, progress: bool) -> Path:
    """Path of the weight file to load for `name` (downloading it into the cache when needed)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"Weight file {path} for {name} does not exist; check the path.")
        return path
    spec = model_spec(name)
    cached = cache_dir() / spec["file"]
    if cached.is_file():
        return cached
    url = weights_url(name, base_url)
    try:
        download(url, cached, progress=progress)
    # URLError/HTTPError/timeouts are OSErrors, a cut connection an HTTPException, a malformed URL a ValueError.
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise WeightsNotFoundError(
            f"Weights {spec['file']} for {name} are not in {cached.parent} and downloading {url} failed "
            f"({reason}); download the file by hand and put it in {cached.parent}/, or give the path of a weight "
            "file instead ('none' gives random weights)."
        ) from error
    return cached


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Loads a weight file with weights_only=True and unwraps `teacher`/`model`/`state_dict` wrappers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() and re.search(r"GLOBAL (\S+) was not an allowed global", str(error)):
            raise WeightsLoadError(
                f"Weight file {path} pickles {_refused_name(error)}, which loading with weights_only=True refuses (it "
                "could run code); use the official checkpoint or re-save it as a plain state dict."
            ) from error
        if "weights only" in str(error).lower():  # not a pickle of tensors at all, or one with opcodes torch refuses
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            raise WeightsLoadError(
                f"Weight file {path} is not a plain PyTorch state dict (safe loading stopped at: "
                f"{detail.group(1).strip() if detail else 'an unsupported pickle'}); use the official checkpoint or "
                "re-save it as a plain state dict."
            ) from error
        raise _corrupt(path, error) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _corrupt(path, error) from error
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise WeightsLoadError(f"Weight file {path} does not contain a state dict; use an official checkpoint.")
    return _strip_training_keys(state)



def _refused_name(error: BaseException) -> str:
    """What torch's weights_only unpickler refused; its own message is many lines that suggest weights_only=False."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    return found.group(1) if found else "objects other than tensors"


def _corrupt(path: Path, error: BaseException) -> WeightsLoadError:
    return WeightsLoadError(f"Weight file {path} is corrupt or truncated ({error}); delete it and download again.")


def _strip_training_keys(state: dict) -> dict[str, torch.Tensor]:
    """Drops `module.`/`backbone.` prefixes and DINO projection-head keys found in training checkpoints."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if not key.startswith("head."):
            cleaned[key] = value
    return cleaned


def check_architecture(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path, name: str) -> None:
    """WeightsLoadError naming the first missing, unexpected and shape-mismatched keys, if any."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label} {', '.join(keys[:3])}{more}")
    raise WeightsLoadError(
        f"Weight file {path} does not match the architecture of {name} ({'; '.join(problems)}); "
        "check that the file belongs to this model name."
    )


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a weight file: "sha256-" + the first 16 hex digits of its SHA-256.

    Memoised per (path, size, mtime) within the process, since the larger files take seconds to hash.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return "sha256-" + _file_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)[:16]
