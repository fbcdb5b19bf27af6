"""Files: the exporter's error type, the output folder written as OUT.partial, free space, sha256, the Tekken file.

A leaf: imports nothing from the package, so every module (the checkpoint layouts and the families included) can
use it without an import circle. ExportError lives here for the same reason: the helpers below raise it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil


class ExportError(RuntimeError):
    """A problem the user can fix (bad path, wrong layout); printed without a traceback."""


def tekken_path() -> str:
    """Pixtral's Tekken tokenizer as shipped inside the mistral-common wheel (tekken_240911.json)."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    if not os.path.isfile(path):
        raise ExportError(f"mistral-common has no {path}: is mistral-common==1.13.1 installed?")
    return path


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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
