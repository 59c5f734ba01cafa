"""Structure-vs-noise baselines of one layer's spectrum: part of the maths room (`net_esd.py`).

Owns the definitions of `docs/metrics.md`, "Structure vs noise" (WeightWatcher 0.7.7's
`randomize`, `mp_fit` and `warning`, with its faults fixed and said so there):
- `shuffled_weight`: the element-shuffled copy of W, from a per-layer seed (`layer_seed`);
- `randomized_columns`: `max_rand_eval`, `ww_softrank`, `rand_distance` from the ESD of W
  and of its shuffled copy;
- `mp_fit`: the Marchenko–Pastur (or, square matrices, quarter-circle) fit of the bulk, its
  edges and the spikes beyond it (`num_spikes`, `sigma_mp`, `mp_softrank`, `bulk_min`,
  `bulk_max`);
- `training_warning`: WeightWatcher's under-/over-trained flag from alpha.

It knows eigenvalues and tensors only: where layers come from and which columns a row
has are `net_esd.py`'s business. Degenerate input (no eigenvalue, a zero matrix) gives NaN,
never an exception, so a baseline can never cost a layer its ESD row.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from esd import metrics_table

# WeightWatcher 0.7.7 constants (constants.py, RMT_Util.py, WeightWatcher.mp_fit)
OVER_TRAINED, UNDER_TRAINED = "over-trained", "under-trained"
OVER_TRAINED_THRESH, UNDER_TRAINED_THRESH = metrics_table.WELL_TRAINED_ALPHA
_KDE_BANDWIDTH = 0.1        # linear-kernel KDE bandwidth, in units of the mean eigenvalue
_KDE_GRID_POINTS = 1000     # the KDE is compared with the MP density on this grid ...
_KDE_GRID_MARGIN = 0.5      # ... from 0 to max + this
_KDE_MIN_DENSITY = 0.01     # grid points where the KDE is below this are left out
_SIGMA_GRID = (0.05, 2.0, 0.01)  # σ candidates: (start, stop, step) × the σ of λ_max at the edge
_OUT_OF_SUPPORT = 1000.0    # residual of each point when the MP support misses the peak


def training_warning(alpha: float, fitted_on_ww_scale: bool = True) -> str:
    """WeightWatcher's per-layer warning: 'over-trained' for α < 2, 'under-trained' for α > 6,
    '' otherwise. '' for a failed fit (NaN α; WeightWatcher's α = −1 there reads as
    'over-trained') and when the fit's α is not on WeightWatcher's scale (xmin_mid)."""
    if not fitted_on_ww_scale or not math.isfinite(alpha):
        return ""
    if alpha < OVER_TRAINED_THRESH:
        return OVER_TRAINED
    if alpha > UNDER_TRAINED_THRESH:
        return UNDER_TRAINED
    return ""


# ----------------------------------------------------------------------------- randomize

def layer_seed(seed: int, longname: str) -> int:
    """The shuffle seed of one layer: a hash of (seed, longname), so a layer's shuffle does
    not depend on the order, the device or the other layers of the run."""
    digest = hashlib.blake2b(f"{int(seed)}\0{longname}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform random permutation of range(n), on CPU (the same on every device), int32
    where it fits (half the memory of int64 on big embeddings)."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=generator, dtype=dtype)


def shuffled_weight(weight: torch.Tensor, layer_type: str, seed: int) -> torch.Tensor:
    """A copy of `weight` (same shape, dtype, device) with its elements shuffled uniformly at
    random: the whole matrix for a 2-D weight; each (out × in) kernel-position slice on its
    own for a conv weight (out, in, k…), as WeightWatcher shuffles each of its Wmats. The
    same seed gives the same copy."""
    generator = torch.Generator().manual_seed(int(seed))
    weight = weight.detach()
    if layer_type in ("conv1d", "conv2d") and weight.ndim >= 3:
        out_ch, in_ch = weight.shape[:2]
        slices = weight.reshape(out_ch * in_ch, -1)  # (out·in, k): column p is slice p
        shuffled = torch.empty_like(slices)
        for p in range(slices.shape[1]):
            perm = _permutation(out_ch * in_ch, generator).to(weight.device)
            shuffled[:, p] = slices[:, p][perm]
        return shuffled.reshape(weight.shape)
    flat = weight.reshape(-1)
    return flat[_permutation(flat.numel(), generator).to(weight.device)].reshape(weight.shape)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√JS divergence (natural log, so in [0, √ln 2]) between the vectors p and q, each
    normalised to sum 1 (WeightWatcher's `jensen_shannon_distance`, which normalises the
    mean (p+q)/2 of the raw vectors instead: the same when Σp = Σq, as for W and its
    shuffle). NaN when either has no mass."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0, None)
    if p.shape != q.shape or p.size == 0 or p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):  # Σ a ln(a/m), 0·ln 0 = 0 (m > 0 wherever a > 0)
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def randomized_columns(evals: np.ndarray, rand_evals: np.ndarray) -> dict:
    """`max_rand_eval` = λ_max of the shuffled W; `ww_softrank` = max_rand_eval / λ_max;
    `rand_distance` = Jensen–Shannon distance between the sorted eigenvalue vectors of W and
    of its shuffle, each read as a probability vector (WeightWatcher's definition)."""
    evals, rand_evals = np.sort(evals), np.sort(rand_evals)
    lam_max = float(evals.max()) if evals.size else math.nan
    rand_max = float(rand_evals.max()) if rand_evals.size else math.nan
    return {"max_rand_eval": rand_max,
            "ww_softrank": rand_max / lam_max if lam_max > 0 else math.nan,
            "rand_distance": jensen_shannon_distance(evals, rand_evals)}


# ----------------------------------------------------------------------------- MP fit

@dataclass(frozen=True)
class MPFit:
    """The Marchenko–Pastur fit of one spectrum (NaN fields when it cannot be made)."""
    num_spikes: float = math.nan
    sigma_mp: float = math.nan
    mp_softrank: float = math.nan
    bulk_min: float = math.nan
    bulk_max: float = math.nan

    def columns(self) -> dict:
        """{column: value}, in the order of MP_FIT_COLUMNS (the fields)."""
        return asdict(self)


MP_FIT_COLUMNS = [item.name for item in fields(MPFit)]


def _mp_edges(sigma, Q: float):
    """The MP bulk edges (λ−, λ+) = (σ(1 − 1/√Q))², (σ(1 + 1/√Q))² (σ a number or an array)."""
    return (sigma * (1 - 1 / math.sqrt(Q))) ** 2, (sigma * (1 + 1 / math.sqrt(Q))) ** 2


def linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density at `grid` of the linear-kernel KDE of `samples` (sklearn's
    KernelDensity(kernel='linear')): (1/(n·h)) Σ max(0, 1 − |x − xᵢ|/h), by prefix sums."""
    xs = np.sort(samples)
    n, h = xs.size, bandwidth
    cums = np.concatenate(([0.0], np.cumsum(xs)))
    lo = np.searchsorted(xs, grid - h, side="right")   # first xᵢ > x − h
    mid = np.searchsorted(xs, grid, side="right")      # first xᵢ > x
    hi = np.searchsorted(xs, grid + h, side="left")    # first xᵢ ≥ x + h
    left = (mid - lo) * (1 - grid / h) + (cums[mid] - cums[lo]) / h     # xᵢ in (x−h, x]
    right = (hi - mid) * (1 + grid / h) - (cums[hi] - cums[mid]) / h    # xᵢ in (x, x+h)
    return np.clip(left + right, 0, None) / (n * h)


def _mp_density(x: np.ndarray, sigma: np.ndarray, Q: float) -> np.ndarray:
    """MP density of eigenvalues (rows: σ candidates (G, 1), columns: x (P,)); 0 off support."""
    a, b = _mp_edges(sigma, Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = Q / (2 * np.pi * sigma ** 2 * x) * np.sqrt((b - x) * (x - a))
    return np.where(np.isfinite(value), value, 0.0)


def _quarter_circle_density(s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Density of the singular values of a square noise matrix whose eigenvalues are MP with
    Q = 1 and scale σ: √(4σ² − s²)/(πσ²) on [0, 2σ]. (WeightWatcher 0.7.7 uses √(4 − s²)/(πσ²),
    whose support does not move with σ, so there only the height is fitted.)"""
    with np.errstate(invalid="ignore"):
        value = np.sqrt(4 * sigma ** 2 - s ** 2) / (np.pi * sigma ** 2)
    return np.where(np.isfinite(value), value, 0.0)


def _residuals(sigmas: np.ndarray, x: np.ndarray, y: np.ndarray, Q: float) -> np.ndarray:
    """Σ (density(σ) − KDE)² over the grid points kept, for each σ of `sigmas` (G,). For MP,
    a support [a, b] that misses the KDE's peak or overshoots the grid costs 1000 per point
    (WeightWatcher's resid_mp)."""
    sig = np.asarray(sigmas, dtype=np.float64)[:, None]  # (G, 1)
    if Q == 1:
        return ((_quarter_circle_density(x[None, :], sig) - y) ** 2).sum(axis=1)
    resid = ((_mp_density(x[None, :], sig, Q) - y) ** 2).sum(axis=1)
    a, b = _mp_edges(sig[:, 0], Q)
    peak = x[int(np.argmax(y))]
    missed = (b < peak) | (b > x.max()) | (a > peak)
    return np.where(missed, _OUT_OF_SUPPORT ** 2 * x.size, resid)


def _best_sigma(x: np.ndarray, y: np.ndarray, Q: float, sigma_scale: float) -> float:
    """σ minimising the residual: the best of WeightWatcher's grid (0.05 … 2 × sigma_scale,
    step 0.01 × sigma_scale), refined by golden-section search between its grid neighbours
    (WeightWatcher polishes with Nelder–Mead from the same grid point)."""
    start, stop, step = (f * sigma_scale for f in _SIGMA_GRID)
    grid = np.arange(start, stop, step)
    resid = _residuals(grid, x, y, Q)
    best = int(np.argmin(resid))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = _residuals(np.array([c, d]), x, y, Q)
    for _ in range(60):  # (hi − lo) shrinks by 0.618 per step: 1e-12 relative long before 60
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = _residuals(np.array([c]), x, y, Q)[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = _residuals(np.array([d]), x, y, Q)[0]
    refined = (lo + hi) / 2
    return float(refined if _residuals(np.array([refined]), x, y, Q)[0] <= resid[best] else grid[best])


def mp_fit(evals: np.ndarray, Q: float, M: int) -> MPFit:
    """Marchenko–Pastur fit of the bulk of a spectrum (all eigenvalues of WᵀW, conv slices
    pooled), as WeightWatcher 0.7.7's `mp_fit`:
    1. rescale the eigenvalues to mean 1 (x = λ·n/Σλ);
    2. fit σ: least squares between the MP density (Q = N/M > 1) of x, or the quarter-circle
       density (Q = 1) of √x, and a linear-kernel KDE (bandwidth 0.1) on 1000 points of
       [0, max + 0.5], points of KDE density ≤ 0.01 left out;
    3. bulk edges λ± = σ²(1 ± 1/√Q)²; a spike is an x above λ+ + √(Q^−½ λ+^⅔ M^−⅔)
       (WeightWatcher's Tracy–Widom margin);
    4. `mp_softrank` = λ+ / x_max; `sigma_mp` = σ (of the rescaled spectrum); `bulk_min`,
       `bulk_max` = λ∓ in the units of λ (divided back by the rescaling)."""
    evals = np.clip(np.asarray(evals, dtype=np.float64), 0, None)
    total = float(evals.sum())
    if evals.size < 2 or not total > 0 or not math.isfinite(total) or not Q >= 1:
        return MPFit()
    scale = evals.size / total                     # x = λ · scale has mean 1
    x = evals * scale
    x_max = float(x.max())
    samples = np.sqrt(x) if Q == 1 else x          # Q = 1: singular values, quarter circle
    grid = np.linspace(0, samples.max() + _KDE_GRID_MARGIN, _KDE_GRID_POINTS)
    density = linear_kde(samples, grid, _KDE_BANDWIDTH)
    kept = density > _KDE_MIN_DENSITY
    if not kept.any():
        return MPFit()
    sigma_scale = math.sqrt(x_max) / (1 + 1 / math.sqrt(Q))  # σ with λ_max at the bulk edge
    sigma = _best_sigma(grid[kept], density[kept], Q, sigma_scale)
    bulk_min, bulk_max = _mp_edges(sigma, Q)
    tracy_widom = Q ** -0.5 * bulk_max ** (2 / 3) * M ** (-2 / 3)
    spikes = int(np.count_nonzero(x > bulk_max + math.sqrt(tracy_widom)))
    return MPFit(num_spikes=spikes, sigma_mp=sigma, mp_softrank=bulk_max / x_max,
                 bulk_min=bulk_min / scale, bulk_max=bulk_max / scale)
