"""Imports point down the layers of the design doc; the core never imports Flower."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedpit"

LAYERS = [
    {"errors", "types", "seeding", "registry", "textmetrics", "faults", "dropout", "memory", "attention", "packed",
     "native", "decode_step", "native_layers"},
    {"config"},
    {"model", "prompts", "data"},
    {"engines"},
    {"synth"},
    {"methods", "evaluation", "privacy"},
    {"runs", "progress", "report", "comparison", "frontier", "paired", "judging", "runtimes", "serving"},
    {"cli"},
]
SIBLINGS_APART = [("methods", "evaluation"), ("methods", "privacy"), ("evaluation", "privacy")]


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_imports_point_down():
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        top = rel.parts[0] if rel.parts[0] != "__init__" else None
        if top is None or top == "__main__":
            continue
        for module in _imports(path):
            if not module.startswith("fedpit."):
                continue
            target = module.split(".")[1]
            if _layer(target) > _layer(top):
                problems.append(f"{rel} imports {module}")
            if (top, target) in SIBLINGS_APART or (target, top) in SIBLINGS_APART:
                problems.append(f"{rel} imports sibling {module}")
    assert problems == []


def test_only_the_flower_runtime_imports_flwr():
    offenders = [
        str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
        if "flower" not in path.relative_to(SRC).parts
        and any(m == "flwr" or m.startswith("flwr.") for m in _imports(path))
    ]
    assert offenders == []
