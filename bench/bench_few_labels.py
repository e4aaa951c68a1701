"""Learning from 250 labels on this machine (issue 15): semi-supervised objectives at equal time, and a
self-supervised rotation pretext as a starting point.

(a) Equal time. Each method (--methods: supervised and the semi-supervised objectives) trains the fast
    net on the same --label-budget labeled images (the split of each seed: seed s labels the same images
    for every method), the rest of the training set its unlabeled pool, for at most --minutes of training
    each. A method's epochs are calibrated first: a short run of --calibrate-steps steps measures its
    seconds per step on this machine, and the method gets the whole epochs that fit in 95% of the budget
    (at most 2,000), so that its cosine schedule ends; --minutes is also each run's time limit
    (time_limit_min), which stops a run that turns out slower. --seeds seeds each: mean ± std of the test
    accuracy (10,000 test images), and each method's difference to supervised, paired by seed. Every run
    is also scored from its final weights (fp32) with one view and with test-time views (flip, flip +
    translate: the fast preset's), `tta_test_acc`; training is the same whichever view scores it, so a
    resumed summary's finished runs are scored the same way without training them again.
(b) Self-supervised. A rotation pretext (Gidaris et al. 2018) on the whole training set with no labels
    (the unlabeled pool and the labeled images alike, labels never read), --pretext-minutes of training
    calibrated the same way; its own results (rotation accuracy on the test images; a logistic-regression
    linear probe on its frozen features of 5,000 labeled images). Then, with the --label-budget labels of
    each seed, for --finetune-epochs epochs each: a linear probe trained by SGD (init_mode linear_probe),
    a fine-tune (init_mode finetune; both re-initialise the head, which learned rotations), and the same
    supervised run from scratch; the time each took.

Prints the JSON summary and writes it to --out. Runs go into --runs-root (calibration runs, stopped after
their steps, are kept there as cancelled runs).

    python bench/bench_few_labels.py --data /tmp/cifar10.npz --runs-root /tmp/bfew/runs \\
        --out /tmp/bfew/result.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cifar_core.config import RunConfig
from cifar_core.data import load_cifar10, per_class_subset
from cifar_core.engine import train_run
from cifar_core.runs import RunRecord, RunStore
from cifar_core.serve.export import load_run_model

MAX_EPOCHS = 2000  # RunConfig's epochs limit
SCHEDULE_SHARE = 0.95  # of the time budget the calibrated epochs aim at


def few_label_config(args, objective: str, seed: int, epochs: int, minutes: float = 0.0, **changes) -> RunConfig:
    """A run on --label-budget labels of the training set (the rest unlabeled), the fast net."""
    return RunConfig.from_dict({
        "name": f"few-labels {objective}", "seed": seed, "device": args.device, "model": "fastnet",
        "model_params": {"width": args.width}, "subset": "full", "val_size": 0, "test_size": args.test_size,
        "label_budget": args.label_budget, "objective": objective, "epochs": epochs, "eval_every": epochs,
        "time_limit_min": minutes, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
        "precision": args.precision, "channels_last": True, "log_every": 20,
        **({"ssl_weak_pass": args.weak_pass} if RunConfig.applies("ssl_weak_pass", {"objective": objective}) else {}),
        **changes})


def pretext_config(args, epochs: int, minutes: float = 0.0) -> RunConfig:
    """The rotation pretext on every training image, no labels (label_budget 0: the labels are never read)."""
    return RunConfig.from_dict({
        "name": "few-labels rotation pretext", "seed": 0, "device": args.device, "model": "fastnet",
        "model_params": {"width": args.width}, "subset": "full", "val_size": 0, "test_size": args.test_size,
        "objective": "rotation", "epochs": epochs, "eval_every": epochs, "time_limit_min": minutes,
        "batch_size": args.pretext_batch_size, "lr": args.lr, "precision": args.precision,
        "channels_last": True, "log_every": 20})


def seconds_per_step(record: RunRecord) -> float:
    """Seconds a step took in a calibration run: its train rows' elapsed time over their steps, the first
    window (the first, slow steps) left out; checkpoint writes at epoch ends included."""
    rows = [r for r in record.read_metrics() if r.get("kind") == "train"]
    if len(rows) < 2:
        raise SystemExit(f"calibration run {record.run_id} logged too few steps ({record.status().get('error')})")
    first, last = rows[0], rows[-1]
    return (last["elapsed"] - first["elapsed"]) / (last["step"] - first["step"])


def calibrated_epochs(cfg: RunConfig, args, store: RunStore, minutes: float, label: str) -> tuple[int, float]:
    """(epochs that fit in SCHEDULE_SHARE of `minutes`, seconds per step) from a --calibrate-steps run."""
    run_id = f"calibrate-{label}-{time.strftime('%H%M%S')}"
    # no evaluation in the probe: the run it sizes evaluates once, at its end (a test pass every epoch of
    # 4 steps doubled the calibrated s/step of the semi-supervised methods)
    probe = cfg.replace(epochs=MAX_EPOCHS, eval_every=MAX_EPOCHS, time_limit_min=0.0,
                        log_every=max(1, args.calibrate_steps // 4), name=f"calibrate {label}")
    record = train_run(probe, store, run_id=run_id, data_source=args.data,
                       stop_at_step=args.calibrate_steps)
    per_step = seconds_per_step(record)
    steps_per_epoch = record.status()["steps_per_epoch"]
    fitting = math.floor(SCHEDULE_SHARE * 60 * minutes / (per_step * steps_per_epoch))
    epochs = max(1, min(MAX_EPOCHS, fitting))
    print(f"  {label}: {per_step:.3f} s/step, {steps_per_epoch} steps/epoch -> {epochs} epochs "
          f"({fitting} fit in the budget)", flush=True)
    return epochs, per_step


def trained(cfg: RunConfig, store: RunStore, args) -> dict:
    """Train `cfg` and return its numbers (test accuracy, seconds, steps)."""
    started = time.time()
    record = train_run(cfg, store, data_source=args.data)
    status, results = record.status(), record.results() or {}
    if status.get("state") != "completed":
        raise SystemExit(f"run {record.run_id} ({cfg.name}, seed {cfg.seed}) {status.get('state')}: "
                         f"{status.get('error')}")
    out = {"run_id": record.run_id, "seed": cfg.seed, "test_acc": results.get("test_acc"),
           "train_seconds": round(results.get("train_seconds", 0.0), 1), "steps": results.get("steps"),
           "total_steps": results.get("total_steps"), "wall_seconds": round(time.time() - started, 1)}
    for key in ("rotation_test_acc", "linear_probe"):
        if key in results:
            out[key] = results[key]
    print(f"  {cfg.name} seed {cfg.seed}: {json.dumps({k: v for k, v in out.items() if k != 'linear_probe'})}",
          flush=True)
    return out


# test-time views every part-(a) run is scored with: (flip, translate) of the export graph
VIEWS = {"none": (False, False), "flip": (True, False), "flip+translate": (True, True)}


def test_images(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images as [0, 1] NCHW floats and their labels: the runs' own test set (--test-size as the
    engine draws it)."""
    data = load_cifar10(args.data)
    x, y = data.x_test, data.y_test
    if args.test_size:
        keep = per_class_subset(y, args.test_size // len(data.classes), seed=0)
        x, y = x[keep], y[keep]
    return torch.from_numpy(x.copy()).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(y.copy())


def view_scores(run_id: str, store: RunStore, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """{view: test accuracy} of a finished run's final weights (its EMA when kept), in fp32."""
    graph, _ = load_run_model(store.record(run_id))
    x, y = test
    scores = {}
    with torch.no_grad():
        for name, (flip, translate) in VIEWS.items():
            graph.tta_flip, graph.tta_translate = flip, translate
            right = sum(int((graph(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(y), 500))
            scores[name] = round(right / len(y), 4)
    print(f"  {run_id}: test accuracy by views {json.dumps(scores)}", flush=True)
    return scores


def with_view_scores(run: dict, store: RunStore, test) -> dict:
    return run if "tta_test_acc" in run else {**run, "tta_test_acc": view_scores(run["run_id"], store, test)}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summary_of(runs: list[dict]) -> dict:
    return {"test_acc": mean_std([r["test_acc"] for r in runs]),
            "tta_test_acc": {view: mean_std([r["tta_test_acc"][view] for r in runs]) for view in VIEWS},
            "train_seconds": mean_std([r["train_seconds"] for r in runs]), "runs": runs}


def paired(runs: list[dict], baseline: list[dict], score=lambda run: run["test_acc"]) -> dict:
    """The per-seed difference in test accuracy (points), mean ± std."""
    base = {r["seed"]: score(r) for r in baseline}
    return mean_std([100 * (score(r) - base[r["seed"]]) for r in runs if r["seed"] in base])


# the arguments that make two part-(a) runs comparable: --resume refuses a summary made with others
SETTINGS = ("label_budget", "minutes", "width", "batch_size", "lr", "ema_decay", "weak_pass", "precision",
            "test_size")
OLDER_DEFAULTS = {"weak_pass": "joint"}  # summaries written before the option existed


def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def resumable(path: str | None, args) -> dict:
    """{method: its entry} of an earlier part (a) summary (--resume), checked against this call's settings."""
    if not path:
        return {}
    try:
        report = json.loads(Path(path).read_text())
        earlier, then = report["a_equal_time"], {**OLDER_DEFAULTS, **report["args"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--resume {path}: not a part (a) summary of this benchmark ({exc})") from None
    differing = {k: (v, then.get(k)) for k, v in settings_of(args).items() if then.get(k) != v}
    if differing:
        raise SystemExit("--resume: the earlier summary was made with other settings (now, then): "
                         + ", ".join(f"{k} {now!r} vs {then!r}" for k, (now, then) in differing.items()))
    return earlier["methods"]


def check_speed(cfg: RunConfig, args, store: RunStore, calibrated: float, method: str) -> None:
    """Stop unless this machine still steps as fast as the earlier summary's calibration: epochs sized on
    a faster machine would run into the time limit here and end their schedule early, so their runs
    would not compare with the earlier ones."""
    _, per_step = calibrated_epochs(cfg, args, store, args.minutes, f"{method}-speed-check")
    slower = per_step / calibrated - 1
    if slower > 1 - SCHEDULE_SHARE:
        raise SystemExit(f"--resume: this machine takes {per_step:.3f} s a {method} step, {slower:.0%} more than "
                         f"the {calibrated} s the earlier summary calibrated its epochs with, so they would not "
                         f"fit in {args.minutes:g} minutes: resume where the machine is as fast, or start a new "
                         "summary (without --resume) to calibrate here")


def part_a(args, store: RunStore, save) -> dict:
    """Equal-time comparison of the methods. `save(out)` is called after every run, so a benchmark cut
    short (it takes hours) loses at most the run in progress: --resume picks up the methods' calibrated
    epochs and finished seeds from that file and runs only what is missing, after checking that this machine
    still steps as fast as that calibration."""
    print(f"(a) {args.label_budget} labels, at most {args.minutes} min of training per run", flush=True)
    earlier = resumable(args.resume, args)
    test = test_images(args)
    out: dict = {"label_budget": args.label_budget, "minutes": args.minutes, "methods": {}}
    for method in args.methods:
        if method in earlier:
            epochs, per_step = earlier[method]["epochs"], earlier[method]["calibrated_s_per_step"]
            print(f"  {method}: {epochs} epochs, as calibrated before ({per_step} s/step)", flush=True)
        else:
            epochs, per_step = calibrated_epochs(few_label_config(args, method, 0, 1), args, store, args.minutes,
                                                 method)
        done = {r["seed"]: r for r in earlier.get(method, {}).get("runs", [])}
        if method in earlier and any(seed not in done for seed in range(args.seeds)):
            check_speed(few_label_config(args, method, 0, 1), args, store, per_step, method)
        runs: list[dict] = []
        for seed in range(args.seeds):
            run = done.get(seed) or trained(few_label_config(args, method, seed, epochs, args.minutes), store, args)
            runs.append(with_view_scores(run, store, test))
            out["methods"][method] = {"epochs": epochs, "calibrated_s_per_step": round(per_step, 4),
                                      **summary_of(runs)}
            save(out)
    if "supervised" in out["methods"]:
        base = out["methods"]["supervised"]["runs"]
        others = {m: v["runs"] for m, v in out["methods"].items() if m != "supervised"}
        out["minus_supervised_points"] = {m: paired(runs, base) for m, runs in others.items()}
        out["minus_supervised_points_tta"] = {
            m: {view: paired(runs, base, lambda r, v=view: r["tta_test_acc"][v]) for view in VIEWS}
            for m, runs in others.items()}
    return out


def part_b(args, store: RunStore) -> dict:
    """The rotation pretext, then linear probe, fine-tune and scratch on the few labels."""
    print(f"(b) rotation pretext, {args.pretext_minutes} min, then {args.label_budget} labels", flush=True)
    epochs, per_step = calibrated_epochs(pretext_config(args, 1), args, store, args.pretext_minutes, "rotation")
    pretext = trained(pretext_config(args, epochs, args.pretext_minutes), store, args)
    pretext.update(epochs=epochs, calibrated_s_per_step=round(per_step, 4))
    follow = {"epochs": args.finetune_epochs}
    rows = {}
    for label, changes in (("linear_probe", {"init_run": pretext["run_id"], "init_mode": "linear_probe"}),
                           ("finetune", {"init_run": pretext["run_id"], "init_mode": "finetune"}),
                           ("scratch", {})):
        runs = [trained(few_label_config(args, "supervised", seed, args.finetune_epochs, name=f"few-labels {label}",
                                         **changes), store, args) for seed in range(args.seeds)]
        rows[label] = summary_of(runs)
    follow.update(rows)
    follow["finetune_minus_scratch_points"] = paired(rows["finetune"]["runs"], rows["scratch"]["runs"])
    return {"pretext": pretext, "with_labels": follow}


def machine() -> dict:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the CIFAR-10 .npz (or folder) to train on")
    parser.add_argument("--runs-root", required=True)
    parser.add_argument("--out", default=None, help="write the JSON summary here (in part (a) after every run)")
    parser.add_argument("--resume", default=None,
                        help="(a) an earlier --out file: reuse its calibrated epochs and finished seeds, run the rest "
                             "(the settings must match); --out may name the same file")
    parser.add_argument("--parts", default="a,b", help="a (equal-time methods), b (rotation pretext), or both")
    parser.add_argument("--methods", default="supervised,fixmatch,mixmatch",
                        help="(a) objectives to compare; supervised is the baseline of the differences")
    parser.add_argument("--label-budget", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=60.0, help="(a) training time of each run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.5, help="fastnet's width multiplier")
    parser.add_argument("--batch-size", type=int, default=64, help="labeled images a step (FixMatch: 64)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="weight EMA of every few-label run (FixMatch evaluates one of 0.999). The average "
                             "starts as a copy of the weights after the first step, so at 0.999 those weigh "
                             "0.999^steps: 0.1%% after 7,000 steps")
    parser.add_argument("--weak-pass", default="joint", choices=("joint", "separate"),
                        help="fixmatch, flexmatch: the weak view in the joint forward pass (FixMatch's) or in a "
                             "separate one without gradients (a third less compute a step, but far worse "
                             "pseudo-labels in the run bench/README.md reports)")
    parser.add_argument("--precision", default="bf16", help="fp32 or bf16 (the fast preset's, on this CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--test-size", type=int, default=0, help="test images (0: all 10,000)")
    parser.add_argument("--calibrate-steps", type=int, default=24, help="steps of each calibration run")
    parser.add_argument("--pretext-minutes", type=float, default=60.0, help="(b) training time of the pretext")
    parser.add_argument("--pretext-batch-size", type=int, default=128, help="(b) images a pretext step (× 4 rotations)")
    parser.add_argument("--finetune-epochs", type=int, default=200,
                        help="(b) epochs of the labels for the probe, fine-tune and scratch runs")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    parts = {p.strip() for p in args.parts.split(",")}
    store = RunStore(args.runs_root)
    report: dict = {"machine": machine(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    started = time.time()

    def write(text: str) -> None:
        if args.out:  # whole or not at all: a kill mid-write leaves the previous summary
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".partial")
            partial.write_text(text)
            partial.replace(out)

    def save_a(a_so_far: dict) -> None:
        write(json.dumps({**report, "a_equal_time": a_so_far, "complete": False}, indent=2, default=str))

    if "a" in parts:
        report["a_equal_time"] = part_a(args, store, save_a)
    if "b" in parts:
        report["b_rotation_pretext"] = part_b(args, store)
    report["wall_seconds"] = round(time.time() - started)
    report["complete"] = True
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    write(text)


if __name__ == "__main__":
    main()
