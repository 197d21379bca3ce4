"""The analysis module's numbers against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from instrumented_adam import analysis


def t3_two_sided_p(t: float) -> float:
    """Two-sided p-value of Student's t with 3 degrees of freedom, from its closed-form CDF:
    F(t) = 1/2 + (1/π)·[ (t/√3)/(1 + t²/3) + arctan(t/√3) ]."""
    u = abs(t) / math.sqrt(3.0)
    upper_tail = 0.5 - (u / (1 + u * u) + math.atan(u)) / math.pi
    return 2 * upper_tail


def test_pearson_and_spearman_of_a_five_point_series():
    # x = 1..5, y = 2 1 4 3 5: deviations (-2 -1 0 1 2) and (-1 -2 1 0 2), Σdxdy = 8, Σdx² = Σdy² = 10,
    # so r = 0.8. y is already a ranking, so Spearman's ρ is the same 0.8.
    # t = r·√(n−2)/√(1−r²) = 0.8·√3/0.6, and with u = t/√3 = 4/3: u/(1+u²) = 12/25 = 0.48, so
    # p = 2·(1/2 − (0.48 + 0.9272952)/π) = 0.1040880...
    x = np.array([1.0, 2, 3, 4, 5])
    y = np.array([2.0, 1, 4, 3, 5])
    out = analysis.correlate(x, y)
    expected_p = 2 * (0.5 - (0.48 + math.atan(4 / 3)) / math.pi)
    assert expected_p == pytest.approx(0.1040880, abs=1e-7)
    assert expected_p == pytest.approx(t3_two_sided_p(0.8 * math.sqrt(3) / 0.6), rel=1e-12)
    assert out["n"] == 5
    assert out["pearson_r"] == pytest.approx(0.8, abs=1e-12)
    assert out["spearman_rho"] == pytest.approx(0.8, abs=1e-12)
    assert out["pearson_p"] == pytest.approx(expected_p, rel=1e-9)
    assert out["spearman_p"] == pytest.approx(expected_p, rel=1e-9)


def test_spearman_differs_from_pearson_on_a_monotone_curve():
    # y = x³ is monotone: ranks agree exactly (ρ = 1) while the linear fit is imperfect.
    x = np.arange(1.0, 8.0)
    out = analysis.correlate(x, x**3)
    assert out["spearman_rho"] == pytest.approx(1.0)
    assert out["spearman_p"] == pytest.approx(0.0, abs=1e-12)
    assert 0.9 < out["pearson_r"] < 0.99


def test_undefined_correlations_are_nan():
    assert math.isnan(analysis.correlate(np.ones(6), np.arange(6.0))["pearson_r"])  # constant figure
    assert math.isnan(analysis.correlate(np.arange(2.0), np.arange(2.0))["spearman_rho"])  # too few pairs


def known_lag_series(n: int = 20, lag: int = 2, seed: int = 0) -> pd.DataFrame:
    """A figure x and a 'loss change' y with y[k] = 3·x[k − lag] + 1 (y undefined before `lag`)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = np.full(n, np.nan)
    y[lag:] = 3 * x[:-lag] + 1
    return pd.DataFrame({"epoch": np.arange(n), "step_norm": x, "train_loss_change": y})


def test_correlation_found_at_its_lag():
    series = known_lag_series(n=20, lag=2)
    corr = analysis.correlations(series, figures=["step_norm"], targets=["train_loss_change"], max_lag=4)
    assert corr["lag"].tolist() == [0, 1, 2, 3, 4]
    at = corr.set_index("lag")
    # Pairs (x[k], y[k + lag]) exist for k + lag in 2..19 and k <= 19: 18 at lags 0..2, then fewer.
    assert at.loc[0, "n"] == 18 and at.loc[2, "n"] == 18 and at.loc[3, "n"] == 17 and at.loc[4, "n"] == 16
    assert at.loc[2, "pearson_r"] == pytest.approx(1.0, abs=1e-12)
    assert at.loc[2, "spearman_rho"] == pytest.approx(1.0, abs=1e-12)
    assert at.loc[2, "pearson_p"] < 1e-12
    for lag in (0, 1, 3, 4):  # independent normal draws elsewhere
        assert abs(at.loc[lag, "pearson_r"]) < 0.6
    ranked = analysis.rank_relations(corr, top=1)
    assert ranked.loc[0, "lag"] == 2 and ranked.loc[0, "strength"] == pytest.approx(1.0)


