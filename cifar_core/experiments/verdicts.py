"""Whether a study's claim held, from its results, with the numbers.

`verdict(df)` reads a study's per-run results (`studies.study_results`: one row per run, its cell,
seed, state and final metrics) and returns a `Verdict`: one of three outcomes (HELD, NOT_HELD,
TOO_FEW) with a sentence that states the numbers and a table of the comparisons behind it.

Comparisons are paired over seeds: within a study a seed fixes the data draw (subset, imbalance) for
every cell, so the difference between two cells is taken seed by seed, and its mean comes with the
standard deviation over seeds and a 95 % Student-t interval (scipy.stats, a dependency of
scikit-learn). A verdict needs MIN_SEEDS seeds finished in every cell it compares; short of that it
says how many more finished runs it needs. A difference "holds" when its interval lies above zero:
with 3 seeds (t = 4.30) only a difference of about 2.5 standard deviations of the per-seed
differences does, so a small real effect can read as "did not hold": the numbers say how close it was.

- bn_vs_gn: BatchNorm's test error at the smallest batch minus at the largest, GroupNorm's same
  difference, and their contrast. Held when BatchNorm's error grew (interval above zero) and grew
  more than GroupNorm's (the contrast's interval above zero).
- ablation: each step's test accuracy minus the previous step's. Held when the crop & flip step's
  gain is above zero and is the largest of the steps' mean gains.
- samplers: each strategy against ``none``: balanced accuracy, and the recall moved to the small
  classes (per seed: the mean recall change of the 5 classes with the fewest training images minus
  that of the other 5). Held when every strategy moved recall to the small classes.
- few_labels: each method's test accuracy minus supervised-only's (the rotation pretext's own run is
  not a classifier and is left out; the fine-tune from it is compared). Held when every method is
  above supervised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..params import ConfigError

HELD, NOT_HELD, TOO_FEW = "held", "did not hold", "not enough finished runs"
OUTCOMES = (HELD, NOT_HELD, TOO_FEW)
HEADLINES = {HELD: "The claim held", NOT_HELD: "The claim did not hold",
             TOO_FEW: "No verdict yet: not enough finished runs"}
MIN_SEEDS = 3
CONFIDENCE = 0.95
BASELINE_STRATEGY = "none"
RECALL_PREFIX, COUNT_PREFIX = "recall_", "train_count_"  # as studies.study_results names its columns
UNFINISHED = ("queued", "starting", "running")


@dataclass(frozen=True)
class Difference:
    """A difference over seeds: its mean, standard deviation, number of seeds and 95 % t-interval."""

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    def text(self) -> str:
        """'+12.3 ± 2.1 pts (95 % CI +7.1 to +17.5, 3 seeds)', in percentage points."""
        return (f"{100 * self.mean:+.1f} ± {100 * self.std:.1f} pts (95 % CI {100 * self.low:+.1f} to "
                f"{100 * self.high:+.1f}, {self.n} seeds)")


def difference(values) -> Difference:
    """Mean, std (ddof 1) and the two-sided 95 % t-interval of per-seed differences (2 or more)."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        raise ConfigError(f"a difference over seeds needs at least 2 seeds, got {n}")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return Difference(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Verdict:
    kind: str
    outcome: str               # HELD, NOT_HELD or TOO_FEW
    claim: str                 # what was tested, in one sentence
    summary: str               # the outcome with its numbers
    rows: tuple = ()           # the comparisons: dicts for a table
    runs_needed: int = 0       # TOO_FEW: finished runs still needed (0 when it cannot be counted)
    notes: tuple = field(default_factory=tuple)

    @property
    def held(self) -> bool:
        return self.outcome == HELD

    @property
    def headline(self) -> str:
        return HEADLINES[self.outcome]


def verdict(df) -> Verdict:
    """The verdict of a study from `studies.study_results(store, id)` (df.attrs["kind"] says which)."""
    kind = df.attrs.get("kind")
    if kind not in VERDICTS:
        raise ConfigError(f"no verdict for study kind {kind!r} (known: {', '.join(VERDICTS)})")
    return VERDICTS[kind](df)


# ---- shared: finished runs by cell and seed ------------------------------------------------------

def _finished(df, metric: str):
    done = df[df["state"] == "completed"] if "state" in df else df.iloc[0:0]
    return done[done[metric].notna()] if metric in done else done.iloc[0:0]


def _by_seed(done, cell: dict, column: str) -> dict:
    """{seed: value} of the finished runs of one cell."""
    mask = None
    for key, value in cell.items():
        match = done[key] == value
        mask = match if mask is None else mask & match
    rows = done[mask] if mask is not None else done
    return {int(seed): float(v) for seed, v in zip(rows["seed"], rows[column])}


