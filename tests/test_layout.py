"""The shape of pipeline/: no import cycle (lazy imports inside functions included), no file over
400 lines, no function over 60, and every architecture's entry builds and freezes as its registry says."""

import ast
import os

import pytest
import torch

from pipeline.archs import ARCHS
from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "pipeline")


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "pipeline." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycle():
    graph, state, path, cycles = import_graph(), {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, cycles


def test_no_file_over_400_lines_and_no_function_over_60():
    long = {name: n for name, path in modules().items() if (n := len(open(path).read().splitlines())) > 400}
    assert not long, long
    long = {f"{name}.{f.name}": n for name, path in modules().items() for f in ast.walk(ast.parse(open(path).read()))
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and (n := f.end_lineno - f.lineno + 1) > 60}
    assert not long, long


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_architecture_builds_and_its_stages_cover_the_backbone(arch):
    from pipeline.model import build_model, frozen_stages, head_of

    entry = ARCHS[arch]
    model = build_model(arch, num_classes=2)
    assert head_of(model, arch) is model.get_submodule(entry.head) and model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    # Every parameter belongs to exactly one stage or to the head: freezing every stage is a linear probe.
    def params(*names: str) -> list[str]:
        return [f"{m}.{n}" for m in names for n, _ in model.get_submodule(m).named_parameters()]

    owned = [p for stage in entry.stages for p in params(*stage)] + params(entry.head)
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())
    assert len(frozen_stages(model, arch, len(entry.stages))) == sum(map(len, entry.stages))
    assert entry.imagenet_weights().url.startswith("https://download.pytorch.org/")
