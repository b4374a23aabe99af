"""The layout's promises: no import circles between first-party files, and both engines implement the Engine
protocol the trainer drives."""
from __future__ import annotations

import ast
import inspect
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("infllm", "data", "kernels")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _first_party_files():
    for pkg in PACKAGES:
        for d, _, names in os.walk(os.path.join(ROOT, pkg)):
            for n in names:
                if n.endswith(".py"):
                    yield os.path.join(d, n)


def _imports(path: str, modules: set) -> set:
    """First-party modules a file imports, at any depth (lazy imports inside functions count too: a circle
    through a lazy import is still a circle in the design)."""
    tree = ast.parse(open(path).read(), path)
    me = _module_name(path)
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # The longest first-party module that the dotted name starts with.
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in modules:
                    if cand != me:
                        found.add(cand)
                    break
    return found


def test_no_import_circles():
    files = list(_first_party_files())
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    # A package's __init__ re-exporting its own submodules is not a circle of design: drop package -> child.
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_kernels_import_only_torch_and_triton():
    # flash-attn is the optional dense backend (lazy import); everything else beyond torch/triton is stdlib.
    allowed = {"torch", "triton", "kernels", "flash_attn"} | set(sys.stdlib_module_names)
    bad = []
    for f in _first_party_files():
        if not _module_name(f).startswith("kernels"):
            continue
        for node in ast.walk(ast.parse(open(f).read())):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            bad += [(os.path.relpath(f, ROOT), r) for r in roots if r not in allowed]
    assert not bad, f"kernels/ must import only torch/triton (and the stdlib): {bad}"


@pytest.mark.parametrize("engine_cls", ["SingleEngine", "DeepSpeedEngine"])
def test_engines_implement_the_protocol(engine_cls):
    from infllm.engine import Engine, SingleEngine
    from infllm.parallel import DeepSpeedEngine

    cls = {"SingleEngine": SingleEngine, "DeepSpeedEngine": DeepSpeedEngine}[engine_cls]
    members = [name for name in dir(Engine) if not name.startswith("_")]
    members += list(getattr(Engine, "__annotations__", {}))
    missing = []
    for name in set(members):
        if hasattr(cls, name):
            continue
        # Attributes set in __init__ count: look for `self.<name> =` in its source.
        if f"self.{name} =" not in inspect.getsource(cls.__init__):
            missing.append(name)
    assert not missing, f"{engine_cls} lacks {sorted(missing)} of infllm.engine.Engine"
    assert "zero_grad" not in vars(cls), "zero_grad is not part of the protocol (the step zeroes gradients)"
