"""Tests for bnport.score.metrics against independent computations.

References: scikit-learn's `roc_curve`; insightface's nearest-point rule written out as eval_ijbc.py does it on top of
`roc_curve`; a brute-force loop over thresholds for the strict rule; insightface's `calculate_roc` re-implemented with
`sklearn.model_selection.KFold` and a loop over thresholds; naive resampling of the score list for the bootstrap.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from bnport.errors import BnportError
from bnport.score import metrics
from bnport.score.metrics import (
    DEFAULT_FPRS,
    compute_roc,
    compute_tpr_at_fpr,
    compute_verification_accuracy,
    compute_verification_accuracy_from_distances,
    normalize_embeddings,
)

KINDS = ("random", "tied", "coarse32", "separated", "equal", "genuine-lowest")


def make_scores(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (both classes present) and scores of one kind: continuous, tied, float32 with few values, perfectly
    separated, all equal, or continuous with a genuine pair scoring lowest of all."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(np.int64)
    labels[:2] = [1, 0]
    rng.shuffle(labels)
    scores = rng.normal(labels * rng.uniform(0.5, 3.0), 1.0)
    if kind == "tied":
        scores = np.round(scores, 1)
    elif kind == "coarse32":
        scores = np.round(scores).astype(np.float32)
    elif kind == "separated":
        scores = np.where(labels == 1, 2.0 + rng.random(n), rng.random(n))
    elif kind == "equal":
        scores = np.full(n, 0.25)
    elif kind == "genuine-lowest":
        scores[np.flatnonzero(labels == 1)[0]] = scores.min() - 1.0
    return labels, scores


def eval_ijbc_tpr(labels, scores, targets) -> list[tuple[float, float, float]]:
    """insightface eval_ijbc.py, step 5: roc_curve, flipud, then the min over (|fpr - x|, index) tuples."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fpr, tpr, thresholds = np.flipud(fpr), np.flipud(tpr), np.flipud(thresholds)
    out = []
    for target in targets:
        _, min_index = min(list(zip(abs(fpr - target), range(len(fpr)))))
        out.append((tpr[min_index], fpr[min_index], thresholds[min_index]))
    return out


