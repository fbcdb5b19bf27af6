#!/usr/bin/env python3
"""pixtract-export: Hugging Face Pixtral checkpoint (or a seeded tiny model) -> ONNX graphs + manifest.

Run `python onnx-export/export.py --help`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pixtract_export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