def test_lag_pairs_follow_epoch_numbers_not_positions():
    # Epoch 3 is missing: x[2] must pair with nothing at lag 1, not with the value of epoch 4.
    x = pd.Series([1.0, 2.0, 3.0, 5.0], index=[0, 1, 2, 4])
    y = pd.Series([10.0, 20.0, 30.0, 50.0], index=[0, 1, 2, 4])
    xs, ys = analysis.lagged_pairs(x, y, 1)
    assert xs.tolist() == [1.0, 2.0] and ys.tolist() == [20.0, 30.0]


def test_negative_and_partial_relations_with_numpy_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = -0.5 * x + rng.normal(scale=0.5, size=40)
    series = pd.DataFrame({"epoch": np.arange(40), "cos_prev": x, "val_loss_change": y})
    corr = analysis.correlations(series, max_lag=0)
    assert len(corr) == 1 and corr.loc[0, "figure"] == "cos_prev" and corr.loc[0, "target"] == "val_loss_change"
    assert corr.loc[0, "pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    ranks_x, ranks_y = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    assert corr.loc[0, "spearman_rho"] == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1], rel=1e-12)
    assert corr.loc[0, "pearson_r"] < -0.4


def test_benjamini_hochberg_q_values():
    # p = 0.01, 0.04, 0.03 (m = 3): sorted 0.01, 0.03, 0.04 → p·m/rank = 0.03, 0.045, 0.04, then the
    # running minimum from the largest rank down: 0.03, 0.04, 0.04.
    corr = pd.DataFrame({
        "figure": ["a", "b", "c"], "label": ["a", "b", "c"], "layer": ["", "", ""], "target": ["t"] * 3,
        "lag": [0, 0, 0], "n": [10] * 3,
        "pearson_r": [0.9, 0.5, 0.7], "pearson_p": [0.01, 0.04, 0.03],
        "spearman_rho": [0.8, -0.6, 0.4], "spearman_p": [0.01, 0.04, 0.03],
    })
    ranked = analysis.rank_relations(corr, top=None)
    assert ranked["figure"].tolist() == ["a", "b", "c"]  # by |ρ|: 0.8, 0.6, 0.4
    assert ranked.set_index("figure")["spearman_q"].to_dict() == pytest.approx({"a": 0.03, "b": 0.04, "c": 0.04})
    by_pearson = analysis.rank_relations(corr, top=2, by="pearson")
    assert by_pearson["figure"].tolist() == ["a", "c"]
    with pytest.raises(ValueError):
        analysis.rank_relations(corr, by="kendall")


def test_constant_figures_and_short_series_give_no_rows():
    series = pd.DataFrame({
        "epoch": np.arange(10), "lr": np.full(10, 1e-3), "step_norm": np.arange(10.0),
        "train_loss_change": np.r_[np.nan, np.arange(9.0) ** 2],
    })
    corr = analysis.correlations(series, max_lag=0)
    assert corr["figure"].tolist() == ["step_norm"]  # the constant lr is left out
    assert analysis.correlations(series.head(4), max_lag=0).empty  # 3 pairs < min_points
    with pytest.raises(KeyError):
        analysis.correlations(series, figures=["no_such_figure"])
    with pytest.raises(ValueError):
        analysis.correlations(series, max_lag=-1)


def test_derived_epoch_series():
    epochs = pd.DataFrame({
        "run_id": 1, "epoch": [1, 0, 2], "step": [20, 10, 30], "num_steps": [10, 10, 10],
        "cos_prev": [0.5, np.nan, -1.0], "update_dot_grad_mean": [-0.02, -0.05, 0.01],
        "train_loss": [1.5, 2.0, 1.4], "val_loss": [1.7, 2.1, 1.8],
    })
    s = analysis.derive_epoch_series(epochs)
    assert s["epoch"].tolist() == [0, 1, 2]  # sorted by epoch
    np.testing.assert_allclose(s["angle_prev_deg"], [np.nan, 60.0, 180.0])
    # Σ⟨Δθ, g⟩ over the epoch = mean over recorded steps × steps in the epoch.
    np.testing.assert_allclose(s["predicted_loss_change"], [-0.5, -0.2, 0.1])
    np.testing.assert_allclose(s["train_loss_change"], [np.nan, -0.5, -0.1])
    np.testing.assert_allclose(s["val_loss_change"], [np.nan, -0.4, 0.1])


def test_predicted_change_from_step_rows_when_epochs_lack_the_aggregate():
    epochs = pd.DataFrame({"epoch": [0, 1], "step": [3, 6], "train_loss": [1.0, 0.5]})
    steps = pd.DataFrame({"epoch": [0, 0, 0, 1, 1, 1], "step": range(1, 7), "update_dot_grad": [-1, -2, -3, 0.5, 0.5, 0.0]})
    s = analysis.derive_epoch_series(epochs, steps)
    np.testing.assert_allclose(s["predicted_loss_change"], [-6.0, 1.0])


def test_layer_tables():
    layers = pd.DataFrame({
        "epoch": [0, 0, 1, 1], "layer_index": [0, 1, 0, 1], "layer": ["w", "b", "w", "b"],
        "step_norm": [1.0, 2.0, 3.0, 4.0], "cos_prev": [np.nan, np.nan, 0.5, 0.25],
    })
    wide = analysis.layer_series(layers, "step_norm")
    assert list(wide.columns) == ["w", "b"] and wide.loc[1, "b"] == 4.0
    both = analysis.layer_wide(layers, ["step_norm", "cos_prev"])
    assert list(both.columns) == ["w:step_norm", "b:step_norm", "w:cos_prev", "b:cos_prev"]


def test_per_layer_correlations_and_matrix():
    n = 12
    rng = np.random.default_rng(1)
    w = rng.normal(size=n)
    series = pd.DataFrame({"epoch": np.arange(n), "step_norm": rng.normal(size=n), "train_loss_change": 2 * w})
    layers = pd.DataFrame({
        "epoch": np.repeat(np.arange(n), 2), "layer_index": np.tile([0, 1], n), "layer": np.tile(["fc.weight", "fc.bias"], n),
        "step_norm": np.column_stack([w, rng.normal(size=n)]).ravel(),
    })
    corr = analysis.correlations(series, max_lag=1, layers=layers, layer_figures=["step_norm"])
    row = corr[(corr["layer"] == "fc.weight") & (corr["lag"] == 0)].iloc[0]
    assert row["pearson_r"] == pytest.approx(1.0) and row["n"] == n
    matrix = analysis.correlation_matrix(corr, "pearson_r", layer="fc.weight")
    assert matrix.shape == (1, 2) and matrix.iloc[0, 0] == pytest.approx(1.0)
    overall = analysis.correlation_matrix(corr)
    assert list(overall.index) == [analysis.EPOCH_FIGURES["step_norm"]]


# ---- statistics that survive shared trends and autocorrelation ------------------------------------
from scipy import stats as _stats  # noqa: E402

from instrumented_adam.analysis import significance  # noqa: E402


def _ar1(rng: np.random.Generator, rows: int, n: int, phi: float) -> np.ndarray:
    """`rows` stationary AR(1) series of length n (unit innovations)."""
    e = rng.normal(size=(rows, n))
    out = np.empty_like(e)
    out[:, 0] = e[:, 0] / math.sqrt(1 - phi * phi)
    for k in range(1, n):
        out[:, k] = phi * out[:, k - 1] + e[:, k]
    return out


def trended_series(seed: int, planted_lag: int | None = None, n: int = 80, figures: int = 4):
    """Figures and a Δ val loss that share a decaying trend, with autocorrelated (AR(1), φ = 0.6)
    noise; with `planted_lag`, figure f0's noise drives the target `planted_lag` epochs later."""
    rng = np.random.default_rng(seed)
    epochs = np.arange(n)
    trend = np.exp(-epochs / 20)
    noise = _ar1(rng, figures, n, 0.6)
    columns = {(f"f{i}", f"f{i}", ""): pd.Series((1 + i) * trend + 0.1 * noise[i], index=epochs) for i in range(figures)}
    target = -0.5 * trend + 0.05 * _ar1(rng, 1, n, 0.6)[0]
    if planted_lag is not None:
        target[planted_lag:] += 0.05 * noise[0, :-planted_lag]
    return columns, {"val_loss_change": pd.Series(target, index=epochs)}


SEEDS = 200


def test_shared_trend_without_relation_is_not_significant():
    # 4 figures × 4 lags per seed. A seed "finds something" when any test has q < 0.05.
    found = naive_found = 0
    for seed in range(SEEDS):
        columns, targets = trended_series(seed)
        table = significance.relation_tests(columns, targets, range(4), permutations=499, seed=seed, out_of_sample=False)
        assert len(table) == 16 and table["p"].min() >= 1 / 500  # floored at what 499 permutations resolve
        found += bool((table["q"] < 0.05).any())
        # The old method: Spearman of the raw series, BH over the same tests.
        naive_found += bool((_stats.false_discovery_control(table["naive_p"], method="bh") < 0.05).any())
    assert found / SEEDS <= 0.07
    assert naive_found / SEEDS >= 0.9  # the naive method reports the trend as a relation nearly always


def test_planted_lagged_relation_is_found_at_its_lag():
    right = 0
    for seed in range(SEEDS):
        columns, targets = trended_series(seed, planted_lag=2)
        table = significance.relation_tests(columns, targets, range(4), permutations=499, seed=seed, out_of_sample=False)
        best = significance.rank_tests(table, top=1).iloc[0]
        right += bool(best["q"] < 0.05 and best["lag"] == 2 and best["figure"] == "f0")
    assert right / SEEDS >= 0.9


def test_detrending_methods():
    epochs = np.arange(50.0)
    trend = 3 * np.exp(-epochs / 10) + 0.5
    # A smooth decay is almost entirely removed by the log-epoch polynomial.
    assert np.nanstd(significance.detrend(trend, epochs)) < 1e-2 * np.std(trend)
    diff = significance.detrend(np.array([1.0, 3.0, 6.0, 10.0]), np.array([0, 1, 2, 4]), "difference")
    np.testing.assert_array_equal(np.isnan(diff), [True, False, False, True])  # epoch 3 is missing
    assert diff[1] == 2.0 and diff[2] == 3.0
    with pytest.raises(ValueError):
        significance.detrend(trend, epochs, "loess")


def test_block_permutations_are_permutations_of_blocks():
    idx = significance.block_permutations(30, 5, 50, np.random.default_rng(0))
    assert idx.shape == (50, 30)
    assert (np.sort(idx, axis=1) == np.arange(30)).all()
    # Inside a block, consecutive positions stay consecutive: most steps are +1.
    assert (np.diff(idx, axis=1) == 1).mean() > 0.7


def test_effective_sample_size_and_interval():
    rng = np.random.default_rng(5)
    white = rng.normal(size=(2, 400))
    assert significance.effective_sample_size(*white) == pytest.approx(400, rel=0.25)
    red = _ar1(rng, 2, 400, 0.9)
    # Two AR(1) with φ = 0.9: n_eff ≈ n·(1 − φ²)/(1 + φ²) ≈ 0.105·n.
    assert 15 < significance.effective_sample_size(*red) < 90
    low, high = significance.fisher_interval(0.5, 50)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.959964 / math.sqrt(47) * (1 - 0.25), rel=0.2)


