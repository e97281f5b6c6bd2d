"""Project consistency: the README's test command is what CI runs; conda and pip list the same packages."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

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


def _recipe_table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_table", ROOT / "docs" / "recipe_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_tables_of_docs_recipes_md_are_the_presets() -> None:
    """docs/recipes.md §5 shows what the presets hold; `python docs/recipe_table.py --write` regenerates it."""
    recipe_table = _recipe_table_module()
    written = recipe_table.tables_in((ROOT / "docs" / "recipes.md").read_text())
    assert written == recipe_table.recipe_tables(), (
        "docs/recipes.md's recipe tables differ from the presets: run `python docs/recipe_table.py --write`")


def test_the_recipe_table_shows_a_changed_preset(monkeypatch) -> None:
    """The comparison can fail: a preset that changes changes the generated tables."""
    import semask.engine.config as config

    recipe_table = _recipe_table_module()
    before = recipe_table.recipe_tables()
    for name in ("semask_tiny_ade20k", "swin_tiny_ade20k"):  # a recipe and its baseline
        changed = config.get_preset(name)
        changed.optim.lr = 2e-4
        monkeypatch.setitem(config.PRESETS, name, changed)
    after = recipe_table.recipe_tables()
    assert after != before and "| 2e-4 |" in after
    monkeypatch.setitem(config.PRESETS, "swin_tiny_ade20k", config.get_preset("swin_small_ade20k"))
    with pytest.raises(SystemExit, match="differs from semask_tiny_ade20k"):  # a baseline unlike its recipe
        recipe_table.recipe_tables()


def test_docs_recipes_md_has_the_sections_the_code_cites() -> None:
    text = (ROOT / "docs" / "recipes.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    cited = set()
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "data").glob("*.md"),
                 *(ROOT / "semask").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for first, last in re.findall(r"docs/recipes\.md §(\d+)(?:-(\d+))?", path.read_text()):
            cited |= {str(n) for n in range(int(first), int(last or first) + 1)}
    assert cited and cited <= sections, f"cited sections without a heading: {sorted(cited - sections)}"
    assert sections == {str(n) for n in range(1, 8)}
