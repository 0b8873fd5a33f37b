"""COG_WEIGHTS -> the adapter directory: an archive from train.py, a directory, or a URL.

Unpacking refuses anything that could escape the target directory, links and devices, and
archives beyond a size limit.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..adapter_files import ADAPTER_CONFIG, ADAPTER_SUBDIR, CONFIG_FILE
from ..errors import UserError

MAX_UNPACKED_BYTES = 8 * 1024**3  # a LoRA for a 70B at rank 64 is well under 2 GB


class WeightsError(UserError):
    """An adapter or archive is unusable; the message names the file and the problem."""


def _safe_members(tar: tarfile.TarFile, source: Path):
    total = 0
    for member in tar.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise WeightsError(f"{source}: archive entry {member.name!r} points outside the target")
        if not (member.isfile() or member.isdir()):
            raise WeightsError(f"{source}: archive entry {member.name!r} is a link or device; refused")
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise WeightsError(f"{source}: unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB; refused")
        yield member


def unpack(archive: Path, target: Path) -> Path:
    """Unpack an adapter archive safely into target; return the directory holding the adapter."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = list(_safe_members(tar, archive))
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise WeightsError(f"{archive}: not a readable adapter archive (.tar.gz): {err}") from None
    return find_adapter_root(target, source=archive)


def find_adapter_root(directory: Path, source: Path | None = None) -> Path:
    """The directory that holds adapter_config.json: `directory/adapter` or `directory` itself."""
    for candidate in (directory / ADAPTER_SUBDIR, directory):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise WeightsError(f"{source or directory}: no {ADAPTER_CONFIG} inside; expected an archive "
                        f"from train.py or a PEFT adapter directory")


def read_training_config(adapter_root: Path) -> dict:
    """The training_config.json that sits beside (or in) the adapter directory, or {}."""
    for candidate in (adapter_root.parent / CONFIG_FILE, adapter_root / CONFIG_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _download(url: str, target: Path) -> Path:
    import urllib.request

    shown = url if len(url) < 80 else url[:60] + "..."
    try:
        with urllib.request.urlopen(url, timeout=300) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as err:
        raise WeightsError(f"weights={shown}: download failed: {err}") from None
    return target


def fetch_weights(weights: str, workdir: Path) -> Path:
    """COG_WEIGHTS -> the adapter directory. Accepted: an archive file, an adapter directory, an
    http(s) URL to an archive, or the archive as a data: URI (what POST /trainings returns)."""
    if weights.startswith(("http://", "https://", "data:")):
        downloaded = _download(weights, workdir / "weights-download")
        return unpack(downloaded, Path(tempfile.mkdtemp(dir=workdir)))
    path = Path(weights)
    if path.is_dir():
        return find_adapter_root(path)
    if path.is_file():
        return unpack(path, Path(tempfile.mkdtemp(dir=workdir)))
    raise WeightsError(f"weights={weights}: no such file or directory")
