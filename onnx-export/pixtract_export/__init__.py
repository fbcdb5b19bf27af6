"""Exporter for pixtract: Pixtral (LlavaForConditionalGeneration) -> ONNX Runtime graphs."""

__version__ = "0.1.0"

# Decoder attention kinds of `export --attention` (families/ build them; cli.py offers them without importing torch).
ATTENTION_KINDS = ("eager", "gqa")
