"""The import graph is the architecture: no cycle among ktutorial's modules, counting imports
anywhere in a module (at the top and inside functions), and imports at the top except for the
optional heavy dependencies named below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ktutorial"

# What a module may import inside a function, and why: each is optional (not in the package's
# dependencies) or costs seconds at import, so only the code that uses it pays for it.
DEFERRED_OK = {
    "torch": "optional: installed by the Makefile (CPU or CUDA build), not a package dependency",
    "kt_kernel": "optional: installed by the Makefile, needs torch",
    "kt_kernel_ext": "optional: kt-kernel's extension",
    "transformers": "1-2 s at import; only the hybrid split and the tiny model's checks use it",
    "safetensors.torch": "needs torch",
    "xllamacpp": "loads llama.cpp's native library; the server runs it in a child process",
    "papermill": "optional: the docs extra",
    "IPython": "optional: present inside a notebook kernel",
    "openai": "about 1 s at import; only the commands that send requests pay it",
    "anthropic": "about 3 s at import; only the commands that send requests pay it",
    "huggingface_hub": "reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import: importing it "
                       "when a download starts lets a caller set them first",
    "httpx2": "huggingface_hub's transport, imported with it",
    "sglang": "optional: sglang-kt is installed on the GPU host only, and its import chain needs CUDA "
              "(the GPU half of the hybrid layer, SGLang's own placement masks)",
    "matplotlib": "about 1 s at import: plots.py imports it at its top; only hybrid's own chart defers it",
    "jupyter_core": "optional: the lab extra; only `ktutorial lab` reads Jupyter's runtime folder",
}
# ktutorial modules the CLI imports inside a command, and why (the CLI's start-up stays short).
CLI_DEFERRED_OK = {
    "ktutorial.hybrid": "imports torch and transformers at its top (seconds)",
    "ktutorial.placement": "imports torch and ktutorial.hybrid at its top (seconds)",
}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> list[str]:
    """The ktutorial modules an import statement binds (a `from pkg import mod` names mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            out.append(name)
    return out


def import_graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """module -> modules it imports anywhere; and every import inside a function or class:
    (module, line, imported name)."""
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    deferred = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            graph[module].update(_targets(module, path.name == "__init__.py", node, known))
            if id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [("." * node.level) + (node.module or "")]
                deferred += [(module, node.lineno, n) for n in names]
    return graph, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_a_deferred_import_counts_as_an_edge(tmp_path):
    pkg = tmp_path / "ktutorial"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from ktutorial import high\n    return high\n")
    (pkg / "high.py").write_text("from ktutorial import low\n")
    graph, deferred = import_graph(modules(pkg))
    assert graph["ktutorial.low"] == {"ktutorial.high"}
    assert find_cycle(graph) == ["ktutorial.high", "ktutorial.low", "ktutorial.high"]
    assert deferred == [("ktutorial.low", 2, "ktutorial")]


def test_no_import_cycle():
    graph, _ = import_graph(modules())
    assert len(graph) > 30  # every module was read
    assert find_cycle(graph) == []


def test_imports_at_the_top():
    """A deferred import is for an optional heavy dependency only (DEFERRED_OK says why each)."""
    _, deferred = import_graph(modules())
    wrong = []
    for module, line, name in deferred:
        top = name.split(".")[0]
        if name in DEFERRED_OK or top in DEFERRED_OK:
            continue
        if module == "ktutorial.cli" and name == "ktutorial":  # `from ktutorial import hybrid`
            continue
        wrong.append(f"{module}:{line} imports {name} inside a function")
    assert wrong == []


def test_the_cli_defers_only_what_is_heavy():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = {id(n) for n in tree.body}
    late = {f"ktutorial.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in top
            and n.module == "ktutorial" for a in n.names}
    assert late <= set(CLI_DEFERRED_OK)


def test_every_module_says_its_job():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if name.endswith("__main__") or path.stat().st_size == 0:
            continue
        assert doc and doc.strip(), f"{name} has no docstring saying its job"


@pytest.mark.parametrize("target", ["ktutorial", "tests"])
def test_ruff_is_clean(target):
    """ruff (configured in pyproject.toml) finds nothing."""
    ruff = Path(sys.executable).parent / "ruff"
    cmd = [str(ruff)] if ruff.exists() else [sys.executable, "-m", "ruff"]
    got = subprocess.run([*cmd, "check", "--no-cache", target], cwd=ROOT, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr
