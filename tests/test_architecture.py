"""The house rules of docs/architecture.md, checked on the source: every import (function-local
ones included) goes to a strictly lower floor, and no two modules import each other, directly
or through others."""
from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first; the same table is in docs/architecture.md ("Floors").
FLOORS = [
    {"engine", "engine.durations", "engine.histogram", "engine.logs", "engine.hl7", "engine.passwords",
     "engine.reactor", "mllp"},
    {"engine.config", "engine.cda", "engine.identity", "engine.web", "engine.atna", "engine.alerts"},
    {"engine.store", "engine.router", "engine.xds"},
    {"engine.steps", "engine.ingest", "engine.connectors", "engine.simulators", "engine.retention"},
    {"engine.transforms"},
    {"engine.reports"},
    {"engine.channels", "engine.delivery", "engine.status", "engine.alerting", "engine.console"},
    {"engine.wiring"},
    {"engine.app"},
    {"engine.cli"},
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.glob("engine/**/*.py")) + sorted(ROOT.glob("mllp/**/*.py")):
        rel = p.relative_to(ROOT)
        if "migrations" in rel.parts:
            continue  # Alembic scripts: frozen history, loaded by the store
        name = ".".join(rel.with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    edges[name].add(t)
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" and len(parts) > 1 else parts[0]


def test_every_room_has_a_floor():
    assert {room(m) for m in modules()} <= set(FLOOR), {room(m) for m in modules()} - set(FLOOR)


def test_no_import_runs_up_or_sideways():
    bad = []
    for a, targets in import_graph().items():
        for b in targets:
            ra, rb = room(a), room(b)
            if ra != rb and not FLOOR[rb] < FLOOR[ra]:
                bad.append(f"{a} -> {b} (floor {FLOOR[ra]} -> {FLOOR[rb]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)
