"""The daemon's one-way layers, checked from the source (docs/daemon.md, "Layers").

Every ``llmuxd`` module belongs to one layer; a module may import its own layer
and the ones below, never above. Imports are read with ``ast`` (those under
``if TYPE_CHECKING:`` and inside functions count too: a type-only import back
into the supervisor is still a dependency a reader must follow). Nothing but the
entry point imports ``llmuxd.supervisor``, there is no import cycle, the state
modules (model and lease tables) do no I/O, and importing the status or lease
modules in a fresh interpreter does not load the daemon.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "llmuxd"

# Layer of each module (prefix match on the dotted name: "llmuxd.gpu" covers the package).
LAYERS: dict[str, int] = {
    # 0  base: vocabulary, no daemon state
    "llmuxd": 0, "llmuxd.errors": 0, "llmuxd.states": 0, "llmuxd.config": 0,
    "llmuxd.tomlout": 0, "llmuxd.logsetup": 0, "llmuxd.sdnotify": 0, "llmuxd.metrics": 0,
    "llmuxd.pidcheck": 0, "llmuxd.lineproto": 0,
    # 1  state (no I/O) and child operations, side by side
    "llmuxd.model": 1, "llmuxd.leases": 1,
    "llmuxd.child": 1, "llmuxd.guardian": 1, "llmuxd.vllm_client": 1, "llmuxd.gpu": 1,
    "llmuxd.child_ops": 1, "llmuxd.validate": 1, "llmuxd.frontend": 1, "llmuxd.watchdog": 1,
    "llmuxd.hostmem": 1,
    # 2  operations on the model table: workers, the daemon core, switching
    "llmuxd.workers": 2, "llmuxd.core": 2, "llmuxd.switching": 2,
    # 3  scheduler (pure policies + planner), status reading, the control API
    "llmuxd.placement": 3, "llmuxd.policy": 3, "llmuxd.planner": 3, "llmuxd.status": 3,
    "llmuxd.control": 3, "llmuxd.upkeep": 3, "llmuxd.host_memory": 3,
    # 4  the supervisor's parts: reload/shutdown, commands, validate jobs, front end keeper
    "llmuxd.lifecycle": 4, "llmuxd.model_commands": 4, "llmuxd.validate_jobs": 4,
    "llmuxd.frontend_keeper": 4, "llmuxd.daemon_port": 4, "llmuxd.watchdog_keeper": 4,
    # 5  the loop; 6 the entry point
    "llmuxd.supervisor": 5,
    "llmuxd.cli": 6, "llmuxd.__main__": 6,
}
# The front end is its own program (gunicorn workers): it may import only the base.
SEPARATE = {"llmuxd.proxy": 0}
STATE = ("llmuxd.model", "llmuxd.leases")
CHILDREN = ("llmuxd.child", "llmuxd.guardian", "llmuxd.vllm_client", "llmuxd.gpu",
            "llmuxd.child_ops", "llmuxd.validate", "llmuxd.frontend", "llmuxd.watchdog")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every llmuxd module ``name`` imports (resolved to a module of the package)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not _is_package(name, mods):
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in mods:
                found.add(t)
    found.discard(name)
    return found


def _layer(name: str) -> tuple[str, int]:
    for table in (SEPARATE, LAYERS):
        best = max((k for k in table if name == k or name.startswith(k + ".")),
                   key=len, default=None)
        if best is not None:
            return ("proxy" if table is SEPARATE else "daemon"), table[best]
    raise AssertionError(f"{name} has no layer: add it to LAYERS in {__file__}")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


GRAPH = {n: _imports(n, p, _modules()) for n, p in _modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        _layer(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name: str) -> None:
    kind, level = _layer(name)
    for dep in sorted(GRAPH[name]):
        dep_kind, dep_level = _layer(dep)
        if kind == "proxy":
            assert dep_kind == "proxy" or dep_level == 0, \
                f"{name} (front end) imports {dep} (daemon layer {dep_level})"
            continue
        assert dep_kind == "daemon", f"{name} imports the front end's {dep}"
        assert dep_level <= level, \
            f"{name} (layer {level}) imports {dep} (layer {dep_level}): upward"


def test_state_does_no_io() -> None:
    """The model and lease tables know nothing of processes, sockets or the GPU."""
    for name in GRAPH:
        if _under(name, STATE):
            bad = sorted(d for d in GRAPH[name] if _under(d, CHILDREN))
            assert not bad, f"{name} (state) imports child operations {bad}"


def test_only_the_entry_point_imports_the_supervisor() -> None:
    users = sorted(n for n, deps in GRAPH.items() if "llmuxd.supervisor" in deps)
    assert users == ["llmuxd.cli"]


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
            # A package and its own submodules may import each other (re-exports).
            if len(comp) > 1 and len({c.split(".")[1] if "." in c else c for c in comp}) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", ["llmuxd.status", "llmuxd.leases", "llmuxd.control.commands"])
def test_import_alone_does_not_load_the_daemon(module: str) -> None:
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('llmuxd.supervisor', 'llmuxd.lifecycle', "
            "'llmuxd.switching', 'llmuxd.child', 'llmuxd.control.server') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"
