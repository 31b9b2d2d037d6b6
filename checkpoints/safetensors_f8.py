"""float8 tensors of a safetensors file read from its bytes.

The safetensors package's numpy loader (0.8) looks float8 dtypes up on numpy itself (`np.float8_e4m3fn`,
which numpy does not have) and raises; the format is simple enough to read directly: an 8-byte
little-endian header length, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}}
(offsets relative to the end of the header), then the raw row-major bytes. Here only "F8_E4M3"
(ml_dtypes.float8_e4m3fn, the fp8 checkpoints' weight type) is read; every other dtype goes through
safe_open as before.
"""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError

F8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}


def read_header(file: str) -> tuple[dict, int]:
    """→ ({tensor name: header entry}, byte offset of the data section)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def f8_names(header: dict) -> set[str]:
    """The tensors of a parsed header stored as float8 (any float8 dtype, so others can be refused)."""
    return {k for k, v in header.items() if str(v.get("dtype", "")).startswith("F8")}


def read_f8(file: str, header: dict, data_start: int, name: str) -> np.ndarray:
    """Tensor `name` (an F8_E4M3 entry of `header`) → numpy float8_e4m3fn of its shape."""
    entry = header[name]
    dtype = F8_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}; of the float8 types only "
                              f"{', '.join(F8_DTYPES)} (float8_e4m3fn) is supported")
    begin, end = entry["data_offsets"]
    shape = tuple(int(d) for d in entry["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count:
        raise CheckpointError(f"{file}: tensor {name}: {end - begin} bytes for shape {shape} (expected {count})")
    raw = np.fromfile(file, dtype=np.uint8, count=count, offset=data_start + begin)
    if raw.size != count:
        raise CheckpointError(f"{file}: cannot read tensor {name}: corrupt or truncated ({raw.size} of {count} bytes)")
    return raw.view(dtype).reshape(shape)