def brute_force_strict(labels, scores, target) -> float:
    """Best TPR over every threshold (+inf and each distinct score) whose FPR is <= target."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    best = 0.0
    for threshold in np.unique(scores):
        if np.count_nonzero(impostor >= threshold) / impostor.size <= target:
            best = max(best, np.count_nonzero(genuine >= threshold) / genuine.size)
    return best


CASES = [(kind, n, seed) for kind in KINDS for n, seed in ((2, 0), (9, 1), (60, 2), (400, 3), (1500, 4))]


# ------------------------------------------------------------------------------------------------------------ ROC

@pytest.mark.parametrize("kind,n,seed", CASES)
@pytest.mark.parametrize("drop", [True, False])
def test_roc_equals_sklearn(kind, n, seed, drop):
    labels, scores = make_scores(kind, n, seed)
    roc = compute_roc(labels, scores, drop_intermediate=drop)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=drop)
    np.testing.assert_array_equal(roc.fpr, fpr)
    np.testing.assert_array_equal(roc.tpr, tpr)
    np.testing.assert_array_equal(roc.thresholds, thresholds)
    assert roc.n_genuine == labels.sum() and roc.n_impostor == (labels == 0).sum()


def test_roc_all_scores_equal_is_the_diagonal_ends():
    roc = compute_roc([1, 0, 0, 1, 0], [0.3] * 5)
    np.testing.assert_array_equal(roc.fpr, [0, 1])
    np.testing.assert_array_equal(roc.tpr, [0, 1])
    np.testing.assert_array_equal(roc.thresholds, [np.inf, 0.3])


@pytest.mark.parametrize("seed", range(4))
def test_roc_is_monotone_and_labels_may_be_bool_or_float(seed):
    labels, scores = make_scores("tied", 300, seed)
    roc = compute_roc(labels, scores)
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0) and np.all(np.diff(roc.thresholds) < 0)
    assert roc.fpr[0] == roc.tpr[0] == 0 and roc.fpr[-1] == roc.tpr[-1] == 1
    for other in (labels.astype(bool), labels.astype(np.float32)):
        np.testing.assert_array_equal(compute_roc(other, scores).tpr, roc.tpr)


def test_roc_decimated_for_plots_keeps_a_subset_of_vertices():
    labels, scores = make_scores("random", 20000, 5)
    full = compute_roc(labels, scores)
    thin = compute_roc(labels, scores, max_points=50)
    assert thin.decimated and not full.decimated and full.fpr.size > 50 >= thin.fpr.size > 10
    idx = np.searchsorted(-full.thresholds, -thin.thresholds)
    np.testing.assert_array_equal(full.thresholds[idx], thin.thresholds)
    np.testing.assert_array_equal(full.fpr[idx], thin.fpr)
    np.testing.assert_array_equal(full.tpr[idx], thin.tpr)
    assert idx[0] == 0 and idx[-1] == full.fpr.size - 1
    json.dumps(thin.to_dict(), allow_nan=False)


@pytest.mark.parametrize("labels,scores,what", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "no impostor"),
    ([0, 0], [0.1, 0.2], "no genuine"),
    ([1, 0, 0], [0.1, np.nan, 0.3], "NaN"),
    ([1, 0, 0], [0.1, np.inf, 0.3], "infinite"),
    ([1, 0, 2], [0.1, 0.2, 0.3], "labels must be"),
    ([1, 0, 0.5], [0.1, 0.2, 0.3], "labels must be"),
    ([1, 0], [0.1, 0.2, 0.3], "same length"),
    ([], [], "no pairs"),
])
def test_bad_input_is_a_user_error(labels, scores, what):
    for call in (compute_roc, compute_tpr_at_fpr):
        with pytest.raises(BnportError, match=what):
            call(labels, scores)


def test_one_class_empty_where_sklearn_gives_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, _, _ = roc_curve([1, 1, 1], [0.1, 0.2, 0.3])
    assert np.isnan(fpr).all()
    with pytest.raises(BnportError) as info:
        compute_tpr_at_fpr([1, 1, 1], [0.1, 0.2, 0.3])
    assert info.value.hint


# -------------------------------------------------------------------------------------------------------- TPR@FPR

@pytest.mark.parametrize("kind,n,seed", CASES)
def test_insightface_rule_equals_eval_ijbc(kind, n, seed):
    labels, scores = make_scores(kind, n, seed)
    n_imp = int((labels == 0).sum())
    targets = sorted(set(DEFAULT_FPRS) | {0.05, 0.3, 0.5, 0.9, 1.0, min(1.0, 1 / n_imp), min(1.0, 1.5 / n_imp)})
    table = compute_tpr_at_fpr(labels, scores, fprs=targets)
    for cell, (tpr, fpr, threshold) in zip(table.row("insightface"), eval_ijbc_tpr(labels, scores, targets)):
        assert (cell.tpr, cell.fpr, cell.threshold) == (tpr, fpr, threshold), cell


@pytest.mark.parametrize("kind,n,seed", CASES)
def test_strict_rule_equals_brute_force(kind, n, seed):
    labels, scores = make_scores(kind, n, seed)
    targets = np.unique(np.concatenate([DEFAULT_FPRS, np.linspace(0.01, 1, 12)]))
    table = compute_tpr_at_fpr(labels, scores, fprs=targets)
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    previous = 0.0
    for cell in table.row("strict"):
        assert cell.tpr == brute_force_strict(labels, scores, cell.fpr_target)
        assert 0.0 <= cell.tpr <= 1.0 and cell.tpr >= previous and cell.fpr <= cell.fpr_target
        previous = cell.tpr
        # the reported point is what the reported threshold gives
        assert cell.tpr == np.count_nonzero(genuine >= cell.threshold) / genuine.size
        assert cell.fpr == np.count_nonzero(impostor >= cell.threshold) / impostor.size


def test_strict_rule_at_targets_that_are_exact_ratios():
    # 0.29 * 100 is 28.999999999999996 in float64, yet 29 / 100 == 0.29: the strict rule must allow 29 impostors
    rng = np.random.default_rng(8)
    labels = np.r_[np.ones(20, int), np.zeros(100, int)]
    scores = rng.normal(labels, 1.0)
    targets = [0.07, 0.14, 0.29, 0.57, 0.58, 0.83]
    table = compute_tpr_at_fpr(labels, scores, fprs=targets)
    for cell in table.row("strict"):
        assert cell.tpr == brute_force_strict(labels, scores, cell.fpr_target)
    assert table.cell("strict", 0.29).fpr == 0.29
    for n in range(1, 160):
        for target in np.linspace(0.001, 1, 97).tolist() + [0.29, 0.57, 0.58]:
            c = metrics._last_count_within(target, n)
            assert c / n <= target and (c == n or (c + 1) / n > target)


def test_hand_made_rules_and_ties():
    # 3 genuine above 4 impostors: vertices (0,0) (0,1/3) (0,1) (1,1); at 1e-6 the last of the three at FPR 0 wins
    table = compute_tpr_at_fpr([1, 1, 1, 0, 0, 0, 0], [.9, .8, .7, .3, .2, .1, .0], fprs=[1e-6])
    assert table.cell("insightface", 1e-6).tpr == 1.0 and table.cell("strict", 1e-6).tpr == 1.0
    # an impostor on top: the insightface rule reads 0 at 0.01 and jumps above the target at 0.2; strict stays 0
    table = compute_tpr_at_fpr([0, 1, 1, 0, 0, 0], [.9, .8, .7, .1, .05, .0], fprs=[0.01, 0.2])
    assert table.cell("insightface", 0.01).tpr == 0.0
    assert (table.cell("insightface", 0.2).tpr, table.cell("insightface", 0.2).fpr) == (1.0, 0.25)
    assert table.cell("strict", 0.2).tpr == 0.0 and table.cell("strict", 0.2).threshold == np.inf
    # FPR 0 and 0.5 equally far from 0.25: the higher FPR wins (first after the flip), with its highest TPR
    table = compute_tpr_at_fpr([1, 0, 1, 0], [.9, .8, .7, .6], fprs=[0.25])
    assert (table.cell("insightface", 0.25).tpr, table.cell("insightface", 0.25).fpr) == (1.0, 0.5)
    assert (table.cell("strict", 0.25).tpr, table.cell("strict", 0.25).threshold) == (0.5, 0.9)


def test_unreliable_flag_and_json():
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(100, int), np.zeros(1000, int)]  # 1000 impostors: exactly 10 / 1e-2
    scores = rng.normal(labels, 1.0)
    table = compute_tpr_at_fpr(labels, scores)
    assert [c.unreliable for c in table.row("strict")] == [True, True, True, True, False, False]
    text = json.dumps(table.to_dict(), allow_nan=False)
    assert json.loads(text)["cells"][0]["rule"] == "insightface"
    assert "*" in str(table)


def test_bad_fpr_targets_and_bootstrap_counts():
    labels, scores = make_scores("random", 50, 0)
    for fprs in ([0.0], [1.5], [], [-1e-3]):
        with pytest.raises(BnportError, match="FPR targets"):
            compute_tpr_at_fpr(labels, scores, fprs=fprs)
    with pytest.raises(BnportError, match="bootstrap"):
        compute_tpr_at_fpr(labels, scores, bootstrap=1)


# ------------------------------------------------------------------------------------------ fast path (the region)

def boundary_cases():
    """Score sets where the region cut lands on ties, on genuine scores, or leaves the answer just outside."""
    rng = np.random.default_rng(11)
    out = []
    labels = np.r_[np.ones(40, int), np.zeros(300, int)]
    out.append(("tied", labels, np.round(np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 300)], 1)))
    out.append(("genuine-on-impostor-values", labels, np.r_[np.round(rng.normal(1, 1, 40), 1),
                                                            np.round(rng.normal(0, 1, 300), 1)]))
    out.append(("separated", labels, np.r_[2 + rng.random(40), rng.random(300)]))
    out.append(("sparse-genuine", np.r_[np.ones(3, int), np.zeros(300, int)], np.r_[[5.0, 0.5, -1.0],
                                                                                  rng.normal(0, 1, 300)]))
    out.append(("coarse", labels, np.round(np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 300)])))
    out.append(("genuine-lowest", labels, np.r_[-9.0, rng.normal(1, 1, 39), rng.normal(0, 1, 300)]))
    return out


@pytest.mark.parametrize("name,labels,scores", boundary_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_region_equals_whole_roc_at_every_cut(name, labels, scores):
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    genuine_sorted = np.sort(genuine)
    targets = np.array([1e-3, 1 / 300, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
    whole = metrics._evaluate_region(metrics._build_region(genuine_sorted, impostor, impostor.size), targets)
    unsettled = 0
    for n_keep in range(1, impostor.size + 1):
        region = metrics._build_region(genuine_sorted, impostor, n_keep, with_index=True)
        # the bootstrap's maps: every pair scoring >= the cut to its threshold, genuine pairs below it to the end
        ascending, n = region.thresholds[::-1], region.thresholds.size
        above = impostor[impostor >= ascending[0]]
        expected = np.sort(n - 1 - np.searchsorted(ascending, above))
        np.testing.assert_array_equal(np.sort(region.impostor_index), expected)
        np.testing.assert_array_equal(region.genuine_index, np.where(
            genuine_sorted >= ascending[0], n - 1 - np.searchsorted(ascending, genuine_sorted), n))
        assert region.impostor_counts.sum() == above.size
        for i, target in enumerate(targets):
            part = metrics._evaluate_region(region, targets[i:i + 1])
            if part is None:
                unsettled += 1
            else:
                np.testing.assert_array_equal(part[:, :, 0], whole[:, :, i])
        _, settled = metrics._settle(genuine_sorted, impostor, targets, n_keep=n_keep)
        np.testing.assert_array_equal(settled, whole)
    assert unsettled > 0  # the fallback (growing the region) was needed for some cuts


def test_fast_path_on_a_large_set_equals_sklearn():
    rng = np.random.default_rng(3)
    n, n_gen = 300_000, 600
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.choice(n, n_gen, replace=False)] = 1
    scores = np.where(labels == 1, rng.normal(0.5, 0.15, n), rng.normal(0.0, 0.1, n)).astype(np.float32)
    targets = [1e-5, 1e-4, 1e-3, 1e-2]
    genuine_sorted = np.sort(scores[labels == 1])
    region, _ = metrics._settle(genuine_sorted, scores[labels == 0], np.array(targets))
    assert not region.complete and region.impostor_counts.sum() < 0.05 * n
    table = compute_tpr_at_fpr(labels, scores, fprs=targets)
    for cell, (tpr, fpr, threshold) in zip(table.row("insightface"), eval_ijbc_tpr(labels, scores, targets)):
        assert (cell.tpr, cell.fpr, cell.threshold) == (tpr, fpr, threshold)


# --------------------------------------------------------------------------------------------------- bootstrap

def resample_route(genuine, impostor, targets):
    """The naive replicate: the resampled score list through roc_curve; (TPR, FPR, threshold) by both rules."""
    labels = np.r_[np.ones(genuine.size, int), np.zeros(impostor.size, int)]
    scores = np.r_[genuine, impostor]
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    last = [np.flatnonzero(fpr <= t)[-1] for t in targets]
    strict = [tpr[last], fpr[last], thresholds[last]]
    return np.array([np.array(eval_ijbc_tpr(labels, scores, targets)).T, strict])


@pytest.mark.parametrize("n_keep", [None, 80])
@pytest.mark.parametrize("decimals", [1, None])
def test_weighted_counts_equal_sklearn_on_the_resampled_list(n_keep, decimals):
    rng = np.random.default_rng(5)
    genuine, impostor = rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 500)
    if decimals is not None:
        genuine, impostor = np.round(genuine, decimals), np.round(impostor, decimals)
    targets = np.array([0.002, 0.01, 0.05])
    genuine_sorted, impostor_sorted = np.sort(genuine), np.sort(impostor)
    region = metrics._build_region(genuine_sorted, impostor, impostor.size if n_keep is None else n_keep,
                                   with_index=True)
    ascending = region.thresholds[::-1]
    settled = 0
    for _ in range(40):
        g = genuine_sorted[rng.integers(0, genuine.size, genuine.size)]
        i = impostor_sorted[rng.integers(0, impostor.size, impostor.size)]
        i_in, g_in = i[i >= ascending[0]], g[g >= ascending[0]]
        n = ascending.size
        imp_counts = np.bincount(n - 1 - np.searchsorted(ascending, i_in), minlength=n)
        gen_counts = np.bincount(n - 1 - np.searchsorted(ascending, g_in), minlength=n)
        result = metrics._evaluate(region.thresholds, imp_counts, gen_counts, genuine.size, impostor.size,
                                   region.complete, targets)
        if result is not None:
            settled += 1
            np.testing.assert_array_equal(result, resample_route(g, i, targets))
    assert settled >= (40 if n_keep is None else 10)


def test_bootstrap_agrees_in_distribution_with_naive_resampling():
    rng = np.random.default_rng(9)
    genuine, impostor = rng.normal(1.2, 1.0, 40), rng.normal(0.0, 1.0, 400)
    targets = np.array([0.01, 0.1])
    genuine_sorted = np.sort(genuine)
    region, _ = metrics._settle(genuine_sorted, impostor, targets, with_index=True)
    ours = metrics._bootstrap_tprs(region, genuine_sorted, impostor, targets, 800, seed=1)
    naive = np.array([resample_route(rng.choice(genuine, genuine.size), rng.choice(impostor, impostor.size),
                                     targets)[:, 0] for _ in range(800)])
    spread = np.sqrt((ours.var(axis=0) + naive.var(axis=0)) / 800)
    assert np.all(np.abs(ours.mean(axis=0) - naive.mean(axis=0)) < 4 * spread + 1e-12)
    for q in (2.5, 50, 97.5):
        assert np.all(np.abs(np.percentile(ours, q, axis=0) - np.percentile(naive, q, axis=0)) <= 2 / 40 + 1e-12)


def test_bootstrap_falls_back_to_the_whole_roc_when_the_region_cannot_settle():
    rng = np.random.default_rng(2)
    genuine, impostor = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 500)
    targets = np.array([0.01, 0.1])
    genuine_sorted = np.sort(genuine)
    tiny = metrics._build_region(genuine_sorted, impostor, 3, with_index=True)
    whole = metrics._build_region(genuine_sorted, impostor, impostor.size, with_index=True)
    assert metrics._replicate(tiny, np.random.default_rng(0), targets) is None
    fallback = metrics._bootstrap_tprs(tiny, genuine_sorted, impostor, targets, 400, seed=0)
    direct = metrics._bootstrap_tprs(whole, genuine_sorted, impostor, targets, 400, seed=0)
    spread = np.sqrt((fallback.var(axis=0) + direct.var(axis=0)) / 400)
    assert np.all(np.abs(fallback.mean(axis=0) - direct.mean(axis=0)) < 4 * spread + 1e-12)


def bootstrap_scores(n_gen, n_imp, seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_gen, int), np.zeros(n_imp, int)]
    return labels, np.r_[rng.normal(0.5, 0.15, n_gen), rng.normal(0.0, 0.1, n_imp)]


def test_bootstrap_intervals_contain_the_estimate_reproduce_and_shrink():
    fprs = [1e-3, 1e-2, 1e-1]
    labels, scores = bootstrap_scores(300, 20_000, 0)
    table = compute_tpr_at_fpr(labels, scores, fprs=fprs, bootstrap=200, seed=3)
    assert table.bootstrap == 200 and table.seed == 3
    for cell in table.cells:
        low, high = cell.interval
        assert 0 <= low <= cell.tpr <= high <= 1
    assert compute_tpr_at_fpr(labels, scores, fprs=fprs, bootstrap=200, seed=3).to_dict() == table.to_dict()
    other = compute_tpr_at_fpr(labels, scores, fprs=fprs, bootstrap=200, seed=4)
    assert [c.interval for c in other.cells] != [c.interval for c in table.cells]
    no_boot = compute_tpr_at_fpr(labels, scores, fprs=fprs)
    assert [c.tpr for c in no_boot.cells] == [c.tpr for c in table.cells]
    assert all(c.interval is None for c in no_boot.cells) and no_boot.seed is None

    big_labels, big_scores = bootstrap_scores(300 * 16, 20_000 * 16, 1)
    big = compute_tpr_at_fpr(big_labels, big_scores, fprs=fprs, bootstrap=100, seed=3)
    for small_cell, big_cell in zip(table.cells, big.cells):
        assert big_cell.interval[1] - big_cell.interval[0] < small_cell.interval[1] - small_cell.interval[0]


# -------------------------------------------------------------------------------------------- 10-fold accuracy

def insightface_calculate_roc_accuracy(embeddings1, embeddings2, issame, n_folds=10):
    """insightface eval/verification.py calculate_roc / calculate_accuracy, threshold by threshold."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    accuracy = np.zeros(n_folds)
    indices = np.arange(len(issame))
    splits = KFold(n_splits=n_folds, shuffle=False).split(indices) if n_folds > 1 else [(indices, indices)]

    def acc(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        return float(tp + tn) / d.size

    for fold, (train, test) in enumerate(splits):
        acc_train = np.array([acc(t, dist[train], issame[train]) for t in thresholds])
        accuracy[fold] = acc(thresholds[np.argmax(acc_train)], dist[test], issame[test])
    return np.mean(accuracy), np.std(accuracy), accuracy


def make_pairs(n_pairs, seed, dims=16):
    """Flip-summed float64 embeddings of pairs (interleaved, as a .bin pack runs), about half of them genuine."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    base = rng.normal(size=(n_pairs, dims))
    other = np.where(issame[:, None], base + rng.normal(scale=0.9, size=base.shape), rng.normal(size=base.shape))
    images = np.empty((2 * n_pairs, dims))
    images[0::2], images[1::2] = base, other
    flipped = images + rng.normal(scale=0.1, size=images.shape)
    return images + flipped, issame


@pytest.mark.parametrize("n_pairs,seed,n_folds", [(60, 0, 10), (203, 1, 10), (600, 2, 10), (97, 3, 5), (40, 4, 1)])
def test_verification_accuracy_equals_insightface(n_pairs, seed, n_folds):
    flip_sum, issame = make_pairs(n_pairs, seed)
    normalised = normalize(flip_sum)  # insightface: sklearn.preprocessing.normalize of the flip sums
    acc, std, folds = insightface_calculate_roc_accuracy(normalised[0::2], normalised[1::2], issame, n_folds)
    result = compute_verification_accuracy(flip_sum[0::2], flip_sum[1::2], issame, n_folds=n_folds)
    assert (result.accuracy, result.std) == (acc, std)
    assert result.fold_accuracies == tuple(folds) and result.n_folds == n_folds and result.n_pairs == n_pairs
    same = compute_verification_accuracy(normalised[0::2], normalised[1::2], issame.astype(int), n_folds=n_folds,
                                         normalize=False)
    assert (same.accuracy, same.std) == (acc, std)
    json.dumps(result.to_dict(), allow_nan=False)


def test_verification_accuracy_hand_computed():
    # folds {0,1} and {2,3}. Fold 0 trains on (0.6 same, 1.9 diff): first perfect threshold 0.61, and the test
    # pairs (0.5 same, 2.0 diff) are both right. Fold 1 trains on (0.5, 2.0): threshold 0.51 rejects the genuine
    # test pair at 0.6 and rejects the impostor at 1.9: accuracy 0.5. Mean 0.75, population std 0.25.
    result = compute_verification_accuracy_from_distances([0.5, 2.0, 0.6, 1.9], [True, False, True, False],
                                                          n_folds=2)
    assert result.fold_accuracies == (1.0, 0.5) and result.accuracy == 0.75 and result.std == 0.25
    assert result.fold_thresholds == pytest.approx((0.61, 0.51))


def test_normalize_embeddings_is_sklearn_normalize_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 512)).astype(np.float32) * 30
    x[3] = 0.0
    np.testing.assert_array_equal(normalize_embeddings(x), normalize(x.astype(np.float64)))
    assert not np.shares_memory(normalize_embeddings(x), x)


def test_verification_bad_input():
    with pytest.raises(BnportError, match="folds"):
        compute_verification_accuracy_from_distances([0.1, 0.2, 0.3], [True, False, True])
    with pytest.raises(BnportError, match="NaN"):
        compute_verification_accuracy_from_distances([np.nan] * 20, [True, False] * 10)
    with pytest.raises(BnportError, match="issame"):
        compute_verification_accuracy_from_distances([0.1] * 20, [2] * 20)
    with pytest.raises(BnportError, match="one shape"):
        compute_verification_accuracy(np.ones((10, 4)), np.ones((9, 4)), [True] * 10)
