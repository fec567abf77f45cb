"""Write one safetensors file tensor by tensor, never holding the whole file in memory.

    writer = StreamWriter(path, [(name, shape, dtype), ...], metadata={"format": "pt"})
    for name, tensor in produce():      # in the announced order
        writer.write(name, tensor)
    info = writer.close()               # {"sha256", "bytes"}, the file fsynced

The format (what safetensors' own reader checks): an 8-byte little-endian header length,
a JSON header (padded with spaces to a multiple of 8) giving each tensor's dtype, shape and
[start, end) byte offsets into the data that follows, offsets contiguous in header order.
Shapes and dtypes are known before the data (a checkpoint's header, or the mapping's),
so the header goes first and each tensor is streamed, hashed and dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def nbytes(shape: list[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class StreamWriter:
    def __init__(self, path: Path, specs: list[tuple[str, list[int], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path, self.specs, self._next = Path(path), list(specs), 0
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, shape, dtype in self.specs:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._sha = hashlib.sha256()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        self._sha.update(data)
        self._file.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next announced tensor; its shape and dtype must be the announced ones."""
        want_name, shape, dtype = self.specs[self._next]
        if name != want_name or list(tensor.shape) != list(shape) or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: got {name} {list(tensor.shape)} {tensor.dtype}, "
                             f"announced {want_name} {list(shape)} {dtype}")
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        self._put(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> dict:
        if self._next != len(self.specs):
            self._file.close()
            raise ValueError(f"{self.path}: {len(self.specs) - self._next} announced tensors "
                             f"were never written (next: {self.specs[self._next][0]})")
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        return {"sha256": self._sha.hexdigest(), "bytes": size}

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
