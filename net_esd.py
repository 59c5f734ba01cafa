"""Empirical spectral density (ESD) metrics of weight matrices.

This module owns the numbers: the eigenvalues of each layer's WᵀW, the power-law fit of their tail
and the derived norm metrics, exactly as defined in `docs/metrics.md` (which follows
WeightWatcher where it is sound, and says how accuracy is certified). It turns
`(longname, layer_type, tensor)` triples into one metrics row each, under the run's
`ESDSettings` (defined without torch in `esd/settings.py`, re-exported here).

It must not know where weights come from (hub, files, adapters: `model_loader.py`), how
layers are prefetched and spread over devices (`esd/pipeline.py`), nor how GPUs are shared
between processes (`gputracker/`).

The structure-vs-noise baselines (`--randomize`, `--mp_fit`) and the `warning` column are
defined in `esd/baselines.py`, this room's helper; here they are only computed and put in
the row (`esd_columns` says which columns a row has under given settings).

Public API: `ESD_COLUMNS`, `RANDOMIZE_COLUMNS`, `MP_FIT_COLUMNS`, `esd_columns`,
`FIX_FINGERS_METHODS`, `normalize_fix_fingers`, `ESDSettings`, `layer_eigenvalues`,
`fit_power_law`, `spectrum_metrics`, `layer_metrics`, `matrix_esd_metrics`, `analyze_layers`,
`net_esd_estimator` (the compatibility entry), `iter_model_layers`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from esd import baselines, metrics_table
from esd.loading.layers import iter_model_layers  # walking nn.Modules is loading's job
from esd.schema import LAYER_TYPES
# the settings live in a module without torch; re-exported: `from net_esd import ESDSettings`
from esd.settings import FIX_FINGERS_METHODS, ESDSettings, normalize_fix_fingers  # noqa: F401

# The columns of a metrics row, from the one table of output columns (esd/metrics_table.py,
# where each column's meaning, unit, enabling flag and summary statistics are defined).
ESD_COLUMNS = metrics_table.metric_columns()
# appended to a row only under --randomize / --mp_fit (docs/metrics.md, "Structure vs noise")
RANDOMIZE_COLUMNS = metrics_table.columns_enabled_by("randomize")
MP_FIT_COLUMNS = metrics_table.columns_enabled_by("mp_fit")   # = the fields of baselines.MPFit


# every eigenvalue above the threshold must match a float64 SVD to this relative accuracy
EIGENVALUE_RTOL = 1e-4
# Gram eigenvalues carry an absolute error of about eps·sqrt(N)·λ_max (Gram rounding plus the
# eigensolver). Measured on all-MiniLM-L6-v2 in float32: up to 20·eps·λ_max at N=384, i.e.
# ~1·eps·sqrt(N)·λ_max; this factor keeps a >10x margin (tests/test_net_esd.py proves it).
_GRAM_ERROR_FACTOR = 16.0
# WeightWatcher's clip_xmax constants (weightwatcher 0.7.7, RMT_Util.fit_clipped_powerlaw)
_MAX_FINGERS = 10
_FINGER_THRESH = 1.0
_CLIP_MIN_ALPHA = 2.0
# elements per block when computing KS distances of many candidates at once (float64: 32 MB)
_KS_BLOCK_ELEMENTS = 4 * 1024 * 1024
# candidates per block: a block spans the tail of its first candidate, so later candidates
# of a wide block compute (and mask) positions before their own xmin — 128 keeps that waste
# small at n = 2048 (half the work of one block of every candidate) for few extra calls
_KS_BLOCK_CANDIDATES = 128
# elements of W converted to the Gram dtype at once (float64: 32 MB)
_GRAM_CHUNK_ELEMENTS = 4 * 1024 * 1024
# column blocks of the Gram product; only blocks on or below the diagonal are computed
_GRAM_COLUMN_BLOCKS = 4
_GRAM_MIN_BLOCKED_COLUMNS = 512


# ----------------------------------------------------------------------------- columns

def esd_columns(settings: ESDSettings = ESDSettings()) -> list:
    """The columns of a metrics row under `settings` (esd/metrics_table.py): ESD_COLUMNS, then
    RANDOMIZE_COLUMNS with --randomize, then MP_FIT_COLUMNS with --mp_fit."""
    return metrics_table.metric_columns(settings)


# ----------------------------------------------------------------------------- eigenvalues

def _as_matrices(weight: torch.Tensor, layer_type: str, conv_norm: float) -> tuple[torch.Tensor, float]:
    """The (b, r, c) stack of matrices whose singular values make the ESD, and the factor
    their eigenvalues are multiplied by (conv_norm for conv slices, else 1)."""
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"unknown layer_type {layer_type!r}; valid: {', '.join(LAYER_TYPES)}")
    if layer_type in ("conv1d", "conv2d") and weight.ndim >= 3:
        out_ch, in_ch = weight.shape[:2]
        slices = weight.reshape(out_ch, in_ch, -1).permute(2, 0, 1)  # (k, out, in)
        return slices, float(conv_norm)
    if weight.ndim != 2:
        raise ValueError(f"{layer_type} weight must be 2-D, got shape {tuple(weight.shape)}")
    return weight.unsqueeze(0), 1.0  # (1, r, c)


class NonFiniteWeightsError(ValueError):
    """The weight holds NaN or Inf: it has no spectrum."""


def _column_blocks(c: int) -> list[tuple[int, int]]:
    """Column ranges splitting c columns into _GRAM_COLUMN_BLOCKS nearly equal blocks; one
    block below _GRAM_MIN_BLOCKED_COLUMNS, where the saved flops cost more in calls."""
    k = min(_GRAM_COLUMN_BLOCKS, c) if c >= _GRAM_MIN_BLOCKED_COLUMNS else 1
    edges = [round(i * c / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _gram_matrices(mats: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The smaller Gram matrix (b, m, m) of each of mats (b, r, c), m = min(r, c), lower
    triangle only. float64 on CPU: BLAS syrk (`_cpu_syrk_gram`). Elsewhere, with 4 column
    blocks only the 10 blocks on or below the diagonal are multiplied (62% of the flops of a
    full matmul; torch has no syrk). W is converted to `dtype` in row chunks, so no
    full-size copy of it is made."""
    if device.type == "cpu" and dtype == torch.float64 and USE_SYRK:
        return _cpu_syrk_gram(mats)
    if mats.shape[-2] < mats.shape[-1]:
        mats = mats.mT  # (b, r, c) with r >= c: the c×c Gram WᵀW is the smaller one
    b, r, c = mats.shape
    blocks = _column_blocks(c)
    gram = torch.zeros(b, c, c, dtype=dtype, device=device)  # (b, c, c)
    rows_per_chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, b * c))
    for start in range(0, r, rows_per_chunk):
        part = mats[:, start:start + rows_per_chunk, :].to(device=device, dtype=dtype)  # (b, rows, c)
        for i, (i0, i1) in enumerate(blocks):
            for j0, j1 in blocks[:i + 1]:
                gram[:, i0:i1, j0:j1].baddbmm_(part[:, :, i0:i1].mT, part[:, :, j0:j1])
    return gram


