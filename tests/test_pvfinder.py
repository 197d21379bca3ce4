"""The vertex-finding workload: generator statistics, inputs/targets, cost, metric, training.

Statistical tests use fixed seeds and bounds of about 4–5 standard errors, so they are stable
for these seeds and would still catch a wrong parameter (each bound is far tighter than the
difference a wrong unit or formula makes).
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from instrumented_adam.demo import pvfinder as pv
from instrumented_adam.demo.tasks import TASKS, PVFinderTask, TrainConfig, train_task
from instrumented_adam.telemetry.store import RunStore


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def events() -> pv.Events:
    return pv.generate_events(4000, seed=12345)


CONFIG = pv.GeneratorConfig()


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---- generator --------------------------------------------------------------------------------
def test_number_of_interactions_is_poisson_with_mean_7_6(events):
    counts = np.bincount(events.pv_event, minlength=events.n_events)
    se = math.sqrt(CONFIG.mean_interactions / events.n_events)
    assert abs(counts.mean() - 7.6) < 4 * se
    # Poisson: variance = mean (a fixed number per event, or a wrong distribution, fails this).
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)
    assert abs(np.mean(counts == 0) - math.exp(-7.6)) < 0.002


def test_vertex_positions(events):
    n = len(events.pv_z)
    for coordinate in (events.pv_x, events.pv_y):
        assert abs(coordinate.mean()) < 4 * 0.055 / math.sqrt(n)
        assert coordinate.std() == pytest.approx(0.055, rel=4 / math.sqrt(2 * n))
    # z ~ N(100, 63) truncated to the grid [−100, 300]: compare with the truncated normal's moments.
    a, b = (-100 - 100) / 63, (300 - 100) / 63
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mass = _normal_cdf(b) - _normal_cdf(a)
    sd = 63 * math.sqrt(1 + (a * pdf(a) - b * pdf(b)) / mass)  # symmetric cut: the mean stays 100
    assert abs(events.pv_z.mean() - 100) < 4 * 63 / math.sqrt(n)
    assert events.pv_z.std() == pytest.approx(sd, rel=4 / math.sqrt(2 * n))
    assert events.pv_z.min() >= -100 and events.pv_z.max() <= 300


def test_multiplicity_is_the_stated_negative_binomial(events):
    tracks = events.pv_tracks
    mu, k = CONFIG.multiplicity_mean, CONFIG.multiplicity_k
    variance = mu + mu * mu / k
    assert abs(tracks.mean() - mu) < 4 * math.sqrt(variance / len(tracks))
    assert tracks.var() == pytest.approx(variance, rel=0.1)
    # P(N >= 5) for NB(k=1, mean 16) is (16/17)^5 = 0.739: 7.6 interactions -> 5.6 visible PVs.
    p_visible = (mu / (mu + k)) ** 5 if k == 1.0 else None
    assert p_visible == pytest.approx(0.739, abs=1e-3)
    assert events.pv_visible.mean() == pytest.approx(p_visible, abs=0.015)
    assert np.array_equal(events.pv_visible, tracks >= 5)
    prompt = events.track_origin >= 0
    assert np.array_equal(np.bincount(events.track_origin[prompt], minlength=len(tracks)), tracks)


def test_track_resolution_and_geometry(events):
    prompt = events.track_origin >= 0
    # The measurement error of the POCA is N(0, σ_z) with the per-track σ_z = σ_IP(pT) / tan θ.
    pull = (events.track_z - events.track_poca_z) / events.track_sigma_z
    assert abs(pull.mean()) < 0.01 and pull.std() == pytest.approx(1.0, abs=0.01)
    tan_theta = 1 / np.sinh(events.track_eta)
    sigma_ip = CONFIG.ip_resolution_const + CONFIG.ip_resolution_pt / events.track_pt
    np.testing.assert_allclose(events.track_sigma_z, sigma_ip / tan_theta)
    # The true POCA to the beam line lies off the vertex by the beam-spot offset along the track
    # (projected: N(0, 0.055 mm) transversely), so the measured POCA minus the vertex z, over the
    # kernel width (resolution ⊕ beam spot, over tan θ), is a unit normal: the kernel is right.
    origin = events.track_origin[prompt]
    transverse = (events.track_poca_z[prompt] - events.pv_z[origin]) * tan_theta[prompt]
    assert transverse.std() == pytest.approx(0.055, rel=0.01)
    pull_vertex = (events.track_z[prompt] - events.pv_z[origin]) / events.track_kernel_z[prompt]
    assert abs(pull_vertex.mean()) < 0.01 and pull_vertex.std() == pytest.approx(1.0, abs=0.01)
    assert np.all((events.track_eta > 2) & (events.track_eta < 5)) and events.track_pt.min() >= CONFIG.pt_min
    assert events.track_pt.mean() == pytest.approx(CONFIG.pt_min + CONFIG.pt_shape * CONFIG.pt_scale, rel=0.01)


def test_secondary_vertices_are_displaced_and_not_targets(events):
    n_pv = len(events.pv_z)
    assert len(events.sv_z) == pytest.approx(CONFIG.secondary_rate * n_pv, rel=0.1)
    secondary = events.track_origin < 0
    sv_index = -1 - events.track_origin[secondary]
    per_sv = np.bincount(sv_index, minlength=len(events.sv_z))
    assert per_sv.min() >= 2 and per_sv.mean() == pytest.approx(2 + CONFIG.secondary_tracks_mean, rel=0.1)
    quiet = pv.generate_events(200, 1, pv.GeneratorConfig(secondary_rate=0.0))
    assert len(quiet.sv_z) == 0 and np.all(quiet.track_origin >= 0)


def test_the_generator_is_seeded():
    a, b, c = pv.generate_events(50, 7), pv.generate_events(50, 7), pv.generate_events(50, 8)
    np.testing.assert_array_equal(a.track_z, b.track_z)
    assert len(a.track_z) != len(c.track_z) or not np.array_equal(a.track_z, c.track_z)


def test_bad_generator_settings_are_refused():
    with pytest.raises(ValueError, match="source"):
        pv.GeneratorConfig(source="geant")
    with pytest.raises(ValueError):
        pv.GeneratorConfig(multiplicity_k=0)
    with pytest.raises(ValueError):
        pv.generate_events(0, 1)


# ---- inputs and targets -----------------------------------------------------------------------
def _single_track_events(z: float, kernel: float) -> pv.Events:
    one = np.array
    return pv.Events(
        n_events=1, pv_event=one([0]), pv_x=one([0.0]), pv_y=one([0.0]), pv_z=one([z]), pv_tracks=one([1]),
        pv_visible=one([False]), sv_event=one([], int), sv_z=one([]), track_event=one([0]), track_origin=one([0]),
        track_poca_z=one([z]), track_z=one([z]), track_sigma_z=one([kernel]), track_kernel_z=one([kernel]),
        track_pt=one([1.0]), track_eta=one([3.0]),
    )


@pytest.mark.parametrize("z, kernel", [(12.34, 0.3), (-99.9, 1.0), (250.05, 0.02)])
def test_kde_of_one_track_is_its_gaussian_kernel(z, kernel):
    n_bins = 1000
    kde = pv.kde_histogram(_single_track_events(z, kernel), n_bins)[0]
    edges = pv.bin_edges(n_bins)
    expected = np.array([_normal_cdf((hi - z) / kernel) - _normal_cdf((lo - z) / kernel)
                         for lo, hi in zip(edges[:-1], edges[1:])])
    np.testing.assert_allclose(kde, expected, atol=1e-6)  # tails beyond 5σ are dropped (< 6e-7)
    assert np.argmax(kde) == np.searchsorted(edges, z) - 1
    if z - 5 * kernel > -100:
        assert kde.sum() == pytest.approx(1.0, abs=1e-6)


def test_kde_sums_the_tracks_of_each_event(events):
    small = pv.generate_events(20, 3)
    kde = pv.kde_histogram(small, 4000)
    inside = (small.track_z > -95) & (small.track_z < 295)
    # Area = number of tracks (those whose kernel lies inside the grid), per event.
    np.testing.assert_allclose(kde.sum(1), np.bincount(small.track_event[inside], minlength=20), atol=0.05 * 40)
    single = sum(pv.kde_histogram(_single_track_events(z, w), 4000)
                 for z, w in zip(small.track_z[small.track_event == 0], small.track_kernel_z[small.track_event == 0]))
    np.testing.assert_allclose(kde[0], single[0], atol=1e-9)


def test_targets_peak_at_the_true_vertices():
    ev = pv.generate_events(300, 5)
    n_bins = 4000
    target, weight = pv.target_histogram(ev, n_bins)
    edges = pv.bin_edges(n_bins)
    vis = ev.pv_visible
    # Unit area per visible PV.
    np.testing.assert_allclose(target.sum(1), np.bincount(ev.pv_event[vis], minlength=300), atol=1e-6)
    # The bin of each visible PV is the maximum of the target within ±1 mm (for PVs with no
    # other PV that close: the Gaussians of close PVs add up).
    bins = np.searchsorted(edges, ev.pv_z[vis]) - 1
    isolated = 0
    for event, z, b in zip(ev.pv_event[vis], ev.pv_z[vis], bins):
        others = ev.pv_z[(ev.pv_event == event) & (ev.pv_z != z)]
        if np.any(np.abs(others - z) < 1.0):
            continue
        isolated += 1
        assert np.argmax(target[event, b - 10: b + 11]) == 10
        assert target[event, b] > 0.3  # σ = 0.1 mm over 0.1 mm bins: 38–40 % of the area in the central bin
    assert isolated > 0.85 * vis.sum()  # ~7 % of PVs have another within 1 mm
    found_event, found_z, _ = pv.find_peaks(target, config=pv.PeakConfig(threshold=1e-3, integral=0.5))
    counts = pv.match_vertices(found_event, found_z, ev.pv_event, ev.pv_z, vis, 300, tolerance=0.05)
    assert counts.found >= 0.98 * counts.visible  # only PVs closer than ~0.3 mm merge
    # Invisible PVs are masked (weight 0 at their bin), visible ones never.
    invisible_bins = np.searchsorted(edges, ev.pv_z[~vis]) - 1
    masked = weight[ev.pv_event[~vis], invisible_bins] == 0
    assert masked.mean() > 0.95
    assert np.all(weight[ev.pv_event[vis], bins] == 1)


def test_dataset_shapes_and_truth():
    x, y, truth = pv.make_dataset(30, 0, 500, chunk=8, progress=False)
    assert x.shape == (30, 1, 500) and y.shape == (30, 2, 500) and x.dtype == torch.float32
    assert truth.event.max() <= 29 and len(truth.z) == len(truth.visible)
    np.testing.assert_allclose(y[:, 0].sum(1).numpy(), np.bincount(truth.event[truth.visible], minlength=30), atol=1e-4)
    x2, _, _ = pv.make_dataset(30, 0, 500, chunk=8, progress=False)
    assert torch.equal(x, x2)


# ---- cost -------------------------------------------------------------------------------------
def test_asymmetric_cost_penalises_missing_more_than_excess():
    target = torch.zeros(1, 10)
    target[0, 4] = 1.0
    low, high = target.clone(), target.clone()
    low[0, 4], high[0, 4] = 0.5, 1.5
    assert pv.asymmetric_cost(low, target, asymmetry=2.0) == pytest.approx(3 * 0.25)
    assert pv.asymmetric_cost(high, target, asymmetry=2.0) == pytest.approx(0.25)
    assert pv.asymmetric_cost(low, target, asymmetry=0.0) == pv.asymmetric_cost(high, target, asymmetry=0.0)
    weight = torch.ones(1, 10)
    weight[0, 4] = 0
    assert pv.asymmetric_cost(low, target, weight) == 0
    # Mean over events of the per-event sums.
    both = pv.asymmetric_cost(torch.cat([low, high]), torch.cat([target, target]), asymmetry=2.0)
    assert both == pytest.approx((0.75 + 0.25) / 2)
    prediction = torch.tensor([[1.0 - 1e-4, 1.0 + 1e-4]], requires_grad=True)
    pv.asymmetric_cost(prediction, torch.ones(1, 2)).backward()
    assert prediction.grad.abs().max() < 1e-3  # continuous gradient through ŷ = y
    with pytest.raises(ValueError):
        pv.asymmetric_cost(low, target, asymmetry=-1)


# ---- metric -----------------------------------------------------------------------------------
def _peak(hist: np.ndarray, z: float, area: float = 1.0, sigma: float = 0.2) -> None:
    edges = pv.bin_edges(hist.shape[-1])
    cdf = np.array([_normal_cdf((e - z) / sigma) for e in edges])
    hist += area * np.diff(cdf)


def test_metric_on_hand_made_predictions():
    n_bins = 4000  # 0.1 mm bins
    truth_event = np.array([0, 0, 0, 0, 1, 1])
    truth_z = np.array([10.0, 50.0, 80.0, 120.0, 20.0, 200.0])
    visible = np.array([True, True, True, False, True, True])
    prediction = np.zeros((3, n_bins))
    _peak(prediction[0], 10.0)           # found
    _peak(prediction[0], 50.3)           # found (0.3 mm off, inside the 0.5 mm window)
    _peak(prediction[0], 81.5)           # 80 is missed, and this is a false positive
    _peak(prediction[0], 120.1)          # at the invisible PV: neither found nor false
    _peak(prediction[0], 160.0)          # false positive
    _peak(prediction[0], 230.0, area=0.2)  # below the integral threshold: not a vertex
    _peak(prediction[1], 20.2)           # found
    _peak(prediction[1], 200.0, area=0.6)  # found
    _peak(prediction[2], -50.0)          # an event without any PV: false positive
    event, z, integral = pv.find_peaks(prediction)
    assert event.tolist() == [0, 0, 0, 0, 0, 1, 1, 2]
    np.testing.assert_allclose(z, [10.0, 50.3, 81.5, 120.1, 160.0, 20.2, 200.0, -50.0], atol=0.01)
    # The integral leaves out the tails below the 0.01 threshold (1–5 % of a peak here).
    np.testing.assert_allclose(integral, [1, 1, 1, 1, 1, 1, 0.6, 1], atol=0.05)
    counts = pv.match_vertices(event, z, truth_event, truth_z, visible, n_events=3)
    assert (counts.visible, counts.found, counts.false_positives, counts.events) == (5, 4, 3, 3)
    assert counts.efficiency == pytest.approx(0.8) and counts.false_positives_per_event == pytest.approx(1.0)
    # A tighter window loses the vertex predicted 0.3 mm away (then a false positive as well).
    tight = pv.match_vertices(event, z, truth_event, truth_z, visible, n_events=3, tolerance=0.2)
    assert (tight.found, tight.false_positives) == (3, 4)


def test_close_vertices_keep_their_own_peaks_and_match_one_to_one():
    prediction = np.zeros((1, 4000))
    _peak(prediction[0], 30.0, sigma=0.15)
    _peak(prediction[0], 31.0, sigma=0.15)  # 1 mm apart: a valley between them splits the run
    event, z, _ = pv.find_peaks(prediction)
    np.testing.assert_allclose(z, [30.0, 31.0], atol=0.02)
    # One found vertex between two true ones matches only one of them (the closer).
    counts = pv.match_vertices(np.array([0]), np.array([30.4]), np.array([0, 0]), np.array([30.0, 30.7]),
                               np.array([True, True]), n_events=1)
    assert (counts.found, counts.false_positives) == (1, 0)
    empty = pv.find_peaks(np.zeros((2, 100)))
    assert all(len(a) == 0 for a in empty)


# ---- models and training ----------------------------------------------------------------------
@pytest.mark.parametrize("model", [pv.AllCNN1d(widths=(4, 4), kernels=(9, 5)), pv.UNet1d(widths=(4, 8, 8), kernel=5)])
def test_models_map_a_kde_to_a_nonnegative_histogram(model):
    for length in (1000, 250, 37):
        out = model(torch.randn(3, 1, length))
        assert out.shape == (3, 1, length) and bool((out >= 0).all())
    with pytest.raises(ValueError):
        pv.AllCNN1d(widths=(4,), kernels=(4,))


def test_tasks_are_registered():
    assert isinstance(TASKS["pvfinder"], PVFinderTask) and TASKS["pvfinder"].architecture == "allcnn"
    assert TASKS["pvfinder-unet"].architecture == "unet"
    with pytest.raises(ValueError):
        PVFinderTask("transformer")


@pytest.mark.parametrize("architecture", ["allcnn", "unet"])
def test_smoke_training_records_the_physics_metrics(tmp_path, architecture):
    task = PVFinderTask(architecture, n_train=96, n_val=48, n_bins=400, widths=(6, 6) if architecture == "allcnn"
                        else (6, 12), progress=False)
    result = train_task(task, TrainConfig(epochs=2, lr=3e-3), tmp_path / "s.sqlite")
    store = RunStore(tmp_path / "s.sqlite")
    epochs = store.epochs(result.run_id)
    assert len(epochs) == 2 and store.runs().iloc[0]["status"] == "finished"
    for column in ("train_loss", "val_loss", "val_efficiency", "val_false_positives", "val_found", "val_visible"):
        assert column in epochs and np.isfinite(epochs[column]).all()
    assert epochs["train_loss"].iloc[1] < epochs["train_loss"].iloc[0]
    assert 0 <= epochs["val_efficiency"].iloc[-1] <= 1
    data = task.data(0)
    assert epochs["val_visible"].iloc[0] == data.val_truth.visible.sum() > 100
    info = store.run_info(result.run_id)["hyperparameters"]
    assert info["task"] == task.name and info["pvfinder"]["n_bins"] == 400
    panel = info["epoch_metric_panels"][0]
    assert set(panel["metrics"]) == {"val_efficiency", "val_false_positives"} <= set(epochs.columns)
    assert task.data(0) is data  # cached: a second optimizer does not regenerate the events


# ---- Pythia -----------------------------------------------------------------------------------
def test_pythia_without_the_wheel_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pythia8mc", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="pip install pythia8mc"):
        pv.generate_events(2, 0, pv.GeneratorConfig(source="pythia"))


def test_pythia_events_drive_the_multiplicities(monkeypatch):
    """With a stand-in for the pythia8mc module: its charged final-state particles in the
    acceptance (and above pt_min) become the tracks of each interaction."""

    class Particle:
        def __init__(self, final, charged, eta, pt, phi=0.5):
            self._v = (final, charged, eta, pt, phi)

        def isFinal(self): return self._v[0]  # noqa: E704
        def isCharged(self): return self._v[1]  # noqa: E704
        def eta(self): return self._v[2]  # noqa: E704
        def pT(self): return self._v[3]  # noqa: E704
        def phi(self): return self._v[4]  # noqa: E704

    settings: list[str] = []

    class Pythia:
        def __init__(self, xmldir, banner):
            self.event: list[Particle] = []
            self.calls = 0

        def readString(self, text): settings.append(text)  # noqa: E704
        def init(self): return True  # noqa: E704

        def next(self):
            self.calls += 1
            if self.calls == 2:
                return False  # a failed event is redrawn
            self.event = [Particle(True, True, 3.0, 0.5), Particle(True, True, 1.0, 0.5), Particle(True, False, 3.0, 0.5),
                          Particle(False, True, 3.0, 0.5), Particle(True, True, 4.5, 0.05), Particle(True, True, 2.5, 2.0)]
            return True

    monkeypatch.setitem(sys.modules, "pythia8mc", types.SimpleNamespace(Pythia=Pythia))
    ev = pv.generate_events(5, 0, pv.GeneratorConfig(source="pythia", secondary_rate=0.0))
    assert "SoftQCD:inelastic = on" in settings
    assert np.all(ev.pv_tracks == 2)  # η = 3.0 / pT 0.5 and η = 2.5 / pT 2.0 pass; the others do not
    assert sorted(set(np.round(ev.track_pt, 6))) == [0.5, 2.0]
