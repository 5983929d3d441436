"""Imports point one way: flows -> deploy -> export -> pfp; pfp never imports prefect, mlflow
or export code, and nothing below flows imports prefect or mlflow."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pfp": {"export", "deploy", "flows", "prefect", "mlflow"},
    "export": {"deploy", "flows", "prefect", "mlflow"},
    "deploy": {"flows", "prefect", "mlflow"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    bad = {
        str(p.relative_to(REPO)): sorted(imported_roots(p) & FORBIDDEN[package])
        for p in (REPO / package).rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}
