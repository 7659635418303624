"""The shape of ``study/``: sub-packages by concept, imports one way, no private names
imported across modules, ``trainables`` independent of ``study``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The sub-packages in pipeline order: each may import only those before it.
LAYERS = ("spec", "storage", "analysis", "privacy", "search", "execution", "report", "cli")


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every ``from``/``import`` in a file, nested too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
    return out


def layer_of(module: str, names: list[str]) -> list[str]:
    """The study sub-packages an import statement reaches."""
    parts = module.split(".")
    if parts[0] != "study":
        return []
    if len(parts) > 1:
        return [parts[1]]
    return [n for n in names if n in LAYERS]


def study_files() -> list[Path]:
    return sorted((ROOT / "study").rglob("*.py"))


def test_every_module_of_study_sits_in_a_concept_package() -> None:
    loose = [p.name for p in (ROOT / "study").glob("*.py")]
    assert sorted(loose) == ["__init__.py"]
    for package in LAYERS:
        init = ROOT / "study" / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_the_tests_mirror_the_packages() -> None:
    """A test of one package sits in ``tests/study/<package>/``; at the top only the tests
    that span packages (this one, whole studies end to end)."""
    tests = ROOT / "tests" / "study"
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS)
    assert sorted(p.name for p in tests.glob("test_*.py")) == [
        "test_honest_studies.py", "test_layout.py"]
    for package in LAYERS:
        assert list((tests / package).glob("test_*.py")), f"no tests for study/{package}"


def test_imports_go_one_way_between_the_packages() -> None:
    upward = []
    for path in study_files():
        rel = path.relative_to(ROOT / "study").parts
        mine = rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")
        if mine not in LAYERS:
            continue
        for line, module, names in imports(path):
            upward += [f"{path.relative_to(ROOT)}:{line} ({mine} imports {other})"
                       for other in layer_of(module, names)
                       if LAYERS.index(other) > LAYERS.index(mine)]
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module() -> None:
    private = []
    for path in [*study_files(), *sorted((ROOT / "trainables").rglob("*.py"))]:
        for line, module, names in imports(path):
            if module.split(".")[0] in ("study", "trainables"):
                private += [f"{path.relative_to(ROOT)}:{line} {module}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_trainables_never_imports_the_service_nor_optuna() -> None:
    wrong = [f"{p.relative_to(ROOT)}:{line} {module}"
             for p in sorted((ROOT / "trainables").rglob("*.py"))
             for line, module, _ in imports(p)
             if module.split(".")[0] in ("study", "optuna")]
    assert not wrong, "\n".join(wrong)
