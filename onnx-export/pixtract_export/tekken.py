"""Tekken tokenizer files (tekken.json): which version one is, and the synthetic ones the tiny and random test models
of a family ship.

The version decides the prompt layout (v3, Pixtral's: a system prompt is written into the user turn; v7 and later:
between [SYSTEM_PROMPT] and [/SYSTEM_PROMPT] tokens) and, from v7, the image section holds the family's patch size,
largest image and patch merge. The Mistral 3 family's real tekken.json files could not be downloaded here; the
synthetic one keeps Pixtral's vocabulary (tekken_240911.json, the same 131,072 ids) and changes only what a version
and an image section are: mistral-common reads it like a real one, and its encoding is the reference the tests use.
"""

from __future__ import annotations

import json

from .files import ExportError, tekken_path


def tekken_version(path: str) -> str:
    """The `config.version` of a tekken.json ("v3", "v7", "v13", ...)."""
    try:
        with open(path) as f:
            version = json.load(f)["config"]["version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{path}: not a Tekken tokenizer file ({err})") from None
    if not (isinstance(version, str) and version.startswith("v") and version[1:].isdigit()):
        raise ExportError(f"{path}: Tekken version {version!r} is not vN")
    return version


def write_synthetic_tekken(out: str, version: str, image: dict):
    """Pixtral's Tekken vocabulary under another version and image section, as mistral-common reads them: from v7 the
    special tokens are listed in the file (ranks 0-19 as in every Tekken, then mistral-common's newer special tokens
    in its own order, then <SPECIAL_n> fillers up to 1,000); the image section is `image` (mistral-common refuses the
    older `multimodal` name after v11)."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    with open(tekken_path()) as f:
        data = json.load(f)
    data["config"]["version"] = version
    data["image"] = dict(image)
    data.pop("multimodal", None)
    special = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    known = {t["token_str"] for t in special}
    for token in SpecialTokens:
        if token.value not in known:
            special.append({"rank": len(special), "token_str": token.value, "is_control": True})
    count = data["config"]["default_num_special_tokens"]
    special += [{"rank": r, "token_str": f"<SPECIAL_{r}>", "is_control": True} for r in range(len(special), count)]
    data["special_tokens"] = special
    with open(out, "w") as f:
        json.dump(data, f, ensure_ascii=False)
