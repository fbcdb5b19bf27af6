#!/usr/bin/env python3
"""Import circles in the exporter's package (onnx-export/pixtract_export): exits 1 and prints each circle.

Run `python onnx-export/check_imports.py --help`.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

DESCRIPTION = """\
Read every .py file of a package (subfolders included) with Python's ast module, collect the package's own imports
(`from .x import y`, `from . import x`, `from ..x import y`, `import pkg.x`, `from pkg.x import y`), wherever they
stand: lazy imports inside functions count like the ones at the top. Reports every import circle (a module that,
through the package's own imports, imports itself) and exits 1 when there is one; 0 otherwise.

Edges: `from M import n` points at M.n when that is a module of the package (a submodule), otherwise at M (a
package's __init__.py when M is a package). A package's __init__.py running before any of its submodules is not
counted as an edge: Python does that for every submodule import, and a package whose __init__ imports its own
submodules (a registry) is not a circle as long as the submodules do not import that __init__ back.
"""


def module_name(root: str, package: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join([package, *rel])


def find_modules(root: str, package: str) -> dict[str, str]:
    """{dotted module name: file path} of every .py file under root (the package folder)."""
    modules = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[module_name(root, package, path)] = path
    return modules


def imports_of(name: str, path: str, modules: dict[str, str], package: str) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in the file."""
    with open(path, encoding="utf-8") as f:
        try:
            tree = ast.parse(f.read(), filename=path)
        except SyntaxError as err:
            raise SystemExit(f"check_imports.py: {path}:{err.lineno}: {err.msg}") from None
    is_package = path.endswith("__init__.py")
    # The package a relative import is resolved in: the module itself for an __init__.py, else its parent.
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(here) - 1:
                    raise SystemExit(f"{path}:{node.lineno}: relative import beyond the package")
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
                if not (target == package or target.startswith(package + ".")):
                    continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return [(t, line) for t, line in found if t in modules and t != name]


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The circles of every strongly connected component of more than one module (Tarjan), each as a path
    a -> ... -> a, enough of them that every module of the component is on one."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        # Shortest circles inside the component until every module of it is on one (a component can hold several).
        members, covered = set(comp), set()
        for start in comp:
            if start in covered:
                continue
            path = _shortest_circle(graph, start, members)
            covered.update(path)
            out.append(path)
    return out


def _shortest_circle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """start -> ... -> start through the fewest modules of `members` (breadth first)."""
    prev, frontier, seen = {}, [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no circle of its component")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(prog="check_imports.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default=os.path.join(here, "pixtract_export"), metavar="DIR",
                        help="the package folder (default: pixtract_export beside this script)")
    parser.add_argument("--edges", action="store_true", help="also print every import edge (module -> module: line)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.package)
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        print(f"check_imports.py: {root} is not a package (no __init__.py)", file=sys.stderr)
        return 2
    package = os.path.basename(root)
    modules = find_modules(root, package)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules, package):
            graph[name].setdefault(target, line)
    edges = sum(len(v) for v in graph.values())
    if args.edges:
        for name in sorted(graph):
            for target, line in sorted(graph[name].items()):
                print(f"  {name} -> {target}  ({os.path.relpath(modules[name], os.path.dirname(root))}:{line})")
    found = circles(graph)
    print(f"{package}: {len(modules)} modules, {edges} import edges (lazy imports included)")
    for path in found:
        steps = []
        for a, b in zip(path, path[1:]):
            steps.append(f"{a} -> {b} ({os.path.relpath(modules[a], os.path.dirname(root))}:{graph[a][b]})")
        print("import circle: " + " -> ".join(path))
        for s in steps:
            print(f"    {s}")
    if found:
        print(f"{len(found)} import circle(s)")
        return 1
    print("no import circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
