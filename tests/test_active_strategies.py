"""Active-learning query strategies on synthetic arrays: uncertainty sampling, core-set, BADGE,
TypiClust, input checks and the registry's declarations."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_core.active import QUERY_STRATEGIES, PoolView, gradient_embeddings, select
from cifar_core.params import ConfigError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def random_pool(n: int = 200, classes: int = 5, dim: int = 8, labeled: int = 10, seed: int = 0) -> PoolView:
    rng = np.random.default_rng(seed)
    return PoolView(probs=softmax(rng.normal(size=(n, classes)) * 2),
                    embeddings=rng.normal(size=(n, dim)).astype(np.float32),
                    labeled_embeddings=rng.normal(size=(labeled, dim)).astype(np.float32))


def blob(center, count: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    return (np.asarray(center, dtype=np.float32) + spread * rng.normal(size=(count, len(center)))).astype(np.float32)


# ---- every strategy -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUERY_STRATEGIES.names())
def test_every_strategy_returns_budget_distinct_pool_indices_the_same_per_seed(name):
    pool = random_pool()
    picked, scores = select(name, None, pool, 25, seed=3)
    again, again_scores = select(name, None, pool, 25, seed=3)
    assert picked.dtype == np.int64 and len(picked) == 25 == len(np.unique(picked))
    assert picked.min() >= 0 and picked.max() < 200
    assert scores.shape == (25,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(picked, again)
    np.testing.assert_array_equal(scores, again_scores)


@pytest.mark.parametrize("name", QUERY_STRATEGIES.names())
def test_every_strategy_can_take_the_whole_pool(name):
    pool = random_pool(n=30, labeled=3)
    picked, _ = select(name, None, pool, 30, seed=0)
    assert sorted(picked) == list(range(30))


def test_random_selection_needs_only_a_size_and_depends_on_the_seed():
    first, scores = select("random", None, PoolView(size=1000), 10, seed=0)
    assert not scores.any()
    assert set(first) != set(select("random", None, PoolView(size=1000), 10, seed=1)[0])


# ---- uncertainty --------------------------------------------------------------------------------

# Each uncertainty measure ranks these rows differently: least confidence favours the flattest top
# class (row 2), margin the tie between the top two (row 1), entropy the mass spread over four (row 3).
SEPARATING_PROBS = np.array([
    [0.97, 0.01, 0.01, 0.01],
    [0.50, 0.50, 0.00, 0.00],   # 1 - max 0.50, margin 0.00, entropy 0.693
    [0.34, 0.33, 0.33, 0.00],   # 1 - max 0.66, margin 0.01, entropy 1.099
    [0.40, 0.20, 0.20, 0.20],   # 1 - max 0.60, margin 0.20, entropy 1.332
    [0.90, 0.05, 0.05, 0.00],
])


@pytest.mark.parametrize("name, expected", [
    ("least_confidence", [2, 3, 1]),
    ("margin", [1, 2, 3]),
    ("entropy", [3, 2, 1]),
])
def test_uncertainty_picks_the_most_uncertain_rows_in_order(name, expected):
    picked, scores = select(name, None, PoolView(probs=SEPARATING_PROBS), 3, seed=0)
    assert list(picked) == expected
    assert np.all(np.diff(scores) <= 0)


def test_the_three_uncertainty_measures_disagree_on_the_separating_case():
    firsts = {name: select(name, None, PoolView(probs=SEPARATING_PROBS), 1, seed=0)[0][0]
              for name in ("least_confidence", "margin", "entropy")}
    assert len(set(firsts.values())) == 3


def test_uncertainty_scores_are_the_measures():
    pool = PoolView(probs=SEPARATING_PROBS)
    assert select("least_confidence", None, pool, 1, seed=0)[1][0] == pytest.approx(0.66)
    assert select("margin", None, pool, 1, seed=0)[1][0] == pytest.approx(1.0)
    assert select("entropy", None, pool, 1, seed=0)[1][0] == pytest.approx(
        -(0.4 * np.log(0.4) + 3 * 0.2 * np.log(0.2)))


def test_equal_uncertainties_are_ordered_by_the_seed():
    pool = PoolView(probs=np.full((100, 4), 0.25))
    by_seed = [tuple(select("entropy", None, pool, 5, seed=seed)[0]) for seed in (0, 0, 1)]
    assert by_seed[0] == by_seed[1] != by_seed[2]


# ---- core-set -----------------------------------------------------------------------------------

def test_coreset_takes_a_lone_far_cluster_before_points_near_the_labeled_set():
    rng = np.random.default_rng(0)
    near = blob([0, 0], 50, 0.3, rng)
    far = blob([10, 10], 3, 0.1, rng)
    pool = PoolView(embeddings=np.concatenate([near, far]), labeled_embeddings=blob([0, 0], 5, 0.3, rng))
    picked, scores = select("coreset", None, pool, 2, seed=0)
    assert picked[0] >= 50
    assert scores[0] == pytest.approx(np.linalg.norm(far[picked[0] - 50]), rel=0.1)


def test_coreset_is_the_k_center_greedy_and_its_radius_never_grows():
    pool = random_pool(n=150, dim=6, labeled=8, seed=1)
    picked, radii = select("coreset", None, pool, 40, seed=0)
    centers = list(pool.labeled_embeddings)
    for pick, radius in zip(picked, radii):
        nearest = np.linalg.norm(pool.embeddings[:, None] - np.array(centers)[None], axis=2).min(axis=1)
        assert nearest[pick] == pytest.approx(nearest.max(), rel=1e-4)
        assert radius == pytest.approx(nearest.max(), rel=1e-4)
        centers.append(pool.embeddings[pick])
    assert np.all(np.diff(radii) <= 0)


def test_coreset_without_labeled_images_starts_at_a_seeded_random_point():
    pool = random_pool(labeled=0)
    picked, radii = select("coreset", None, pool, 10, seed=5)
    np.testing.assert_array_equal(picked, select("coreset", None, pool, 10, seed=5)[0])
    assert picked[0] != select("coreset", None, pool, 10, seed=6)[0][0]
    assert np.isfinite(radii).all() and np.all(np.diff(radii) <= 0)


def test_coreset_of_100_from_40000_by_512_completes():
    rng = np.random.default_rng(0)
    pool = PoolView(embeddings=rng.normal(size=(40_000, 512)).astype(np.float32),
                    labeled_embeddings=rng.normal(size=(1_000, 512)).astype(np.float32))
    started = time.perf_counter()
    picked, _ = select("coreset", None, pool, 100, seed=0)
    print(f"core-set: 100 of 40,000 × 512 (1,000 labeled) in {time.perf_counter() - started:.2f} s")
    assert len(np.unique(picked)) == 100


# ---- BADGE --------------------------------------------------------------------------------------

def test_gradient_embedding_is_the_cross_entropy_gradient_of_the_head_at_the_pseudo_label():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4).double()
    features = torch.randn(5, 6, dtype=torch.float64)
    probs = torch.softmax(head(features), dim=1).detach().numpy()
    embeddings = gradient_embeddings(probs, features.numpy())
    for i in range(len(features)):
        head.zero_grad()
        logits = head(features[i:i + 1])
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        np.testing.assert_allclose(embeddings[i], head.weight.grad.numpy().ravel(), rtol=1e-10, atol=1e-12)


def test_badge_is_k_means_plus_plus_on_the_gradient_embeddings():
    pool = random_pool(n=80, classes=4, dim=5, seed=2)
    picked, scores = select("badge", None, pool, 12, seed=0)
    embedded = gradient_embeddings(pool.probs, pool.embeddings)
    norms = np.linalg.norm(embedded, axis=1)
    assert picked[0] == np.argmax(norms) and scores[0] == pytest.approx(norms.max(), rel=1e-5)
    for step in range(1, len(picked)):
        distances = np.linalg.norm(embedded[picked[:step]] - embedded[picked[step]], axis=1)
        assert scores[step] == pytest.approx(distances.min(), rel=1e-4, abs=1e-6)


def test_badge_spreads_over_two_tight_clusters_of_equal_uncertainty():
    rng = np.random.default_rng(0)
    features = np.concatenate([blob([5, 0, 0], 30, 1e-3, rng), blob([0, 5, 0], 30, 1e-3, rng)])
    pool = PoolView(probs=np.tile([0.5, 0.3, 0.2], (60, 1)), embeddings=features)
    for seed in range(5):
        picked, _ = select("badge", None, pool, 2, seed=seed)
        assert sorted(picked // 30) == [0, 1]


# ---- TypiClust ----------------------------------------------------------------------------------

BLOB_CENTERS = np.array([[0, 0], [20, 0], [0, 20]], dtype=np.float32)


def three_blobs(sizes=(150, 200, 100), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([blob(center, size, 1.0, rng) for center, size in zip(BLOB_CENTERS, sizes)])


def nearest_blob(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None] - BLOB_CENTERS[None], axis=2).argmin(axis=1)


def test_typiclust_covers_the_uncovered_clusters_largest_first_with_typical_points():
    embeddings = three_blobs()
    pool = PoolView(embeddings=embeddings, labeled_embeddings=np.zeros((1, 2), dtype=np.float32))
    picked, scores = select("typiclust", None, pool, 2, seed=0)
    assert list(nearest_blob(embeddings[picked])) == [1, 2]
    for pick, blob_id in zip(picked, (1, 2)):
        members = embeddings[nearest_blob(embeddings) == blob_id]
        median_radius = np.median(np.linalg.norm(members - BLOB_CENTERS[blob_id], axis=1))
        assert np.linalg.norm(embeddings[pick] - BLOB_CENTERS[blob_id]) < median_radius  # in the dense half
    assert (scores > 0).all()


def test_typiclust_prefers_a_dense_point_to_an_outlier_of_its_cluster():
    rng = np.random.default_rng(1)
    embeddings = np.concatenate([blob([0, 0], 60, 0.2, rng), blob([3, 3], 4, 2.0, rng)])
    pool = PoolView(embeddings=embeddings, labeled_embeddings=np.empty((0, 2), dtype=np.float32))
    picked, _ = select("typiclust", None, pool, 1, seed=0)
    assert picked[0] < 60 and np.linalg.norm(embeddings[picked[0]]) < 0.2


def test_typiclust_from_nothing_labeled_takes_one_per_cluster():
    embeddings = three_blobs(seed=3)
    pool = PoolView(embeddings=embeddings, labeled_embeddings=np.empty((0, 2), dtype=np.float32))
    picked, _ = select("typiclust", None, pool, 3, seed=0)
    assert sorted(nearest_blob(embeddings[picked])) == [0, 1, 2]


# ---- input checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, pool, budget, message", [
    ("entropy", PoolView(probs=SEPARATING_PROBS), 0, "budget must be at least 1"),
    ("entropy", PoolView(probs=SEPARATING_PROBS), 6, r"budget 6 is larger than the unlabeled pool \(5 images\)"),
    ("entropy", PoolView(probs=SEPARATING_PROBS), 2.5, "budget must be a whole number"),
    ("coreset", PoolView(probs=SEPARATING_PROBS, labeled_embeddings=np.zeros((1, 3))), 2,
     "query strategy coreset needs embeddings"),
    ("coreset", PoolView(embeddings=np.zeros((5, 3))), 2, r"needs labeled_embeddings \(an empty \(0, D\) array"),
    ("entropy", PoolView(embeddings=np.zeros((5, 3))), 2, "query strategy entropy needs probs"),
    ("margin", PoolView(probs=np.where(np.eye(5, 4) > 0, np.nan, SEPARATING_PROBS)), 1,
     r"probs: 4 values are NaN or infinite \(the first in row 0\)"),
    ("margin", PoolView(probs=SEPARATING_PROBS * 2), 1, "probs: row 0 sums to 2, not 1"),
    ("margin", PoolView(probs=SEPARATING_PROBS[:, :1]), 1, "at least 2"),
    ("margin", PoolView(probs=SEPARATING_PROBS[0]), 1, r"expected a 2-D array .* got shape \(4,\)"),
    ("badge", PoolView(probs=SEPARATING_PROBS, embeddings=np.zeros((4, 3))), 1,
     r"disagree on the number of images \(probs 5, embeddings 4\)"),
    ("coreset", PoolView(embeddings=np.zeros((5, 3)), labeled_embeddings=np.zeros((2, 4))), 1,
     "labeled_embeddings have 4 columns but embeddings have 3"),
    ("random", PoolView(), 1, "nothing says how many images"),
    ("uncertain", PoolView(size=5), 1, r"unknown query strategy 'uncertain' \(choose from: random,"),
])
def test_bad_inputs_are_config_errors_that_say_what_is_wrong(name, pool, budget, message):
    with pytest.raises(ConfigError, match=message):
        select(name, None, pool, budget, seed=0)


def test_bad_parameters_and_seeds_are_config_errors():
    pool = random_pool(n=20)
    with pytest.raises(ConfigError, match=r"typiclust\.neighbors: 0 is below the minimum 1"):
        select("typiclust", {"neighbors": 0}, pool, 2, seed=0)
    with pytest.raises(ConfigError, match="coreset: unknown parameter"):
        select("coreset", {"k": 3}, pool, 2, seed=0)
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        select("random", None, pool, 2, seed=-1)


# ---- declarations -------------------------------------------------------------------------------

def test_the_registry_describes_every_strategy_as_json():
    described = json.loads(json.dumps(QUERY_STRATEGIES.describe()))
    by_name = {entry["name"]: entry for entry in described}
    assert set(by_name) == {"random", "least_confidence", "margin", "entropy", "coreset", "badge", "typiclust"}
    assert {"needs_embeddings", "needs_labeled"} <= set(by_name["coreset"]["tags"])
    assert [p["name"] for p in by_name["typiclust"]["params"]][0] == "neighbors"
    assert all(entry["description"] for entry in described)
