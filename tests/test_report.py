"""The HTML report: self-contained, every figure present and decodable, and it renders in Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from instrumented_adam.analysis import plots
from instrumented_adam.analysis.relations import load_runs
from instrumented_adam.telemetry.recorder import Recorder
from instrumented_adam.analysis.report import build_report, write_report
from instrumented_adam.telemetry.store import RunStore
from instrumented_adam.demo.tasks import TrainConfig, make_optimizer, train_task

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">')


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two linear-regression runs (overlaid on the loss surface) and one digits run."""
    path = tmp_path_factory.mktemp("report") / "exp.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_task("linreg", TrainConfig(epochs=12), path, run_name="lin-adam")
        train_task("linreg", TrainConfig(optimizer="adamw", epochs=12), path, run_name="lin-adamw")
        train_task("digits", TrainConfig(epochs=7), path, run_name="mlp")
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    return write_report(store, tmp_path_factory.mktemp("html") / "report.html", max_lag=2, top=8)


def test_report_is_self_contained(report):
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is fetched: no external sources, links or stylesheets.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    images = IMG.findall(page)
    assert len(images) == page.count("<img")
    for data, alt in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), alt
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            assert im.width >= 600 and im.height >= 100, alt


def test_report_contents(report):
    page = report.read_text()
    alts = [alt for _, alt in IMG.findall(page)]
    # Per group: loss, lr/wd, epoch steps, distance, moments, step figures, predicted vs actual;
    # the linear regression adds the loss-surface path and the parameters; per run: layers + correlations.
    assert alts.count("loss curves") == 2 and alts.count("epoch step norm and angle") == 2
    assert alts.count("trajectory on the loss surface") == 1 and alts.count("parameters over training") == 1
    assert alts.count("learning rate and weight decay") == 2 and alts.count("moment norms and effective lr") == 2
    for run in ("1:lin-adam", "2:lin-adamw", "3:mlp"):
        assert f"per-layer step norms of {run}" in alts and f"correlation heatmap of {run}" in alts
    assert len(alts) == 2 * 7 + 2 + 3 * 2
    assert page.count("Strongest relations") == 3
    assert "linreg: 2-parameter linear regression" in page and "digits: MLP 75-50-25" in page
    assert 'data-report-check' not in page.split("<body>")[0]  # set by the script at load, not baked in


def test_report_of_runs_without_epochs(tmp_path):
    # A run that recorded steps but ended no epoch, and a store without runs, still give a page.
    # (Selecting runs is covered by tests/test_cli.py's report of named runs.)
    s = RunStore(tmp_path / "s.sqlite", create=True)
    config = TrainConfig(lr=0.1, weight_decay=0.0)
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(model.parameters(), config)
    # The name is shown as is: escaped in HTML, and its '$' does not start matplotlib's mathtext.
    rec = Recorder(opt, s, run_name="<b>$lr", model=model)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    rec.close()
    page = build_report(s)
    assert "1:&lt;b&gt;$lr" in page and "<b>$lr" not in page and "Too few epochs" in page
    empty = tmp_path / "e.sqlite"
    RunStore(empty, create=True).close()
    assert "holds no runs yet" in build_report(empty)


def test_plots_take_data_not_stores(store):
    # The plotting module draws from loaded quantities: the same figures from a notebook.
    runs = load_runs(RunStore(store))
    fig = plots.plot_trajectory(runs)  # non-2-parameter runs are skipped
    assert fig.axes and fig.axes[0].get_xlabel() == "slope"
    assert len(plots.surface_runs(runs)) == 2


# ---- headless Chromium ---------------------------------------------------------------------------
def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium(binary: str, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs headless Chromium with a fresh profile and nothing that reaches the network."""
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    url = report.resolve().as_uri()
    images = report.read_text().count("<img")

    # The report's inline check runs at the load event and records on <body> whether every
    # figure decoded (naturalWidth > 0) and whether any script error occurred.
    dom = chromium(binary, tmp_path / "profile-dom", "--virtual-time-budget=15000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attributes.get("data-images-total") == str(images)
    assert attributes.get("data-images-loaded") == str(images)
    assert attributes.get("data-js-errors") == "0"
    assert attributes.get("data-report-check") == "ok"
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
    assert not console_errors, console_errors

    shot = tmp_path / "report.png"
    done = chromium(binary, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1100,1800",
                    f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1100, 1800)
        # Not a blank page: the top of the report has text, tables and figures in many shades.
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200
