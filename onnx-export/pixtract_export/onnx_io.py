"""ONNX files, without torch: initializer sizes, the weights digest, and writing a graph with its weights inline or in
one external data file (`<graph>.onnx_data`). Used by `export` (trace.py), `quantize` and `sizes`."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx

OPSET = 17
# Above this many bytes of weights a graph keeps its tensors in a side file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's values from its dims and type (no data is read; sub-byte types rounded up)."""
    count = 1
    for d in t.dims:
        count *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def weights_digest(model: onnx.ModelProto, base_dir: str = "") -> str:
    """sha256 over the graph's initializers (name, type, dims, bytes) in name order: equal weights, equal digest.

    Initializers stored as external data are hashed straight from their file under base_dir (the graph file's
    folder) in 16 MiB reads: a 1.3 GB LM head is never materialised (numpy_helper.to_array + tobytes held it twice).
    """
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        external = init.HasField("data_location") and init.data_location == onnx.TensorProto.EXTERNAL
        if external and init.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            info = {e.key: e.value for e in init.external_data}
            h.update(init.name.encode())
            h.update(str(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).encode())
            h.update(str(list(init.dims)).encode())
            remaining = tensor_nbytes(init)
            with open(os.path.join(base_dir, info["location"]), "rb") as f:
                f.seek(int(info.get("offset", 0)))
                while remaining:
                    chunk = f.read(min(remaining, 16 << 20))
                    if not chunk:
                        raise ValueError(f"{info['location']}: ends inside initializer {init.name}")
                    h.update(chunk)
                    remaining -= len(chunk)
            continue
        arr = numpy_helper.to_array(init, base_dir)
        h.update(init.name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(list(arr.shape)).encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)) if arr.flags.c_contiguous and arr.dtype != object
                 else arr.tobytes())
        del arr
    return h.hexdigest()


# Initializers of at least this many bytes go to the data file (smaller ones stay inline, as onnx.save does).
EXTERNAL_MIN_TENSOR_BYTES = 1024
# Offsets of tensors of at least 1 MiB in the data file are multiples of this, so ONNX Runtime can map them.
EXTERNAL_ALIGN = 64 * 1024


def _is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _tensor_bytes(t: onnx.TensorProto, base_dir: str) -> bytes:
    """The raw little-endian bytes of one initializer, read from its external file when it has one."""
    if _is_external(t):
        info = {e.key: e.value for e in t.external_data}
        with open(os.path.join(base_dir, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            return f.read(length)
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def save_graph(model: onnx.ModelProto, path: str, source_dir: str | None = None,
               threshold: int | None = None) -> bool:
    """Writes model to path; returns whether its weights went to `<file>_data`.

    Initializers may still live in files under source_dir (an exporter's scratch output, or the model directory
    a graph was loaded from with load_external_data=False). Above `threshold` bytes of weights (default
    EXTERNAL_DATA_THRESHOLD) every initializer of >= 1 KiB is copied, one at a time, into a single data file and
    the proto keeps only references: the proto written stays far below protobuf's 2 GB limit and the weights are
    never all in memory. Below it, the weights are read back inline and the graph is one file.
    """
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    inits = model.graph.initializer
    weight_bytes = sum(tensor_nbytes(t) for t in inits)
    external = weight_bytes > threshold
    if not external:
        for t in inits:
            if _is_external(t):
                t.raw_data = _tensor_bytes(t, source_dir or "")
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(model, path)
        return False
    location = os.path.basename(path) + "_data"
    data_path = os.path.join(os.path.dirname(path), location)
    if source_dir and os.path.abspath(os.path.join(source_dir, location)) == os.path.abspath(data_path):
        raise ValueError(f"save_graph: {data_path} would overwrite the data it is read from")
    with open(data_path, "wb") as data:
        for t in inits:
            if tensor_nbytes(t) < EXTERNAL_MIN_TENSOR_BYTES:
                if _is_external(t):
                    t.raw_data = _tensor_bytes(t, source_dir or "")
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                continue
            blob = _tensor_bytes(t, source_dir or "")
            if len(blob) >= (1 << 20):
                pad = (-data.tell()) % EXTERNAL_ALIGN
                data.write(b"\0" * pad)
            offset = data.tell()
            data.write(blob)
            del blob
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(tensor_nbytes(t)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return True
