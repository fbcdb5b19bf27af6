"""Weight-only quantization of an exported model directory with ONNX Runtime's MatMulNBits quantizer.

Every MatMul whose weight is a constant (the decoder's q/k/v/o and MLP projections and the LM head; the vision
encoder's too when asked) becomes a `com.microsoft.MatMulNBits` node holding 4- or 8-bit weights in blocks of
`block_size` along the input dimension, each block with its own scale (in the activation dtype) and zero point.
Activations, the KV cache and the logits keep the source model's dtype: a q4f16 model is an fp16 export whose
weights were then quantized. Round-to-nearest, no calibration data: deterministic, seconds even for 12B.

Block size: 32 by default. Smaller blocks follow the weights' local range more closely (better fidelity, what
ONNX Runtime GenAI's model builder and the onnx-community q4 exports use) at the cost of one scale + zero point per
32 weights: 0.578 bytes/weight at int4 with fp16 scales, against 0.520 at 128, i.e. 11% more for the quantized
matrices. For extraction, where one wrong digit is a wrong total, that trade goes to accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil

import onnx

from .files import ExportError, check_free_space, partial_output
from .manifest import graph_entry
from .onnx_io import save_graph

GRAPH_NAMES = ("vision_encoder", "embed_tokens", "decoder")
# Graphs the quantizer touches by default: the decoder holds ~97% of Pixtral 12B's weights. The vision encoder
# (0.4 B) reads every image once per page, so its precision matters more than its size; embeddings are a lookup
# (Gather), not a MatMul, and stay in the activation dtype.
DEFAULT_GRAPHS = ("decoder",)
LM_HEAD_NODE = "/lm_head/MatMul"


def variant_name(dtype: str, bits: int | None) -> str:
    """fp32, fp16, int8, int4, q8f16, q4f16: the names onnx-community exports use for the same layouts."""
    if not bits:
        return dtype
    return f"int{bits}" if dtype == "fp32" else f"q{bits}f16"


def _constant_matmuls(model: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return [(n.name, inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]]) == 2]


# A weight read from an external data file is quantized in slabs of whole rows of about this size: blocks run along
# the rows (the input dimension), so a slab of 2 x block_size rows or a multiple is quantized exactly as it would be
# in the whole matrix, and the 1.34 GB LM head of Pixtral 12B (fp16) is never in memory at once.
SLAB_BYTES = 64 << 20


def _external_location(t: onnx.TensorProto, base_dir: str) -> tuple[str, int]:
    info = {e.key: e.value for e in t.external_data}
    return os.path.join(base_dir, info["location"]), int(info.get("offset", 0))


def _read_rows(t: onnx.TensorProto, base_dir: str, first: int, count: int):
    """Rows first..first+count of a 2-D initializer, read alone (from its external data file when it has one)."""
    import numpy as np
    from onnx import numpy_helper

    rows, cols = t.dims
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)[first:first + count]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    path, offset = _external_location(t, base_dir)
    array = np.fromfile(path, dtype=dtype, count=count * cols, offset=offset + first * cols * dtype.itemsize)
    if array.size != count * cols:
        raise ExportError(f"{path}: {t.name} needs {rows * cols} values at offset {offset}, the file ends first; the "
                          "export is incomplete")
    return array.reshape(count, cols)


def _quantize_weight(t: onnx.TensorProto, base_dir: str, quantizer, bits: int, block_size: int):
    """(packed, scales, zero points) of a 2-D weight as ONNX Runtime's qbits_block_quant gives them for the whole
    matrix, computed slab by slab of rows when the weight is large (SLAB_BYTES)."""
    import numpy as np

    rows, cols = t.dims
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    step = 2 * block_size  # whole blocks, and an even count of them: two 4-bit zero points share a byte
    slab = max(step, SLAB_BYTES // max(1, cols * itemsize) // step * step)
    if t.data_location != onnx.TensorProto.EXTERNAL or rows <= slab:
        return quantizer.qbits_block_quant(_read_rows(t, base_dir, 0, rows))
    k_blocks = -(-rows // block_size)
    per_byte = 8 // bits
    parts = []
    for first in range(0, rows, slab):
        parts.append(quantizer.qbits_block_quant(_read_rows(t, base_dir, first, min(slab, rows - first))))
    packed = np.concatenate([p for p, _, _ in parts], axis=1)
    scales = np.concatenate([s for _, s, _ in parts], axis=1)
    zero_points = np.concatenate([z for _, _, z in parts], axis=1)
    del parts
    if packed.shape[1] != k_blocks or zero_points.shape[1] != -(-k_blocks // per_byte):
        raise ExportError(f"{t.name}: slab quantization gave {packed.shape[1]} blocks, expected {k_blocks}")
    return packed, scales, zero_points


def _matmul_nbits(node: onnx.NodeProto, weight: onnx.TensorProto, quantized, bits: int, block_size: int,
                  symmetric: bool, accuracy_level: int | None) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node and initializers ONNX Runtime's DefaultWeightOnlyQuantizer.quantize_matmul makes for a
    2-D weight (QOperator format), from its quantized blocks. The numbers come from ONNX Runtime's own kernel
    (qbits_block_quant); names, tensor encoding and attributes are the ones quantize_matmul writes, so the graph is
    byte for byte what MatMulNBitsQuantizer writes (a test compares the two)."""
    import onnx_ir as ir

    packed, scales, zero_points = quantized
    tensors = [ir.serde.serialize_tensor(ir.Tensor(packed, name=weight.name + f"_Q{bits}")),
               ir.serde.serialize_tensor(ir.Tensor(scales, name=weight.name + "_scales"))]
    if not symmetric:
        tensors.append(onnx.numpy_helper.from_array(zero_points, weight.name + "_zero_points"))
    rows, cols = weight.dims
    attrs = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
    if accuracy_level:  # written only when set, as ONNX Runtime does (most providers do not know the attribute)
        attrs["accuracy_level"] = accuracy_level
    new = onnx.helper.make_node("MatMulNBits", inputs=[node.input[0]] + [t.name for t in tensors],
                                outputs=[node.output[0]], name=node.name + f"_Q{bits}" if node.name else "",
                                domain="com.microsoft", **attrs)
    return new, tensors