def test_out_of_sample_gain_rewards_a_leading_figure_only():
    rng = np.random.default_rng(2)
    n = 200
    x = rng.normal(size=n)
    y = 0.3 * _ar1(rng, 1, n, 0.5)[0]
    y_led = y.copy()
    y_led[3:] += x[:-3]
    assert significance.out_of_sample_gain(x, y_led, 3) > 0.5
    assert significance.out_of_sample_gain(x, y, 3) < 0.05  # an unrelated figure does not help
    assert math.isnan(significance.out_of_sample_gain(x[:8], y[:8], 3))  # too few points


def test_relations_of_a_run_default_to_the_validation_loss_and_take_a_window():
    columns, targets = trended_series(1, planted_lag=1)
    series = pd.DataFrame({"epoch": np.arange(80), "step_norm": columns[("f0", "f0", "")].to_numpy(),
                           "val_loss_change": targets["val_loss_change"].to_numpy(),
                           "train_loss_change": np.zeros(80) + np.arange(80.0)})
    table = analysis.relations(series, lags=range(0, 3), permutations=199)
    assert set(table["target"]) == {"val_loss_change"} and set(table["lag"]) == {0, 1, 2}
    best = significance.rank_tests(table, top=1).iloc[0]
    assert best["lag"] == 1 and best["q"] < 0.05 and best["oos_gain"] > 0
    windowed = analysis.relations(series, lags=[1], window=(20, 59), permutations=99)
    assert windowed.loc[0, "n"] == 39  # pairs (k, k+1) with both epochs in 20..59
    train = analysis.relations(series, target="train", lags=[0], permutations=99)
    assert set(train["target"]) == {"train_loss_change"}
    with pytest.raises(ValueError):
        analysis.relations(series, target="test")
