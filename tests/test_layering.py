"""Import-direction rules (STYLE.md G1, G4): robust_objectives -> torch + stdlib; tune_spaces -/-> pipelines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules(package: str) -> dict[str, set[str]]:
    """{file: top-level names of every absolute import in it} for every .py under `package`."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_robust_objectives_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "robust_objectives"}
    files = imported_top_level_modules("robust_objectives")
    assert "robust_objectives/__init__.py" in files and len(files) > 5
    offenders = {path: sorted(names - allowed) for path, names in files.items() if names - allowed}
    assert not offenders, offenders


def test_tune_spaces_never_imports_pipelines():
    files = imported_top_level_modules("tune_spaces")
    assert "tune_spaces/__init__.py" in files
    offenders = [path for path, names in files.items() if "pipelines" in names]
    assert not offenders, offenders


def test_importing_robust_objectives_loads_no_heavy_framework():
    code = (
        "import sys, robust_objectives\n"
        "heavy = ('ray', 'transformers', 'datasets', 'peft', 'pipelines', 'pandas')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", result.stdout
