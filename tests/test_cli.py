"""The instrumented-adam command line: listing, reports, exports, and errors without tracebacks."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instrumented_adam.demo import cli
from instrumented_adam.demo.tasks import TrainConfig, train_task


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with two short linear-regression runs (ids 1 and 2)."""
    path = tmp_path_factory.mktemp("cli") / "exp.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_task("linreg", TrainConfig(epochs=6), path, run_name="base")
        train_task("linreg", TrainConfig(optimizer="adamax", epochs=6), path, run_name="other")
    finally:
        torch.set_num_threads(threads)
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """cli.main's status (SystemExit included, as argparse exits on usage errors), stdout, stderr."""
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_runs_lists_the_runs(store, capsys):
    status, out, _ = run_main(["runs", str(store)], capsys)
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["run_id", "name", "status", "optimizer", "task"]
    assert lines[1].split()[:7] == ["1", "base", "finished", "Adam", "linreg", "6", "36"]
    assert lines[2].split()[:5] == ["2", "other", "finished", "Adamax", "linreg"]


def test_report_of_named_runs(store, capsys):
    # Runs by name and by id; the page goes next to the store (exp.html) without --out.
    status, out, _ = run_main(["report", str(store), "other", "1", "--max-lag", "1", "--top", "5"], capsys)
    out_file = store.with_suffix(".html")
    assert status == 0 and "Report of 2 run(s) written" in out and str(out_file.resolve()) in out
    page = out_file.read_text()
    assert "1:base" in page and "2:other" in page and page.count('<div class="plot"') >= 8
    assert 'id="health"' in page


def test_report_out_must_not_be_a_directory(store, tmp_path, capsys):
    status, _, err = run_main(["report", str(store), "--out", str(tmp_path)], capsys)
    assert status == 1 and "is a directory" in err


def test_report_out_in_a_missing_directory_is_an_error(store, tmp_path, capsys):
    # A typo in the path must not silently create directories.
    status, _, err = run_main(["report", str(store), "--out", str(tmp_path / "nonexistent" / "dir" / "x.html")], capsys)
    assert status == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "nonexistent").exists()


def test_report_relation_options(store, tmp_path, capsys):
    out = tmp_path / "r.html"
    status, _, err = run_main(["report", str(store), "--out", str(out), "--target", "train", "--lags", "1-2",
                               "--epochs", "1-", "--layer-norm", "raw", "--no-progress"], capsys)
    assert status == 0, err
    page = out.read_text()
    assert "per-layer epoch step (‖s_k‖)" in page  # raw, not the per-element RMS
    status, _, err = run_main(["report", str(store), "--lags", "3-1"], capsys)
    assert status == 2 and "is not a lag or a lag range" in err
    status, _, err = run_main(["report", str(store), "--epochs", "x"], capsys)
    assert status == 2 and "is not an epoch window" in err
    status, _, err = run_main(["report", str(store), "--lags", "0-2", "--max-lag", "2", "--out", str(out)], capsys)
    assert status == 1 and "not both" in err


def test_version_and_help_texts(capsys):
    from instrumented_adam import __version__

    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out.strip() == f"instrumented-adam {__version__}"
    for command, words in (("runs", "Lists the runs"), ("export", "TensorBoard event"), ("check", "Exits 1")):
        status, out, _ = run_main([command, "--help"], capsys)
        assert status == 0 and words in " ".join(out.split()), out
    status, out, _ = run_main(["export", "--help"], capsys)
    assert "parquet (needs pyarrow)" in " ".join(out.split())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["runs", "{store}"], ["check", "{store}"]])
def test_fast_commands_do_not_import_torch(store, argv):
    # A fresh interpreter: the command must not load torch (nor, for --help/--version, pandas).
    argv = [a.format(store=store) for a in argv]
    code = ("import sys, time; t = time.perf_counter(); from instrumented_adam.demo import cli\n"
            "try:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TIME', time.perf_counter() - t); print('TORCH', 'torch' in sys.modules);"
            "print('PANDAS', 'pandas' in sys.modules)") % (argv,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("TIME", "TORCH", "PANDAS")))
    assert lines["TORCH"] == "False"
    if argv[0].startswith("--"):
        assert lines["PANDAS"] == "False" and float(lines["TIME"]) <= 0.5


@pytest.mark.parametrize("fmt, expected", [
    ("csv", ["runs.csv", "steps.csv", "epochs.csv", "layers.csv", "metrics.csv"]),
    ("parquet", ["runs.parquet", "epochs.parquet"]),
])
def test_export_tables(store, tmp_path, capsys, fmt, expected):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    status, out, _ = run_main(["export", str(store), "base", "--format", fmt, "--out", str(tmp_path / "x")], capsys)
    assert status == 0
    for name in expected:
        assert (tmp_path / "x" / name).stat().st_size > 0
    import pandas as pd

    epochs = pd.read_csv(tmp_path / "x" / "epochs.csv") if fmt == "csv" else pd.read_parquet(tmp_path / "x" / "epochs.parquet")
    assert epochs["run_id"].unique().tolist() == [1] and len(epochs) == 6


