"""Primary-vertex finding on generated LHCb-like events: a PV-finder-style workload.

A re-implementation, from the published descriptions only, of the "hybrid" vertex finder of
LHCb's PV-finder project (R. Fang et al., arXiv:1906.08306; S. Akar et al., arXiv:2007.01023;
S. Akar et al., arXiv:2103.04962): tracks are turned into a one-dimensional kernel density
estimate (KDE) along the beam axis, and a 1D convolutional network maps that KDE to a
histogram with a narrow peak at each primary vertex (PV). No code of the PV-finder repository
is used (it carries no licence); the generator is our own toy, much simpler than LHCb's
simulation, and the published efficiencies are quoted only for context.

Pieces (each usable alone):

`GeneratorConfig`, `generate_events`
    A seeded, vectorised numpy event generator: a Poisson number of pp interactions per
    event (mean 7.6, LHCb Run 3), vertices at x, y ~ N(0, 0.055 mm), z ~ N(100, 63) mm
    (truncated to the grid), charged tracks per vertex from a negative binomial, straight
    tracks in the acceptance 2 < η < 5 whose points of closest approach (POCA) to the beam
    line are smeared with a per-track, pT-dependent resolution, and optionally a few
    displaced secondary vertices. With ``source="pythia"`` the tracks of each interaction are
    the charged final-state particles of a Pythia 8 SoftQCD:inelastic event (needs the
    ``pythia8mc`` wheel).
`kde_histogram`, `target_histogram`
    The network's input (the sum over tracks of each track's Gaussian POCA kernel in z,
    integrated over each bin) and its target (a unit-area Gaussian at each visible PV, and a
    mask that removes from the cost the bins around PVs too small to be found).
`AllCNN1d`, `UNet1d`
    The two model families: a fully convolutional stack and a 1D U-Net, sized by width and
    depth arguments.
`asymmetric_cost`
    PV-finder's idea of an asymmetric cost: a χ²-like squared difference per bin in which
    predicting too little where there is a vertex costs ``1 + asymmetry`` times more than
    predicting too much, so that the network prefers a false positive to a missed vertex.
`find_peaks`, `match_vertices`
    The physics metric: peaks of the predicted histogram (runs of bins above a threshold,
    split at valleys, whose integral passes a threshold), matched to true PVs within a
    tolerance, giving the vertex-finding efficiency and false positives per event.
`PVFinderTask`
    All of it as a demo task (`instrumented_adam.demo.tasks.TASKS` registers ``pvfinder``,
    the AllCNN model, and ``pvfinder-unet``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# ---- generator --------------------------------------------------------------------------------
#: The z range of the KDE grid and the number of bins PV-finder publishes (0.1 mm bins).
Z_RANGE_MM: tuple[float, float] = (-100.0, 300.0)
PUBLISHED_BINS = 4000


@dataclass(frozen=True)
class GeneratorConfig:
    """Parameters of the toy event generator (lengths in mm, momenta in GeV).

    Multiplicity: the number of charged tracks in 2 < η < 5 per pp interaction is negative
    binomial with mean ``multiplicity_mean`` and shape ``multiplicity_k``. These values are
    chosen, not fitted: the mean, 16, is three units of pseudorapidity at dN/dη ≈ 5.3, the
    forward charged-particle density LHCb measures in minimum-bias pp collisions at 13 TeV
    (prompt charged particles, 2 < η < 4.8, arXiv:2107.10090); the shape k = 1.0 lies in the
    range of negative-binomial fits to minimum-bias multiplicities in limited η windows, and with
    it 74 % of interactions have at least 5 tracks, which turns LHCb Run 3's 7.6 interactions per
    crossing into the 5.6 *visible* PVs per event quoted in arXiv:2007.01023.

    Per-track resolution: the transverse impact-parameter resolution of the VELO,
    σ_IP = ``ip_resolution_const`` + ``ip_resolution_pt`` / pT (μm), the form and roughly the
    values LHCb measures (13 + 25/pT μm, JINST 9 (2014) P09007). A track of polar angle θ then
    has a POCA resolution along z of σ_IP / tan θ.
    """

    mean_interactions: float = 7.6
    beam_sigma_xy: float = 0.055
    z_mean: float = 100.0
    z_sigma: float = 63.0
    multiplicity_mean: float = 16.0
    multiplicity_k: float = 1.0
    eta_range: tuple[float, float] = (2.0, 5.0)
    #: Transverse momentum pt_min + Gamma(shape, scale): mean 0.7 GeV, the soft spectrum of minimum bias.
    pt_shape: float = 2.0
    pt_scale: float = 0.3
    pt_min: float = 0.1
    ip_resolution_const: float = 13e-3
    ip_resolution_pt: float = 25e-3
    #: A PV is *visible* (to be found) with at least this many tracks (PV-finder's definition).
    min_visible_tracks: int = 5
    #: Expected secondary vertices per PV (b/c-hadron-like decays); their tracks join the KDE
    #: but they are not targets: the network has to learn not to flag them.
    secondary_rate: float = 0.1
    secondary_flight_mean: float = 5.0
    secondary_tracks_mean: float = 2.0  # 2 + Poisson(mean) tracks
    z_range: tuple[float, float] = Z_RANGE_MM
    #: "toy": the negative binomial and the spectra above; "pythia": Pythia 8 SoftQCD events.
    source: str = "toy"

    def __post_init__(self) -> None:
        if self.source not in ("toy", "pythia"):
            raise ValueError(f"unknown event source {self.source!r}; choose 'toy' or 'pythia'")
        if not (self.mean_interactions > 0 and self.multiplicity_mean > 0 and self.multiplicity_k > 0):
            raise ValueError("the mean number of interactions and the multiplicity parameters must be positive")
        if not self.z_range[0] < self.z_mean < self.z_range[1]:
            raise ValueError(f"z_mean {self.z_mean} lies outside the grid {self.z_range}")


@dataclass
class Events:
    """Generated events as flat arrays: one entry per vertex, one per track.

    Vertices: ``pv_event`` (event index), ``pv_x/y/z`` (mm), ``pv_tracks`` (charged tracks in
    the acceptance), ``pv_visible``. Secondary vertices: ``sv_event``, ``sv_z``. Tracks:
    ``track_event``; ``track_origin`` (the PV index, or −1 − the SV index); the true POCA to the
    beam line (``track_poca_z``), the measured one (``track_z``), the z resolution of the
    measurement (``track_sigma_z``), and the KDE kernel width (``track_kernel_z``, which adds
    the beam spot's spread to the resolution: the kernel does not know where in the beam spot
    the track's vertex lies); ``track_pt``, ``track_eta``.
    """

    n_events: int
    pv_event: np.ndarray
    pv_x: np.ndarray
    pv_y: np.ndarray
    pv_z: np.ndarray
    pv_tracks: np.ndarray
    pv_visible: np.ndarray
    sv_event: np.ndarray
    sv_z: np.ndarray
    track_event: np.ndarray
    track_origin: np.ndarray
    track_poca_z: np.ndarray
    track_z: np.ndarray
    track_sigma_z: np.ndarray
    track_kernel_z: np.ndarray
    track_pt: np.ndarray
    track_eta: np.ndarray

    @property
    def n_tracks(self) -> int:
        return len(self.track_z)


def _truncated_normal(rng: np.random.Generator, mean: float, sigma: float, lo: float, hi: float, n: int) -> np.ndarray:
    """N(mean, sigma) restricted to [lo, hi] by redrawing the values outside (0.15 % of z)."""
    values = rng.normal(mean, sigma, n)
    outside = (values < lo) | (values > hi)
    while outside.any():
        values[outside] = rng.normal(mean, sigma, int(outside.sum()))
        outside = (values < lo) | (values > hi)
    return values


def _toy_kinematics(rng: np.random.Generator, config: GeneratorConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pT, η, φ) of `n` tracks: Gamma-distributed pT above pt_min, flat η and φ."""
    pt = config.pt_min + rng.gamma(config.pt_shape, config.pt_scale, n)
    eta = rng.uniform(*config.eta_range, n)
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    return pt, eta, phi


def _pythia_kinematics(n_interactions: int, config: GeneratorConfig, seed: int,
                       energy_gev: float = 13600.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Charged final-state particles of `n_interactions` Pythia 8 SoftQCD:inelastic events.

    Returns the multiplicity per interaction (charged particles in the η acceptance with
    pT > pt_min) and the (pT, η, φ) of those particles, concatenated.
    """
    try:
        import pythia8mc  # the optional extra: pip install pythia8mc
    except ImportError as e:
        raise RuntimeError(
            "Pythia events need the pythia8mc wheel: pip install pythia8mc (or use source='toy', "
            "the parametrised generator)"
        ) from e
    pythia = pythia8mc.Pythia("", False)
    for setting in (f"Beams:eCM = {energy_gev}", "SoftQCD:inelastic = on", "Random:setSeed = on",
                    f"Random:seed = {seed % 900_000_000 + 1}", "Next:numberCount = 0", "Print:quiet = on"):
        pythia.readString(setting)
    if not pythia.init():
        raise RuntimeError("Pythia 8 failed to initialise")
    counts = np.zeros(n_interactions, dtype=np.int64)
    pts: list[float] = []
    etas: list[float] = []
    phis: list[float] = []
    eta_lo, eta_hi = config.eta_range
    for i in range(n_interactions):
        while not pythia.next():  # a failed event is redrawn, as Pythia's examples do
            pass
        for particle in pythia.event:
            if not (particle.isFinal() and particle.isCharged()):
                continue
            eta, pt = particle.eta(), particle.pT()
            if eta_lo < eta < eta_hi and pt > config.pt_min:
                counts[i] += 1
                pts.append(pt)
                etas.append(eta)
                phis.append(particle.phi())
    return counts, np.asarray(pts), np.asarray(etas), np.asarray(phis)


def _tracks_from(rng: np.random.Generator, config: GeneratorConfig, x0: np.ndarray, y0: np.ndarray, z0: np.ndarray,
                 pt: np.ndarray, eta: np.ndarray, phi: np.ndarray) -> dict[str, np.ndarray]:
    """Straight tracks from (x0, y0, z0) with (pT, η, φ): true and smeared POCA to the beam line."""
    tan_theta = 1.0 / np.sinh(eta)  # tan θ = 1 / sinh η
    tx, ty = tan_theta * np.cos(phi), tan_theta * np.sin(phi)
    # The line (x0 + tx·s, y0 + ty·s, z0 + s) is closest to the z axis at s = −(x0·tx + y0·ty)/(tx² + ty²).
    poca_z = z0 - (x0 * tx + y0 * ty) / (tx * tx + ty * ty)
    sigma_ip = config.ip_resolution_const + config.ip_resolution_pt / pt
    sigma_z = sigma_ip / tan_theta
    measured_z = poca_z + rng.normal(0.0, 1.0, len(pt)) * sigma_z
    kernel_z = np.hypot(sigma_ip, config.beam_sigma_xy) / tan_theta
    return {"poca_z": poca_z, "z": measured_z, "sigma_z": sigma_z, "kernel_z": kernel_z, "pt": pt, "eta": eta}


def generate_events(n_events: int, seed: int, config: GeneratorConfig = GeneratorConfig()) -> Events:
    """`n_events` seeded events (numpy's PCG64 seeded with `seed`), all drawn at once."""
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    rng = np.random.default_rng(seed)
    n_pv = rng.poisson(config.mean_interactions, n_events)
    pv_event = np.repeat(np.arange(n_events), n_pv)
    n_vertices = len(pv_event)
    pv_x = rng.normal(0.0, config.beam_sigma_xy, n_vertices)
    pv_y = rng.normal(0.0, config.beam_sigma_xy, n_vertices)
    pv_z = _truncated_normal(rng, config.z_mean, config.z_sigma, *config.z_range, n_vertices)
    if config.source == "pythia":
        pv_tracks, pt, eta, phi = _pythia_kinematics(n_vertices, config, seed)
    else:
        k = config.multiplicity_k
        pv_tracks = rng.negative_binomial(k, k / (k + config.multiplicity_mean), n_vertices)
        pt, eta, phi = _toy_kinematics(rng, config, int(pv_tracks.sum()))
    origin = np.repeat(np.arange(n_vertices), pv_tracks)
    prompt = _tracks_from(rng, config, pv_x[origin], pv_y[origin], pv_z[origin], pt, eta, phi)

    # Secondary vertices: a displaced decay of a hadron flying forward from its PV.
    n_sv_per_pv = rng.poisson(config.secondary_rate, n_vertices) if config.secondary_rate > 0 else np.zeros(n_vertices, int)
    sv_parent = np.repeat(np.arange(n_vertices), n_sv_per_pv)
    n_sv = len(sv_parent)
    _, sv_eta, sv_phi = _toy_kinematics(rng, config, n_sv)
    flight_z = rng.exponential(config.secondary_flight_mean, n_sv)
    sv_tan = 1.0 / np.sinh(sv_eta)
    sv_x = pv_x[sv_parent] + flight_z * sv_tan * np.cos(sv_phi)
    sv_y = pv_y[sv_parent] + flight_z * sv_tan * np.sin(sv_phi)
    sv_z = pv_z[sv_parent] + flight_z
    sv_tracks = 2 + rng.poisson(config.secondary_tracks_mean, n_sv)
    sv_origin = np.repeat(np.arange(n_sv), sv_tracks)
    sv_pt, sv_track_eta, sv_track_phi = _toy_kinematics(rng, config, int(sv_tracks.sum()))
    secondary = _tracks_from(rng, config, sv_x[sv_origin], sv_y[sv_origin], sv_z[sv_origin], sv_pt, sv_track_eta,
                             sv_track_phi)

    def both(key: str) -> np.ndarray:
        return np.concatenate([prompt[key], secondary[key]])

    return Events(
        n_events=n_events,
        pv_event=pv_event, pv_x=pv_x, pv_y=pv_y, pv_z=pv_z, pv_tracks=pv_tracks,
        pv_visible=pv_tracks >= config.min_visible_tracks,
        sv_event=pv_event[sv_parent], sv_z=sv_z,
        track_event=np.concatenate([pv_event[origin], pv_event[sv_parent][sv_origin]]),
        track_origin=np.concatenate([origin, -1 - sv_origin]),
        track_poca_z=both("poca_z"), track_z=both("z"), track_sigma_z=both("sigma_z"),
        track_kernel_z=both("kernel_z"), track_pt=both("pt"), track_eta=both("eta"),
    )


# ---- inputs and targets -----------------------------------------------------------------------
def bin_edges(n_bins: int, z_range: tuple[float, float] = Z_RANGE_MM) -> np.ndarray:
    """The n_bins + 1 edges of the z grid (mm)."""
    return np.linspace(z_range[0], z_range[1], n_bins + 1)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def binned_gaussians(n_rows: int, row: np.ndarray, mean: np.ndarray, sigma: np.ndarray, n_bins: int,
                     z_range: tuple[float, float] = Z_RANGE_MM, weight: np.ndarray | None = None,
                     n_sigma: float = 5.0) -> np.ndarray:
    """(n_rows, n_bins): for each i, a unit-area Gaussian N(mean[i], sigma[i]) integrated over
    the bins of row `row[i]` (times `weight[i]`), summed per row; tails beyond `n_sigma` dropped.

    Vectorised per window size: the Gaussians are grouped by how many bins ±n_sigma·σ spans
    (powers of two), and each group evaluates the normal CDF at its window's edges at once.
    """
    lo, hi = z_range
    width = (hi - lo) / n_bins
    out = np.zeros(n_rows * n_bins)
    if len(mean) == 0:
        return out.reshape(n_rows, n_bins)
    weight = np.ones(len(mean)) if weight is None else np.asarray(weight, dtype=np.float64)
    centre = np.floor((mean - lo) / width).astype(np.int64)
    half = np.maximum(np.ceil(n_sigma * sigma / width).astype(np.int64) + 1, 1)
    group = np.ceil(np.log2(half)).astype(np.int64)
    for g in np.unique(group):
        pick = np.flatnonzero(group == g)
        h = 1 << int(g)
        offsets = np.arange(-h, h + 1)
        bins = centre[pick, None] + offsets  # (tracks, 2h + 1)
        lower = lo + bins * width
        cdf_lo = _normal_cdf((lower - mean[pick, None]) / sigma[pick, None])
        cdf_hi = _normal_cdf((lower + width - mean[pick, None]) / sigma[pick, None])
        content = (cdf_hi - cdf_lo) * weight[pick, None]
        inside = (bins >= 0) & (bins < n_bins)
        flat = (row[pick, None] * n_bins + bins)[inside]
        out += np.bincount(flat, weights=content[inside], minlength=n_rows * n_bins)
    return out.reshape(n_rows, n_bins)


def kde_histogram(events: Events, n_bins: int, z_range: tuple[float, float] = Z_RANGE_MM) -> np.ndarray:
    """The network input, (n_events, n_bins): Σ over tracks of the track's Gaussian kernel in z.

    Each track contributes N(ẑ, w) integrated over each bin, with ẑ its measured POCA and w its
    kernel width (resolution ⊕ beam-spot spread, over tan θ): the histogram counts tracks per
    bin and its peaks sit at the vertices. PV-finder's published kernel is 3D (for each z bin,
    the maximum over x, y of a sum of track probabilities); tracks here are already referred to
    the beam line, so the toy uses this 1D projection.
    """
    return binned_gaussians(events.n_events, events.track_event, events.track_z, events.track_kernel_z, n_bins, z_range)


@dataclass(frozen=True)
class TargetConfig:
    """The target histogram: a unit-area Gaussian of width `sigma` (mm) at each visible PV;
    bins within `mask_halfwidth` mm of an invisible PV (too few tracks) are left out of the cost."""

    sigma: float = 0.1
    mask_halfwidth: float = 1.0


def target_histogram(events: Events, n_bins: int, config: TargetConfig = TargetConfig(),
                     z_range: tuple[float, float] = Z_RANGE_MM) -> tuple[np.ndarray, np.ndarray]:
    """(target, weight), each (n_events, n_bins): the target peaks at each visible PV with unit
    area; weight is 0 in the masked bins around invisible PVs and 1 elsewhere."""
    vis = events.pv_visible
    sigma = np.full(int(vis.sum()), config.sigma)
    target = binned_gaussians(events.n_events, events.pv_event[vis], events.pv_z[vis], sigma, n_bins, z_range)
    lo, hi = z_range
    width = (hi - lo) / n_bins
    weight = np.ones((events.n_events, n_bins))
    centres = lo + (np.arange(n_bins) + 0.5) * width
    half_bins = int(math.ceil(config.mask_halfwidth / width))
    for event, z in zip(events.pv_event[~vis], events.pv_z[~vis]):
        c = int((z - lo) // width)
        window = slice(max(c - half_bins, 0), min(c + half_bins + 1, n_bins))
        near = np.abs(centres[window] - z) <= config.mask_halfwidth + width / 2
        weight[event, window][near] = 0.0
    weight[target > 1e-3] = 1.0  # a visible PV beside an invisible one keeps its peak
    return target, weight


# ---- models -----------------------------------------------------------------------------------
def _same_conv(n_in: int, n_out: int, kernel: int) -> nn.Conv1d:
    if kernel % 2 == 0:
        raise ValueError(f"kernel sizes must be odd (same padding), got {kernel}")
    return nn.Conv1d(n_in, n_out, kernel, padding=kernel // 2)


class AllCNN1d(nn.Module):
    """A fully convolutional stack (PV-finder's "AllCNN"-style model): conv + LeakyReLU layers
    with wide kernels at full resolution, then a 1-channel conv and softplus (the histogram is
    non-negative). Scale it with `widths` (channels per layer, its length is the depth) and
    `kernels`. The last bias starts at −4 so that the first prediction is ≈ 0 everywhere.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 16, 16, 16),
                 kernels: Sequence[int] = (25, 15, 15, 15), final_kernel: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        if len(widths) != len(kernels):
            raise ValueError(f"one kernel size per layer: {len(widths)} widths, {len(kernels)} kernels")
        layers: list[tuple[str, nn.Module]] = []
        n_in = in_channels
        for i, (width, kernel) in enumerate(zip(widths, kernels), start=1):
            layers += [(f"conv{i}", _same_conv(n_in, width, kernel)), (f"act{i}", nn.LeakyReLU(0.01))]
            if dropout > 0:
                layers.append((f"drop{i}", nn.Dropout(dropout)))
            n_in = width
        layers.append((f"conv{len(widths) + 1}", _same_conv(n_in, 1, final_kernel)))
        self.net = nn.Sequential(OrderedDict(layers))
        with torch.no_grad():
            self.net[-1].bias.fill_(-4.0)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(self.net(x))


class _DoubleConv(nn.Sequential):
    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__(OrderedDict([("conv1", _same_conv(n_in, n_out, kernel)), ("act1", nn.LeakyReLU(0.01)),
                                      ("conv2", _same_conv(n_out, n_out, kernel)), ("act2", nn.LeakyReLU(0.01))]))


class UNet1d(nn.Module):
    """A 1D U-Net: `len(widths)` resolution levels (max-pool by 2 down, transposed conv up, skip
    connections concatenated), a 1×1 head and softplus. Inputs whose length is not a multiple of
    2^(levels − 1) are zero-padded on the right and the output cropped back.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64), kernel: int = 7) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError("a U-Net needs at least two levels")
        self.down = nn.ModuleList()
        n_in = in_channels
        for width in widths:
            self.down.append(_DoubleConv(n_in, width, kernel))
            n_in = width
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for coarse, fine in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.upsample.append(nn.ConvTranspose1d(coarse, fine, 2, stride=2))
            self.up.append(_DoubleConv(2 * fine, fine, kernel))
        self.head = nn.Conv1d(widths[0], 1, 1)
        with torch.no_grad():
            self.head.bias.fill_(-4.0)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1]
        multiple = 1 << (len(self.down) - 1)
        pad = -length % multiple
        if pad:
            x = nn.functional.pad(x, (0, pad))
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool1d(x, 2)
            x = block(x)
            skips.append(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips[:-1])):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return nn.functional.softplus(self.head(x))[..., :length]


# ---- cost -------------------------------------------------------------------------------------
def asymmetric_cost(prediction: Tensor, target: Tensor, weight: Tensor | None = None, asymmetry: float = 2.0) -> Tensor:
    """Mean over events of Σ_bins w·(ŷ − y)²·(1 + asymmetry·[ŷ < y]).

    Written from PV-finder's published description (a χ²-like cost with an asymmetry
    parameter that penalises missed vertices more than false ones), not from its code: where
    the prediction ŷ falls short of the target y — a vertex predicted too weakly or missed —
    the squared difference costs ``1 + asymmetry`` times more than an excess of the same size,
    which is what a false vertex is. The cost stays continuous with a continuous gradient at
    ŷ = y. ``asymmetry = 0`` is the plain squared error. `weight` (0 in masked bins) is
    broadcast against the histograms.
    """
    if asymmetry < 0:
        raise ValueError(f"the asymmetry must be >= 0, got {asymmetry}")
    diff = prediction - target
    per_bin = diff.square() * (1.0 + asymmetry * (diff < 0).to(diff.dtype))
    if weight is not None:
        per_bin = per_bin * weight
    return per_bin.reshape(per_bin.shape[0], -1).sum(1).mean()


# ---- metric -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakConfig:
    """Peak finding: bins above `threshold` form candidate runs, split at valleys; a run whose
    integral reaches `integral` is a found vertex at its weighted-mean z; it matches a true PV
    within `tolerance` mm (PV-finder's 0.5 mm search window)."""

    threshold: float = 0.01
    integral: float = 0.5
    tolerance: float = 0.5


def find_peaks(histograms: np.ndarray, z_range: tuple[float, float] = Z_RANGE_MM,
               config: PeakConfig = PeakConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of each row of `histograms` (n_events, n_bins) → (event index, z in mm, integral).

    A peak is a run of consecutive bins above ``config.threshold``, cut in two at every
    interior valley (a bin lower than both its neighbours' side: two close vertices keep their
    own peaks), whose sum reaches ``config.integral``. Vectorised over all events at once.
    """
    hist = np.asarray(histograms, dtype=np.float64)
    n_events, n_bins = hist.shape
    lo, hi = z_range
    centres = lo + (np.arange(n_bins) + 0.5) * (hi - lo) / n_bins
    above = hist > config.threshold
    previous = np.concatenate([np.full((n_events, 1), -np.inf), hist[:, :-1]], axis=1)
    following = np.concatenate([hist[:, 1:], np.full((n_events, 1), -np.inf)], axis=1)
    previous_above = np.concatenate([np.zeros((n_events, 1), bool), above[:, :-1]], axis=1)
    valley = (hist < previous) & (hist <= following)  # a valley bin starts the next peak
    start = above & (~previous_above | valley)
    segment = np.cumsum(start.ravel()) - 1  # segment id of each bin (valid where above)
    keep = above.ravel()
    ids = segment[keep]
    n_segments = int(start.sum())
    values = hist.ravel()[keep]
    integral = np.bincount(ids, weights=values, minlength=n_segments)
    z_sum = np.bincount(ids, weights=values * np.tile(centres, n_events)[keep], minlength=n_segments)
    event = np.repeat(np.arange(n_events), n_bins)[keep]
    first = np.zeros(n_segments, dtype=np.int64)
    first[ids[::-1]] = event[::-1]  # any bin of a segment gives its event
    found = integral >= config.integral
    return first[found], z_sum[found] / integral[found], integral[found]


@dataclass(frozen=True)
class VertexCounts:
    """Result of matching found peaks to true vertices over a set of events."""

    events: int
    visible: int
    found: int
    false_positives: int

    @property
    def efficiency(self) -> float:
        """Found visible PVs over visible PVs (NaN without visible PVs)."""
        return self.found / self.visible if self.visible else float("nan")

    @property
    def false_positives_per_event(self) -> float:
        return self.false_positives / self.events if self.events else float("nan")


def match_vertices(found_event: np.ndarray, found_z: np.ndarray, true_event: np.ndarray, true_z: np.ndarray,
                   true_visible: np.ndarray, n_events: int, tolerance: float = 0.5) -> VertexCounts:
    """Matches found vertices to true ones, per event, closest pairs first, one to one.

    A visible true PV with a found vertex within `tolerance` counts as found; a found vertex
    matched to nothing is a false positive, except when it lies within `tolerance` of an
    invisible PV (a real vertex too small to be required: neither found nor false, as in
    PV-finder's counting).
    """
    found_event, found_z = np.asarray(found_event), np.asarray(found_z, dtype=np.float64)
    true_event, true_z = np.asarray(true_event), np.asarray(true_z, dtype=np.float64)
    true_visible = np.asarray(true_visible, dtype=bool)
    found_order, true_order = np.argsort(found_event, kind="stable"), np.argsort(true_event, kind="stable")
    found_bounds = np.searchsorted(found_event[found_order], np.arange(n_events + 1))
    true_bounds = np.searchsorted(true_event[true_order], np.arange(n_events + 1))
    n_found = n_false = 0
    for e in range(n_events):
        pred = found_z[found_order[found_bounds[e]:found_bounds[e + 1]]]
        idx = true_order[true_bounds[e]:true_bounds[e + 1]]
        truth, visible = true_z[idx], true_visible[idx]
        if len(pred) == 0:
            continue
        if len(truth) == 0:
            n_false += len(pred)
            continue
        distance = np.abs(pred[:, None] - truth[None, :])
        pred_used = np.zeros(len(pred), bool)
        true_used = np.zeros(len(truth), bool)
        for flat in np.argsort(distance, axis=None, kind="stable"):
            p, t = divmod(int(flat), len(truth))
            if distance[p, t] > tolerance:
                break
            if pred_used[p] or true_used[t]:
                continue
            pred_used[p] = true_used[t] = True
            n_found += int(visible[t])
        n_false += int((~pred_used).sum())
    return VertexCounts(events=n_events, visible=int(true_visible.sum()), found=n_found, false_positives=n_false)


# ---- data set ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VertexTruth:
    """True PVs of a set of events, for the metric: event index, z (mm), visible."""

    event: np.ndarray
    z: np.ndarray
    visible: np.ndarray

    @classmethod
    def of(cls, events: Events) -> VertexTruth:
        return cls(events.pv_event.copy(), events.pv_z.copy(), events.pv_visible.copy())


def make_dataset(n_events: int, seed: int, n_bins: int, generator: GeneratorConfig = GeneratorConfig(),
                 target: TargetConfig = TargetConfig(), chunk: int = 250,
                 progress: bool | None = None, desc: str = "generating events") -> tuple[Tensor, Tensor, VertexTruth]:
    """Inputs (n, 1, n_bins) float32, targets (n, 2, n_bins) float32 — channel 0 the target
    histogram, channel 1 the cost weight — and the true vertices, generated in chunks of `chunk`
    events (each chunk seeded from `seed` and its index, so the set does not depend on `chunk`
    only through the seeding) with a tqdm progress bar (``progress=None``: only on a terminal).
    """
    from tqdm import tqdm

    inputs = np.empty((n_events, 1, n_bins), dtype=np.float32)
    targets = np.empty((n_events, 2, n_bins), dtype=np.float32)
    truth_parts: list[VertexTruth] = []
    seeds = np.random.SeedSequence(seed).spawn(-(-n_events // chunk))
    with tqdm(total=n_events, desc=desc, unit="event", disable=None if progress is None else not progress,
              leave=False) as bar:
        for i, child in enumerate(seeds):
            lo, hi = i * chunk, min((i + 1) * chunk, n_events)
            events = generate_events(hi - lo, int(child.generate_state(1)[0]), generator)
            inputs[lo:hi, 0] = kde_histogram(events, n_bins, generator.z_range)
            target_hist, weight = target_histogram(events, n_bins, target, generator.z_range)
            targets[lo:hi, 0], targets[lo:hi, 1] = target_hist, weight
            truth_parts.append(VertexTruth(events.pv_event + lo, events.pv_z, events.pv_visible))
            bar.update(hi - lo)
    truth = VertexTruth(*(np.concatenate([getattr(p, k) for p in truth_parts]) for k in ("event", "z", "visible")))
    return torch.from_numpy(inputs), torch.from_numpy(targets), truth


__all__ = [
    "Z_RANGE_MM", "PUBLISHED_BINS", "GeneratorConfig", "Events", "generate_events", "bin_edges", "binned_gaussians",
    "kde_histogram", "TargetConfig", "target_histogram", "AllCNN1d", "UNet1d", "asymmetric_cost", "PeakConfig",
    "find_peaks", "VertexCounts", "match_vertices", "VertexTruth", "make_dataset",
]
