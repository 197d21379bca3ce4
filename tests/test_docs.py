"""Every Python snippet in README.md and docs/*.md runs.

The ```python blocks of one file run in order, in one fresh interpreter (later blocks may use
names an earlier block defined), in a scratch directory that holds a small demo store at
`runs/demo/demo.sqlite` (the store the docs' examples read). A block preceded by the comment
`<!-- snippet: needs-cuda -->` is skipped without a GPU. Shell blocks are not run here; the
commands they show are exercised by the CLI tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?P<marker><!-- snippet: (?P<flag>[a-z-]+) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(path: Path) -> list[tuple[str | None, str]]:
    """(flag, code) of each ```python block of a Markdown file, in order."""
    return [(m.group("flag"), m.group("code")) for m in _BLOCK.finditer(path.read_text(encoding="utf-8"))]


def test_the_docs_have_snippets() -> None:
    """The parser finds the README's snippets (a broken pattern would make every test pass)."""
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    assert any("ia.Adam(" in code for _, code in blocks)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a small demo store at runs/demo/demo.sqlite (a few epochs of each task)."""
    directory = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "instrumented_adam.demo.cli", "demo", "--epochs", "4", "--no-report",
               "--no-progress", "--out", str(directory / "runs" / "demo")]
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (directory / "runs" / "demo" / "demo.sqlite").exists()
    return directory


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: d.name)
def test_snippets_run(doc: Path, scratch: Path, tmp_path: Path) -> None:
    blocks = python_blocks(doc)
    runnable = [code for flag, code in blocks if not (flag == "needs-cuda" and not torch.cuda.is_available())]
    if not runnable:
        pytest.skip("every snippet of this file needs CUDA")
    work = tmp_path / "work"
    shutil.copytree(scratch, work)  # each file's snippets get their own copy of the demo store
    script = "\n\n".join(f"# --- block {i} of {doc.name}\n{code}" for i, code in enumerate(runnable))
    (work / "snippets.py").write_text(script, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "snippets.py"], cwd=work, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, f"{doc.name}: a snippet failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
