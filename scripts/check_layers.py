#!/usr/bin/env python3
"""Checks the library's module structure (src/, without the binary's cli/ and bench/):

1. no import circle between files (a file naming its own ancestor module, or an ancestor re-exporting a
   descendant, is not a circle: that is how Rust modules nest);
2. no stage imports a later stage (source -> raster -> model -> extract -> sink -> pipeline);
3. clap lives only in src/cli/ and src/main.rs.

Prints each violation and exits 1; prints the file count and exits 0 when clean.
Usage: scripts/check_layers.py [SRC_DIR]
"""
import re
import sys
from pathlib import Path

# Data-flow order. `eval` and `report` read what the sink committed (and the manifests the pipeline wrote), and
# nothing in the flow reads them: they come last; the binary (cli/) wires `pipeline` and `report`.
STAGES = ["source", "raster", "model", "extract", "sink", "pipeline", "eval", "report"]
BINARY_ONLY = ("cli", "bench")


def module_of(path: Path, src: Path) -> tuple:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def references(text: str, module: tuple, is_mod_file: bool) -> set:
    """Module paths (tuples) a file names through `crate::` or `super::`."""
    text = re.sub(r"//[^\n]*", "", text)
    # Unit tests are not part of the module graph.
    text = text.split("#[cfg(test)]")[0]
    out = set()
    for m in re.finditer(r"\bcrate((?:::\w+)+)", text):
        out.add(tuple(m.group(1).strip(":").split("::")))
    # `super` is the parent of the module this file defines. `use super::{a, b::c}` names each item in braces
    # (one level of braces: nested groups name their first segment, which is the module that matters).
    base = module
    for m in re.finditer(r"\b((?:super::)+)(\w+(?:::\w+)*)", text):
        depth = m.group(1).count("super")
        parent = base[: len(base) - depth]
        out.add(parent + tuple(m.group(2).split("::")))
    for m in re.finditer(r"\b((?:super::)+)\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text):
        depth = m.group(1).count("super")
        parent = base[: len(base) - depth]
        for item in re.split(r",(?![^{]*\})", m.group(2)):
            item = item.strip()
            first = re.match(r"(\w+(?:::\w+)*)", item)
            if first and first.group(1) not in ("self",):
                out.add(parent + tuple(first.group(1).split("::")))
    # Child modules named in `use name::...` or `pub use name::...` after `mod name;`.
    children = set(re.findall(r"\bmod (\w+);", text))
    for m in re.finditer(r"\buse (\w+)::", text):
        if m.group(1) in children:
            out.add(module + (m.group(1),))
    return out


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    files = {}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src).parts
        if rel[0] in BINARY_ONLY or rel == ("main.rs",):
            continue
        files[module_of(path, src)] = path
    problems = []
    edges = {m: set() for m in files}
    for module, path in files.items():
        text = path.read_text()
        for ref in references(text, module, path.name == "mod.rs"):
            # The longest prefix that is a module file.
            target = next((ref[:n] for n in range(len(ref), -1, -1) if ref[:n] in files), None)
            if target is None or target == module:
                continue
            # Nesting: a module naming its ancestors, or an ancestor naming its descendants.
            if module[: len(target)] == target or target[: len(module)] == module:
                continue
            edges[module].add(target)
            if module and target and module[0] in STAGES and target[0] in STAGES:
                if STAGES.index(target[0]) > STAGES.index(module[0]):
                    problems.append(f"{path}: the {module[0]} stage imports the later {target[0]} stage ({'::'.join(target)})")
    # Circles: strongly connected components of more than one file (Tarjan).
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    for comp in comps:
        problems.append("import circle: " + " <-> ".join(str(files[m]) for m in sorted(comp)))
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src).parts
        if rel[0] == "cli" or rel == ("main.rs",):
            continue
        if re.search(r"\bclap\b", path.read_text()):
            problems.append(f"{path}: mentions clap outside src/cli/")
    problems = list(dict.fromkeys(problems))
    for p in problems:
        print(p)
    if problems:
        return 1
    edge_count = sum(len(e) for e in edges.values())
    print(f"layers ok: {len(files)} library files, {edge_count} imports between them, no circle, stages in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