def _paired_seeds(df, done, cells: list[dict], column: str) -> tuple[list[int], int, int]:
    """(seeds finished in every cell, finished runs still needed for MIN_SEEDS such seeds, how many of
    the study's runs in those cells are still queued or running)."""
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    finished = [set(_by_seed(done, cell, column)) for cell in cells]
    missing = {s: sum(s not in f for f in finished) for s in seeds}
    paired = [s for s in seeds if missing[s] == 0]
    short = MIN_SEEDS - len(paired)
    gaps = sorted(m for m in missing.values() if m > 0)
    needed = 0 if short <= 0 else sum(gaps[:short]) + max(0, short - len(gaps)) * len(cells)
    pending = 0
    for cell in cells:
        mask = df["state"].isin(UNFINISHED)
        for key, value in cell.items():
            mask &= df[key] == value
        pending += int(mask.sum())
    return paired, needed, pending


def _too_few(kind: str, claim: str, what: str, needed: int, pending: int, planned_seeds: int) -> Verdict:
    wait = (f" {pending} of them {'is' if pending == 1 else 'are'} still queued or running."
            if pending else "")
    relaunch = (f" This study has {planned_seeds} seed{'s' if planned_seeds != 1 else ''}: launch it "
                f"with {MIN_SEEDS} or more." if planned_seeds < MIN_SEEDS else "")
    summary = (f"The verdict compares {what} over {MIN_SEEDS} seeds "
               f"finished in each, and needs {needed} more finished run{'s' if needed != 1 else ''}."
               + wait + relaunch)
    return Verdict(kind, TOO_FEW, claim, summary, runs_needed=needed)


def _planned_seeds(df) -> int:
    return int(df["seed"].nunique()) if "seed" in df and len(df) else 0


def _row(comparison: str, diff: Difference, **extra) -> dict:
    return {"comparison": comparison, "mean (pts)": round(100 * diff.mean, 2),
            "std (pts)": round(100 * diff.std, 2), "95 % CI low": round(100 * diff.low, 2),
            "95 % CI high": round(100 * diff.high, 2), "seeds": diff.n, **extra}


def _paired_difference(done, a: dict, b: dict, column: str, seeds: list[int]) -> Difference:
    """column(a) − column(b), seed by seed."""
    va, vb = _by_seed(done, a, column), _by_seed(done, b, column)
    return difference([va[s] - vb[s] for s in seeds])


# ---- bn_vs_gn ------------------------------------------------------------------------------------

BN_CLAIM = ("BatchNorm's test error grows as the batch shrinks, and grows more than GroupNorm's "
            "(Wu & He, 2018).")


def bn_vs_gn(df) -> Verdict:
    metric = "test_acc"
    sizes = sorted({int(b) for b in df["batch_size"].dropna()}) if "batch_size" in df else []
    norms = set(df["norm"]) if "norm" in df else set()
    if len(sizes) < 2 or not {"batch", "group"} <= norms:
        return Verdict("bn_vs_gn", TOO_FEW, BN_CLAIM,
                       "This study cannot test the claim: it needs two or more batch sizes, each with "
                       "norm=batch and norm=group.")
    small, large = sizes[0], sizes[-1]
    done = _finished(df, metric)
    cells = [{"norm": n, "batch_size": b} for n in ("batch", "group") for b in (small, large)]
    seeds, needed, pending = _paired_seeds(df, done, cells, metric)
    if needed:
        return _too_few("bn_vs_gn", BN_CLAIM, f"batch {small} with batch {large} for both norms", needed,
                        pending, _planned_seeds(df))
    # error = 1 - accuracy, so error(small) - error(large) = acc(large) - acc(small)
    growth = {}
    for norm in ("batch", "group"):
        at_small = _by_seed(done, {"norm": norm, "batch_size": small}, metric)
        at_large = _by_seed(done, {"norm": norm, "batch_size": large}, metric)
        growth[norm] = [at_large[s] - at_small[s] for s in seeds]
    bn, gn = difference(growth["batch"]), difference(growth["group"])
    contrast = difference([b - g for b, g in zip(growth["batch"], growth["group"])])
    held = bn.above_zero and contrast.above_zero
    numbers = (f"from batch {large} to batch {small}, BatchNorm's test error changed by {bn.text()}, "
               f"GroupNorm's by {gn.text()}; BatchNorm's minus GroupNorm's: {contrast.text()}.")
    if held:
        summary = f"BatchNorm's error grew and GroupNorm's much less: {numbers}"
    elif not bn.above_zero:
        summary = f"BatchNorm's error did not grow beyond the seed noise: {numbers}"
    else:
        summary = f"BatchNorm's error grew, but not clearly more than GroupNorm's: {numbers}"
    rows = (_row(f"BatchNorm: error at batch {small} − at batch {large}", bn),
            _row(f"GroupNorm: error at batch {small} − at batch {large}", gn),
            _row("BatchNorm's growth − GroupNorm's", contrast))
    return Verdict("bn_vs_gn", HELD if held else NOT_HELD, BN_CLAIM, summary, rows)


