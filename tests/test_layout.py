"""The package layout rule (DESIGN.md, "The flow" and "Layout"): stages are thin and share code
only through library packages. No module under ``lmrun/`` but ``lmrun/cli.py`` imports
``lmrun.stages``, and no stage module imports another stage's module. Imports are read with
``ast`` (top-level and inside functions, absolute and relative, ``from lmrun import stages``)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmrun

PACKAGE = Path(lmrun.__file__).parent
STAGES = PACKAGE / "stages"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module ``path`` (a file under ``root``) imports, as absolute dotted names; for
    ``from X import y`` both ``X`` and ``X.y`` (``y`` may be a submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def is_stages(module: str) -> bool:
    return module == "lmrun.stages" or module.startswith("lmrun.stages.")


def modules_under_lmrun() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_scanner_sees_every_import_form(tmp_path):
    (tmp_path / "lmrun" / "stages").mkdir(parents=True)
    src = tmp_path / "lmrun" / "stages" / "a.py"
    src.write_text("import lmrun.stages.b\nfrom lmrun.stages import c\nfrom . import d\nfrom .e import f\n"
                   "from lmrun import stages\ndef g():\n    from ..tracking import run\n")
    found = imported_modules(src, tmp_path)
    assert {"lmrun.stages.b", "lmrun.stages.c", "lmrun.stages.d", "lmrun.stages.e", "lmrun.stages",
            "lmrun.tracking.run"} <= found


def test_only_the_cli_imports_stages():
    offenders = {}
    for path in modules_under_lmrun():
        if path == PACKAGE / "cli.py" or STAGES in path.parents:
            continue
        bad = sorted(m for m in imported_modules(path) if is_stages(m))
        if bad:
            offenders[str(path.relative_to(PACKAGE.parent))] = bad
    assert not offenders, f"library modules importing lmrun.stages (move the shared code to a library package): {offenders}"


def test_no_stage_imports_another_stage():
    stage_files = sorted(p for p in STAGES.glob("*.py") if p.name != "__init__.py")
    assert len(stage_files) >= 10  # the scan found the stages
    offenders = {}
    for path in stage_files:
        own = module_name(path)
        bad = sorted(m for m in imported_modules(path) if is_stages(m) and m != own)
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"stages importing other stages (share through a library package): {offenders}"


@pytest.mark.parametrize("path", sorted(p.name for p in STAGES.glob("*.py") if p.name != "__init__.py"))
def test_every_stage_module_is_a_registered_stage(path):
    """lmrun/stages/ holds stages only (shared helpers live in library packages): each module has
    a conf/stage/<name>.yaml and ``plan``/``run``."""
    from lmrun import cli

    name = path.removesuffix(".py")
    assert name in cli.stage_names()
    mod = cli.load_stage(name)
    assert callable(mod.plan) and callable(mod.run)
