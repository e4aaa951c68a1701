"""Does a search over the tricks beat the best hand-made preset? (issue: AutoML with Optuna)

1. The hand-made candidates (HAND_MADE: the quick preset's recipe, the fast muon preset's recipe on the
   quick preset's network, and the quick recipe with the fast muon preset's optimizer) are each trained
   --seeds times on the report's 10,000-image random subset, --epochs epochs, and scored on the 10,000
   test images, one run after another on this machine. The best shipped preset (SHIPPED) is the baseline
   the target names; the best of all candidates, hand combinations included, is reported beside it.
2. A search (TPE, median pruning on the per-epoch validation accuracy) over the tricks, for --minutes of
   wall time (no trial starts after that; the last one finishes). Its fixed part, whose own values are
   trial 0, is the candidate named by --start (by default the best one); 1,000-2,000 of the 10,000
   images are held out for validation.
3. The best trial's config is trained --seeds times on all 10,000 images the same way.
Prints (and writes to --out) the candidates' accuracies, the trial counts, the best parameters, the fANOVA
importances and the best-of-search accuracy as mean ± std with the paired differences to the baseline
and to the best candidate.

    python bench/bench_search.py --data /tmp/cifar10.npz --runs-root /tmp/bsearch --minutes 60
    # the search starts from the quick preset, so Muon is in the space but not in its start
    python bench/bench_search.py ... --start "quick preset"
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cifar_core.config import RunConfig
from cifar_core.engine import train_run
from cifar_core.experiments import search
from cifar_core.experiments.presets import preset
from cifar_core.runs import RunStore

SPACE = {
    "optimizer": {"choices": ["sgd", "muon"]},
    "muon_lr": {"low": 0.06, "high": 1.0, "log": True},
    "muon_momentum": {"low": 0.3, "high": 0.9},
    "lr": {"low": 0.15, "high": 2.0, "log": True},
    "momentum": {"low": 0.7, "high": 0.95},
    "weight_decay": {"low": 1e-4, "high": 1e-2, "log": True},
    "label_smoothing": {"low": 0.0, "high": 0.3},
    "batch_size": {"low": 100, "high": 500, "log": True},
    "model_params.dropout": {"low": 0.0, "high": 0.3},
    "augment.cutout": {},
    "tta_translate": {},
    "schedule_params.warmup_fraction": {"low": 0.0, "high": 0.5},
}
SUBSET = {"subset": "random", "subset_size": 10000, "val_size": 0, "test_size": 0}
QUICK_NET = {"model_params": preset("quick (about a minute)")["model_params"], "precision": "fp32"}
HAND_MADE = {
    "quick preset": preset("quick (about a minute)"),
    "fast muon preset, quick net": {**preset("fast muon"), **QUICK_NET},
    "quick preset + fast muon's optimizer": {**preset("quick (about a minute)"), "optimizer": "muon",
                                             **{k: preset("fast muon")[k] for k in ("muon_lr", "muon_momentum")}},
}
SHIPPED = ("quick preset", "fast muon preset, quick net")


def hand_made(name: str, epochs: int) -> RunConfig:
    """A hand-made candidate on the report's 10,000 images, all of them trained on."""
    return RunConfig.from_dict({**HAND_MADE[name], **SUBSET, "name": f"hand-made: {name}", "epochs": epochs,
                                "eval_every": epochs})


def final_runs(cfg: RunConfig, seeds: int, store: RunStore, data: str) -> tuple[list[float], list[float]]:
    """Test accuracies and training seconds of `seeds` runs of cfg."""
    accs, seconds = [], []
    for seed in range(seeds):
        record = train_run(cfg.replace(seed=seed, eval_every=cfg.epochs), store=store, data_source=data,
                           progress=False)
        accs.append(record.results()["test_acc"])
        seconds.append(record.results()["train_seconds"])
        print(f"  {cfg.name} seed {seed}: {100 * accs[-1]:.2f}% in {seconds[-1]:.0f} s", flush=True)
    return accs, seconds


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs-root", required=True)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--val-size", type=int, default=2000, help="held-out images that score the trials")
    parser.add_argument("--tpe-startup", type=int, default=10, help="random trials before TPE models the results")
    parser.add_argument("--prune-after", type=int, default=3,
                        help="epochs a trial trains before the median pruner may stop it")
    parser.add_argument("--start", default="best", choices=["best", *HAND_MADE],
                        help="the candidate the search starts from (its fixed part and trial 0)")
    parser.add_argument("--study", default=None, help="continue this study instead of starting one")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args()
    store = RunStore(args.runs_root)
    report: dict = {"epochs": args.epochs, "seeds": args.seeds, "hand_made": {}}

    def save() -> None:
        print(json.dumps(report, indent=2, default=str), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    hand_accs: dict[str, list[float]] = {}
    for name in HAND_MADE:
        accs, seconds = final_runs(hand_made(name, args.epochs), args.seeds, store, args.data)
        hand_accs[name] = accs
        report["hand_made"][name] = {"test_acc": mean_std(accs), "accs": accs, "train_s": seconds}
    def best_of(names) -> str:
        return max(names, key=lambda name: statistics.mean(hand_accs[name]))

    baseline, best_candidate = best_of(SHIPPED), best_of(HAND_MADE)
    start = best_candidate if args.start == "best" else args.start
    report.update(baseline=baseline, best_candidate=best_candidate, search_start=start)
    save()

    base = hand_made(start, args.epochs).replace(val_size=args.val_size, eval_every=1, name="search trial")
    study = args.study or time.strftime("bench-%Y%m%d-%H%M%S")
    spec = search.SearchSpec(base=base.to_dict(), space=SPACE, trials=1000, time_budget_min=args.minutes,
                             sampler="tpe", sampler_params={"n_startup_trials": args.tpe_startup},
                             pruner="median", pruner_params={"n_startup_trials": 5, "n_warmup_steps": args.prune_after})
    storage = search.start_search(study, spec, store, data_source=args.data)
    started = time.time()
    why = search.SearchWorker(store, study, storage, args.data, log=lambda text: print(text, flush=True)).run()
    search_s = time.time() - started
    loaded, spec = search.load_search(study, storage)
    report["search"] = search.summary(loaded, spec)
    report["search"].update(stopped_because=why, search_wall_s=round(search_s))
    try:
        report["search"]["importances"] = search.importances(loaded)
    except Exception as exc:  # too few trials: say so in the report
        report["search"]["importances"] = str(exc)
    save()

    best = search.best_config(loaded, train_on_validation=True).replace(name="best of search", eval_every=args.epochs)
    best_accs, best_s = final_runs(best, args.seeds, store, args.data)
    def paired_diff(name: str) -> str:
        return mean_std([b - h for b, h in zip(best_accs, hand_accs[name])])

    report["best_of_search"] = {"test_acc": mean_std(best_accs), "accs": best_accs, "train_s": best_s,
                                "minus_baseline_points": paired_diff(baseline),
                                "minus_best_candidate_points": paired_diff(best_candidate)}
    save()


if __name__ == "__main__":
    main()
