"""The package's layering, as the README's layout describes it: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssah_peft"

#: package -> the packages it must not import (directly, by any relative or absolute import).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "tuner": ("unit_map", "scoring", "experiments", "finetuning", "training", "cli", "export"),
    "scoring": ("unit_map", "experiments", "finetuning", "training", "cli", "export", "evaluate"),
    "training": ("experiments", "finetuning", "cli"),
    "finetuning": ("experiments", "cli"),
    "evaluate": ("experiments", "finetuning", "cli"),
    "export": ("experiments", "finetuning", "cli"),
}


def imported_packages(path: Path) -> set[str]:
    """The first-level ``ssah_peft`` subpackages/modules that the module at ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth_of_package = len(path.relative_to(PACKAGE).parts) - 1
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the package root, then the first name is a subpackage
                climbed = depth_of_package - (node.level - 1)
                parts = list(path.relative_to(PACKAGE).parts[:climbed]) + (node.module or "").split(".")
                names = [part for part in parts if part]
                if names:
                    found.add(names[0])
                elif node.level - 1 == depth_of_package:  # `from .. import x` at the root: x are modules
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("ssah_peft."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ssah_peft."))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package: str) -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_packages(path) & set(FORBIDDEN[package]))
        for path in sorted((PACKAGE / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_import_reader_sees_relative_and_absolute_imports() -> None:
    module = PACKAGE / "tuner" / "model.py"
    assert "units" in imported_packages(module)  # `from ..units import ...`
    assert imported_packages(PACKAGE / "finetuning" / "job.py") >= {"training", "unit_map"}
