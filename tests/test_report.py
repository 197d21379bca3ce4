"""The HTML report: self-contained, every figure present and decodable, and it renders in Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
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
        # With the kernel histograms: the report's distribution and histogram views render too.
        train_task("digits", TrainConfig(epochs=7, histogram_every=5), path, run_name="mlp")
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    return write_report(store, tmp_path_factory.mktemp("html") / "report.html", max_lag=2, top=8)


PLOT = re.compile(r'<div class="plot" id="(plot-\d+)" aria-label="([^"]*)">')


def test_report_shows_the_kernel_histograms(report):
    text = report.read_text()
    assert "Distributions over training (kernel histograms, all tensors)" in text
    assert "histograms of the effective step size of 3:mlp" in text
    assert "median, dashed 16th/84th percentile (kernel histograms)" in text


def test_report_is_self_contained(report):
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is fetched: no external sources, links or stylesheets; plotly.js is inlined once.
    assert not re.search(r'<(script|img|link|iframe)[^>]+(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "@import" not in page
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1
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
    alts = [alt for _, alt in IMG.findall(page)] + [alt for _, alt in PLOT.findall(page)]
    # Per group: loss, lr/wd, epoch geometry, moments, step figures, predicted vs actual (interactive);
    # the linear regression adds the loss-surface path and the parameters (PNG); per run: layers.
    assert alts.count("loss curves") == 2 and alts.count("epoch geometry") == 2
    assert alts.count("trajectory on the loss surface") == 1 and alts.count("parameters over training") == 1
    assert alts.count("learning rate and weight decay") == 2 and alts.count("moment norms and effective lr") == 2
    for run in ("1:lin-adam", "2:lin-adamw", "3:mlp"):
        assert f"per-layer step norms of {run}" in alts
    # The digits run has kernel histograms: its group's distributions figure and its histogram view.
    assert alts.count("distributions of the effective step size, update and gradient over training") == 1
    assert "histograms of the effective step size of 3:mlp" in alts
    assert len(alts) == 2 * 6 + 2 + 3 + 2
    # 12 epochs give 11 loss changes: fewer than the 12 pairs a relation test needs; the 7-epoch run too.
    assert page.count("Too few epochs with a logged loss to test relations") == 3
    assert "linreg: 2-parameter linear regression" in page and "digits: MLP 75-50-25" in page
    assert 'data-report-check' not in page.split("<body>")[0]  # set by the script at load, not baked in
    # The report opens with the health findings, before the runs table.
    assert page.index('id="health"') < page.index("<h2>Runs</h2>")
    assert "best epoch" in page and "<b>healthy</b>" in page


def test_relations_table_in_a_longer_run(tmp_path):
    path = tmp_path / "s.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_task("linreg", TrainConfig(epochs=40), path, run_name="lin")
    finally:
        torch.set_num_threads(threads)
    page = build_report(path, lags=(1, 2), permutations=99, top=5)
    assert "Relations to the change of the validation loss" in page and "lags 1…2" in page
    assert "so p ≥ 0.01" in page and "out-of-sample gain" in page
    train = build_report(path, target="train", window=(5, None), permutations=99)
    assert "Relations to the change of the training loss" in train and "epochs 5…last" in train


def test_weight_decay_zero_is_a_flat_panel_and_epochs_are_integers(store):
    from instrumented_adam.analysis import interactive

    runs = load_runs(RunStore(store))
    spec = interactive.figure_hyperparameters(runs[2:])  # the digits run: weight decay 0
    assert spec["layout"]["yaxis2"]["range"] == [-1, 1]
    assert "constant 0 in every run" in spec["layout"]["annotations"][1]["text"]
    geometry = interactive.figure_epoch_geometry(runs)
    assert all(geometry["layout"][f"xaxis{s}"]["tickformat"] == "d" for s in ("", "2", "3", "4"))


def test_adam_and_adamax_moments_on_separate_axes(tmp_path):
    from instrumented_adam.analysis import interactive
    from instrumented_adam.analysis.relations import RunData
    import pandas as pd

    def run(i, optimizer, v):
        epochs = pd.DataFrame({"epoch": [0, 1, 2], "second_moment_mean_mean": v})
        return RunData(i, optimizer, {"optimizer": optimizer}, epochs, pd.DataFrame(), pd.DataFrame())

    spec = interactive.figure_moments([run(1, "Adam", [1e-8, 1e-8, 1e-8]), run(2, "Adamax", [1e-4, 1e-4, 1e-4])])
    axes = {t["legendgroup"]: t.get("yaxis", "y") for t in spec["data"] if "second_moment" in t["hovertemplate"] + t["name"]}
    assert set(axes) == {"1:Adam", "2:Adamax"} and axes["1:Adam"] != axes["2:Adamax"]
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert any("Adam's second moment" in t for t in titles) and any("Adamax" in t for t in titles)


def test_signed_log_ticks_do_not_collide_near_zero():
    from instrumented_adam.analysis.interactive import signed_log_ticks
    import numpy as np

    values = np.array([-3.0, -1e-4, 1e-7, 2.0, 0.5])
    positions, labels = signed_log_ticks(values, scale=3e-3)
    assert labels[0] == "0" and len(positions) == len(set(positions))
    ordered = sorted(positions)
    assert min(np.diff(ordered)) >= 0.9  # label spacing in axis units
    assert "1e0" in labels and "−1e0" in labels


def test_display_thinning_keeps_the_ends():
    from instrumented_adam.analysis.interactive import MAX_DISPLAY_POINTS, thin
    import numpy as np

    x = np.arange(10_001.0)
    tx, ty = thin(x, x * 2)
    assert len(tx) <= MAX_DISPLAY_POINTS + 1 and tx[0] == 0 and tx[-1] == 10_000 and (ty == 2 * tx).all()


def test_missing_output_directory_is_an_error(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(store, tmp_path / "nowhere" / "x.html")
    assert not (tmp_path / "nowhere").exists()


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
    assert "(running)" in page or "(finished)" in page
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


def _body_attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:2000]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def _check_rendered(binary: str, page: Path, profile: Path, fragment: str = "") -> tuple[dict[str, str], str]:
    dom = chromium(binary, profile, "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri() + fragment)
    assert dom.returncode == 0, dom.stderr[-2000:]
    attributes = _body_attributes(dom.stdout)
    text = page.read_text()
    assert attributes.get("data-images-total") == str(text.count("<img"))
    assert attributes.get("data-images-loaded") == str(text.count("<img"))
    assert attributes.get("data-plots-total") == str(text.count('<div class="plot"'))
    assert attributes.get("data-plots-rendered") == attributes.get("data-plots-total")
    assert attributes.get("data-js-errors") == "0"
    assert attributes.get("data-report-check") == "ok"
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
    assert not console_errors, console_errors
    return attributes, dom.stderr


def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    # The report's inline check runs at the load event and records on <body> whether every image
    # decoded, every Plotly figure rendered, and whether any script error occurred.
    _check_rendered(binary, report, tmp_path / "profile-dom")

    shot = tmp_path / "report.png"
    done = chromium(binary, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1100,1800",
                    "--virtual-time-budget=10000", f"--screenshot={shot}", report.resolve().as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1100, 1800)
        # Not a blank page: the top of the report has text, tables and figures in many shades.
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200


def test_legend_toggle_and_zoom_in_headless_chromium(report, tmp_path):
    # #selftest makes the page click the first run in the first figure's legend (real mouse
    # events on plotly's legend toggle) and drag a zoom box over the figure, then record the trace's
    # visibility and the x range before and after on <body>.
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    attributes, _ = _check_rendered(binary, report, tmp_path / "profile-selftest", "#selftest")
    assert attributes.get("data-selftest") == "done"
    assert attributes.get("data-selftest-toggled") == "legendonly"  # the run is hidden
    before = [float(v) for v in attributes["data-selftest-xrange-before"].split(",")]
    after = [float(v) for v in attributes["data-selftest-xrange-after"].split(",")]
    assert before[0] < after[0] < after[1] < before[1]  # zoomed in to the middle of the axis


def test_a_3000_epoch_store_renders_in_under_30_s(tmp_path):
    import time

    binary = chromium_binary()
    path = tmp_path / "long.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_task("linreg", TrainConfig(epochs=3000), path, run_name="long")
    finally:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    page = write_report(path, tmp_path / "long.html")
    built = time.perf_counter() - started
    assert "3000" in page.read_text()
    if binary is not None:
        _check_rendered(binary, page, tmp_path / "profile-long")
    assert time.perf_counter() - started < 30, f"built in {built:.1f} s"


def test_data_dictionary_documents_every_store_column(store):
    # docs/data-dictionary.md must describe every column of a demo store, and its figure rows are
    # generated from core.figures (so they cannot drift from the formulas).
    from instrumented_adam.analysis import dictionary

    columns = dictionary.store_columns(store)
    assert not dictionary.undocumented(columns)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data-dictionary.md").read_text()
    assert dictionary.figure_section() in doc
    for table, cols in columns.items():
        section = doc.split(f"## `{table}`", 1)
        assert len(section) == 2, f"table {table} is not in docs/data-dictionary.md"
        body = section[1].split("\n## ", 1)[0]
        for c in cols:
            assert f"| `{c}` |" in body, f"{table}.{c} is not in docs/data-dictionary.md"
    with RunStore(store) as s:
        for metric in s.metrics()["name"].unique():
            assert f"| `{metric}` |" in doc


def test_report_loads_neither_torch_nor_the_op_library(store):
    # The analysis layer reads the store only: building a report in a fresh interpreter must not
    # import torch, the compiled ops, or the demo (which imports both).
    code = (
        "import sys\n"
        "from instrumented_adam.analysis.report import build_report\n"
        "from instrumented_adam.analysis import health, significance, dictionary\n"
        f"page = build_report({str(store)!r})\n"
        "health.check_runs(__import__('instrumented_adam.telemetry.store', fromlist=['RunStore']).RunStore("
        f"{str(store)!r}))\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('instrumented_adam._C', 'instrumented_adam.demo',"
        " 'instrumented_adam.core.stats', 'instrumented_adam.core.table', 'instrumented_adam.core._ops'))]\n"
        "print('BAD', bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BAD []" in done.stdout, done.stdout


def test_task_metric_panels_are_drawn(tmp_path):
    """A task's own figures of merit (the vertex finder's efficiency and false positives per event)
    appear as their own figure when the run names them under EPOCH_METRIC_PANELS_KEY; the report of
    a run that names none has no such figure."""
    from instrumented_adam.analysis.interactive import EPOCH_METRIC_PANELS_KEY

    path = tmp_path / "s.sqlite"
    model = torch.nn.Linear(3, 1)
    import instrumented_adam as ia

    opt = ia.Adam(model.parameters(), lr=1e-2)
    panel = {"title": "Vertex finding (validation events)",
             "metrics": {"val_efficiency": "efficiency", "val_false_positives": "false positives / event"}}
    with Recorder(opt, path, run_name="pv", model=model, hyperparameters={EPOCH_METRIC_PANELS_KEY: [panel]}) as rec:
        for epoch in range(3):
            model.weight.grad = torch.randn_like(model.weight)
            model.bias.grad = torch.randn_like(model.bias)
            opt.step()
            rec.end_epoch(train_loss=1.0 / (epoch + 1), val_efficiency=0.5 + 0.1 * epoch, val_false_positives=0.9)
    page = build_report(path)
    assert "Vertex finding (validation events)" in page
    assert "pv val_efficiency" in page and "false positives / event" in page
    train_task("linreg", TrainConfig(epochs=2), tmp_path / "plain.sqlite", run_name="lin")
    assert "Vertex finding" not in build_report(tmp_path / "plain.sqlite")
