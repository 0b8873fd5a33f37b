"""The training output: a verified PEFT adapter plus what is needed to use and judge it.

Archive layout (adapter.tar.gz):
    adapter/adapter_config.json        loadable by peft.PeftModel.from_pretrained unchanged
    adapter/adapter_model.safetensors
    training_config.json               resolved settings, base model, prompt template
    metrics.json                       loss per step, eval loss, tokens/s, wall time
    loss.png                           the loss curve

Saving checks the adapter is real (alpaca-lora's state_dict monkeypatch once wrote 443-byte
adapters with no weights in them); unpacking refuses anything that could escape the target
directory, links, and archives beyond a size limit.
"""

from __future__ import annotations

from .errors import UserError

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch

ADAPTER_SUBDIR = "adapter"
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
ARCHIVE_NAME = "adapter.tar.gz"
MAX_UNPACKED_BYTES = 8 * 1024**3  # a LoRA for a 70B at rank 64 is well under 2 GB


class ArtifactError(UserError):
    """An adapter or archive is unusable; the message names the file and the problem."""


def expected_lora_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every LoRA tensor, enumerated from the modules (independently of PEFT's
    own state-dict helper, which is what the check guards)."""
    shapes = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not lora_a:
            continue
        for adapter_name in lora_a:
            prefix = name if adapter_name == "default" else f"{name}.{adapter_name}"
            shapes[f"{prefix}.lora_A.weight"] = tuple(lora_a[adapter_name].weight.shape)
            shapes[f"{prefix}.lora_B.weight"] = tuple(module.lora_B[adapter_name].weight.shape)
    return shapes


def snapshot_lora(peft_model) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, to prove later that training changed them."""
    return {n: p.detach().clone().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}


def verify_adapter_dir(adapter_dir: Path, expected: dict[str, tuple[int, ...]],
                       initial: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights_file.is_file():
        raise ArtifactError(f"{adapter_dir}: adapter_config.json or adapter_model.safetensors missing")
    saved = load_file(str(weights_file))
    want = {_saved_key(key): shape for key, shape in expected.items()}
    missing = sorted(set(want) - set(saved))
    if not saved or missing:
        raise ArtifactError(f"{weights_file}: {len(saved)} tensors saved, {len(missing)} LoRA tensors "
                            f"missing (e.g. {missing[:2]}); refusing to write an empty adapter")
    for key, shape in want.items():
        if tuple(saved[key].shape) != shape:
            raise ArtifactError(f"{weights_file}: {key} has shape {tuple(saved[key].shape)}, "
                                f"expected {shape}")
    if initial is not None:
        before = {_saved_key(key): value for key, value in initial.items()}
        lora_b = [k for k in want if k.endswith("lora_B.weight")]
        unchanged = [k for k in lora_b if k in before and torch.equal(saved[k].float(), before[k].float())]
        if len(unchanged) == len(lora_b):
            raise ArtifactError(f"{weights_file}: no LoRA weight moved from its initial value; "
                                f"training did not update the adapter")


def _saved_key(name: str) -> str:
    """PEFT saves keys without the adapter name: "...q_proj.lora_A.default.weight" -> "...lora_A.weight"."""
    return name.replace(".default.", ".")


def save_adapter(peft_model, adapter_dir: Path, initial: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the PEFT adapter directory and check its contents before anyone relies on it."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    verify_adapter_dir(adapter_dir, expected_lora_shapes(peft_model), initial)
    return adapter_dir


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pack(output_dir: Path) -> Path:
    """adapter.tar.gz in output_dir with the adapter and the run's config, metrics and plot."""
    archive = output_dir / ARCHIVE_NAME
    partial = output_dir / (ARCHIVE_NAME + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(output_dir / ADAPTER_SUBDIR, arcname=ADAPTER_SUBDIR)
        for name in (CONFIG_FILE, METRICS_FILE, PLOT_FILE):
            if (output_dir / name).exists():
                tar.add(output_dir / name, arcname=name)
    partial.rename(archive)
    return archive


def _safe_members(tar: tarfile.TarFile, source: Path):
    total = 0
    for member in tar.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise ArtifactError(f"{source}: archive entry {member.name!r} points outside the target")
        if not (member.isfile() or member.isdir()):
            raise ArtifactError(f"{source}: archive entry {member.name!r} is a link or device; refused")
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise ArtifactError(f"{source}: unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB; refused")
        yield member


def unpack(archive: Path, target: Path) -> Path:
    """Unpack an adapter archive safely into target; return the directory holding the adapter."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = list(_safe_members(tar, archive))
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArtifactError(f"{archive}: not a readable adapter archive (.tar.gz): {err}") from None
    return find_adapter_root(target, source=archive)


def find_adapter_root(directory: Path, source: Path | None = None) -> Path:
    """The directory that holds adapter_config.json: `directory/adapter` or `directory` itself."""
    for candidate in (directory / ADAPTER_SUBDIR, directory):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ArtifactError(f"{source or directory}: no adapter_config.json inside; expected an archive "
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
        raise ArtifactError(f"weights={shown}: download failed: {err}") from None
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
    raise ArtifactError(f"weights={weights}: no such file or directory")