def quantize_graph(src: str, dst: str, bits: int, block_size: int, symmetric: bool, accuracy_level: int | None,
                   exclude: set[str]) -> dict:
    """Quantizes one graph file, one weight at a time; returns what the manifest records about it.

    The graph is loaded without its external data; each constant MatMul weight is read alone from the data file,
    quantized and dropped, and the weights that stay float are copied from the source file by save_graph. Memory is
    the largest single weight plus the quantized weights: ONNX Runtime's MatMulNBitsQuantizer wants the whole graph
    in memory and held about twice its weights (9.90 GB for the 4.87 GB fp32 decoder of a 2-layer 12B-wide model).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.onnx_model import ONNXModel

    src_dir = os.path.dirname(os.path.abspath(src))
    model = onnx.load(src, load_external_data=False)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        raise ExportError(f"{os.path.basename(src)}: has subgraphs; the quantizer handles flat graphs (pixtract's "
                          "exports are flat)")
    candidates = _constant_matmuls(model)
    quantized = [(name, dims) for name, dims in candidates if name not in exclude]
    wanted = {name for name, _ in quantized}
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        weight = inits[node.input[1]]
        blocks = _quantize_weight(weight, src_dir, quantizer, bits, block_size)
        new, tensors = _matmul_nbits(node, weight, blocks, bits, block_size, symmetric, accuracy_level)
        del blocks
        nodes.append(new)
        # Into the graph at once, in the order ONNX Runtime appends them (a message is copied when added: keeping
        # the list until the end held every quantized weight twice).
        model.graph.initializer.extend(tensors)
        del tensors
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    ONNXModel(model).set_opset_import("com.microsoft", 1)
    ONNXModel(model).clean_initializers()  # the float weights no node reads any more
    done = {n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    if len(done) != len(quantized):
        raise ExportError(f"{os.path.basename(src)}: expected {len(quantized)} MatMulNBits nodes, the quantizer "
                          f"produced {len(done)}; refusing to write a half-quantized graph")
    float_parameters = sum(math.prod(t.dims) for t in model.graph.initializer
                           if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    # Same rule as the export: above 1 GiB of weights they go to `<file>_data` (protobuf caps a file at 2 GB). The
    # float weights left (norms, biases) are still references into the source's data file; save_graph copies them.
    external = save_graph(model, dst, source_dir=src_dir)
    kept = [name for name, _ in candidates if name in exclude]
    return {
        "proto": model,
        "external": external,
        "record": {
            "quantized_matmuls": len(quantized),
            "quantized_parameters": sum(k * n for _, (k, n) in quantized),
            "kept_matmuls": kept,
            "float_parameters": float_parameters,
        },
    }


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def quantize_model_dir(src_dir: str, out_dir: str, bits: int, block_size: int, graphs=DEFAULT_GRAPHS,
                       symmetric: bool = False, accuracy_level: int | None = None, keep_lm_head: bool = False) -> dict:
    """src_dir (an fp32 or fp16 export) -> out_dir with the chosen graphs quantized; returns the new manifest."""
    if bits not in (4, 8):
        raise ExportError(f"--bits {bits}: MatMulNBits variants are 4 or 8 bits")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"--block-size {block_size}: must be a power of two >= 16 (MatMulNBits)")
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown:
        raise ExportError(f"unknown graph(s) {unknown}; choose from {', '.join(GRAPH_NAMES)}")
    if "embed_tokens" in graphs:
        raise ExportError("embed_tokens is a Gather, not a MatMul; it stays in the activation dtype")
    manifest_path = os.path.join(src_dir, "pixtract-model.json")
    if not os.path.isfile(manifest_path):
        raise ExportError(f"{src_dir} is not a model directory (no pixtract-model.json); run `export` first")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("quantization"):
        raise ExportError(f"{src_dir} is already quantized ({manifest.get('variant')}); quantize an fp32 or fp16 "
                          "export")
    out_dir = os.path.normpath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new --out (nothing was overwritten)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # The quantized graphs: `bits` per weight plus a scale and zero point per block (at most 1.3x bits / source
    # bits of the source graph's bytes); the rest is hard-linked when it can be, copied when it cannot.
    source_bits = 16 if manifest["dtype"] == "fp16" else 32
    need = 0
    for name, entry in manifest["graphs"].items():
        size = entry["bytes"] + entry.get("external_data", {}).get("bytes", 0)
        need += int(size * 1.3 * bits / source_bits) if name in graphs else size
    check_free_space(parent, need, "quantize", "the quantized graphs at 1.3 x bits / source bits of their source, "
                     "the other graphs' sizes")
    with partial_output(out_dir) as work:
        return _quantize_into(manifest, src_dir, work, bits, block_size, graphs, symmetric, accuracy_level,
                              keep_lm_head)


def _quantize_into(manifest: dict, src_dir: str, out_dir: str, bits: int, block_size: int, graphs, symmetric: bool,
                   accuracy_level: int | None, keep_lm_head: bool) -> dict:
    new = copy.deepcopy(manifest)
    records = {}
    for name in GRAPH_NAMES:
        entry = manifest["graphs"][name]
        src = os.path.join(src_dir, entry["file"])
        dst = os.path.join(out_dir, entry["file"])
        if name in graphs:
            exclude = {LM_HEAD_NODE} if (keep_lm_head and name == "decoder") else set()
            res = quantize_graph(src, dst, bits, block_size, symmetric, accuracy_level, exclude)
            fresh = graph_entry(dst, res["proto"], res["external"])
            for key, value in entry.items():  # keep the decoder's templates and other notes
                if key != "external_data":  # the quantized graph has its own (or none: it may fit in one file)
                    fresh.setdefault(key, value)
            new["graphs"][name] = fresh
            records[name] = res["record"]
        else:
            _link_or_copy(src, dst)
            if "external_data" in entry:
                _link_or_copy(os.path.join(src_dir, entry["external_data"]["file"]),
                              os.path.join(out_dir, entry["external_data"]["file"]))
    for tok in (manifest["tokenizer"]["file"], manifest["tokenizer"].get("tekken_file")):
        if tok:
            _link_or_copy(os.path.join(src_dir, tok), os.path.join(out_dir, tok))

    new["variant"] = variant_name(manifest["dtype"], bits)
    new["quantization"] = {
        "method": "onnxruntime MatMulNBitsQuantizer, round-to-nearest, weight-only",
        "op": "com.microsoft.MatMulNBits",
        "bits": bits,
        "block_size": block_size,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level if accuracy_level is not None else 0,
        "scale_dtype": "float16" if manifest["dtype"] == "fp16" else "float32",
        "source_variant": manifest.get("variant", manifest["dtype"]),
        "source_weights_sha256": manifest["weights_sha256"],
        "graphs": records,
    }
    new["weights_sha256"] = hashlib.sha256(
        "".join(new["graphs"][k]["weights_sha256"] for k in sorted(new["graphs"])).encode()).hexdigest()
    with open(os.path.join(out_dir, "pixtract-model.json"), "w") as f:
        json.dump(new, f, indent=2)
        f.write("\n")
    return new


def run_quantize(args) -> int:
    graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip())
    new = quantize_model_dir(args.model, args.out, args.bits, args.block_size, graphs, args.symmetric,
                             args.accuracy_level, args.keep_lm_head)
    q = new["quantization"]
    total = 0
    for name, entry in new["graphs"].items():
        size = entry["bytes"] + entry.get("external_data", {}).get("bytes", 0)
        total += size
        rec = q["graphs"].get(name)
        what = (f"{rec['quantized_matmuls']} MatMul -> MatMulNBits ({rec['quantized_parameters'] / 1e6:.2f} M "
                f"weights at {q['bits']} bits)" if rec else "unchanged")
        print(f"  {name}: {size / 1e6:.2f} MB, {what}")
    print(f"{new['variant']} model in {args.out}: {total / 1e6:.2f} MB of graphs, block size {q['block_size']}")
    return 0
