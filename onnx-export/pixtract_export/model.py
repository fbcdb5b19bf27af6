"""Loading Pixtral: a local Hugging Face checkpoint, or a tiny seeded random model with the real tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import torch

# Mean/std of Pixtral's image normalisation (CLIP's), as mistral-common applies them.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_SEED = 20240911
# Weights drawn from N(0, 0.2): with transformers' default 0.02 the tiny model's top logits nearly tie and greedy
# decoding flips on rounding noise; 0.2 keeps the top-1/top-2 gaps around 0.1-0.5.
TINY_WEIGHT_STD = 0.2


class ExportError(RuntimeError):
    """A problem the user can fix (bad path, wrong layout); printed without a traceback."""


def tekken_path() -> str:
    """Pixtral's Tekken tokenizer as shipped inside the mistral-common wheel (tekken_240911.json)."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    if not os.path.isfile(path):
        raise ExportError(f"mistral-common has no {path}: is mistral-common==1.13.1 installed?")
    return path


def tiny_config():
    """The tiny Pixtral: the real vocabulary, token ids, patch and image size and RoPE thetas; toy widths (text
    hidden 32, 4 heads / 2 KV heads, head_dim 16; vision hidden 64, head_dim 16, divisible by 4 for the 2D RoPE)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        num_channels=3,
        patch_size=16,
        image_size=1024,
        hidden_act="silu",
        rope_theta=10000.0,
    )
    text = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=131072,
        rope_theta=1e9,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=11,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=10,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_tiny_model(seed: int = TINY_SEED):
    """Deterministic random weights: every parameter is redrawn from a generator seeded once, in name order."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * TINY_WEIGHT_STD)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * TINY_WEIGHT_STD)
            else:
                # RMSNorm gains: around 1 so activations keep a sane scale through the layers.
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    return model


_RUN_PEAK_GB = 0.0


def run_peak_gb() -> float:
    """The largest peak RSS any memory_note saw (the kernel's own peak, and so /usr/bin/time -v's maximum resident
    set size, only covers the time since the last reset)."""
    return _RUN_PEAK_GB


def memory_note(reset_peak: bool = False) -> str:
    """This process's memory now (Linux): resident anonymous + file-backed (mapped safetensors) and the peak since the
    last reset. reset_peak=True then restarts the peak (writing 5 to /proc/self/clear_refs), so each phase of an
    export reports its own peak. The reset also restarts the peak that getrusage and /usr/bin/time -v report: the
    run's peak is the largest phase peak (run_peak_gb)."""
    global _RUN_PEAK_GB
    try:
        with open("/proc/self/status") as f:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        gb = lambda key: int(status[key].split()[0]) / 1e6  # kB -> GB
        _RUN_PEAK_GB = max(_RUN_PEAK_GB, gb("VmHWM"))
        note = (f"RSS {gb('VmRSS'):.2f} GB (anon {gb('RssAnon'):.2f}, file {gb('RssFile'):.2f}), "
                f"peak {gb('VmHWM'):.2f} GB")
        if reset_peak:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                note += " (peak reset)"
            except OSError:
                pass
        return note
    except (OSError, KeyError, ValueError):
        return "memory n/a"


@contextlib.contextmanager
def partial_output(final: str):
    """Yields `final`.partial, created empty, for a command to write its output into; renamed to `final` (empty or
    absent: the caller checked) when the block completes. A failure inside the block (a cut checkpoint, no memory,
    Ctrl-C) removes it; a killed process leaves it, and the next command writing `final` removes it first. Nothing
    half-written is ever under `final`."""
    work = final + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if os.path.isdir(final):
        os.rmdir(final)
    os.rename(work, final)


