"""Exporter for pixtract: Pixtral (LlavaForConditionalGeneration) -> ONNX Runtime graphs."""

__version__ = "0.1.0"
