"""Branching studies (issue 13): bitwise continuation, executors (local processes, Ray), faults,
content-addressed re-runs, plain torch checkpoints, the comparison and the report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from instrumented_adam.analysis.branches import branch_comparison, branch_overlays, branch_tree, write_branch_report
from instrumented_adam.demo.study_tasks import TASK_REF, make_task
from instrumented_adam.studies.executor import LocalExecutor, SerialExecutor
from instrumented_adam.studies.protocol import epoch_seed, load_task
from instrumented_adam.studies.spec import BranchSpec
from instrumented_adam.studies.study import Study
from instrumented_adam.telemetry.store import RunStore

HERE = Path(__file__).resolve().parent
FAULTY_TASK = "studies_task:make_task"  # tests/studies_task.py (tests/ is on sys.path under pytest)
TINY = {"n_train": 64}

# Columns that say when something happened, not what: they differ between any two runs.
TIME_COLUMNS = {"started_at", "updated_at", "finished_at", "wall_time", "saved_at", "marked_at", "code_version"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _root(tmp: Path, task: str = FAULTY_TASK, kwargs=None, epochs: int = 5, **kw) -> tuple[Path, int]:
    store = tmp / "study.sqlite"
    run = Study(store).train_root(task, dict(TINY if kwargs is None else kwargs), epochs=epochs, seed=0, **kw)
    return store, run


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory) -> Path:
    """A 5-epoch root of the linreg task with planted faults (checkpoints after every epoch)."""
    store, _ = _root(tmp_path_factory.mktemp("root"))
    return store


def _copy_root(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copy(src, dst)  # the checkpoints stay where they are: branches only read them
    return dst


# Two branch points, one branch each: small, since every worker process imports torch first.
SWEEP = dict(at_epochs=[2, 3], grid={"lr": [0.05]}, seeds=1, epochs=2)


def frames(path: Path) -> dict[str, pd.DataFrame]:
    """Every table of a store as DataFrames, without the columns that record times."""
    with RunStore(path, readonly=True) as s:
        out = {"runs": s.runs(), "steps": s.steps(), "groups": s.step_groups(), "epochs": s.epochs(), "layers": s.layers(),
               "metrics": s.metrics(), "checkpoints": s.checkpoints(), "branches": s.study_branches()}
    for name, df in out.items():
        df = df.drop(columns=[c for c in df.columns if c in TIME_COLUMNS])
        if name == "checkpoints":  # paths name each study's own directory
            df = df.assign(path=df["path"].map(lambda p: Path(p).name))
        for col in df.columns:
            if df[col].dtype == object:
                df[col] = df[col].map(lambda v: repr(_strip_times(v)))
        out[name] = df.reset_index(drop=True)
    return out


def _strip_times(value):
    if isinstance(value, dict):
        return {k: _strip_times(v) for k, v in value.items() if k not in TIME_COLUMNS}
    return value


def assert_same_stores(a: Path, b: Path) -> None:
    fa, fb = frames(a), frames(b)
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name], check_exact=True, obj=name)


@pytest.fixture(scope="module")
def local_sweep(faulty_root, tmp_path_factory) -> Path:
    """The reference sweep: 2 branches on two local worker processes."""
    store = _copy_root(faulty_root, tmp_path_factory.mktemp("local"))
    result = Study(store, executor=LocalExecutor(2, threads=1)).sweep(1, **SWEEP)
    assert result.summary() == {"finished": 2}, result.errors
    return store


# ---- the training protocol and the specs ------------------------------------------------------------
def test_epoch_seed_is_a_function_of_seed_and_epoch():
    assert epoch_seed(0, 3) == epoch_seed(0, 3)
    assert len({epoch_seed(s, e) for s in range(4) for e in range(4)}) == 16
    with pytest.raises(ValueError, match="package.module:factory"):
        load_task("no_colon")
    with pytest.raises(TypeError, match="not a TrainingTask"):
        load_task("builtins:dict")


def test_spec_ids_are_content_hashes():
    a = BranchSpec("run:x", 3, (("lr", 1e-3), ("betas", (0.9, 0.99))), 2, None)
    b = BranchSpec("run:x", 3, (("betas", [0.9, 0.99]), ("lr", 0.001)), 2, None)
    assert a.id == b.id and len(a.id) == 16
    assert a.id != BranchSpec("run:x", 3, (("lr", 1e-3),), 2, None).id
    assert a.id != BranchSpec("run:x", 3, a.overrides, 2, 1).id
    assert BranchSpec.from_dict(a.to_dict()) == a


def test_overrides_are_validated_before_anything_trains(faulty_root, tmp_path):
    store = _copy_root(faulty_root, tmp_path)
    study = Study(store, executor=SerialExecutor())
    with pytest.raises(ValueError, match="Invalid learning rate"):
        study.sweep(1, [2], grid={"lr": [0.1, -1.0]})
    with pytest.raises(ValueError, match="Invalid beta parameter"):
        study.branch(1, 2, {"betas": [0.9, 1.5]})
    with pytest.raises(ValueError, match="not an argument of Adam"):
        study.branch(1, 2, {"momentum": 0.9})
    with pytest.raises(ValueError, match="unknown optimizer"):
        study.branch(1, 2, {"optimizer": "Lion"})
    with pytest.raises(ValueError, match="no checkpoint after epoch 9"):
        study.branch(1, 9, {})
    with RunStore(store) as s:
        assert s.study_branches().empty and len(s.runs()) == 1


# ---- bitwise continuation ----------------------------------------------------------------------------
def _final_state(store: RunStore, run_id: int) -> dict:
    ckpts = store.checkpoints(run_id)
    return torch.load(ckpts.sort_values("step").iloc[-1]["path"], weights_only=True)


def _assert_same_tensors(a, b, where="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), where


@pytest.mark.parametrize("name, kwargs, schedule", [("linreg", TINY, "cosine"), ("digits", {"n_train": 96}, "constant")])
def test_zero_override_branch_is_the_parents_own_continuation_bitwise(tmp_path, name, kwargs, schedule):
    store, root = _root(tmp_path, TASK_REF, {"name": name, **kwargs}, epochs=4, schedule=schedule)
    result = Study(store, executor=SerialExecutor()).branch(root, 2, {}, epochs=2)
    (spec,) = result.specs
    assert result.status[spec.id] == "finished", result.errors
    child = result.run_ids[spec.id]
    with RunStore(store) as s:
        info = s.run_info(child)
        assert (int(info["parent_run"]), int(info["branch_epoch"])) == (root, 2)
        branch_step = int(info["branch_step"])
        for table, key in (("epochs", "epoch"), ("layers", "epoch"), ("metrics", "epoch"), ("steps", "step")):
            frame = getattr(s, table)
            parent, mine = frame(root), frame(child)
            parent = parent[parent[key] >= 2] if key == "epoch" else parent[parent["step"] > branch_step]
            drop = ["run_id", "wall_time", "seq"]
            parent = parent.drop(columns=[c for c in drop if c in parent]).reset_index(drop=True)
            mine = mine.drop(columns=[c for c in drop if c in mine]).reset_index(drop=True)
            assert len(mine) and len(mine) == len(parent), table
            pd.testing.assert_frame_equal(mine, parent, check_exact=True, obj=table)  # every recorded figure
        a, b = _final_state(s, root), _final_state(s, child)
    _assert_same_tensors(a["model"], b["model"], "model")  # parameters
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer state")  # moments, epoch buffers
    assert a["recorder"]["step"] == b["recorder"]["step"] and a["recorder"]["epoch"] == b["recorder"]["epoch"]


# ---- executors: local worker processes and Ray ------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # A real local cluster with 2 CPUs; the workers import the test task from tests/.
    path = os.pathsep.join([str(HERE), str(HERE.parent)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_local_and_ray_sweeps_give_identical_stores(faulty_root, local_sweep, ray_cluster, tmp_path):
    from instrumented_adam.studies.executor import RayExecutor

    store = _copy_root(faulty_root, tmp_path)
    result = Study(store, executor=RayExecutor(num_cpus=1)).sweep(1, **SWEEP)
    assert result.summary() == {"finished": 2}, result.errors
    assert_same_stores(local_sweep, store)


def test_rerunning_a_finished_sweep_trains_nothing(faulty_root, local_sweep):
    before = frames(local_sweep)
    began = time.monotonic()
    result = Study(local_sweep, executor=LocalExecutor(2)).sweep(1, **SWEEP)
    assert result.trained == 0 and result.summary() == {"reused": 2}
    assert time.monotonic() - began < 5
    after = frames(local_sweep)
    for name in before:
        if name != "branches":
            pd.testing.assert_frame_equal(before[name], after[name], check_exact=True)


def test_sigkill_of_a_worker_mid_branch_is_retried_and_the_store_is_undisturbed(faulty_root, local_sweep, tmp_path,
                                                                                 monkeypatch):
    store = _copy_root(faulty_root, tmp_path)
    marker = tmp_path / "killed"
    # The branch from epoch 3 dies after one step of its second epoch: its retry resumes from its checkpoint.
    monkeypatch.setenv("IA_TEST_KILL_AT", f"4:{marker}")
    result = Study(store, executor=LocalExecutor(2, threads=1)).sweep(1, **SWEEP)
    assert marker.exists(), "the planted SIGKILL did not happen"
    assert result.summary() == {"finished": 2}, result.errors
    with RunStore(store) as s:
        attempts = s.study_branches()["attempts"].tolist()
    assert sorted(attempts) == [1, 2]  # the killed branch ran twice
    frames_a, frames_b = frames(local_sweep), frames(store)
    frames_a["branches"] = frames_a["branches"].drop(columns="attempts")
    frames_b["branches"] = frames_b["branches"].drop(columns="attempts")
    for name in frames_a:
        pd.testing.assert_frame_equal(frames_a[name], frames_b[name], check_exact=True, obj=name)


def test_a_branch_that_raises_is_failed_and_the_rest_completes(faulty_root, tmp_path):
    from studies_task import RAISING_LR

    store = _copy_root(faulty_root, tmp_path)
    result = Study(store, executor=LocalExecutor(1, threads=1)).sweep(1, [2], grid={"lr": [RAISING_LR, 0.05]},
                                                                      epochs=1)
    assert result.summary() == {"failed": 1, "finished": 1}
    (failed,) = [k for k, v in result.status.items() if v == "failed"]
    assert "planted failure" in result.errors[failed]
    with RunStore(store) as s:
        rows = s.study_branches().set_index("branch_id")
        assert rows.loc[failed, "status"] == "failed" and "planted failure" in rows.loc[failed, "error"]
        assert len(s.runs()) == 2  # the root and the finished branch: nothing half-done is merged
    tree = branch_tree(store)
    assert "planted failure" in tree[tree["status"] == "failed"]["error"].iloc[0]
    out = subprocess.run([sys.executable, "-m", "instrumented_adam.demo.cli", "runs", str(store), "--tree"],
                         capture_output=True, text=True, cwd=HERE.parent)
    assert out.returncode == 0, out.stderr
    assert "@2 lr=0.05" in out.stdout and "(failed)" in out.stdout and "planted failure" in out.stdout


# ---- a checkpoint written with torch.optim.Adam only --------------------------------------------------
def test_a_plain_torch_checkpoint_branches_like_the_script_continues(tmp_path):
    task = make_task("linreg", **TINY)
    model = task.model(0)
    # The script's optimizer: torch's own Adam (the fused path, whose arithmetic ours follows).
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    for epoch in range(3):
        task.train_epoch(model, opt, epoch, 0)
    ckpt = tmp_path / "plain.pt"
    torch.save({"net": model.state_dict(), "opt": opt.state_dict(), "epoch": 3}, ckpt)
    for epoch in range(3, 5):
        task.train_epoch(model, opt, epoch, 0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = opt.state_dict()["state"]

    store = tmp_path / "study.sqlite"
    study = Study(store, executor=SerialExecutor())
    root = study.import_checkpoint(ckpt, TASK_REF, {"name": "linreg", **TINY}, epoch=3, model_key="net", optimizer_key="opt")
    assert study.import_checkpoint(ckpt, TASK_REF, {"name": "linreg", **TINY}, epoch=3, model_key="net",
                                   optimizer_key="opt") == root  # the same file is the same root
    result = study.branch(root, 3, {}, epochs=2)
    (spec,) = result.specs
    assert result.status[spec.id] == "finished", result.errors
    with RunStore(store) as s:
        final = _final_state(s, result.run_ids[spec.id])
        epochs = s.epochs(result.run_ids[spec.id])
    assert list(epochs["epoch"]) == [3, 4] and list(epochs["step"]) == [8, 10]
    for k, v in expected.items():
        assert torch.equal(final["model"][k], v), k
    for pid, state in expected_state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(final["optimizer"]["state"][pid][key], state[key]), (pid, key)


# ---- comparison and report ---------------------------------------------------------------------------
def test_comparison_against_an_independent_computation(faulty_root, tmp_path):
    from scipy import stats

    store = _copy_root(faulty_root, tmp_path)
    Study(store, executor=SerialExecutor()).sweep(1, [3], grid={"lr": [0.05]}, seeds=3, epochs=2)
    table = branch_comparison(store)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["seeds"] == 3 and row["last_epoch"] == 4
    with RunStore(store) as s:
        e = s.epochs()
    parent = e[e["run_id"] == 1].set_index("epoch")["val_loss"]
    diffs = np.array([e[(e["run_id"] == r) & (e["epoch"] == 4)]["val_loss"].iloc[0] - parent[4] for r in row["run_ids"]])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert row["diff_final"] == pytest.approx(diffs.mean(), rel=1e-12)
    assert (row["diff_final_low"], row["diff_final_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half), rel=1e-12)
    best = np.array([e[(e["run_id"] == r)]["val_loss"].min() - parent.loc[3:4].min() for r in row["run_ids"]])
    assert row["diff_best"] == pytest.approx(best.mean(), rel=1e-12)
    overlays = branch_overlays(store, 1, 3)
    assert set(overlays["role"]) == {"parent", "branch"} and overlays["epoch"].min() == 2
    assert {"val_loss", "step_norm", "cos_prev", "lr", "exp_avg_norm_mean"} <= set(overlays["figure"])


def test_the_sweep_report_renders_in_headless_chromium(local_sweep, tmp_path):
    from test_report import _check_rendered, chromium, chromium_binary

    page = write_branch_report(local_sweep, tmp_path / "study.html")
    text = page.read_text()
    assert "Provenance tree" in text and text.count('<div class="plot"') == 3  # the tree + 2 branch points
    assert "From epoch 2" in text and "From epoch 3" in text and "Δ final" in text
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    _check_rendered(binary, page, tmp_path / "profile")
    shot = tmp_path / "study.png"
    done = chromium(binary, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1100,1600",
                    "--virtual-time-budget=10000", f"--screenshot={shot}", page.resolve().as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200
    keep = os.environ.get("IA_KEEP_STUDY_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_branches_to_sgd_and_rmsprop_record_epochs_and_continue_like_torch(faulty_root, tmp_path):
    store = _copy_root(faulty_root, tmp_path)
    result = Study(store, executor=SerialExecutor()).sweep(
        1, [2], overrides=[{"optimizer": "SGD", "momentum": 0.9, "lr": 0.01}, {"optimizer": "RMSprop", "lr": 0.01}], epochs=2)
    assert result.summary() == {"finished": 2}, result.errors
    sgd = next(k for k, s in zip(result.run_ids, result.specs) if s.override_dict["optimizer"] == "SGD")
    with RunStore(store) as s:
        epochs = s.epochs(result.run_ids[sgd])
        info = s.run_info(result.run_ids[sgd])
        final = _final_state(s, result.run_ids[sgd])
        start = torch.load(s.checkpoints(1).set_index("epochs_done").loc[2, "path"], weights_only=True)
    assert info["optimizer"] == "SGD" and int(info["branch_epoch"]) == 2 and int(info["parent_run"]) == 1
    assert list(epochs["epoch"]) == [2, 3] and list(epochs["step"]) == [6, 8]
    assert (epochs["lr"] == 0.01).all() and (epochs["momentum"] == 0.9).all() and epochs["val_loss"].notna().all()
    # The same continuation written by hand with torch.optim.SGD from the parent's weights at epoch 2.
    task = load_task(FAULTY_TASK, TINY)
    model = task.model(0)
    model.load_state_dict(start["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in (2, 3):
        task.train_epoch(model, opt, epoch, 0)
    for k, v in model.state_dict().items():
        assert torch.equal(final["model"][k], v), k
    table = branch_comparison(store)
    assert sorted(table["overrides"]) == ["lr=0.01 momentum=0.9 optimizer=SGD", "lr=0.01 optimizer=RMSprop"]
    assert table["diff_final"].notna().all()


def test_the_cli_trains_branches_and_sweeps(tmp_path, capsys):
    from instrumented_adam.demo.cli import main

    store = tmp_path / "cli.sqlite"
    assert main(["train", str(store), "--task", "linreg", "--task-arg", "n_train=64", "--epochs", "3", "--set", "lr=0.1"]) == 0
    assert main(["branch", str(store), "linreg-root-s0", "--at-epoch", "2", "--set", "lr=0.05", "--set", "betas=0.9,0.99",
                 "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert "@2 betas=0.9,0.99 lr=0.05" in out and "1 finished; trained 1" in out
    assert main(["sweep", str(store), "1", "--at-epoch", "1,2", "--grid", "lr=0.05,0.2", "--seeds", "1",
                 "--executor", "serial"]) == 0
    assert "4 finished; trained 4" in capsys.readouterr().out
    assert main(["sweep", str(store), "1", "--at-epoch", "1,2", "--grid", "lr=0.05,0.2", "--executor", "serial"]) == 0
    assert "4 reused; trained 0" in capsys.readouterr().out
    assert main(["sweep", str(store), "1", "--at-epoch", "2", "--grid", "lr=-1", "--executor", "serial"]) == 1
    assert "Invalid learning rate" in capsys.readouterr().err
    assert main(["runs", str(store), "--tree"]) == 0
    tree = capsys.readouterr().out
    assert tree.count("└─") == 5 and "@1 lr=0.2" in tree
    assert main(["study-report", str(store)]) == 0
    assert (tmp_path / "cli-study.html").exists()
