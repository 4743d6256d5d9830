"""The package's import graph, computed from its source: no circles, and no arrow that runs up.

The layers (../shared/design/layout.md): at the bottom what every part shares (the config and
its data, the error contract, the memory model, the engine's facts, its processes, the version
parser); above it, side by side, start-up (startup/: before ready), serving (serving/: while
serving) and the job path (jobs/), which receives what it needs and imports neither; then the
platform's adaptations (platform/), the only part that knows the runpod SDK; at the top the
composition root (gams_worker/worker.py), the one module that builds the worker.
Imports inside functions and under TYPE_CHECKING count: each is an arrow a reader follows.
"""

from __future__ import annotations

import ast
from typing import Dict, Iterator, List, Set, Tuple

from tests.harness.worker_process import ROOT

PACKAGE = ROOT / "gams_worker"
BOTTOM = {"config", "engine_info", "errors", "memory", "presets", "processes", "versions"}
# The parts each part may import from, besides itself.
MAY_IMPORT = {
    "bottom": {"bottom"},
    "startup": {"bottom"},
    "serving": {"bottom"},
    "jobs": {"bottom"},
    "platform": {"bottom", "jobs"},
    "worker": {"bottom", "startup", "serving", "jobs", "platform"},
}
# Arrows forbidden inside a part: input validation depends on the chat messages' rules, never the reverse.
FORBIDDEN = {("jobs.messages", "jobs.input")}
# The parts of the worker that only the composition root builds.
BUILT_BY_THE_ROOT = {"PlainJobs", "OpenAIJobs", "JobDispatch", "EngineWatchdog", "EngineStatsLog", "StatusServer",
                     "Worker"}


def modules() -> Iterator[Tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        yield name.removesuffix(".__init__").removesuffix("__init__"), ast.parse(path.read_text(), str(path))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (``from gams_worker.jobs import openai`` names jobs.openai)."""
    names = {name for name, _ in modules()}
    graph: Dict[str, Set[str]] = {}
    for name, tree in modules():
        targets = set()
        for node in ast.walk(tree):
            imported = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gams_worker"):
                base = node.module.removeprefix("gams_worker").lstrip(".")
                imported = [f"{base}.{alias.name}".lstrip(".") for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                imported = [alias.name.removeprefix("gams_worker").lstrip(".") for alias in node.names
                            if alias.name.startswith("gams_worker")]
            targets.update(target for target in imported if target in names and target not in ("", name))
        graph[name] = targets
    return graph


def part(module: str) -> str:
    if module in BOTTOM:
        return "bottom"
    return module.split(".")[0] if module.split(".")[0] in MAY_IMPORT else module


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Each circle of imports, as the modules on it."""
    found, visiting, done = [], [], set()

    def visit(module: str) -> None:
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            if target in visiting:
                found.append(visiting[visiting.index(target):] + [target])
            elif target not in done:
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return found


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"config", "worker", "jobs.plain", "startup.ladder", "serving.watchdog", "platform.job_loop"} <= set(graph)
    assert "startup.ladder" in graph["worker"] and "jobs.messages" in graph["jobs.input"]
    assert "jobs.openai" in graph["jobs.dialects"]  # from gams_worker.jobs.openai import ...


def test_there_are_no_import_circles():
    assert circles(import_graph()) == []


def test_no_arrow_runs_up():
    upward = sorted(f"{source} -> {target}" for source, targets in import_graph().items() for target in targets
                    if (part(target) != part(source) and part(target) not in MAY_IMPORT[part(source)])
                    or (source, target) in FORBIDDEN)
    assert upward == []


def test_only_the_platform_knows_the_runpod_sdk():
    knowing = sorted(name for name, tree in modules() for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom)) and part(name) != "platform"
                     and any(module.split(".")[0] == "runpod" for module in
                             ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""])))
    assert knowing == []


def test_only_the_composition_root_builds_the_worker():
    builders = sorted({f"{name}: {node.func.id}" for name, tree in modules() for node in ast.walk(tree)
                       if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                       and node.func.id in BUILT_BY_THE_ROOT and name != "worker"})
    assert builders == []
