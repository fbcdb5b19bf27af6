"""torch -> ONNX, for any family: trace a module into a graph file, write an embedding table as one Gather, and
pre-transpose Linear weights so the trace holds each weight once.

A family describes its graphs as GraphPlans (families/); graphs.py writes them with the functions below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import onnx
import torch
from torch import nn

from . import __version__
from .memory import memory_note
from .onnx_io import EXTERNAL_DATA_THRESHOLD, OPSET, save_graph, weights_digest


@dataclass
class TracedGraph:
    """A module to trace and how: the arguments of trace_graph, plus the attention it is traced with."""

    module: nn.Module
    args: tuple
    input_names: list
    output_names: list
    dynamic_axes: dict
    fixed_output_dims: dict | None = None
    custom_opsets: dict | None = None
    # (config, registered name, attention function): ops.UseAttention around the trace; None keeps the model's own.
    attention: tuple | None = None


@dataclass
class GraphPlan:
    """One graph of a family's export, built only when its turn comes (so nothing is held before or after it).

    build returns a TracedGraph, or a 2-D tensor: an embedding table, written directly as one Gather
    (write_embed_tokens). With release=True, `release` runs once the graph is written and drops what only this graph
    needed. `manifest` holds fields appended to the graph's manifest entry.
    """

    key: str
    file: str
    build: Callable[[], "TracedGraph | torch.Tensor"]
    release: Callable[[], None] | None = None
    manifest: dict = field(default_factory=dict)


def trace_graph(module, args, path, input_names, output_names, dynamic_axes, fixed_output_dims=None,
                custom_opsets=None, threshold=None):
    """Traces module to ONNX at path; weights go to `<file>_data` beside it when they are too large for one file.

    Returns (graph proto, external, weights digest). With external data the returned proto's initializers point
    into `<file>_data` (no weight bytes held in memory): the weights are moved tensor by tensor from the
    exporter's scratch files into the one data file, so a graph of several GB is never held twice.
    """
    import shutil
    import tempfile

    # Export into a scratch folder first: for >2 GB models the legacy exporter scatters one file per tensor.
    scratch = tempfile.mkdtemp(prefix="pixtract-export-", dir=os.path.dirname(path))
    try:
        raw = os.path.join(scratch, "graph.onnx")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                raw,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
                custom_opsets=custom_opsets,
            )
        model = onnx.load(raw, load_external_data=False)
        model.producer_name = "pixtract-export"
        model.producer_version = __version__
        # Shape inference loses static sizes through some slices (e.g. logits[:, -1:] becomes "Castlogits_dim_1"):
        # restate what the wrapper guarantees so the manifest and ONNX Runtime report it.
        for (out_name, axis), size in (fixed_output_dims or {}).items():
            for out in model.graph.output:
                if out.name == out_name:
                    out.type.tensor_type.shape.dim[axis].dim_value = size
        external = save_graph(model, path, source_dir=scratch, threshold=threshold)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest = weights_digest(model, os.path.dirname(path))
    print(f"  {os.path.basename(path)} written ({memory_note(reset_peak=True)})", flush=True)
    return model, external, digest


class _TransposedLinear(nn.Module):
    """nn.Linear with its weight stored already transposed ([in, out]): `x @ weight_t (+ bias)`.

    The TorchScript exporter writes nn.Linear on 3-D inputs as MatMul(x, Transpose(W)) and constant folding then
    materialises W^T as a new initializer while W is still held by torch: during the export every Linear weight
    existed twice. Transposed beforehand, the graph is the same MatMul (+ Add) on an [in, out] constant, with no
    folding copy, and the initializer keeps the parameter's name.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def transpose_linears(root: nn.Module):
    """Replaces every nn.Linear under root by a _TransposedLinear, one at a time (peak: one extra weight).

    Works from the Linear modules' names: a list of the modules themselves would keep every replaced weight alive
    until the end (a second copy of all of them: +3.5 GB for the 4-layer wide decoder).
    """
    names = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, _TransposedLinear(getattr(parent, attr)))


def write_embed_tokens(weight: torch.Tensor, path: str, threshold: int | None = None):
    """embed_tokens.onnx written directly: one Gather(embed.weight, input_ids), the graph the TorchScript exporter
    gives for nn.Embedding (same names, opset, IR version), without tracing.

    Traced, the table (131072 x 5120: 1.3 GB in fp16) was serialized in memory and parsed back, about three copies
    at once; here its bytes go from the torch tensor straight to the file (or inline below the threshold).
    Returns (proto, external, weights digest) like trace_graph.
    """
    from onnx import TensorProto, helper

    weight = weight.detach().contiguous()
    elem = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}[weight.dtype]
    vocab, hidden = weight.shape
    table = onnx.TensorProto(name="embed.weight", data_type=elem, dims=[vocab, hidden])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed.weight", "input_ids"], ["inputs_embeds"], name="/embed/Gather")],
        "main_graph",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "sequence", hidden])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8,
                              producer_name="pixtract-export", producer_version=__version__)
    table = model.graph.initializer[0]
    view = weight.view(torch.uint8) if weight.dtype == torch.float16 else weight
    raw = memoryview(view.numpy()).cast("B")
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    if len(raw) > threshold:
        location = os.path.basename(path) + "_data"
        with open(os.path.join(os.path.dirname(path), location), "wb") as f:
            f.write(raw)
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            entry = table.external_data.add()
            entry.key, entry.value = key, value
        table.data_location = TensorProto.EXTERNAL
        external = True
    else:
        table.raw_data = raw.tobytes()
        external = False
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    digest = weights_digest(model, os.path.dirname(path))
    print(f"  {os.path.basename(path)} written ({memory_note(reset_peak=True)})", flush=True)
    return model, external, digest
