"""rayeff's modules form no import cycle (module- and function-level imports both count), and each imports alone:
in a fresh child process that holds the third-party libraries but no rayeff module yet."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rayeff"


def module_files() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The rayeff modules `name` imports anywhere in its file (a `from package import name` names a module when
    the package has one of that name)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path of modules, or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_is_no_import_cycle_among_rayeff_modules():
    known = module_files()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert len(graph) > 50 and graph["rayeff.config"] >= {"rayeff.methods"}   # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def third_party_roots(known: dict) -> set[str]:
    roots = set()
    for path in known.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots.add(node.module.split(".")[0])
    return {r for r in roots if r != "rayeff" and r not in sys.stdlib_module_names}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_rayeff_module_imports_alone():
    """The third-party libraries are imported once here; then each rayeff module in a forked child of its own."""
    import importlib

    known = module_files()
    for root in sorted(third_party_roots(known)):
        try:
            importlib.import_module(root)
        except ImportError:
            pass
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "rayeff" or m.startswith("rayeff.")}
    failures = {}
    try:
        for name in sorted(known):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:   # the child: import the module alone, report, and leave without running any cleanup
                os.close(read)
                try:
                    importlib.import_module(name)
                    message = b""
                except BaseException as err:  # noqa: BLE001
                    message = f"{type(err).__name__}: {err}".encode()[:2000]
                os.write(write, message)
                os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                message = pipe.read().decode()
            os.waitpid(pid, 0)
            if message:
                failures[name] = message
    finally:
        sys.modules.update(saved)
    assert not failures, failures


def test_a_first_order_worker_imports_deepspeed_without_mlflow_which_stays_importable():
    """In a fresh process, as a worker starts: DeepSpeed is imported but its autotuner's MLflow import is not made
    (1.3-2.3 s of each worker's start here), and MLflow imports normally afterwards, for a run that tracks."""
    import subprocess

    code = ("import sys\nfrom rayeff.train.worker import prepare_process\n"
            "prepare_process({'scaling': {'gpus_per_worker': 0}, 'method': {'name': 'full'}})\n"
            "print('deepspeed' in sys.modules, 'mlflow' in sys.modules)\n"
            "import deepspeed.autotuning.autotuner as tuner, mlflow\n"
            "print(tuner.has_mlflow, mlflow.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False", "False", "mlflow"], done.stdout
