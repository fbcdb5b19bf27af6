"""Prompts and images as mistral-common encodes them: the reference that Mistral's own stack and vLLM use."""

from __future__ import annotations

import numpy as np

from .files import tekken_path

_TOKENIZERS = {}


def model_tekken(model_dir: str) -> str:
    """The tekken.json a model directory's prompts are encoded with: its own (exports since the Mistral 3 family
    write it beside tokenizer.json), else Pixtral's from mistral-common (older Pixtral exports)."""
    import json
    import os

    with open(os.path.join(model_dir, "pixtract-model.json")) as f:
        name = json.load(f)["tokenizer"].get("tekken_file")
    return os.path.join(model_dir, name) if name else tekken_path()


def mistral_tokenizer(tekken: str | None = None):
    """mistral-common's tokenizer for a tekken.json (default Pixtral's), loaded once per file."""
    path = tekken or tekken_path()
    if path not in _TOKENIZERS:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        _TOKENIZERS[path] = MistralTokenizer.from_file(path)
    return _TOKENIZERS[path]


def encode(content: list, system: str | None = None, tekken: str | None = None):
    """content: [{"type": "image", "image": PIL.Image} | {"type": "text", "text": str}, ...] for one user turn.

    Returns (token ids, [CHW float32 arrays, one per image]).
    """
    from mistral_common.protocol.instruct.messages import ImageChunk, SystemMessage, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    chunks = []
    for part in content:
        if part["type"] == "image":
            chunks.append(ImageChunk(image=part["image"]))
        else:
            chunks.append(TextChunk(text=part["text"]))
    messages = []
    if system is not None:
        messages.append(SystemMessage(content=system))
    if len(chunks) == 1 and isinstance(chunks[0], TextChunk):
        messages.append(UserMessage(content=chunks[0].text))
    else:
        messages.append(UserMessage(content=chunks))
    enc = mistral_tokenizer(tekken).encode_chat_completion(ChatCompletionRequest(messages=messages))
    return list(enc.tokens), [np.ascontiguousarray(img, dtype=np.float32) for img in enc.images]


def encode_case(folder: str, content: list, system: str | None = None, tekken: str | None = None):
    """A reference case's content ([{"type": "image", "file": ...} | {"type": "text", ...}]) with its images read
    back from their PNGs in `folder`, encoded as `encode` does: the bytes the Rust side decodes too."""
    import os

    from PIL import Image

    loaded = []
    for c in content:
        if c["type"] == "image":
            with Image.open(os.path.join(folder, c["file"])) as im:
                im.load()
                loaded.append({"type": "image", "image": im.copy()})
        else:
            loaded.append(c)
    return encode(loaded, system, tekken)


def decode(ids: list[int], tekken: str | None = None) -> str:
    return mistral_tokenizer(tekken).decode(ids)


def pad_images(images: list[np.ndarray]):
    """HF's Llava/Pixtral batch layout: [N,3,Hmax,Wmax] zero-padded plus image_sizes [[h,w],...]."""
    import torch

    hmax = max(i.shape[1] for i in images)
    wmax = max(i.shape[2] for i in images)
    out = np.zeros((len(images), 3, hmax, wmax), dtype=np.float32)
    for n, img in enumerate(images):
        out[n, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([[i.shape[1], i.shape[2]] for i in images], dtype=torch.int64)
    return torch.from_numpy(out), sizes
