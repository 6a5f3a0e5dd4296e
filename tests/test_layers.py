"""The library stays free of the orchestration stack: pixelpick <- tasks <- flows."""

import ast
import shutil
import subprocess
import sys
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


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def package_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that `module` (at `path`) imports anywhere, in functions too (a deferred import is
    still a dependency), except under `if TYPE_CHECKING:`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in modules:  # `import a.b.c` depends on the nearest module named
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def module_graph(*packages: str) -> dict[str, set[str]]:
    files = {}
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {module: package_imports(path, module, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return stack[stack.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_the_projects_modules():
    graph = module_graph("pixelpick", "tasks", "flows")
    # A package imports its own modules to re-export them; only cycles between modules are layering faults.
    graph = {module: {m for m in imported if not module.startswith(f"{m}.")} for module, imported in graph.items()}
    # Imports inside functions count too (step_input imports training where a step first needs its device).
    assert "pixelpick.training" in graph["pixelpick.step_input"]
    assert find_cycle(graph) is None


def test_every_module_imports():
    import importlib

    for module in sorted(module_graph("pixelpick", "tasks", "flows")):
        if not module.endswith("__main__"):
            importlib.import_module(module)


def test_the_architecture_notes_list_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    tree = text[text.index("```\npixelpick/\n"):]
    tree = tree[:tree.index("\n```")]
    sections = dict.fromkeys(("pixelpick", "tasks", "flows", "benchmarks"), "")
    current = "pixelpick"
    for line in tree.splitlines()[1:]:
        if line and not line.startswith(" "):  # a top-level folder: the lines below it are its modules
            current = line.split()[0].rstrip("/")
        sections[current] += line + "\n"
    missing = [str(path.relative_to(REPO)) for name in sections for path in sorted((REPO / name).rglob("*.py"))
               if f" {path.name}" not in sections[name] and f"{path.name}," not in sections[name]]
    assert missing == []


def _campaign_file_names() -> set[str]:
    """The folder and file names layout.py gives a campaign's paths (string constants joined with `/`)."""
    names = set()
    for node in ast.walk(ast.parse((REPO / "pixelpick" / "layout.py").read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            names.add(node.right.value)
    return names


def test_every_path_of_a_campaign_is_built_in_layout_py_only():
    names = _campaign_file_names()
    assert {"rounds", "pools", "labels", "steps", "dvc.lock", "probs.zarr", "train.distributed.json"} <= names
    offenders = []
    for package in ("pixelpick", "tasks", "flows"):
        for path in (REPO / package).rglob("*.py"):
            if path.name == "layout.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                        and isinstance(node.right, ast.Constant) and node.right.value in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: / {node.right.value!r}")
    assert offenders == []


def test_the_annotators_server_imports_no_pandas_or_torch():
    """The annotator's server stays small: pandas (100 MB resident) and torch are imported only by what writes
    tables or runs models, never by `pixelpick annotate serve`."""
    code = ("import sys, pixelpick.annotation.cli, pixelpick.annotation.server; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"


def test_a_dvc_stages_command_starts_without_prefect_mlflow_or_a_web_server(reference_campaign, tmp_path):
    """`pixelpick step` is what every DVC stage runs: it pays for torch and the library, not for Prefect (about a
    second to import), MLflow (needed to log an evaluated round only) or the annotator's server."""
    shutil.copytree(reference_campaign, tmp_path / "project")  # the session's reference is never changed
    folder = tmp_path / "project/data/runs/tiny"
    code = ("import sys; from flows.cli import main; "
            f"sys.argv = ['pixelpick', 'step', 'train', '--round', '1', '--campaign-dir', {str(folder)!r}]; main(); "
            "print(sorted(m for m in ('prefect', 'mlflow', 'fastapi', 'uvicorn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["train of round 1: up to date", "[]"]


def test_the_stages_that_write_files_only_start_without_torch_or_the_orchestration_stack():
    """`pixelpick step settings` runs on every `dvc repro` after params.yaml changes, annotate and ingest in every
    round: they read and write tables, so their start must not pay for importing torch, Prefect, MLflow or
    matplotlib."""
    probe = ("import sys, flows.cli, tasks.pipeline_files, pixelpick.recipe, pixelpick.labelling\n"
             "print(sorted(set(sys.modules) & {'prefect', 'mlflow', 'dvc', 'torch', 'torchvision', 'skimage',"
             " 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
