"""Safetensors files read tensor by tensor with plain file reads (no memory map): the reader every layout uses."""

from __future__ import annotations

import json
import os

import torch

from ..files import ExportError

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F8_E4M3": torch.float8_e4m3fn}
# A header larger than this is not a safetensors header (the format's own readers refuse above 100 MB too).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: str, select=None):
    """Yields (name, tensor) of a safetensors file, one tensor at a time, each read with plain file reads into its
    own buffer. safetensors' safe_open maps the file, and every page a tensor was read from stays resident (and
    counted in the process's RSS) until the file is closed: reading a 3.9 GB consolidated.safetensors that way
    added 2.5 GB to the export's peak; the real 25 GB file would add up to its whole size. select(name): only the
    tensors it accepts are read (an FP8 checkpoint's scales are read first, before the weights they scale)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ExportError(f"{path}: not a safetensors file (header length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path}: not a safetensors file (header: {err})") from None
        base = 8 + header_len
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            if select is not None and not select(name):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ExportError(f"{path}: {name} is {info.get('dtype')}; expected BF16, F16, F32 or F8_E4M3")
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            want = end - begin
            if want != torch.Size(shape).numel() * dtype.itemsize or base + end > size:
                raise ExportError(f"{path}: {name} ({info.get('dtype')} {shape}) does not fit bytes {begin}-{end} "
                                  f"of a {size}-byte file; the download is cut or corrupt")
            buffer = bytearray(want)
            f.seek(base + begin)
            if f.readinto(buffer) != want:
                raise ExportError(f"{path}: {name}: short read; the file changed while it was read")
            if not want:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(shape)