# float64 Gram on CPU through BLAS dsyrk (scipy's OpenBLAS): the lower triangle at half the
# flops of a matmul, with no block bookkeeping — 34–42% fewer CPU-seconds than the blocked
# baddbmm on 2048-wide layers (bench/bench_esd.py prints both). The eigensolver stays torch's
# (MKL's dsyevd is 2× faster than OpenBLAS's here). False: the blocked baddbmm everywhere.
USE_SYRK = True


_blas_control: dict = {}
_blas_control_lock = threading.Lock()


def _blas_threads_as_torch() -> None:
    """Let BLAS (scipy's OpenBLAS, for the syrk) run with torch's current thread count, so a
    worker given N cores uses N. Checked before every chunk: in esd/pipeline.py's compute
    threads, torch's count is first set to the thread's share of the cores (two layers at
    once share them; the last one gets them all). The count stays set after the Gram
    (threadpoolctl, without restoring)."""
    from esd.pipeline import follow_cpu_share
    follow_cpu_share()
    threads = torch.get_num_threads()
    if _blas_control.get("threads") == threads:
        return
    with _blas_control_lock:
        if "libraries" not in _blas_control:  # after scipy's BLAS is loaded: it is among them
            from threadpoolctl import ThreadpoolController
            _blas_control["libraries"] = ThreadpoolController().select(user_api="blas")
        _blas_control["libraries"].limit(limits=threads)
        _blas_control["threads"] = threads


def _float64_rows(part: torch.Tensor) -> np.ndarray:
    """A C-ordered float64 copy of one chunk of W (the one conversion of the Gram)."""
    return part.to(torch.float64).contiguous().numpy()


