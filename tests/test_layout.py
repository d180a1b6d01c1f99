"""The package's shape: no import cycles, a vLLM-free core, vLLM internals only behind compat.

Imports are read from the source (every ``import`` statement, inside functions and
``TYPE_CHECKING`` blocks too), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("rlkv_vllm",)
CORE = "rlkv_vllm.core"
# the only modules that may import vLLM beyond its public API
COMPAT = {"rlkv_vllm.compat"}
# vLLM's public API: the offline engine, sampling parameters, prompts
VLLM_PUBLIC = {"vllm", "vllm.inputs", "vllm.sampling_params"}


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py file of our packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> tuple[set[str], set[str]]:
    """(our modules ``name`` imports, vLLM modules it imports)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    ours: set[str] = set()
    vllm: set[str] = set()

    def add(target: str) -> None:
        if target.split(".")[0] == "vllm":
            vllm.add(target)
        elif target in modules:
            ours.add(target)
        elif target.rsplit(".", 1)[0] in modules:  # from pkg import name (not a module)
            ours.add(target.rsplit(".", 1)[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "vllm":
                vllm.add(mod)
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                add(sub if sub in modules else mod)
    ours.discard(name)
    return ours, vllm


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    deps, vllm = {}, {}
    for name, path in modules.items():
        deps[name], vllm[name] = _imports(name, path, modules)
    return deps, vllm


def _find_cycle(deps: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(deps.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(deps):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    deps, _ = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle: submodules never
    # import their package by name (checked below)
    cycle = _find_cycle(deps)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_depends_on_nothing_outside_the_core():
    deps, vllm = _graph()
    for name in deps:
        if name == CORE or name.startswith(CORE + "."):
            outside = sorted(d for d in deps[name] if not (d == CORE or d.startswith(CORE + ".")))
            assert not outside, f"{name} imports {outside}: the core may import only the core"
            assert not vllm[name], f"{name} imports {sorted(vllm[name])}: the core is vLLM-free"


def _script_vllm_imports() -> dict[str, set[str]]:
    """vLLM modules imported by the scripts under benchmarks/ (not a package)."""
    out = {}
    folder = os.path.join(ROOT, "benchmarks")
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py"):
            out[f"benchmarks/{f}"] = _imports(f[:-3], os.path.join(folder, f), {})[1]
    return out


def test_vllm_internals_only_in_compat():
    _, vllm = _graph()
    for name, mods in sorted({**vllm, **_script_vllm_imports()}.items()):
        if name in COMPAT:
            continue
        internal = sorted(m for m in mods if m not in VLLM_PUBLIC)
        assert not internal, (f"{name} imports vLLM internals {internal}: route them through "
                              "rlkv_vllm/compat.py")


# what the trainer may import from the plugin package (docs/ARCHITECTURE.md)
TRAINER_MAY_IMPORT = ("rlkv_vllm.core", "rlkv_vllm.tiny_model")


def _trainer_imports() -> dict[str, tuple[set[str], set[str]]]:
    """rlkv_trainer module -> (rlkv_vllm modules it imports, vLLM modules it imports)."""
    folder = os.path.join(ROOT, "trainer")
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py"):
            name = "rlkv_trainer" if f == "__init__.py" else f"rlkv_trainer.{f[:-3]}"
            tree = ast.parse(open(os.path.join(folder, f), encoding="utf-8").read())
            plugin, vllm = set(), set()
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for n in names:
                    if n.split(".")[0] == "vllm":
                        vllm.add(n)
                    elif n.split(".")[0] == "rlkv_vllm":
                        plugin.add(n)
            out[name] = (plugin, vllm)
    assert len(out) > 5
    return out


def test_trainer_imports_the_core_and_vllms_public_api_only():
    for name, (plugin, vllm) in _trainer_imports().items():
        outside = sorted(m for m in plugin if not any(m == p or m.startswith(p + ".") for p in TRAINER_MAY_IMPORT))
        assert not outside, f"{name} imports {outside}: the trainer may import {TRAINER_MAY_IMPORT} only"
        internal = sorted(m for m in vllm if m not in VLLM_PUBLIC)
        assert not internal, f"{name} imports vLLM internals {internal}: use LLM, SamplingParams, vllm.inputs"


def test_core_imports_without_vllm():
    """Every core module imports in a process where ``import vllm`` fails."""
    code = textwrap.dedent(
        """
        import importlib, importlib.abc, pkgutil, sys

        class NoVllm(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ImportError("vllm is not importable in this test")
                return None

        sys.meta_path.insert(0, NoVllm())
        import rlkv_vllm.core as core
        names = [m.name for m in pkgutil.iter_modules(core.__path__, core.__name__ + ".")]
        for n in names:
            importlib.import_module(n)
        assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        from rlkv_vllm.core.plan import build_plan
        from rlkv_vllm.core.settings import parse_settings
        print("ok", len(names))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout
    assert int(r.stdout.split()[1]) >= 6
