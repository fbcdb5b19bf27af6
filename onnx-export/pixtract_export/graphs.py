"""Writes a family's graphs: the plans its build_graphs returns (families/), traced or written by trace.py, recorded
as the manifest's "graphs" section (manifest.graph_entry)."""

from __future__ import annotations

import contextlib
import os

import torch

from . import ATTENTION_KINDS
from .manifest import GRAPH_KEYS, graph_entry
from .ops import UseAttention
from .trace import TracedGraph, trace_graph, write_embed_tokens


def export_graphs(family, model, out_dir: str, dtype: torch.dtype, attention: str = "eager", release: bool = False,
                  external_threshold: int | None = None) -> dict:
    """Writes the family's graphs into out_dir in the family's order; returns the manifest's "graphs" section, in the
    manifest's order (GRAPH_KEYS).

    release=True consumes the model to keep peak memory near one copy of the weights: after each graph is written,
    its plan's `release` drops what only that graph needed (the family says what). Only the config stays usable
    afterwards.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r}: expected one of {ATTENTION_KINDS}")
    entries = {}
    for plan in family.build_graphs(model, dtype, attention):
        path = os.path.join(out_dir, plan.file)
        item = plan.build()
        if isinstance(item, TracedGraph):
            use = UseAttention(*item.attention) if item.attention else contextlib.nullcontext()
            with use:
                proto, ext, digest = trace_graph(item.module, item.args, path, item.input_names, item.output_names,
                                                 item.dynamic_axes, fixed_output_dims=item.fixed_output_dims,
                                                 custom_opsets=item.custom_opsets, threshold=external_threshold)
        else:
            proto, ext, digest = write_embed_tokens(item, path, external_threshold)
        entry = graph_entry(path, proto, ext, digest)
        entry.update(plan.manifest)
        entries[plan.key] = entry
        del item, proto
        if release and plan.release:
            plan.release()
    if set(entries) != set(GRAPH_KEYS):
        raise ValueError(f"family {family.name}: wrote graphs {sorted(entries)}, the manifest needs {list(GRAPH_KEYS)}")
    return {key: entries[key] for key in GRAPH_KEYS}