# ---- ablation ------------------------------------------------------------------------------------

ABLATION_CLAIM = "Crop & flip (step 1) gives the largest single gain over the previous step, above zero."


def ablation(df) -> Verdict:
    metric = "test_acc"
    steps = sorted({int(s) for s in df["step"].dropna()}) if "step" in df else []
    if len(steps) < 3 or steps[:2] != [0, 1]:
        return Verdict("ablation", TOO_FEW, ABLATION_CLAIM,
                       "This study cannot test the claim: it needs the baseline, the crop & flip step "
                       "and at least one later step.")
    done = _finished(df, metric)
    cells = [{"step": s} for s in steps]
    seeds, needed, pending = _paired_seeds(df, done, cells, metric)
    if needed:
        return _too_few("ablation", ABLATION_CLAIM, f"all {len(steps)} steps", needed, pending,
                        _planned_seeds(df))
    names = {int(s): str(t) for s, t in zip(df["step"], df["trick"])} if "trick" in df else {}
    gains = {s: _paired_difference(done, {"step": s}, {"step": prev}, metric, seeds)
             for prev, s in zip(steps, steps[1:])}
    largest = max(gains, key=lambda s: gains[s].mean)
    crop = gains[1]
    held = crop.above_zero and largest == 1
    label = names.get(1, "step 1")
    if held:
        summary = f"{label} gained {crop.text()} over the baseline, the largest of {len(gains)} steps."
    elif largest != 1:
        summary = (f"{label} gained {crop.text()}, but the largest gain was step {largest} "
                   f"({names.get(largest, '?')}): {gains[largest].text()}.")
    else:
        summary = (f"{label} had the largest mean gain, {crop.text()}, but its interval "
                   "reaches zero or below.")
    rows = tuple(_row(f"{s}. {names.get(s, '')} − step {prev}", gains[s], effect=_effect(gains[s]))
                 for prev, s in zip(steps, steps[1:]))
    return Verdict("ablation", HELD if held else NOT_HELD, ABLATION_CLAIM, summary, rows)


def _effect(diff: Difference) -> str:
    if diff.low > 0:
        return "gain"
    if diff.high < 0:
        return "loss"
    return "within the seed noise"


# ---- samplers ------------------------------------------------------------------------------------

SAMPLERS_CLAIM = ("Every re-balancing strategy moves recall from the large classes to the small ones "
                  "(against no balancing, paired over seeds).")


def samplers(df) -> Verdict:
    metric = "balanced_acc"
    strategies = list(dict.fromkeys(df["balance"])) if "balance" in df else []
    others = [s for s in strategies if s != BASELINE_STRATEGY]
    if BASELINE_STRATEGY not in strategies or not others:
        return Verdict("samplers", TOO_FEW, SAMPLERS_CLAIM,
                       "This study cannot test the claim: it needs the strategy 'none' and at least one "
                       "re-balancing strategy.")
    done = _finished(df, metric)
    cells = [{"balance": s} for s in strategies]
    seeds, needed, pending = _paired_seeds(df, done, cells, metric)
    if needed:
        return _too_few("samplers", SAMPLERS_CLAIM, "every strategy with 'none'", needed, pending,
                        _planned_seeds(df))
    classes = [c[len(RECALL_PREFIX):] for c in df.columns if str(c).startswith(RECALL_PREFIX)]
    if not classes or any(f"{COUNT_PREFIX}{c}" not in df for c in classes):
        return Verdict("samplers", TOO_FEW, SAMPLERS_CLAIM,
                       "The finished runs do not record their per-class recall and training counts, "
                       "which the verdict compares.")
    base = {s: _class_values(done, BASELINE_STRATEGY, s, classes) for s in seeds}
    rows, moved, shifts = [], [], []
    for name in others:
        bal = _paired_difference(done, {"balance": name}, {"balance": BASELINE_STRATEGY}, metric, seeds)
        shift = difference([_recall_shift(base[s], _class_values(done, name, s, classes)) for s in seeds])
        rows.append(_row(f"{name}: balanced accuracy − none's", bal, effect=_effect(bal)))
        rows.append(_row(f"{name}: small classes' recall gain − large classes'", shift,
                         effect="moved to the small classes" if shift.above_zero else "not clearly moved"))
        shifts.append(f"{name} {100 * shift.mean:+.1f} ± {100 * shift.std:.1f}")
        if shift.above_zero:
            moved.append(name)
    held = len(moved) == len(others)
    # one figure per strategy here; the rows (shown as a table) hold the intervals and balanced accuracy
    figures = (f"Small classes' recall gain minus the large classes', in points, paired over {len(seeds)} "
               f"seeds: {'; '.join(shifts)}.")
    if held:
        summary = f"Every strategy moved recall to the small classes. {figures}"
    else:
        which = f"only {', '.join(moved)} did" if moved else "none of them did"
        summary = (f"{len(moved)} of {len(others)} strategies moved recall to the small "
                   f"classes ({which}). {figures}")
    return Verdict("samplers", HELD if held else NOT_HELD, SAMPLERS_CLAIM, summary, tuple(rows))


