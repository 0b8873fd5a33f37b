"""Sharded safetensors written tensor by tensor (the format's header first, then the bytes).

Hand-written rather than safetensors' save_file, which needs every tensor of a file in memory at
once: a 70B's 5 GB file would be held whole, where this holds one tensor.
"""

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class StreamingSafetensors:
    """Sharded safetensors written tensor by tensor, in the planned order.

    Every shape is known before the first byte (from params.json), so each file's header is
    written first and a tensor can be dropped as soon as its bytes are out: memory holds one
    tensor, never a whole file.
    """

    def __init__(self, out_dir: Path, plan: Sequence[tuple[str, tuple, torch.dtype]], max_file_bytes: int):
        self.files: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            size_of = nbytes(entry)
            if self.files[-1] and size + size_of > max_file_bytes:
                self.files.append([])
                size = 0
            self.files[-1].append(entry)
            size += size_of
        n = len(self.files)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out_dir, self.total_bytes = out_dir, sum(map(nbytes, plan))
        self._pending = [(i, entry) for i, entries in enumerate(self.files) for entry in entries]
        self._next, self._handle, self._open_index = 0, None, -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (want_name, shape, dtype) = self._pending[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, tuple(shape), dtype):
            raise AssertionError(f"wrote {name} {tuple(tensor.shape)} {tensor.dtype}, planned {want_name} {shape} {dtype}")
        if index != self._open_index:
            self._open(index)
        self._handle.write(tensor.contiguous().view(torch.uint8).numpy().data)  # no extra copy
        self._next += 1
        if self._next == len(self._pending) or self._pending[self._next][0] != index:
            self._handle.close()

    def _open(self, index: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.files[index]:
            end = offset + nbytes((name, shape, dtype))
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
        self._handle = open(self.out_dir / self.names[index], "wb")
        self._handle.write(struct.pack("<Q", len(blob)) + blob)
        self._open_index = index

    def close(self) -> None:
        if self._next != len(self._pending):
            raise AssertionError(f"{len(self._pending) - self._next} planned tensors never written")
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, entries in enumerate(self.files) for name, _, _ in entries}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()


def nbytes(entry: tuple[str, tuple, torch.dtype]) -> int:
    _, shape, dtype = entry
    return math.prod(shape) * dtype.itemsize

