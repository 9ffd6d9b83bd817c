"""The import graph of lens_fast has floors (README, "Layout"): a module imports only from
its own floor or the floors below, and no two modules import each other, directly or in a
loop. Read from the source (every import statement, function-level ones included), so a
new arrow running back up fails here with the files and the line."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> the package it installs as (setup.py maps kernels/ and train/).
PACKAGES = {"lens_fast": "lens_fast", "kernels": "lens_fast.kernels", "train": "lens_fast.train"}
# Bottom to top. A module's floor is that of the longest prefix naming it.
FLOORS = [
    ("kernels", ["lens_fast.kernels"]),
    ("ops and leaves", ["lens_fast.ops", "lens_fast.resolutions", "lens_fast.images", "lens_fast.sampling",
                        "lens_fast.flops", "lens_fast._checkout", "lens_fast.errors", "lens_fast.atomic",
                        "lens_fast.cli_checks", "lens_fast.chat_api", "lens_fast.chat_server",
                        "lens_fast.image_metadata"]),
    ("models", ["lens_fast.models"]),
    ("components", ["lens_fast.vae", "lens_fast.text_encoder", "lens_fast.quant", "lens_fast.tiny",
                    "lens_fast.testing", "lens_fast.reasoner", "lens_fast.rl"]),
    ("engine", ["lens_fast.engine"]),
    ("pipeline", ["lens_fast.pipeline", "lens_fast"]),
    ("train", ["lens_fast.train"]),
    ("toy and curate", ["lens_fast.toy", "lens_fast.curate"]),
    ("cli", ["lens_fast.cli"]),
]


def floor_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is on no floor; add it to FLOORS"
    return level


def modules():
    """{module name: (path, is_package)} of every source file."""
    found = {}
    for folder, package in PACKAGES.items():
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            base = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = base if f == "__init__.py" else f"{base}.{f[:-3]}"
                    found[name] = (os.path.join(dirpath, f), f == "__init__.py")
    return found


def imports(name: str, path: str, is_package: bool, known):
    """[(imported module, line)] of one file, resolved to modules of this tree."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno))
    return out


def graph():
    known = modules()
    return known, {name: imports(name, path, pkg, known) for name, (path, pkg) in known.items()}


def test_no_import_runs_back_up():
    known, edges = graph()
    upward = [f"{known[a][0]}:{line} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})"
              for a, targets in edges.items() for b, line in targets if floor_of(b) > floor_of(a)]
    assert not upward, "imports running back up:\n" + "\n".join(upward)


def test_no_import_cycles():
    _, edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt, _ in edges.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_floors_see_every_module_and_the_graph_is_read():
    known, edges = graph()
    assert {floor_of(m) for m in known} == set(range(len(FLOORS)))
    assert any(b == "lens_fast.ops.norm_modulate" for b, _ in edges["lens_fast.models.transformer"])
