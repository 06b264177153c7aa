"""fastopt's modules in layers: every import (function-local ones included) goes to the same
layer or one below, and no group of modules imports itself round.

The layer order is the table below, bottom first. Imports are read from the source with
``ast`` (relative ones resolved; ``importlib.import_module`` of a literal name counted too), so
an import inside a function, which Python runs only when the function is called, counts as much
as one at the top of a file. ``kernels/`` is installed as ``fastopt.kernels`` and is named so
here. A module missing from the table fails the test (say where it belongs); a module in the
table that does not exist yet is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fastopt": ROOT / "fastopt", "fastopt.kernels": ROOT / "kernels"}

# Bottom first. A module may import from its own layer (as long as no cycle forms) and from
# the layers below. Names are relative to ``fastopt``; a package's own file is
# ``<package>.__init__``; ``kernels.*`` is every module of ``fastopt.kernels``.
LAYERS: list[tuple[str, list[str]]] = [
    ("leaf modules: import nothing of fastopt",
     ["_build", "_torch_args", "rounding", "quant", "sharded", "step_args"]),
    ("the compiled extension's loader, the reference ops, the Triton kernels",
     ["_ext", "reference", "kernels.*"]),
    ("the op schemas' Python side", ["_ops"]),
    ("backend choice", ["backends"]),
    ("8-bit blocks of sharded params; offload: host copies, norms measured during backward, "
     "the overlapped update", ["blocks", "offload", "backward_norm", "overlap"]),
    ("state formats, their state_dict form, step plans", ["state", "state_dict", "_plan"]),
    ("the other fused ops' front ends", ["norm", "accumulate", "scaler"]),
    ("the optimizer", ["adamw"]),
    ("the package", ["__init__"]),
    ("the benchmark", ["benchmark", "bench_cli"]),
    # The trainer, bottom first: its errors, then what needs nothing else of it ...
    ("train: errors", ["train.errors"]),
    ("train: process groups, schedules, early stopping",
     ["train.distributed", "train.schedules", "train.early_stopping"]),
    ("train: the config schema, checkpoint files, what a dataset factory returns",
     ["train.config", "train.checkpoint", "train.jobs.job_data"]),
    ("train: data, sharded checkpoints, metrics; the built-in jobs' models and data",
     ["train.data", "train.sharded_checkpoint", "train.metrics",
      "train.gpt", "train.mlp", "train.text_data"]),
    ("train: the loop's components, parallel strategies, telemetry, plots",
     ["train.components", "train.strategy", "train.telemetry", "train.plots"]),
    ("train: micro-batches", ["train.microbatch"]),
    ("train: a run's state", ["train.run"]),
    ("train: the loop (fit)", ["train.loop"]),
    ("train: jobs (presets, factories, run_job)",
     ["train.jobs.presets", "train.jobs.factories", "train.jobs.runner"]),
    ("train: the jobs package", ["train.jobs.__init__"]),
    ("train: the trainer package", ["train.__init__"]),
    # ... and the command line at the top.
    ("train: the command line", ["train.cli"]),
    ("python -m fastopt", ["__main__"]),
]  # fmt: skip


def _modules() -> dict[str, Path]:
    """Every module's dotted name (``fastopt.train.cli``, ``fastopt.kernels.adamw``; a
    package's ``__init__.py`` as ``fastopt.train.__init__``) and its file."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _resolve(dotted: str) -> str | None:
    """The module a dotted import name loads: a package's ``__init__``, else the module
    itself; None outside fastopt."""
    for name in (f"{dotted}.__init__", dotted):
        if name in MODULES:
            return name
    return None


def _imports(module: str) -> set[str]:
    """The fastopt modules that ``module``'s source imports, anywhere in the file."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module.rsplit(".", 1)[0]  # for a package's __init__ too: the package itself
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # ``from X import name``: the submodule X.name when there is one, else X.
            targets = [
                f"{source}.{alias.name}" if _resolve(f"{source}.{alias.name}") else source
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):  # importlib.import_module("fastopt.kernels"): an import by a literal name
            targets = [node.args[0].value]
        else:
            continue
        found.update(r for r in map(_resolve, targets) if r is not None and r != module)
    return found


def _short(module: str) -> str:
    return module.removeprefix("fastopt.")


def _layer_of(module: str) -> int | None:
    name = _short(module)
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if name == member or (member.endswith(".*") and name.startswith(member[:-1])):
                return index
    return None


GRAPH = {m: _imports(m) for m in MODULES}


def _groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another round (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as a path, for each group of :func:`_groups`."""
    cycles = []
    for group in _groups(graph):  # the shortest path from the group's first module back to it
        members, first = set(group), group[0]
        paths, queue = {first: [first]}, [first]
        for v in queue:
            if first in graph[v]:
                cycles.append([*paths[v], first])
                break
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return cycles


def test_the_walk_sees_function_local_and_relative_imports():
    """The checks below are only as good as the walk: it must find imports inside functions
    and resolve ``from . import x`` and ``from .. import x``."""
    assert "fastopt.__init__" in GRAPH["fastopt.train.components"]  # `import fastopt` in a function
    assert "fastopt.train.distributed" in GRAPH["fastopt.train.checkpoint"]  # from . import D
    assert "fastopt.reference" in GRAPH["fastopt.kernels.norm"]  # from .. import reference
    assert "fastopt.train.cli" in GRAPH["fastopt.__main__"]  # in a function, absolute
    assert "fastopt.kernels.__init__" in GRAPH["fastopt.backends"]  # importlib, a literal name


def test_every_module_has_a_layer():
    missing = sorted(_short(m) for m in MODULES if _layer_of(m) is None)
    assert not missing, f"modules not in tests/test_layers.py's LAYERS table: {missing}"


def test_no_import_cycle():
    shown = [
        f"{len(group)} modules ({', '.join(map(_short, group))}), e.g. "
        + " -> ".join(map(_short, cycle))
        for group, cycle in zip(_groups(GRAPH), _cycles(GRAPH))
    ]
    assert not shown, "modules that import one another round:\n" + "\n".join(shown)


def test_imports_go_down_the_layers():
    upward = [
        f"{_short(src)} ({LAYERS[_layer_of(src)][0]}) imports {_short(dst)} "
        f"({LAYERS[_layer_of(dst)][0]})"
        for src, targets in sorted(GRAPH.items())
        for dst in sorted(targets)
        if _layer_of(src) is not None
        and _layer_of(dst) is not None
        and _layer_of(dst) > _layer_of(src)
    ]
    assert not upward, "imports up the layer order:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set()}, None),
    ],
    ids=["two", "three-and-a-tail", "none"],
)
def test_the_cycle_finder(graph, cycle):
    assert _cycles(graph) == ([cycle] if cycle else [])