def _class_values(done, strategy: str, seed: int, classes: list[str]) -> tuple[list[float], list[float]]:
    """(recall per class, training images per class) of one finished run."""
    row = done[(done["balance"] == strategy) & (done["seed"] == seed)].iloc[0]
    return ([float(row[f"{RECALL_PREFIX}{c}"]) for c in classes],
            [float(row[f"{COUNT_PREFIX}{c}"]) for c in classes])


def _recall_shift(base, other) -> float:
    """Mean recall change of the half of the classes with the fewest training images (by the baseline
    run's counts, ties by class order) minus that of the other half."""
    base_recall, counts = base
    change = [o - b for o, b in zip(other[0], base_recall)]
    order = sorted(range(len(counts)), key=lambda i: (counts[i], i))
    small, large = order[:len(order) // 2], order[len(order) // 2:]
    return sum(change[i] for i in small) / len(small) - sum(change[i] for i in large) / len(large)


# ---- few_labels ----------------------------------------------------------------------------------

FEW_LABELS_CLAIM = ("With the same few labels and labeled steps, learning from the unlabeled images too "
                    "beats supervised-only training (every semi-supervised method, and the fine-tune "
                    "from the rotation pretext, above supervised).")
FEW_LABELS_BASELINE = "supervised"
FEW_LABELS_PRETEXT = "rotation pretext"  # its test accuracy is not a classifier's: never compared


def few_labels(df) -> Verdict:
    metric = "test_acc"
    methods = [m for m in dict.fromkeys(df["method"]) if m != FEW_LABELS_PRETEXT] if "method" in df else []
    others = [m for m in methods if m != FEW_LABELS_BASELINE]
    if FEW_LABELS_BASELINE not in methods or not others:
        return Verdict("few_labels", TOO_FEW, FEW_LABELS_CLAIM,
                       "This study cannot test the claim: it needs the supervised method and at least one "
                       "method that also learns from unlabeled images.")
    done = _finished(df, metric)
    cells = [{"method": m} for m in methods]
    seeds, needed, pending = _paired_seeds(df, done, cells, metric)
    if needed:
        return _too_few("few_labels", FEW_LABELS_CLAIM, "every method with supervised", needed, pending,
                        _planned_seeds(df))
    gains = {m: _paired_difference(done, {"method": m}, {"method": FEW_LABELS_BASELINE}, metric, seeds)
             for m in others}
    ahead = [m for m in others if gains[m].above_zero]
    lines = "; ".join(f"{m}: {gains[m].text()}" for m in others)
    held = len(ahead) == len(others)
    if held:
        summary = f"Every method beat supervised-only training (test accuracy − supervised's): {lines}."
    else:
        which = f"only {', '.join(ahead)} did" if ahead else "none of them did"
        summary = (f"{len(ahead)} of {len(others)} methods beat supervised-only training beyond the seed noise "
                   f"({which}); test accuracy − supervised's: {lines}.")
    rows = tuple(_row(f"{m} − supervised", gains[m], effect=_effect(gains[m])) for m in others)
    return Verdict("few_labels", HELD if held else NOT_HELD, FEW_LABELS_CLAIM, summary, rows)


VERDICTS = {"bn_vs_gn": bn_vs_gn, "samplers": samplers, "ablation": ablation, "few_labels": few_labels}