def _cpu_syrk_gram(mats: torch.Tensor) -> torch.Tensor:
    """(b, m, m) float64 lower-triangle Gram of each of mats (b, r, c) on CPU, accumulated
    by dsyrk over chunks converted to float64 (no full-size float64 copy of W), with torch's
    thread count (`_blas_threads_as_torch`)."""
    from scipy.linalg import blas
    b, r, c = mats.shape
    tall = r >= c                      # Gram = WᵀW (c×c), else WWᵀ (r×r)
    m, k = (c, r) if tall else (r, c)  # m×m Gram, summed over k
    per_chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, m))
    grams = []
    for w in mats:
        gram = None
        for start in range(0, k, per_chunk):
            part = w[start:start + per_chunk] if tall else w[:, start:start + per_chunk]
            x = _float64_rows(part)  # C-order = its transpose in Fortran order
            _blas_threads_as_torch()
            # tall: x is (rows, c) and x.T (Fortran, c×rows) · its transpose = xᵀx;
            # wide: x is (r, cols) and x.T (Fortran, cols×r) with trans: x·xᵀ
            gram = blas.dsyrk(1.0, x.T, beta=0.0 if gram is None else 1.0, c=gram,
                              trans=0 if tall else 1, lower=1, overwrite_c=1)
        grams.append(torch.from_numpy(gram))
    return torch.stack(grams) if b > 1 else grams[0].unsqueeze(0)


