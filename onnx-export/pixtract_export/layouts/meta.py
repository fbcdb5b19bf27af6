"""Models built on torch's meta device (shapes only) and then given their weights: their buffers are rebuilt here."""

from __future__ import annotations

from ..files import ExportError


def rebuild_buffers(model):
    """Buffers (the RoPE inverse frequencies, text and 2D vision) were never computed on the meta device, and the
    bf16 cast would have rounded them: each module holding buffers is rebuilt from its config on the CPU, in the
    module's own default dtype (fp32), and its buffers are taken over."""
    for module in model.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ExportError(f"random-checkpoint: cannot rebuild the buffers of {type(module).__name__}")
        fresh = type(module)(config)
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf)
