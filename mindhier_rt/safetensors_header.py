"""Read a safetensors header (names, dtypes, shapes, metadata) without loading any tensor, with bounded memory.

A safetensors file is an 8-byte little-endian header length, a JSON header and the tensor bytes. Whoever reads
an untrusted file should look at the header first: it says what the file would make us allocate. This reader
caps the header's size before reading it and checks that every tensor's byte range matches its dtype and shape
and lies inside the file, so the tensors a file can make a reader allocate are bounded by the file's size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mindhier_rt.errors import CheckpointError

MAX_HEADER_BYTES = 16 * 2**20  # the JSON header of the largest preset's checkpoint is about 100 kB

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the header lists it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    file_bytes: int


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: expected a safetensors file, found an unreadable or corrupt file ({what})")


def _tensor_spec(path: Path, name: str, entry: object, data_bytes: int) -> TensorSpec:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, f"tensor {name!r}: expected dtype, shape and data_offsets, found {entry!r:.80}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _fail(path, f"tensor {name!r}: expected a dtype among {', '.join(DTYPE_BYTES)}, found {dtype!r:.40}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: expected a list of non-negative sizes as shape, found {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _fail(path, f"tensor {name!r}: expected data_offsets [begin, end], found {offsets!r:.80}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
        raise _fail(
            path,
            f"tensor {name!r} of dtype {dtype} and shape {tuple(shape)}: expected {nbytes} bytes inside the "
            f"{data_bytes} data bytes, found offsets {begin}..{end}",
        )
    return TensorSpec(dtype=dtype, shape=tuple(shape), nbytes=nbytes)


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """The header of ``path``: tensor specs and string metadata. Reads at most ``8 + max_header_bytes`` bytes.

    Raises CheckpointError for a missing, truncated or inconsistent file.
    """
    try:
        file_bytes = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"expected an 8-byte header length, found a {len(prefix)}-byte file")
            n = int.from_bytes(prefix, "little")
            limit = min(max_header_bytes, file_bytes - 8)
            if n > limit:
                raise _fail(path, f"expected a header of at most {limit} bytes, found a length of {n}")
            raw = fh.read(n)
    except OSError as e:
        raise _fail(path, str(e)) from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _fail(path, f"expected a JSON object as header, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "expected string-to-string __metadata__")
    data_bytes = file_bytes - 8 - n
    tensors = {name: _tensor_spec(path, name, entry, data_bytes) for name, entry in header.items()}
    return SafetensorsHeader(tensors=tensors, metadata=metadata, file_bytes=file_bytes)