def _gram_eigenvalues(mats: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Ascending eigenvalues (b, m) of the smaller Gram matrix of each of mats (b, r, c).
    Raises NonFiniteWeightsError for NaN/Inf weights: any of them makes a diagonal entry of
    the Gram (a sum of squares of one column) non-finite, so checking the m×m Gram replaces
    a pass over the whole weight."""
    gram = _gram_matrices(mats, dtype, device)  # (b, m, m)
    if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all()):
        if not bool(torch.isfinite(mats).all()):
            raise NonFiniteWeightsError("weight holds NaN or Inf")
        if dtype != torch.float64:  # finite weights whose squares overflow this dtype
            return _gram_eigenvalues(mats, torch.float64, device)
    if device.type == "cpu":
        _blas_threads_as_torch()  # the eigensolver takes this thread's share of the cores too
    return torch.linalg.eigvalsh(gram, UPLO="L")  # (b, m)


def _svd_eigenvalues(mats: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Ascending σ² (b, m) from a float64 SVD: the slow path for ill-conditioned matrices."""
    sv = torch.linalg.svdvals(mats.to(device=device, dtype=torch.float64))  # (b, m), descending
    return (sv * sv).flip(-1)


def _inaccurate_rows(evals: torch.Tensor, dtype: torch.dtype, n_dim: int, evals_thresh: float) -> torch.Tensor:
    """Bool (b,): True where the Gram eigenvalues in `dtype` may miss EIGENVALUE_RTOL on the
    smallest eigenvalue above evals_thresh (absolute error ≈ eps·sqrt(N)·λ_max)."""
    lam_max = evals[:, -1].clamp(min=0)
    kept = torch.where(evals > evals_thresh, evals, torch.full_like(evals, math.inf))
    lam_min_kept = kept.min(dim=-1).values  # inf when nothing is kept
    abs_error = _GRAM_ERROR_FACTOR * torch.finfo(dtype).eps * math.sqrt(n_dim) * lam_max
    return abs_error > EIGENVALUE_RTOL * lam_min_kept


def _gram_precisions(device: torch.device) -> tuple[torch.dtype, ...]:
    """Gram dtypes tried in turn. float32 first only on CUDA (float64 is slow on most GPUs);
    on CPU float64 costs ~2x float32 but float32 fails the accuracy bound on most trained
    layers (27 of 39 in all-MiniLM-L6-v2), so trying it first would mostly add work."""
    return (torch.float32, torch.float64) if device.type == "cuda" else (torch.float64,)


def _accurate_eigenvalues(mats: torch.Tensor, device: torch.device, evals_thresh: float,
                          precisions: Optional[tuple] = None) -> torch.Tensor:
    """Ascending float64 eigenvalues (b, m) of the smaller Gram of each matrix, accurate to
    EIGENVALUE_RTOL above evals_thresh: Gram eigenvalues in each of `precisions`, then a
    float64 SVD, each only for the matrices the previous step could not certify."""
    n_dim = max(mats.shape[-2], mats.shape[-1])
    todo = torch.arange(mats.shape[0])  # matrices not certified yet

    def pending():  # no copy while every matrix is pending (a 2-D weight: the common case)
        return mats if len(todo) == mats.shape[0] else mats[todo]

    result = None
    for dtype in precisions or _gram_precisions(device):
        try:
            evals = _gram_eigenvalues(pending(), dtype, device).to(torch.float64)  # (len(todo), m)
        except torch.linalg.LinAlgError:  # the eigensolver did not converge: next precision / SVD
            continue
        if result is None:
            result = evals
        else:
            result[todo.to(device)] = evals
        todo = todo[_inaccurate_rows(evals, dtype, n_dim, evals_thresh).cpu()]
        if len(todo) == 0:
            return result
    if result is None:
        return _svd_eigenvalues(mats, device)
    result[todo.to(device)] = _svd_eigenvalues(pending(), device)
    return result


def layer_eigenvalues(weight: torch.Tensor, layer_type: str, conv_norm: float = 0.5,
                      device="cpu", *, evals_thresh: float = 1e-5) -> np.ndarray:
    """Ascending float64 eigenvalues of WᵀW (σ², not divided by N). Conv weights (out, in, k…)
    contribute one (out × in) slice per kernel position, scaled by √conv_norm; all pooled.
    Eigenvalues above evals_thresh match a float64 SVD to EIGENVALUE_RTOL.
    Raises NonFiniteWeightsError (a ValueError) when the weight holds NaN or Inf."""
    device = torch.device(device)
    mats, scale = _as_matrices(weight.detach(), layer_type, conv_norm)
    if mats.numel() == 0:  # a dimension of size 0: no eigenvalue at all
        return np.empty(0)
    evals = _accurate_eigenvalues(mats, device, evals_thresh / scale) * scale  # (b, m)
    return np.sort(evals.flatten().cpu().numpy())


# ----------------------------------------------------------------------------- power-law fit

@dataclass(frozen=True)
class PowerLawFit:
    """One power-law fit of a sorted spectrum; NaN fields when status is not 'ok'."""
    alpha: float = math.nan
    D: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    num_pl_spikes: float = math.nan
    sigma: float = math.nan
    status: str = "no_candidate"
    num_fingers: float = math.nan
    raw_alpha: float = math.nan


def _candidate_alphas(log_x: torch.Tensor) -> torch.Tensor:
    """α(i) = 1 + k / Σ_{j≥i} ln(x_j/x_i), k = n−i, for i in 0..n−2 (shape (n−1,));
    NaN where the tail is flat (the sum is 0)."""
    n = log_x.shape[0]
    tail_sums = log_x.flip(0).cumsum(0).flip(0)  # (n,) Σ_{j≥i} ln x_j
    k = torch.arange(n, 0, -1, dtype=log_x.dtype, device=log_x.device)  # (n,) n−i
    spread = (tail_sums - k * log_x)[:-1]
    alphas = 1 + k[:-1] / spread
    # A flat tail (x_i = … = x_{n−1}, sorted) has a sum of exactly 0, but the cumulative sums
    # leave a rounding residue (~1e-15) there that would give α ~ 1e15: test ties exactly.
    flat = log_x[:-1] >= log_x[-1]
    return torch.where((spread > 0) & ~flat, alphas, torch.full_like(alphas, math.nan))


def _ks_distances_block(log_x: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """D(i) = max_j |1 − (x_{i+j}/x_i)^(1−α(i)) − j/k| for candidate indices idx (b,), ascending."""
    n = log_x.shape[0]
    t = torch.arange(int(idx[0]), n, device=log_x.device)  # (w,) positions any tail can reach
    j = t.to(log_x.dtype)[None, :] - idx.to(log_x.dtype)[:, None]  # (b, w) offset in each tail
    outside = j < 0  # (b, w) positions before x_i
    j.div_((n - idx).to(log_x.dtype)[:, None])  # (b, w) empirical CDF j/k
    gap = log_x[t][None, :] - log_x[idx][:, None]  # (b, w) ln(x_t / x_i)
    gap.mul_((1 - alphas[idx])[:, None]).exp_()  # (x_t / x_i)^(1−α): 1 − model CDF
    gap.add_(j).sub_(1).abs_().masked_fill_(outside, 0)  # |1 − model CDF − j/k|
    return gap.max(dim=1).values  # (b,)


def _ks_distances(log_x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """KS distance of each candidate (c,), in blocks of candidates × tail width of at most
    _KS_BLOCK_ELEMENTS floats, so memory stays bounded (no n×n matrix at any n)."""
    n = log_x.shape[0]
    pieces, start = [], 0
    while start < candidates.shape[0]:
        block = max(1, min(_KS_BLOCK_CANDIDATES, _KS_BLOCK_ELEMENTS // (n - int(candidates[start]))))
        pieces.append(_ks_distances_block(log_x, alphas, candidates[start:start + block]))
        start += block
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=log_x.dtype, device=log_x.device)


def _best_candidate_fit(x: torch.Tensor, log_x: torch.Tensor, alphas: torch.Tensor,
                        candidates: torch.Tensor) -> PowerLawFit:
    """Among candidate indices with α > 1, the one with the smallest D (first on ties)."""
    valid = alphas[candidates] > 1  # NaN compares False
    candidates = candidates[valid]
    if candidates.numel() == 0:
        return PowerLawFit(status="no_candidate")
    distances = _ks_distances(log_x, alphas, candidates)
    best = int(candidates[int(torch.argmin(distances))])  # argmin returns the first minimum
    n = x.shape[0]
    alpha = float(alphas[best])
    k = n - best
    return PowerLawFit(alpha=alpha, D=float(distances.min()), xmin=float(x[best]), xmax=float(x[-1]),
                       num_pl_spikes=k, sigma=(alpha - 1) / math.sqrt(k), status="ok")


def _dks_fit(x: torch.Tensor) -> PowerLawFit:
    """WeightWatcher's default fit: every i in 0..n−2 is a candidate."""
    if x.shape[0] < 2:
        return PowerLawFit(status="no_candidate")
    log_x = torch.log(x)
    alphas = _candidate_alphas(log_x)
    return _best_candidate_fit(x, log_x, alphas, torch.arange(x.shape[0] - 1, device=x.device))


def _xmin_mid_fit(x: torch.Tensor, xmin_pos: float) -> PowerLawFit:
    """The single candidate i = ⌊n / xmin_pos⌋, clamped to n−2."""
    n = x.shape[0]
    if n < 2:
        return PowerLawFit(status="no_candidate")
    i = min(int(n // xmin_pos), n - 2)
    log_x = torch.log(x)
    alphas = _candidate_alphas(log_x)
    return _best_candidate_fit(x, log_x, alphas, torch.tensor([i], device=x.device))


def peak_window(x: np.ndarray, bins: int) -> tuple[float, float]:
    """(low, high) = (0.95·p, 1.5·p), p = 10^(left edge of the fullest bin of the log10 histogram)."""
    counts, edges = np.histogram(np.log10(x), bins=bins)
    peak = 10.0 ** edges[int(np.argmax(counts))]
    return 0.95 * peak, 1.5 * peak


def _xmin_peak_fit(x: torch.Tensor, bins: int) -> PowerLawFit:
    """Candidates with 0.95·p ≤ x_i ≤ 1.5·p (p from the log-histogram peak); DKS when none fits."""
    n = x.shape[0]
    if n < 2:
        return PowerLawFit(status="no_candidate")
    low, high = peak_window(x.cpu().numpy(), bins)
    log_x = torch.log(x)
    alphas = _candidate_alphas(log_x)
    head = x[:-1]
    candidates = torch.nonzero((head >= low) & (head <= high)).flatten()
    fit = _best_candidate_fit(x, log_x, alphas, candidates)
    if fit.status == "ok":
        return fit
    fallback = _best_candidate_fit(x, log_x, alphas, torch.arange(n - 1, device=x.device))
    if fallback.status != "ok":
        return fallback
    return replace(fallback, status="peak_window_empty")


def _clip_xmax_fit(x: torch.Tensor) -> PowerLawFit:
    """WeightWatcher 0.7.7's finger clipping (RMT_Util.fit_clipped_powerlaw with its defaults):
    fit all eigenvalues (raw fit), then refit without the top idx = 2, 3, … 9 eigenvalues; the
    first refit whose α is below raw α − 1 wins with num_fingers = idx − 1 (WW's count); stop
    early once a refit has α ≤ 2. Like WW, num_pl_spikes counts every eigenvalue ≥ xmin
    (clipped fingers included) while xmax and sigma describe the clipped fit."""
    raw = _dks_fit(x)
    if raw.status != "ok":
        return raw
    best, num_fingers = raw, 0
    for idx in range(2, _MAX_FINGERS):
        if x.shape[0] - idx < 2:
            break
        clipped = _dks_fit(x[:-idx])
        if clipped.status != "ok":
            break
        if clipped.alpha + _FINGER_THRESH < raw.alpha:
            best, num_fingers = clipped, idx - 1
            break
        if clipped.alpha <= _CLIP_MIN_ALPHA:
            break
    spikes = int((x >= best.xmin).sum())
    return replace(best, num_pl_spikes=spikes, num_fingers=num_fingers, raw_alpha=raw.alpha)


def fit_power_law(x: np.ndarray, fix_fingers: str = "xmin_mid", xmin_pos: float = 2,
                  bins: int = 100, device="cpu") -> PowerLawFit:
    """Power-law fit of the sorted positive eigenvalues x (metrics.md, 'The power-law fit')."""
    method = normalize_fix_fingers(fix_fingers)
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=torch.device(device))
    if method == "DKS":
        return _dks_fit(xt)
    if method == "xmin_mid":
        return _xmin_mid_fit(xt, xmin_pos)
    if method == "xmin_peak":
        return _xmin_peak_fit(xt, bins)
    return _clip_xmax_fit(xt)


# ----------------------------------------------------------------------------- one layer

def _shape_columns(weight: torch.Tensor, layer_type: str) -> dict:
    """longname-independent size columns: M, N, Q, params, num_evals."""
    if layer_type in ("conv1d", "conv2d") and weight.ndim >= 3:
        rows, cols = weight.shape[:2]
        slices = int(np.prod(weight.shape[2:]))
    elif weight.ndim == 2:
        rows, cols = weight.shape
        slices = 1
    else:
        raise ValueError(f"{layer_type} weight must be 2-D, got shape {tuple(weight.shape)}")
    m, n = min(rows, cols), max(rows, cols)
    return {"M": int(m), "N": int(n), "Q": n / m if m else math.nan,
            "params": int(weight.numel()), "num_evals": int(m * slices)}


def _log10(value: float) -> float:
    """log10 of a positive number, NaN otherwise."""
    return math.log10(value) if value > 0 and math.isfinite(value) else math.nan


def _matrix_rank(evals: np.ndarray, n_dim: int) -> int:
    """Number of σ > σ_max · N · eps32 (np.linalg.matrix_rank's rule with float32 eps)."""
    sv = np.sqrt(np.clip(evals, 0, None))
    if sv.size == 0:
        return 0
    return int(np.count_nonzero(sv > sv.max() * n_dim * np.finfo(np.float32).eps))


def _entropy(kept: np.ndarray, rank: int) -> float:
    """−Σ p ln p / ln(rank), p = λ/Σλ over the kept eigenvalues; NaN when rank ≤ 1."""
    if rank <= 1 or kept.size == 0 or kept.sum() <= 0:
        return math.nan
    p = kept / kept.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(rank))


def _log_alpha_norm(kept: np.ndarray, alpha: float) -> float:
    """log10 Σ λ^α over the kept eigenvalues, as α·log10 λ_max + log10 Σ (λ/λ_max)^α."""
    if not math.isfinite(alpha) or kept.size == 0:
        return math.nan
    lam_max = kept.max()
    return float(alpha * math.log10(lam_max) + math.log10(np.sum((kept / lam_max) ** alpha)))


def _norm_columns(evals: np.ndarray, kept: np.ndarray, n_dim: int, alpha: float) -> dict:
    """Derived metrics of one spectrum (all eigenvalues for norms/rank, kept ones for the rest)."""
    evals = np.clip(evals, 0, None)
    norm = float(evals.sum())
    lam_max = float(evals.max()) if evals.size else math.nan
    rank = _matrix_rank(evals, n_dim)
    return {
        "norm": norm, "log_norm": _log10(norm),
        "spectral_norm": lam_max, "log_spectral_norm": _log10(lam_max),
        "stable_rank": norm / lam_max if lam_max > 0 else math.nan,
        "alpha_weighted": alpha * _log10(lam_max),
        "log_alpha_norm": _log_alpha_norm(kept, alpha),
        "matrix_rank": rank, "entropy": _entropy(kept, rank),
    }


def _empty_row(longname: str, layer_type: str, shape_columns: dict, status: str,
               settings: ESDSettings = ESDSettings()) -> dict:
    """A row with the columns of `settings`, every metric NaN, the given fit_status, no warning."""
    row = dict.fromkeys(esd_columns(settings), math.nan)
    row.update(shape_columns, longname=longname, layer_type=layer_type, fit_status=status, warning="")
    return row


def _kept_eigenvalues(evals: np.ndarray, evals_thresh: float, filter_zeros: bool) -> np.ndarray:
    """Eigenvalues the fit uses: λ > evals_thresh, or (filter_zeros off) every λ > 0, since the
    fit takes logarithms."""
    return evals[evals > (evals_thresh if filter_zeros else 0.0)]


def layer_metrics(weight: torch.Tensor, layer_type: str, longname: str = "",
                  settings: ESDSettings = ESDSettings(), device="cpu") -> tuple[dict, np.ndarray]:
    """(metrics row with the columns of `esd_columns(settings)`, ascending eigenvalues) of one
    weight tensor. NaN/Inf weights give fit_status 'non_finite_weights' and no eigenvalues.
    With settings.randomize, the element-shuffled weight (seeded by randomize_seed and
    longname) costs one more eigensolve."""
    weight = weight.detach()
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"unknown layer_type {layer_type!r}; valid: {', '.join(LAYER_TYPES)}")
    try:
        evals = layer_eigenvalues(weight, layer_type, settings.conv_norm, device,
                                  evals_thresh=settings.evals_thresh)
    except NonFiniteWeightsError:
        shape_columns = _shape_columns(weight, layer_type)
        return _empty_row(longname, layer_type, shape_columns, "non_finite_weights", settings), np.empty(0)
    row = spectrum_metrics(evals, weight.shape, layer_type, settings, longname, device)
    if settings.randomize and evals.size:
        row.update(_randomized_columns(weight, layer_type, longname, evals, row, settings, device))
    return row, evals


def _randomized_columns(weight: torch.Tensor, layer_type: str, longname: str, evals: np.ndarray,
                        row: dict, settings: ESDSettings, device) -> dict:
    """RANDOMIZE_COLUMNS: the ESD of the element-shuffled weight against the layer's own."""
    seed = baselines.layer_seed(settings.randomize_seed, longname)
    shuffled = baselines.shuffled_weight(weight, layer_type, seed)
    rand_evals = layer_eigenvalues(shuffled, layer_type, settings.conv_norm, device,
                                   evals_thresh=settings.evals_thresh)
    del shuffled
    columns = baselines.randomized_columns(evals, rand_evals)
    columns["rand_num_spikes"] = baselines.mp_fit(rand_evals, row["Q"], row["M"]).num_spikes
    return columns


def spectrum_metrics(evals: np.ndarray, shape, layer_type: str, settings: ESDSettings = ESDSettings(),
                     longname: str = "", device="cpu") -> dict:
    """The metrics row of a weight of `shape` whose ascending eigenvalues (σ², conv slices
    scaled and pooled) are `evals`: the fit, the derived metrics, the warning and (with
    settings.mp_fit) the MP fit; not the randomized columns, which need the weight."""
    shape_columns = _shape_columns(torch.empty(tuple(shape), device="meta"), layer_type)
    kept = _kept_eigenvalues(evals, settings.evals_thresh, settings.filter_zeros)
    if kept.size == 0:
        fit = PowerLawFit(status="no_eigenvalue_above_threshold")
    elif kept.size < settings.min_evals:
        fit = PowerLawFit(status="too_few_eigenvalues")
    else:
        fit = fit_power_law(kept, settings.fix_fingers, settings.xmin_pos, settings.bins, device)

    row = _empty_row(longname, layer_type, shape_columns, fit.status, settings)
    row.update(alpha=fit.alpha, D=fit.D, xmin=fit.xmin, xmax=fit.xmax,
               num_pl_spikes=fit.num_pl_spikes, sigma=fit.sigma,
               warning=baselines.training_warning(fit.alpha, settings.fix_fingers != "xmin_mid"))
    if settings.fix_fingers == "clip_xmax":
        row.update(num_fingers=fit.num_fingers, raw_alpha=fit.raw_alpha)
    row.update(_norm_columns(evals, kept, shape_columns["N"], fit.alpha))
    if settings.mp_fit:
        row.update(baselines.mp_fit(evals, shape_columns["Q"], shape_columns["M"]).columns())
    return row


def matrix_esd_metrics(weight: torch.Tensor, layer_type: str, longname: str = "", *,
                       evals_thresh: float = 1e-5, bins: int = 100, fix_fingers="xmin_mid",
                       xmin_pos: float = 2, conv_norm: float = 0.5, filter_zeros: bool = True,
                       min_evals: int = 10, randomize: bool = False, randomize_seed: int = 0,
                       mp_fit: bool = False, device="cpu", return_eigs: bool = False):
    """One metrics row (dict with `esd_columns(settings)`) for one weight tensor, the settings
    given as keywords; with return_eigs, the tuple (row, ascending eigenvalues)."""
    settings = ESDSettings(fix_fingers=fix_fingers, evals_thresh=evals_thresh, bins=bins,
                           xmin_pos=xmin_pos, conv_norm=conv_norm, filter_zeros=filter_zeros,
                           min_evals=min_evals, randomize=randomize, randomize_seed=randomize_seed,
                           mp_fit=mp_fit)
    row, evals = layer_metrics(weight, layer_type, longname, settings, device)
    return (row, evals) if return_eigs else row


# ----------------------------------------------------------------------------- a whole model



def _failed_row(longname: str, layer_type: str, weight: torch.Tensor, error: Exception,
                settings: ESDSettings) -> dict:
    """Row for a layer whose maths raised: sizes when they can be read, fit_status says why."""
    try:
        shape_columns = _shape_columns(weight, layer_type)
    except Exception:
        shape_columns = {"params": int(weight.numel())} if isinstance(weight, torch.Tensor) else {}
    message = " ".join(str(error).split())[:200]
    return _empty_row(longname, layer_type, shape_columns, f"error: {type(error).__name__}: {message}",
                      settings)


def _layer_row(item: tuple, settings: ESDSettings, device: torch.device) -> tuple[dict, np.ndarray]:
    """(metrics row, eigenvalues) of one (longname, layer_type, weight); never raises."""
    longname, layer_type, weight = item
    try:
        return layer_metrics(weight, layer_type, longname, settings, device)
    except Exception as error:  # one layer's maths must not kill the model
        return _failed_row(longname, layer_type, weight, error, settings), np.empty(0)


def _selected_layers(layers: Iterable, names) -> Iterator:
    """The layers whose longname is in `names` (all when names is None), lazily."""
    wanted = None if names is None else set(names)
    for item in layers:
        if wanted is None or item[0] in wanted:
            yield item


def analyze_layers(layers: Iterable, settings: ESDSettings = ESDSettings(), *, device_ids=None,
                   device=None, names=None, eigs_out: Optional[dict] = None,
                   progress: Optional[Callable[[int, str], None]] = None):
    """pandas DataFrame: one row per (longname, layer_type, tensor) of `layers`, in their order,
    with the columns `esd_columns(settings)`.

    layers: any iterable, consumed lazily by a prefetch thread (esd/pipeline.py): at most ~2
        layers alive on CPU (two computed at once on ≥ 2 cores, else the one computed and the
        next one being read).
    names: optional collection of longnames to analyse (others are skipped).
    eigs_out: optional dict, filled with longname -> ascending eigenvalues (np.float64).
    device_ids: CUDA device indices to spread layers over (ignored without CUDA);
        otherwise `device` (default CPU).
    progress: optional callback(layers_done, longname) after each layer, in iterator order
        (called from the worker threads when layers are computed side by side).
    Errors raised by the iterator propagate; a layer whose maths fails gets a row whose
    fit_status starts with 'error:'.
    """
    import pandas as pd

    from esd.pipeline import resolve_devices, run_on_devices
    done = iter(range(1, 1 << 62))
    count_lock = threading.Lock()

    def on_layer_done(longname: str) -> None:
        with count_lock:
            count = next(done)
        if progress is not None:
            progress(count, longname)

    outputs = run_on_devices(_selected_layers(layers, names), resolve_devices(device_ids, device),
                             lambda item, dev: _layer_row(item, settings, dev), on_layer_done)
    if eigs_out is not None:
        for row, evals in outputs:
            eigs_out[row["longname"]] = evals
    return pd.DataFrame([row for row, _ in outputs], columns=esd_columns(settings))


def net_esd_estimator(net, EVALS_THRESH=1e-5, bins=100, fix_fingers="xmin_mid", xmin_pos=2,
                      conv_norm=0.5, filter_zeros=True, device_ids=None, *, parallel=True,
                      layers=None, min_evals=10, randomize=False, randomize_seed=0, mp_fit=False,
                      eigs_out: Optional[dict] = None, device=None,
                      progress: Optional[Callable[[int, str], None]] = None):
    """The compatibility entry, with the keywords of the circulating `net_esd_estimator`
    copies: one row per analysed layer of `net` (see `analyze_layers`).

    net: an nn.Module (every Linear, Conv1D, Conv1d, Conv2d, Embedding; tied weights once)
        or any iterable of (longname, layer_type, tensor).
    parallel: False computes on the first of device_ids only (the copies' switch).
    layers: optional collection of longnames to analyse.
    The other keywords are the fields of ESDSettings (EVALS_THRESH = evals_thresh); bad
    values raise ValueError naming the parameter.
    """
    settings = ESDSettings(fix_fingers=fix_fingers, evals_thresh=EVALS_THRESH, bins=bins,
                           xmin_pos=xmin_pos, conv_norm=conv_norm, filter_zeros=filter_zeros,
                           min_evals=min_evals, randomize=randomize, randomize_seed=randomize_seed,
                           mp_fit=mp_fit)
    source = iter_model_layers(net) if isinstance(net, torch.nn.Module) else iter(net)
    if device_ids and not parallel:
        device_ids = list(device_ids)[:1]
    return analyze_layers(source, settings, device_ids=device_ids, device=device, names=layers,
                          eigs_out=eigs_out, progress=progress)
