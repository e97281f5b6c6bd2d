"""Project consistency: the README's test command is what CI runs; conda and pip list the same packages."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [b.strip() for b in blocks if "pytest" in b]
    assert len(commands) == 1, f"expected one bash block running pytest in README.md, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = _readme_test_command()
    assert command == 'python -m pip install -e ".[dev]" && python -m pytest'
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_yml_lists_the_pyproject_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = set(map(_normalise, project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        expected |= set(map(_normalise, extra))
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip_lines = []
    for line in lines[start + 1:]:
        if not line.startswith("      - "):
            break
        pip_lines.append(_normalise(line.strip()[2:]))
    assert set(pip_lines) == expected
    assert len(pip_lines) == len(set(pip_lines)), "duplicate entries in environment.yml"


def test_the_notebooks_extra_is_part_of_dev() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["notebooks"]) <= set(extras["dev"])


def test_no_module_imports_another_modules_private_names() -> None:
    import ast

    offenders = []
    for path in sorted((ROOT / "semask").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("semask"):
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def test_models_are_not_patched_after_they_are_built() -> None:
    """Class names, palette and config are set by the builder (`build_model`), never assigned afterwards."""
    import re

    patched = [f"{path.relative_to(ROOT)}:{i + 1}" for path in sorted((ROOT / "semask").rglob("*.py"))
               for i, line in enumerate(path.read_text().splitlines())
               if re.search(r"\bmodel\.(class_names|palette|config)\s*=(?!=)", line)]
    assert not patched, patched


def test_the_export_extra_is_part_of_dev() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["export"]) <= set(extras["dev"])


def test_the_convert_extra_is_part_of_dev() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["convert"]) <= set(extras["dev"])


IMPORT_NAMES = {"pillow": "PIL"}  # distribution name -> module name, where they differ


def _imported_modules(paths) -> set[str]:
    import ast

    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    """A declared dependency that nothing imports (torchvision was one) is a download for nothing."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    imported = _imported_modules(sorted((ROOT / "semask").rglob("*.py")))
    unused = sorted(d for d in declared if IMPORT_NAMES.get(d, d) not in imported)
    assert not unused, f"declared in pyproject.toml but never imported by semask: {unused}"
    assert "scipy" not in declared  # the COCO-Stuff converter's optional extra, imported lazily
