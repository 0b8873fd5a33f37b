"""COG_WEIGHTS -> the adapter directory: an archive from train.py, a directory, or a URL.

Unpacking reads the archive as a stream, one member at a time, and stops at the first member that
could escape the target directory, is a link or a device, or would take the archive past its
limits (limits.py): bytes written, members, compression ratio. So a small archive that unpacks
to gigabytes is refused after at most a few seconds of decompression, and whatever it wrote
lies in a temporary directory its caller removes. Messages name what the user gave, never the
temporary directory.
"""

from __future__ import annotations

import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..adapter_files import ADAPTER_CONFIG, ADAPTER_SUBDIR, CONFIG_FILE, MODEL_SUBDIR
from ..errors import UserError, read_json
from .limits import MAX_COMPRESSION_RATIO, RATIO_CHECKED_AFTER, Limits

CHUNK = 1 << 20


class WeightsError(UserError):
    """An adapter or archive is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class FetchedAdapter:
    root: Path  # the directory holding adapter_config.json (or a full model's config.json)
    label: str  # what the user gave (archive, directory, shortened URL), for messages
    full_model: bool = False  # train.py's finetune_method=full: the archive holds the model itself


def _member_path(member: tarfile.TarInfo, label: str) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not name.parts or "\\" in member.name:
        raise WeightsError(f"{label}: archive entry {member.name!r} points outside the target; refused")
    if not (member.isfile() or member.isdir()):
        raise WeightsError(f"{label}: archive entry {member.name!r} is a link or device; refused")
    return name


def _extract(tar: tarfile.TarFile, raw, target: Path, label: str, limits: Limits) -> None:
    written = 0
    for count, member in enumerate(tar, start=1):
        if count > limits.max_archive_members:
            raise WeightsError(f"{label}: more than {limits.max_archive_members} archive entries; refused "
                               f"(an adapter archive has a handful)")
        name = _member_path(member, label)
        destination = target.joinpath(*name.parts)
        if member.isdir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        if written + member.size > limits.max_unpacked_bytes:
            raise WeightsError(f"{label}: unpacks to more than {limits.max_unpacked_bytes:,} bytes "
                               f"($ALPACA_TUNE_MAX_UNPACKED_BYTES); refused")
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        with open(destination, "wb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > limits.max_unpacked_bytes:  # a header that lied about its size
                    raise WeightsError(f"{label}: unpacks to more than {limits.max_unpacked_bytes:,} bytes "
                                       f"($ALPACA_TUNE_MAX_UNPACKED_BYTES); refused")
                if written > RATIO_CHECKED_AFTER and written > MAX_COMPRESSION_RATIO * raw.tell():
                    raise WeightsError(f"{label}: expands more than {MAX_COMPRESSION_RATIO}x "
                                       f"({raw.tell():,} bytes read, {written:,} unpacked so far): no adapter "
                                       f"compresses like that; refused as an archive bomb")
                out.write(chunk)


def unpack(archive: Path, target: Path, label: str | None = None, limits: Limits | None = None) -> FetchedAdapter:
    """Unpack an adapter archive safely into target (an empty directory the caller removes)."""
    label = label or str(archive)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            _extract(tar, raw, target, label, limits or Limits.from_env())
    except WeightsError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as err:
        raise WeightsError(f"{label}: not a readable adapter archive (.tar.gz): {err}") from None
    return find_adapter_root(target, label)


def find_adapter_root(directory: Path, label: str | None = None) -> FetchedAdapter:
    """The directory that holds adapter_config.json: `directory/adapter` or `directory` itself; or,
    from a full fine-tuning run, `directory/model` holding the whole model (config.json, weights)."""
    label = label or str(directory)
    for candidate in (directory / ADAPTER_SUBDIR, directory):
        if (candidate / ADAPTER_CONFIG).is_file():
            return FetchedAdapter(candidate, label)
    model = directory / MODEL_SUBDIR
    if (model / "config.json").is_file() and any(model.glob("*.safetensors")):
        return FetchedAdapter(model, label, full_model=True)
    raise WeightsError(f"{label}: no {ADAPTER_CONFIG} inside; expected an archive from train.py or a "
                       f"PEFT adapter directory")


def read_training_config(adapter: FetchedAdapter) -> dict:
    """The training_config.json beside (or in) the adapter directory as a JSON object, or {}."""
    for candidate in (adapter.root.parent / CONFIG_FILE, adapter.root / CONFIG_FILE):
        if candidate.is_file():
            config = read_json(candidate, WeightsError, f"{adapter.label}: {CONFIG_FILE}")
            if not isinstance(config, dict):
                raise WeightsError(f"{adapter.label}: {CONFIG_FILE} must be a JSON object, is a JSON "
                                   f"{type(config).__name__}")
            template = config.get("prompt_template")
            if template is not None and not isinstance(template, dict):
                raise WeightsError(f"{adapter.label}: {CONFIG_FILE}: field 'prompt_template' must be the "
                                   f"template as a JSON object (as train.py writes it), is {template!r:.60}")
            return config
    return {}


def _download(url: str, target: Path, label: str, limits: Limits) -> Path:
    import urllib.request

    written = 0
    try:
        with urllib.request.urlopen(url, timeout=300) as response, open(target, "wb") as out:
            while chunk := response.read(CHUNK):
                written += len(chunk)
                if written > limits.max_unpacked_bytes:
                    raise WeightsError(f"{label}: larger than {limits.max_unpacked_bytes:,} bytes "
                                       f"($ALPACA_TUNE_MAX_UNPACKED_BYTES); refused")
                out.write(chunk)
    except WeightsError:
        raise
    except (OSError, ValueError) as err:
        raise WeightsError(f"{label}: download failed: {err}") from None
    return target


def fetch_weights(weights: str, workdir: Path, limits: Limits | None = None) -> FetchedAdapter:
    """COG_WEIGHTS -> the adapter directory. Accepted: an archive file, an adapter directory, an
    http(s) URL to an archive, or the archive as a data: URI (what POST /trainings returns).
    Archives are unpacked under `workdir`, which the caller removes."""
    limits = limits or Limits.from_env()
    if weights.startswith(("http://", "https://", "data:")):
        label = "weights=" + (weights if len(weights) < 80 else weights[:60] + "...")
        downloaded = _download(weights, workdir / "weights-download", label, limits)
        return unpack(downloaded, Path(tempfile.mkdtemp(dir=workdir)), label, limits)
    path = Path(weights)
    if path.is_dir():
        return find_adapter_root(path)
    if path.is_file():
        return unpack(path, Path(tempfile.mkdtemp(dir=workdir)), str(path), limits)
    raise WeightsError(f"weights={weights}: no such file or directory")
