"""Active-learning query strategies: which unlabeled images to label next.

Each strategy is one function plus a registry entry that declares its parameters and, as tags, the
inputs it reads from the `PoolView` (the model's softmax on the pool, penultimate embeddings of the
pool and of the labeled set). `select` checks the inputs, then returns the indices of `budget`
distinct pool images, most wanted first, and a score per pick (higher = more wanted) for display.

Uncertainty sampling (least confidence, margin, entropy) ranks the softmax. Core-set is the k-center
greedy of Sener & Savarese 2018; BADGE (Ash et al. 2020) seeds k-means++ on the gradient embeddings
of the last layer; TypiClust (Hacohen et al. 2022) is made for low budgets: the most typical image of
each large cluster not yet covered by the labeled set, clustering self-supervised embeddings.

Every selection is deterministic for a given seed (ties are broken by a permutation drawn from it)
and never builds an N × N matrix: each strategy's docstring states its memory bound.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from sklearn import config_context
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

from ..params import ConfigError, Param, Registry

NEEDS_PROBS = "needs_probs"                  # tag: reads pool.probs
NEEDS_EMBEDDINGS = "needs_embeddings"        # tag: reads pool.embeddings
NEEDS_LABELED = "needs_labeled"              # tag: reads pool.labeled_embeddings (0 rows when nothing is labeled)
SELF_SUPERVISED = "self_supervised"          # tag: meant for a self-supervised encoder's embeddings, not the classifier's

QUERY_STRATEGIES = Registry("query strategy")

PROB_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PoolView:
    """What a strategy may read about the unlabeled pool; numpy arrays, one row per image.

    probs: (N, C) the model's softmax on the pool. embeddings: (N, D) the pool's embeddings
    (penultimate features, or a self-supervised encoder's for entries tagged SELF_SUPERVISED).
    labeled_embeddings: (L, D) the labeled images' embeddings in the same space, (0, D) when none.
    size: the number of pool images, when no array gives it (random selection before any model).
    """

    probs: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    size: int | None = None


Selection = tuple[np.ndarray, np.ndarray]  # (picked pool indices, int64; their scores, float64)


# ---- helpers ------------------------------------------------------------------------------------

def top_scores(scores: np.ndarray, budget: int, rng: np.random.Generator) -> Selection:
    """The `budget` highest scores, highest first; equal scores in an order drawn from `rng`."""
    shuffled = rng.permutation(len(scores))
    order = shuffled[np.argsort(-scores[shuffled], kind="stable")[:budget]]
    return order.astype(np.int64), scores[order].astype(np.float64)


def sorted_probs(probs: np.ndarray) -> np.ndarray:
    return np.sort(probs, axis=1)[:, ::-1]


def distances_to_nearest(points: np.ndarray, centers: np.ndarray, chunk_mib: int) -> np.ndarray:
    """(N,) Euclidean distance from each point to its nearest center; ≤ chunk_mib MiB of distances
    exist at a time."""
    chunks = pairwise_distances_chunked(points, centers, working_memory=chunk_mib,
                                        reduce_func=lambda block, start: block.min(axis=1))
    return np.concatenate(list(chunks)).astype(np.float64)


def distances_to_row(points: np.ndarray, sq_norms: np.ndarray, row: int) -> np.ndarray:
    """(N,) Euclidean distances from every point to points[row], from one matrix-vector product."""
    squared = sq_norms + sq_norms[row] - 2.0 * (points @ points[row]).astype(np.float64)
    return np.sqrt(np.maximum(squared, 0.0))


def row_sq_norms(points: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", points, points, dtype=np.float64)


# ---- uncertainty --------------------------------------------------------------------------------

@QUERY_STRATEGIES.register("random", description="Uniformly random images (the baseline every "
                           "strategy must beat); all scores 0.")
def random_selection(pool: PoolView, budget: int, rng: np.random.Generator) -> Selection:
    picked = rng.choice(pool.size, size=budget, replace=False).astype(np.int64)
    return picked, np.zeros(budget)


@QUERY_STRATEGIES.register("least_confidence", tags=(NEEDS_PROBS,), description="Images whose top "
                           "class probability is lowest; score 1 − max p. Memory O(N·C).")
def least_confidence(pool: PoolView, budget: int, rng: np.random.Generator) -> Selection:
    return top_scores(1.0 - pool.probs.max(axis=1), budget, rng)


@QUERY_STRATEGIES.register("margin", tags=(NEEDS_PROBS,), description="Images whose two most probable "
                           "classes are closest; score 1 − (p1 − p2). Memory O(N·C).")
def margin(pool: PoolView, budget: int, rng: np.random.Generator) -> Selection:
    ranked = sorted_probs(pool.probs)
    return top_scores(1.0 - (ranked[:, 0] - ranked[:, 1]), budget, rng)


@QUERY_STRATEGIES.register("entropy", tags=(NEEDS_PROBS,), description="Images whose softmax has the "
                           "highest entropy (nats). Memory O(N·C).")
def entropy(pool: PoolView, budget: int, rng: np.random.Generator) -> Selection:
    probs = pool.probs
    logs = np.log(np.where(probs > 0, probs, 1.0))  # 0 · log 0 = 0
    return top_scores(-(probs * logs).sum(axis=1), budget, rng)


# ---- core-set -----------------------------------------------------------------------------------

CHUNK_PARAM = Param("chunk_mib", "int", 64, 1, 4096, help="MiB of pool × labeled distances computed "
                    "at a time (only the nearest per pool image is kept).")


@QUERY_STRATEGIES.register("coreset", params=(CHUNK_PARAM,), tags=(NEEDS_EMBEDDINGS, NEEDS_LABELED),
                           description="Core-set (Sener & Savarese 2018): k-center greedy on the "
                           "embeddings, each pick the pool image farthest from the labeled and picked ones.")
def coreset(pool: PoolView, budget: int, rng: np.random.Generator, chunk_mib: int) -> Selection:
    """Greedy 2-approximation of the k-center problem: repeatedly take the image farthest from every
    center (the labeled set, then the picks) and make it one. Score: that distance, the covering
    radius before the pick, so the scores never increase. With no labeled image the first pick is
    drawn from `rng`; its score is the radius it leaves.

    Memory: the embeddings as float32 (N·D·4 bytes, 82 MB for 40,000 × 512), a few (N,) float64
    vectors and ≤ chunk_mib MiB of pool × labeled distances. Time: O(N·L·D) once, O(N·D) per pick.
    """
    points = np.ascontiguousarray(pool.embeddings, dtype=np.float32)
    labeled = pool.labeled_embeddings
    nearest = (distances_to_nearest(points, labeled, chunk_mib) if len(labeled)
               else np.full(len(points), np.inf))
    return k_center_greedy(points, nearest, budget, first=None if len(labeled) else int(rng.integers(len(points))))


def k_center_greedy(points: np.ndarray, nearest: np.ndarray, budget: int, first: int | None) -> Selection:
    """`budget` picks of the k-center greedy from `nearest` (each point's distance to the centers so
    far, inf where there are none); `first` overrides the first pick."""
    sq_norms = row_sq_norms(points)
    picked, radii = np.empty(budget, dtype=np.int64), np.empty(budget)
    for step in range(budget):
        pick = first if step == 0 and first is not None else int(np.argmax(nearest))
        distances = distances_to_row(points, sq_norms, pick)
        picked[step] = pick
        radii[step] = nearest[pick] if np.isfinite(nearest[pick]) else distances.max()
        np.minimum(nearest, distances, out=nearest)
        nearest[pick] = -np.inf  # never again, even when every remaining distance is 0
    return picked, radii


# ---- BADGE --------------------------------------------------------------------------------------

def pseudo_label_residuals(probs: np.ndarray) -> np.ndarray:
    """(N, C) p − onehot(argmax p): the cross-entropy's gradient wrt the logits at the pseudo-label."""
    residuals = np.array(probs, dtype=np.float64)
    residuals[np.arange(len(residuals)), residuals.argmax(axis=1)] -= 1.0
    return residuals


def gradient_embeddings(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(N, C·D) BADGE's gradient embeddings: the gradient of the cross-entropy at the pseudo-label
    wrt the weights W (C × D, flattened by rows) of a linear head logits = W h + b, that is
    (p − onehot(argmax p)) ⊗ h. Materialised: for small pools; `badge` never builds it."""
    residuals = pseudo_label_residuals(probs)
    return (residuals[:, :, None] * np.asarray(embeddings, dtype=np.float64)[:, None, :]).reshape(len(probs), -1)


@QUERY_STRATEGIES.register("badge", tags=(NEEDS_PROBS, NEEDS_EMBEDDINGS), description="BADGE (Ash et "
                           "al. 2020): k-means++ seeding on the last layer's gradient embeddings at the "
                           "pseudo-labels: uncertain and diverse.")
def badge(pool: PoolView, budget: int, rng: np.random.Generator) -> Selection:
    """k-means++ seeding on g_i = (p_i − onehot(ŷ_i)) ⊗ h_i: the first pick is the largest gradient,
    each next one drawn with probability ∝ its squared distance to the nearest pick. Score: that
    distance at the time of the pick (for the first, its gradient's norm).

    The embeddings are never materialised (N·C·D, 820 MB for 40,000 × 10 × 512): as
    ⟨a ⊗ h, a' ⊗ h'⟩ = ⟨a, a'⟩·⟨h, h'⟩, a distance needs only the residuals and the embeddings.
    Memory: the inputs plus O(N·C) float64 and a few (N,) vectors. Time: O(N·(C + D)) per pick.
    """
    residuals = pseudo_label_residuals(pool.probs)
    features = np.ascontiguousarray(pool.embeddings, dtype=np.float32)
    sq_norms = row_sq_norms(residuals) * row_sq_norms(features)
    nearest_sq = np.full(len(features), np.inf)
    taken = np.zeros(len(features), dtype=bool)
    picked, scores = np.empty(budget, dtype=np.int64), np.empty(budget)
    for step in range(budget):
        pick = int(np.argmax(sq_norms)) if step == 0 else draw_by_weight(nearest_sq, taken, rng)
        picked[step], scores[step] = pick, np.sqrt(sq_norms[pick] if step == 0 else nearest_sq[pick])
        cross = (residuals @ residuals[pick]) * (features @ features[pick]).astype(np.float64)
        np.minimum(nearest_sq, np.maximum(sq_norms + sq_norms[pick] - 2.0 * cross, 0.0), out=nearest_sq)
        taken[pick] = True
        nearest_sq[taken] = 0.0
    return picked, scores


def draw_by_weight(weights: np.ndarray, taken: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability ∝ weights; uniformly among those not taken when all are 0."""
    total = weights.sum()
    if total > 0:
        return int(rng.choice(len(weights), p=weights / total))
    return int(rng.choice(np.flatnonzero(~taken)))


# ---- TypiClust ----------------------------------------------------------------------------------

# Above this many clusters the reference implementation switches to mini-batch k-means.
FULL_KMEANS_MAX_CLUSTERS = 50


@QUERY_STRATEGIES.register("typiclust", params=(
    Param("neighbors", "int", 20, 1, 200, help="k of the typicality: 1 / mean distance to the k nearest "
          "neighbours within the cluster (capped at half the cluster's size)."),
    Param("max_clusters", "int", 500, 2, 10000, help="Clusters = labeled + budget, at most this many."),
    Param("min_cluster_size", "int", 5, 0, 1000, help="Clusters of this many images or fewer are skipped "
          "(outliers) until the others run out."),
    CHUNK_PARAM,
), tags=(NEEDS_EMBEDDINGS, NEEDS_LABELED, SELF_SUPERVISED), description="TypiClust (Hacohen et al. "
   "2022), for low budgets: k-means into labeled + budget clusters, then the most typical image of each "
   "large cluster the labeled set does not cover yet.")
def typiclust(pool: PoolView, budget: int, rng: np.random.Generator, neighbors: int, max_clusters: int,
              min_cluster_size: int, chunk_mib: int) -> Selection:
    """Clusters the labeled and pool embeddings together into min(L + budget, max_clusters) clusters,
    orders the clusters by how many labeled images they hold (fewest first), then by size (largest
    first), and visits them in that order, cycling when the budget exceeds them: each visit picks the
    cluster's most typical pool image not picked yet. Score: its typicality.

    Memory: the (L + N) × D float32 embeddings, k-means' chunked distances and, per visit, the
    cluster's k-neighbour lists (m × k) with ≤ chunk_mib MiB of its m × m distances at a time.
    """
    labeled = pool.labeled_embeddings
    features = np.concatenate([labeled, pool.embeddings]).astype(np.float32)
    n_clusters = min(len(labeled) + budget, max_clusters, len(features))
    clusters = cluster_labels(features, n_clusters, int(rng.integers(2**31 - 1)))
    sizes = np.bincount(clusters, minlength=n_clusters)
    covered = np.bincount(clusters[:len(labeled)], minlength=n_clusters)
    order = np.lexsort((-sizes, covered))
    pool_clusters = clusters[len(labeled):].copy()
    return typical_per_cluster(pool.embeddings, pool_clusters, order[sizes[order] > min_cluster_size], order,
                               budget, neighbors, chunk_mib)


def cluster_labels(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    if n_clusters <= FULL_KMEANS_MAX_CLUSTERS:
        return KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit_predict(features)
    return MiniBatchKMeans(n_clusters=n_clusters, batch_size=4096, n_init=1,
                           random_state=seed).fit_predict(features)


def typical_per_cluster(embeddings: np.ndarray, pool_clusters: np.ndarray, visits: np.ndarray,
                        every_cluster: np.ndarray, budget: int, neighbors: int, chunk_mib: int) -> Selection:
    """Visit the clusters `visits` in turn (then `every_cluster`, once those have no pool image left),
    taking each visited cluster's most typical pool image; `pool_clusters` is -1 where picked."""
    remaining = np.bincount(pool_clusters, minlength=len(every_cluster))
    picked, scores = np.empty(budget, dtype=np.int64), np.empty(budget)
    step = visit = 0
    while step < budget:
        if not remaining[visits].any():
            visits = every_cluster
        cluster = visits[visit % len(visits)]
        visit += 1
        if remaining[cluster] == 0:
            continue
        members = np.flatnonzero(pool_clusters == cluster)
        typicality = typicality_of(embeddings[members], min(neighbors, len(members) // 2), chunk_mib)
        best = int(np.argmax(typicality))
        picked[step], scores[step] = members[best], typicality[best]
        pool_clusters[members[best]] = -1
        remaining[cluster] -= 1
        step += 1
    return picked, scores


def typicality_of(points: np.ndarray, k: int, chunk_mib: int) -> np.ndarray:
    """(m,) 1 / (mean Euclidean distance to the k nearest other points + 1e-5); 0 for k = 0."""
    if k == 0:
        return np.zeros(len(points))
    with config_context(working_memory=chunk_mib):
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return 1.0 / (distances[:, 1:].mean(axis=1) + 1e-5)  # column 0: the point itself


# ---- selection ----------------------------------------------------------------------------------

def select(name: str, params: dict | None, pool: PoolView, budget: int, seed: int) -> Selection:
    """Strategy `name`'s `budget` picks from `pool`: (indices into the pool, most wanted first; a score
    per pick, higher = more wanted). Bad input raises ConfigError with a message for the user."""
    entry = QUERY_STRATEGIES.get(name)
    values = entry.validate(params)
    checked = checked_pool(name, pool, entry.tags)
    check_budget(budget, checked.size)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a whole number ≥ 0, got {seed!r}")
    return entry.fn(checked, int(budget), np.random.default_rng(int(seed)), **values)


def check_budget(budget, pool_size: int) -> None:
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
        raise ConfigError(f"budget must be a whole number of images, got {budget!r}")
    if budget < 1:
        raise ConfigError(f"budget must be at least 1 image, got {budget}")
    if budget > pool_size:
        raise ConfigError(f"budget {budget} is larger than the unlabeled pool ({pool_size} images)")


def checked_pool(name: str, pool: PoolView, tags: tuple[str, ...]) -> PoolView:
    """`pool` with its arrays as finite 2-D float arrays and its size filled in, or ConfigError."""
    needed = {NEEDS_PROBS: "probs", NEEDS_EMBEDDINGS: "embeddings", NEEDS_LABELED: "labeled_embeddings"}
    for tag, attribute in needed.items():
        if tag in tags and getattr(pool, attribute) is None:
            hint = " (an empty (0, D) array when nothing is labeled yet)" if attribute == "labeled_embeddings" else ""
            raise ConfigError(f"query strategy {name} needs {attribute}{hint}")
    probs = None if pool.probs is None else checked_probs(pool.probs)
    embeddings = None if pool.embeddings is None else finite_matrix("embeddings", pool.embeddings)
    labeled = None if pool.labeled_embeddings is None else finite_matrix("labeled_embeddings",
                                                                          pool.labeled_embeddings)
    if labeled is not None and embeddings is not None and labeled.shape[1] != embeddings.shape[1]:
        raise ConfigError(f"labeled_embeddings have {labeled.shape[1]} columns but embeddings have "
                          f"{embeddings.shape[1]}: both must come from the same encoder")
    return replace(pool, probs=probs, embeddings=embeddings, labeled_embeddings=labeled,
                   size=pool_size(pool.size, probs, embeddings))


def pool_size(size: int | None, probs: np.ndarray | None, embeddings: np.ndarray | None) -> int:
    """The one row count of the pool arrays (and `size`, when given), or ConfigError."""
    counts = {what: len(array) for what, array in (("probs", probs), ("embeddings", embeddings))
              if array is not None}
    if size is not None:
        counts["size"] = size
    if not counts:
        raise ConfigError("the pool view has no probs, embeddings or size: nothing says how many images it holds")
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{what} {count}" for what, count in counts.items())
        raise ConfigError(f"the pool's arrays disagree on the number of images ({listed}): one row per pool image")
    return int(next(iter(counts.values())))


def finite_matrix(what: str, value, dtype: type = np.float32) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected an array of numbers") from None
    if array.ndim != 2:
        raise ConfigError(f"{what}: expected a 2-D array (one row per image), got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ConfigError(f"{what}: {int(bad.sum())} values are NaN or infinite (the first in row "
                          f"{int(np.argwhere(bad)[0, 0])})")
    return array


def checked_probs(value) -> np.ndarray:
    probs = finite_matrix("probs", value, np.float64)
    if probs.shape[1] < 2:
        raise ConfigError(f"probs: expected one column per class (at least 2), got {probs.shape[1]}")
    if (probs < 0).any():
        raise ConfigError(f"probs: negative values (the first in row {int(np.argwhere(probs < 0)[0, 0])}): "
                          "pass the softmax of the logits")
    off = np.flatnonzero(np.abs(probs.sum(axis=1) - 1.0) > PROB_SUM_TOLERANCE)
    if len(off):
        raise ConfigError(f"probs: row {int(off[0])} sums to {probs[off[0]].sum():.4g}, not 1 "
                          f"({len(off)} such rows): pass the softmax of the logits")
    return probs