def test_export_tensorboard(store, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    status, out, _ = run_main(["export", str(store), "--format", "tensorboard", "--out", str(tmp_path / "tb")], capsys)
    assert status == 0
    runs = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert runs == ["1-base", "2-other"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb" / "1-base").iterdir())


@pytest.mark.parametrize("argv", [
    ["runs", "{missing}"],
    ["report", "{missing}"],
    ["export", "{missing}", "--format", "csv", "--out", "{tmp}/x"],
])
def test_missing_store(argv, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "nope.sqlite", tmp=tmp_path) for a in argv]
    status, out, err = run_main(argv, capsys)
    assert status == 1
    assert err.strip() == f"instrumented-adam: error: no run store at {tmp_path / 'nope.sqlite'}"
    assert not (tmp_path / "nope.sqlite").exists()  # nothing created by a typo


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "notes.sqlite").write_text("hello")
    status, _, err = run_main(["runs", str(tmp_path / "notes.sqlite")], capsys)
    assert status == 1 and "not an instrumented_adam run store" in err and "Traceback" not in err
    status, _, err = run_main(["runs", str(tmp_path)], capsys)
    assert status == 1 and "is a directory" in err


@pytest.mark.parametrize("argv", [
    ["report", "{store}", "base", "ghost"],
    ["export", "{store}", "ghost", "--format", "csv", "--out", "{tmp}/x"],
])
def test_unknown_run(store, argv, tmp_path, capsys):
    argv = [a.format(store=store, tmp=tmp_path) for a in argv]
    status, out, err = run_main(argv, capsys)
    assert status == 1
    assert err.startswith("instrumented-adam: error: no run 'ghost'") and "1:base" in err  # lists the runs there are
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--epochs", "0"], "'0' is not a positive integer"),
    (["demo", "--lr", "-0.001"], "'-0.001' is not a positive number"),
    (["demo", "--lr=-1e-3"], "'-1e-3' is not a positive number"),
    (["demo", "--weight-decay", "-1"], "'-1' is not a number >= 0"),
    (["demo", "--lr", "nan"], "'nan' is not a positive number"),
    (["demo", "--betas", "0.9", "1.0"], "'1.0' is not a beta in [0, 1)"),
    (["demo", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["demo", "--task", "mnist"], "invalid choice: 'mnist'"),
    (["export", "x.sqlite", "--format", "xml", "--out", "d"], "invalid choice: 'xml'"),
    (["export", "x.sqlite", "--format", "csv"], "the following arguments are required: --out"),
    (["report"], "the following arguments are required: store"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    status, out, err = run_main(argv, capsys)
    assert status == 2
    assert message in err and err.startswith("usage: instrumented-adam") and "Traceback" not in err


def test_demo_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status, _, err = run_main(["demo", "--out", str(tmp_path / "file"), "--no-progress"], capsys)
    assert status == 1 and "is not a directory" in err


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("instrumented-adam") == "instrumented_adam.demo.cli:main"


def test_user_errors_in_a_fresh_process(tmp_path):
    # What a user sees: one line on stderr, status 1, no traceback. The installed console script
    # when there is one next to this interpreter, else the module.
    script = Path(sys.executable).parent / "instrumented-adam"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "instrumented_adam.demo.cli"]
    done = subprocess.run([*command, "runs", str(tmp_path / "missing.sqlite")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().endswith(f"error: no run store at {tmp_path / 'missing.sqlite'}")


def test_a_branch_shows_the_steps_it_ran_and_the_configured_lr(tmp_path, capsys):
    # A branch from step 30 (epoch 3) that ran to step 50: 'runs' and the report show 20 steps.
    # Its first step was a warm-up step at a tenth of the lr: 'lr (start)' shows the configured lr.
    from instrumented_adam.telemetry.store import RunStore

    path = tmp_path / "b.sqlite"
    with RunStore(path, create=True) as store:
        parent = store.create_run("parent", optimizer="Adam", optimizer_config=[{"lr": 1e-3}])
        for epoch in range(3):
            store.write_epoch(parent, {"epoch": epoch, "step": 10 * (epoch + 1), "num_steps": 10, "recorded_steps": 10, "wall_time": 1.0, "lr": 1e-3})
        store.set_status(parent, "finished")
        child = store.create_run("child", optimizer="Adam", parent_run=parent, branch_epoch=3, branch_step=30,
                                 optimizer_config=[{"lr": 1e-4, "initial_lr": 2e-3}])
        for epoch in (3, 4):
            store.write_epoch(child, {"epoch": epoch, "step": 10 * (epoch + 1), "num_steps": 10, "recorded_steps": 10, "wall_time": 1.0, "lr": 2e-4})
        store.set_status(child, "finished")
    status, out, _ = run_main(["runs", str(path)], capsys)
    assert status == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    # (no task: the empty task cell drops out of the split) epochs, steps:
    assert rows["parent"][4:6] == ["3", "30"] and rows["child"][4:6] == ["2", "20"]
    from instrumented_adam.analysis.report import build_report

    page = build_report(path, permutations=9)
    child_row = page.split("2:child</td>", 1)[1].split("</tr>", 1)[0]
    assert "<td>0.002</td>" in child_row and "<td>20</td>" in child_row and "run 1, epoch 3" in child_row
