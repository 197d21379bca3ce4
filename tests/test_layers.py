"""The package's layers: core < telemetry < analysis < studies < demo, imports only pointing down, and the
store and the report usable without torch or the compiled extension (issue 8)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import instrumented_adam as ia
from instrumented_adam.telemetry.recorder import Recorder

PACKAGE = Path(ia.__file__).resolve().parent
LAYERS = ("core", "telemetry", "analysis", "studies", "demo")


def _imported_modules(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of the package, relative ones resolved."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        module = package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from . import x` / `from .. import analysis`: the names may be modules themselves.
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "instrumented_adam" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_no_module_of_a_lower_layer_imports_a_higher_one():
    violations = []
    for layer_index, layer in enumerate(LAYERS):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for line, name in _imported_modules(path):
                target = _layer(name)
                if target is not None and target > layer_index:
                    violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer}) imports {name} ({LAYERS[target]})")
    assert not violations, "\n".join(violations)


def test_the_import_parser_sees_an_upward_import(tmp_path):
    """The check above must be able to fail: a fake core module importing the demo is caught."""
    fake = tmp_path / "instrumented_adam" / "core" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..demo import tasks\nimport instrumented_adam.analysis.report\nfrom . import stats\n")
    names = [n for _, n in _imported_modules(fake, tmp_path)]
    assert "instrumented_adam.demo.tasks" in names and "instrumented_adam.analysis.report" in names
    assert "instrumented_adam.core.stats" in names
    assert sorted({_layer(n) for n in names if _layer(n) is not None}) == [0, 2, 4]


def test_the_studies_layer_sits_between_analysis_and_demo(tmp_path):
    """A study module may use the analysis; the analysis may not use the studies."""
    fake = tmp_path / "instrumented_adam" / "analysis" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..studies import study\n")
    layers = {_layer(n) for _, n in _imported_modules(fake, tmp_path)}
    assert layers == {LAYERS.index("studies")} and LAYERS.index("studies") > LAYERS.index("analysis")
    assert LAYERS.index("analysis") < LAYERS.index("studies") < LAYERS.index("demo")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, '_C': 'instrumented_adam._C' in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["instrumented_adam.store", "instrumented_adam.telemetry.store", "instrumented_adam",
                                    "instrumented_adam.analysis.branches"])
def test_importing_the_store_loads_neither_torch_nor_the_extension(module):
    assert _loaded_after(f"import {module}") == {"torch": False, "_C": False}


def test_the_probe_sees_torch_when_it_is_loaded():
    """The subprocess check must be able to fail."""
    assert _loaded_after("import instrumented_adam.core.optimizer") == {"torch": True, "_C": True}


def test_a_report_of_an_existing_store_loads_neither_torch_nor_the_extension(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = ia.Adam(model.parameters(), lr=1e-2)
    db = tmp_path / "exp.sqlite"
    with Recorder(opt, db, run_name="tiny", model=model) as rec:
        for _ in range(3):
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step()
            rec.end_epoch(train_loss=1.0, val_loss=1.0)
    out = tmp_path / "report.html"
    loaded = _loaded_after(
        "from instrumented_adam.analysis.report import write_report\n"
        f"write_report({str(db)!r}, {str(out)!r}, permutations=19)"
    )
    assert out.exists() and out.stat().st_size > 1000
    assert loaded == {"torch": False, "_C": False}
