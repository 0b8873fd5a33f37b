"""Unpacking COG_WEIGHTS: escapes, links, bombs and floods are refused early, with nothing left on
disk, and messages name the archive the user gave."""

import io
import re
import tarfile
import zlib
from pathlib import Path

import pytest

from alpaca_tune.serving import weights
from alpaca_tune.serving.limits import Limits


def _tar_with(tmp_path, entries):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                data = b"{}"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _left_on_disk(workdir):
    return sorted(p.relative_to(workdir) for p in workdir.rglob("*") if p.is_file())


@pytest.mark.parametrize("entries, message", [
    ([("../escape.json", "file")], "points outside the target"),
    ([("/abs.json", "file")], "points outside the target"),
    ([("adapter/adapter_config.json", "link")], "is a link or device"),
    ([("adapter/fifo", "fifo")], "is a link or device"),
    ([("something/else.txt", "file")], "no adapter_config.json inside"),
])
def test_unsafe_or_foreign_archives_are_refused(tmp_path, entries, message):
    archive = _tar_with(tmp_path, entries)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(weights.WeightsError, match=message) as err:
        weights.fetch_weights(str(archive), workdir)
    assert str(err.value).startswith(str(archive))
    assert not (tmp_path / "escape.json").exists() and not (workdir.parent / "escape.json").exists()


def _bomb(path, member_size: int, block=64 << 20):
    """A real tar.gz (one gzip stream) whose one member is `member_size` zero bytes: ~1000x smaller
    than what it unpacks to."""
    header = tarfile.TarInfo("adapter/adapter_model.safetensors")
    header.size = member_size
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip framing
    zeros = bytes(block)
    with open(path, "wb") as out:
        out.write(compressor.compress(header.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(member_size // block):
            out.write(compressor.compress(zeros))
        out.write(compressor.compress(bytes(member_size % block + (-member_size) % 512 + 1024)))
        out.write(compressor.flush())
    return path


@pytest.mark.slow  # building it compresses 6 GiB (~15 s); refusing it takes milliseconds
def test_a_six_gib_bomb_is_refused_from_its_header(tmp_path):
    archive = _bomb(tmp_path / "bomb.tar.gz", 6 << 30)
    assert archive.stat().st_size < 8 << 20  # ~6 MB
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(weights.WeightsError, match=r"bomb.tar.gz: unpacks to more than 4,294,967,296 bytes"):
        weights.fetch_weights(str(archive), workdir)
    assert _left_on_disk(workdir) == []


def test_a_bomb_under_the_size_limit_stops_at_the_compression_ratio(tmp_path):
    archive = _bomb(tmp_path / "bomb.tar.gz", 256 << 20)  # 256 MiB of zeros: within the 4 GiB limit
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(weights.WeightsError, match="expands more than 100x") as err:
        weights.fetch_weights(str(archive), workdir)
    unpacked = int(re.search(r"([\d,]+) unpacked so far", str(err.value)).group(1).replace(",", ""))
    assert unpacked < 32 << 20  # stopped after tens of MB
    # what it wrote lies in a directory under workdir, which the caller (InstructModel.load) removes


def test_members_together_past_the_limit_are_refused_before_the_one_that_crosses_it(tmp_path):
    import os

    path = tmp_path / "two.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("adapter/a.bin", "adapter/b.bin"):
            info = tarfile.TarInfo(name)
            info.size = 600_000
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(weights.WeightsError, match="unpacks to more than 1,000,000 bytes"):
        weights.unpack(path, workdir, limits=Limits(max_unpacked_bytes=1_000_000))
    assert _left_on_disk(workdir) == [Path("adapter/a.bin")]  # b.bin never written


def test_a_flood_of_members_is_refused(tmp_path):
    path = tmp_path / "flood.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for index in range(1001):
            tar.addfile(tarfile.TarInfo(f"adapter/empty-{index}"), io.BytesIO(b""))
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(weights.WeightsError, match="more than 1000 archive entries"):
        weights.fetch_weights(str(path), workdir)


def test_limits_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_TUNE_MAX_UNPACKED_BYTES", "10")
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("adapter/adapter_model.safetensors")
        info.size = 100
        tar.addfile(info, io.BytesIO(b"x" * 100))
    with pytest.raises(weights.WeightsError, match="unpacks to more than 10 bytes"):
        weights.fetch_weights(str(path), tmp_path)
    import base64

    uri = "data:application/gzip;base64," + base64.b64encode(path.read_bytes()).decode()
    with pytest.raises(weights.WeightsError, match=r"weights=data:.*larger than 10 bytes"):
        weights.fetch_weights(uri, tmp_path)
    monkeypatch.setenv("ALPACA_TUNE_MAX_UNPACKED_BYTES", "lots")
    with pytest.raises(weights.UserError, match=r"\$ALPACA_TUNE_MAX_UNPACKED_BYTES='lots': must be a positive"):
        Limits.from_env()


def test_a_training_config_that_is_not_json_names_the_archive(tmp_path):
    path = tmp_path / "weights.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("adapter/adapter_config.json", b"{}"), ("training_config.json", b"{oops")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    adapter = weights.fetch_weights(str(path), tmp_path)
    with pytest.raises(weights.WeightsError, match=rf"^{re.escape(str(path))}: training_config.json: not UTF-8 JSON"):
        weights.read_training_config(adapter)
