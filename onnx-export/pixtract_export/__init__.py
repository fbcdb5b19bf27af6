"""Exporter for pixtract: Pixtral (LlavaForConditionalGeneration) -> ONNX Runtime graphs."""

__version__ = "0.1.0"

# Decoder attention kinds of `export --attention` (graphs.py builds them; cli.py offers them without importing torch).
ATTENTION_KINDS = ("eager", "gqa")