def check_free_space(folder: str, need: int, what: str, basis: str = "parameters x bytes per value x 1.1"):
    """One clear error line when `folder`'s file system has less than `need` bytes free. `folder` may not exist yet
    (the output is created with its parents): its nearest existing ancestor is on the file system it will be on."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ExportError(f"{what}: {folder} has {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB is needed "
                          f"({basis}); free space or choose another --out")


HF_FILES = ("config.json", "*.safetensors")
LAYOUT_NAMES = {"hf": "Hugging Face layout (config.json + safetensors, as mistral-community/pixtral-12b)",
                "consolidated": "Mistral consolidated layout (params.json + consolidated.safetensors + tekken.json, "
                                "as mistralai/Pixtral-12B-2409), converted in memory to the Hugging Face names"}


def checkpoint_layout(path: str) -> str:
    """"hf" (config.json + *.safetensors) or "consolidated" (params.json + consolidated.safetensors + tekken.json);
    otherwise one line naming what each layout lacks."""
    from .consolidated import FILES as CONSOLIDATED_FILES

    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such checkpoint directory")
    names = set(os.listdir(path))
    has = lambda want: any(n.endswith(".safetensors") for n in names) if want == "*.safetensors" else want in names
    hf_missing = [n for n in HF_FILES if not has(n)]
    consolidated_missing = [n for n in CONSOLIDATED_FILES if not has(n)]
    # config.json decides for the HF layout: the mistralai repo ships no config.json, and a folder holding both
    # is read as the Hugging Face one.
    if not hf_missing:
        return "hf"
    if not consolidated_missing:
        return "consolidated"
    raise ExportError(f"{path}: not a Pixtral checkpoint: the Hugging Face layout (mistral-community/pixtral-12b) "
                      f"lacks {' and '.join(hf_missing)}; Mistral's consolidated layout (mistralai/Pixtral-12B-2409) "
                      f"lacks {' and '.join(consolidated_missing)}")


def load_checkpoint(path: str, dtype: torch.dtype):
    """A local checkpoint directory in either layout (checkpoint_layout). Never the network."""
    from transformers import LlavaForConditionalGeneration

    layout = checkpoint_layout(path)
    print(f"checkpoint {path}: {LAYOUT_NAMES[layout]}")
    if layout == "consolidated":
        from .consolidated import load_consolidated

        return load_consolidated(path, dtype)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llava" or cfg.get("vision_config", {}).get("model_type") != "pixtral":
        raise ExportError(
            f"{path}: config.json describes model_type={cfg.get('model_type')!r} with vision "
            f"{cfg.get('vision_config', {}).get('model_type')!r}; pixtract exports Llava + Pixtral vision only"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Loaded in the dtype the weights are stored in, then cast module by module: asking from_pretrained for another
    # dtype held the stored copy and the cast copy at once (bf16 -> fp16 of 2.5 B parameters: 10.5 GB peak for 5 GB
    # of weights). Only parameters are cast, one at a time; buffers (RoPE inverse frequencies, fp32) stay as
    # from_pretrained(dtype=...) leaves them.
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype")
    stored = getattr(torch, stored, None) if isinstance(stored, str) else None
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        stored = dtype
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=stored, local_files_only=True, attn_implementation="eager"
    )
    if stored != dtype:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(dtype)
        model.config.dtype = dtype
    model.eval()
    return model


def write_tokenizer(out_dir: str, checkpoint: str | None) -> str:
    """tokenizer.json for the Rust `tokenizers` crate.

    The checkpoint's own tokenizer.json when it has one; otherwise its tekken.json (Mistral's consolidated layout),
    or else Pixtral's Tekken file from mistral-common, converted the way transformers converts it.
    """
    dst = os.path.join(out_dir, "tokenizer.json")
    if checkpoint and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        shutil.copyfile(os.path.join(checkpoint, "tokenizer.json"), dst)
        return dst
    from transformers.integrations.mistral.tokenizer import MistralConverter

    tekken = os.path.join(checkpoint, "tekken.json") if checkpoint else ""
    MistralConverter(vocab_file=tekken if os.path.isfile(tekken) else tekken_path()).converted().save(dst)
    return dst


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
