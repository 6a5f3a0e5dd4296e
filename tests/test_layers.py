"""The library stays free of the orchestration stack: pixelpick <- tasks <- flows."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "dvc", "mlflow"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_never_imports_prefect_dvc_or_mlflow():
    offenders = {
        str(path.relative_to(REPO)): imported_roots(path) & ORCHESTRATION
        for path in (REPO / "pixelpick").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_never_import_flows():
    offenders = [str(p) for p in (REPO / "tasks").rglob("*.py") if "flows" in imported_roots(p)]
    assert offenders == []
