"""Command line: `python -m cifar_core train|submit|split|crt|ensemble|ensemble-result|search|search-worker|
search-report|active|active-worker|active-report|cancel|runs|tensorboard|export|predict|data|describe`.

The train flags are generated from RunConfig's declarations, one flag per field, so the CLI, the
app's form and config.json can never drift apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import fields

from .config import RunConfig, flag_name, parse_augment, parse_kv
from .params import ConfigError, validate_id


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        flag = flag_name(f.name)
        if "param" in f.metadata:
            param = f.metadata["param"]
            help_text = param.help or ""
            if param.kind == "choice":
                help_text += f" [{', '.join(map(str, param.choices))}]"
            if param.low is not None:
                help_text += f" (range {param.low:g}..{param.high:g})"
            help_text += f" default: {param.default!r}"
            if param.kind == "bool":
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                    default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, default=None, help=help_text)
        elif f.name == "augment":
            parser.add_argument(flag, dest=f.name, default=None,
                                help="augmentation chain: 'random_crop:padding=4;hflip;cutout:size=8@0.5', "
                                     "a JSON list, or 'none'")
        else:
            parser.add_argument(flag, dest=f.name, default=None,
                                help=f"parameters of the chosen {f.metadata['registry']}: 'k=v,k=v' or JSON")


def config_from_args(args: argparse.Namespace, defaults: dict | None = None) -> RunConfig:
    """The config of the train flags: `defaults` (RunConfig's when None), else the --preset, then --config,
    then each flag given."""
    data = dict(defaults or {})
    if getattr(args, "preset", None):
        from .experiments.presets import preset
        data = preset(args.preset)
    if getattr(args, "config", None):
        try:
            with open(args.config, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {args.config} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {args.config} is a folder, not a JSON file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {args.config} is not UTF-8 text (a JSON file is)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {args.config} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {args.config} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a JSON object")
        data = {**data, **loaded}
    for f in fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if (f.name in RunConfig.registries() and value != data.get(f.name)
                and getattr(args, f"{f.name}_params", None) is None):
            data.pop(f"{f.name}_params", None)  # another entry than the defaults' or preset's: its own options
        if f.name == "augment":
            value = parse_augment(value)
        elif "registry" in f.metadata:
            value = {**data.get(f.name, {}), **parse_kv(value)} if isinstance(data.get(f.name), dict) \
                else parse_kv(value)
        data[f.name] = value
    return RunConfig.from_dict(data)


def cmd_train(args) -> int:
    from .runs import RunStore
    from .engine import train_run
    from .engine.distributed import in_torchrun, is_other_rank, launched_here, rank_exit_code
    store = RunStore(args.runs_root)
    if args.resume and is_other_rank():  # rank 0 sends the run's config: this machine need not hold the record
        cfg, run_id = RunConfig(), args.resume
    elif args.resume:
        record = store.record(args.resume)
        if not record.exists():
            raise ConfigError(f"run {args.resume} not found in {store.root}")
        cfg = record.config()
        run_id = args.resume
    else:
        cfg = config_from_args(args)
        run_id = args.run_id
    if args.print_config:
        print(cfg.to_json())
        return 0
    if args.estimate:
        from .experiments.estimate import estimate_run
        print(estimate_run(cfg, store, data_source=args.data).report())
        return 0
    if not args.resume:
        check_init_source(cfg, store, run_id)
    record = train_run(cfg, store=store, run_id=run_id, data_source=args.data, resume=bool(args.resume),
                       progress=not args.no_progress, meta=None if args.resume else {"command": args.command_line})
    if not in_torchrun():
        return report_trained(record)
    if not (is_other_rank() or launched_here()):  # the launcher reports a run it started
        report_trained(record)
    return rank_exit_code(record.state())


def check_init_source(cfg: RunConfig, store, run_id: str | None = None) -> None:
    """ConfigError now, before any record or job exists, when cfg.init_run cannot be started from."""
    if cfg.init_run:
        from .engine.init_from import check_init_run
        check_init_run(store, cfg, run_id)


def report_trained(record) -> int:
    """Print a trained run's outcome and record; 0 when it completed."""
    status = record.status()
    results = record.results() or {}
    line = f"run {record.run_id}: {status.get('state')}"
    if "test_acc" in results:
        line += f", test accuracy {100 * results['test_acc']:.2f}% in {results['train_seconds']:.0f} s"
    if status.get("error"):
        line += f" ({status['error']})"
    print(line)
    print(f"record: {record.path}")
    return 0 if status.get("state") == "completed" else 1


def cmd_runs(args) -> int:
    from .jobs import refresh
    from .runs import RunStore, best_accuracy, shown_state
    store = RunStore(args.runs_root)
    refresh(store)  # vanished runs become failed, a stalled queue gets its supervisor back
    rows, problems = [], {}
    for record in store.records():
        status, cfg = record.status(), record.config_dict() or {}
        problem = record.problem()
        if problem:
            problems[record.run_id] = problem
        best = best_accuracy(status)
        created = status.get("created")
        rows.append((record.run_id, "unreadable" if problem else shown_state(status), cfg.get("model", "?"),
                     "" if best is None else f"{100 * best:.2f}%",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
                     if isinstance(created, (int, float)) else "?"))
    if args.json:
        print(json.dumps([{**dict(zip(("run_id", "state", "model", "accuracy", "created"), r)),
                           "problem": problems.get(r[0])} for r in rows]))
        return 0
    if not rows:
        print(f"no runs in {store.root}")
        return 0
    widths = [max(len(str(r[i])) for r in rows + [("run", "state", "model", "acc", "created")])
              for i in range(5)]
    for row in [("run", "state", "model", "acc", "created")] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    for run_id, problem in problems.items():
        print(f"{run_id}: {problem}")
    return 0


def cmd_tensorboard(args) -> int:
    from .jobs import refresh
    from .runs import RunStore
    from .tensorboard_export import RunBeingTrained, convert_run, open_command, tensorboard_modules
    if bool(args.run_ids) == bool(args.all):
        raise ConfigError("name the runs to convert (tensorboard RUN [RUN ...]) or give --all, not both")
    store = RunStore(args.runs_root)
    tensorboard_modules()  # not installed: say so once
    refresh(store)  # a run whose process vanished is no longer "running"
    run_ids = args.run_ids or store.ids()
    if not run_ids:
        print(f"no runs in {store.root}")
        return 0
    converted, failed = 0, 0
    for run_id in run_ids:
        try:
            print(convert_run(store, run_id).summary())
            converted += 1
        except RunBeingTrained as exc:
            print(f"{run_id}: skipped: {exc}", file=sys.stderr if args.run_ids else sys.stdout)
            failed += bool(args.run_ids)  # named explicitly: not converted is a failure; with --all a note
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    if converted:
        print(f"open them: {open_command(store.root)}")
    return 2 if failed else 0


def cmd_worker(args) -> int:
    from .jobs import run_worker
    from .runs import RunStore
    from .jobs import IDLE_EXIT_SECONDS
    idle = IDLE_EXIT_SECONDS if args.idle_exit is None else args.idle_exit
    return run_worker(RunStore(args.runs_root), idle_exit=idle)


def cmd_submit(args) -> int:
    from .jobs import submit
    from .runs import RunStore
    from .data import load_cifar10
    cfg = config_from_args(args)
    store = RunStore(args.runs_root)
    check_init_source(cfg, store)
    load_cifar10(args.data)  # no data: say so now, not when the queued job fails later
    record = submit(cfg, store, data_source=args.data)
    print(record.run_id)
    return 0


def cmd_crt(args) -> int:
    from .engine.init_from import crt_config
    from .runs import RunStore
    store = RunStore(args.runs_root)
    cfg = crt_config(store, args.run_id, epochs=args.epochs)
    if args.print_config:
        print(cfg.to_json())
        return 0
    if args.submit:
        from .data import load_cifar10
        from .jobs import submit
        load_cifar10(args.data)  # no data: say so now, not when the queued job fails later
        record = submit(cfg, store, data_source=args.data, meta={"command": args.command_line})
        print(record.run_id)
        return 0
    from .engine import train_run
    record = train_run(cfg, store=store, data_source=args.data, progress=not args.no_progress,
                       meta={"command": args.command_line})
    return report_trained(record)


def cmd_ensemble(args) -> int:
    from .data import load_cifar10
    from .experiments.ensembles import launch_ensemble, member_configs
    from .runs import RunStore
    cfg = config_from_args(args)
    store = RunStore(args.runs_root)
    check_init_source(cfg, store)
    member_configs(cfg, args.members)  # a bad K or balancing: say so before looking for the data
    load_cifar10(args.data)  # no data: say so now, not when the queued jobs fail later
    ensemble_id = launch_ensemble(cfg, args.members, store, data_source=args.data)
    print(ensemble_id)
    return 0


def cmd_ensemble_result(args) -> int:
    from .experiments.ensembles import ensemble_result
    from .jobs import refresh
    from .runs import RunStore
    store = RunStore(args.runs_root)
    refresh(store)  # a member whose process vanished is failed, not running
    print(json.dumps(ensemble_result(store, args.ensemble_id), indent=2))
    return 0


def cmd_cancel(args) -> int:
    from .jobs import cancel
    from .runs import RunStore
    print(f"{args.run_id}: {cancel(args.run_id, RunStore(args.runs_root))}")
    return 0


def cmd_split(args) -> int:
    from .data import load_cifar10
    from .engine.prepare import run_split, split_counts
    from .runs import RunStore
    cfg = config_from_args(args)
    arrays = load_cifar10(args.data)
    print(json.dumps(split_counts(run_split(cfg, arrays.y_train, RunStore(args.runs_root))), indent=2))
    return 0


def search_storage(args, store) -> str:
    """--storage, else the study's manifest in this runs folder, else its default SQLite file."""
    from .experiments.search import default_storage, read_manifest
    if args.storage:
        return args.storage
    try:
        return read_manifest(store, args.study)["storage"]
    except ConfigError:
        return default_storage(store, args.study)


def cmd_search(args) -> int:
    from .data import load_cifar10
    from .experiments.search import SearchSpec, launch_worker, load_space_file, start_search
    from .runs import RunStore
    store = RunStore(args.runs_root)
    study = args.study or time.strftime("search-%Y%m%d-%H%M%S")
    validate_id(study, "study name")
    spec = SearchSpec(base=config_from_args(args).to_dict(), space=load_space_file(args.space), trials=args.trials,
                      time_budget_min=args.time_budget_min, sampler=args.sampler,
                      sampler_params=parse_kv(args.sampler_params or ""), pruner=args.pruner,
                      pruner_params=parse_kv(args.pruner_params or "")).validated()
    load_cifar10(args.data)  # no data: say so now, not when the first trial fails
    storage = start_search(study, spec, store, args.storage, data_source=args.data)
    print(f"study {study} in {storage_text(storage)}", flush=True)
    if args.detach:
        pid = launch_worker(store, study)
        print(f"worker pid {pid}" if pid else "a worker already runs this study")
        return 0
    return run_search_worker(store, study, storage, args.data)


def storage_text(url: str) -> str:
    from .experiments.search import masked
    return masked(url)


def run_search_worker(store, study: str, storage: str, data_source: str | None) -> int:
    from .experiments.search import SearchWorker, load_search, summary
    why = SearchWorker(store, study, storage, data_source, log=lambda text: print(text, flush=True)).run()
    loaded, spec = load_search(study, storage)
    print(f"search worker done: {why}")
    print(json.dumps(summary(loaded, spec), indent=2, default=str))
    return 0


def cmd_search_worker(args) -> int:
    from .runs import RunStore
    store = RunStore(args.runs_root)
    validate_id(args.study, "study name")
    return run_search_worker(store, args.study, search_storage(args, store), args.data)


def cmd_search_report(args) -> int:
    from .experiments.search import best_config, importances, load_search, summary, trials_csv
    from .runs import RunStore
    store = RunStore(args.runs_root)
    validate_id(args.study, "study name")
    loaded, spec = load_search(args.study, search_storage(args, store))
    report = summary(loaded, spec)
    try:
        report["importances"] = importances(loaded)
    except ConfigError as exc:
        report["importances"] = str(exc)
    print(json.dumps(report, indent=2, default=str))
    if args.csv:
        with open(args.csv, "wb") as fh:
            fh.write(trials_csv(loaded))
    if args.train_best:
        from .jobs import submit
        cfg = best_config(loaded, epochs=args.epochs, train_on_validation=args.train_on_validation)
        record = submit(cfg, store, data_source=args.data, meta={"search": args.study, "best_of_search": True})
        print(f"best config queued as run {record.run_id}")
    return 0


def cmd_active(args) -> int:
    from .experiments.active_loop import ROUND_DEFAULTS, LoopSpec, launch_worker, start_loop
    from .runs import RunStore
    store = RunStore(args.runs_root)
    loop_id = args.loop or time.strftime("active-%Y%m%d-%H%M%S")
    validate_id(loop_id, "active-learning loop id")
    cfg = config_from_args(args, defaults=ROUND_DEFAULTS)
    spec = LoopSpec(base=cfg.to_dict(), strategy=args.strategy, strategy_params=parse_kv(args.strategy_params or ""),
                    initial=args.initial, per_round=args.per_round, rounds=args.rounds, seed=cfg.seed,
                    labeller=args.labeller)
    loop = start_loop(loop_id, spec, store, data_source=args.data)  # checks the definition against the data
    print(f"active-learning loop {loop_id}: {loop.spec.strategy}, {loop.spec.initial:,} + {loop.spec.rounds - 1} × "
          f"{loop.spec.per_round:,} labels, {loop.spec.labeller} labeller", flush=True)
    if args.detach:
        pid = launch_worker(store, loop_id)
        print(f"worker pid {pid}" if pid else "a worker already runs this loop")
        return 0
    return run_active_worker(store, loop_id, args.data)


def run_active_worker(store, loop_id: str, data_source: str | None) -> int:
    from .experiments.active_loop import AWAITING, FAILED, curve_text, loop_report, run_worker
    state = run_worker(store, loop_id, data_source, log=lambda text: print(text, flush=True))
    print(f"active worker done: {state}")
    if state == AWAITING:
        print("label the picked images on the Active learning page (it starts a worker again when they are "
              f"submitted), or run `python -m cifar_core active-worker --loop {loop_id}` after submitting them")
    print(curve_text(loop_report(store, loop_id)))
    return 1 if state == FAILED else 0


def cmd_active_worker(args) -> int:
    from .runs import RunStore
    validate_id(args.loop, "active-learning loop id")
    return run_active_worker(RunStore(args.runs_root), args.loop, args.data)


def cmd_active_report(args) -> int:
    from .experiments.active_loop import curve_text, loop_report
    from .runs import RunStore
    validate_id(args.loop, "active-learning loop id")
    report = loop_report(RunStore(args.runs_root), args.loop)
    print(json.dumps(report, indent=2) if args.json else curve_text(report))
    return 0


def cmd_data(args) -> int:
    from .data import load_cifar10
    started = time.time()
    arrays = load_cifar10(args.data, download=args.download)
    print(f"CIFAR-10: {len(arrays.x_train)} train, {len(arrays.x_test)} test images "
          f"from {arrays.origin} ({time.time() - started:.2f} s)")
    return 0


def cmd_describe(args) -> int:
    from .active import QUERY_STRATEGIES
    from .augment import AUGMENTATIONS
    from .experiments.search import PRUNERS, SAMPLERS
    from .imbalance import BALANCING
    from .data import IMBALANCE
    from .engine import OBJECTIVES
    from .models import MODELS
    from .schedules import SCHEDULES
    out = {"config": {name: p.to_dict() for name, p in RunConfig.scalar_params().items()},
           "models": MODELS.describe(), "augmentations": AUGMENTATIONS.describe(),
           "schedules": SCHEDULES.describe(), "imbalance": IMBALANCE.describe(),
           "balance": BALANCING.describe(), "search_samplers": SAMPLERS.describe(),
           "search_pruners": PRUNERS.describe(), "query_strategies": QUERY_STRATEGIES.describe(),
           "objectives": OBJECTIVES.describe()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_export(args) -> int:
    from .serve.export import describe_checkpoint, export_run
    from .runs import RunStore, validate_run_id
    validate_run_id(args.run_id)
    started = time.time()
    result = export_run(args.run_id, RunStore(args.runs_root), out=args.out, name=args.name,
                        data_source=args.data, fp16_weights=args.fp16_weights, evaluate=args.evaluate,
                        export_command=args.command_line, train_command=args.train_command, int8=args.int8,
                        tta=args.tta, int8_min_agreement=args.int8_min_agreement)
    card, parity = result.card, result.card["parity"]
    print(f"exported {args.run_id} → {result.onnx_path} ({card['file']['bytes'] / 2**20:.2f} MB) "
          f"in {time.time() - started:.1f} s")
    print(f"weights {describe_checkpoint(card)}")
    print(f"parity on {parity['images']} real test images: max |Δlogit| batch 1 = "
          f"{parity['max_abs_diff_batch_1']:.2e}, batch {parity['images']} = {parity['max_abs_diff_batch_n']:.2e}, "
          f"top-1 mismatches {parity['top1_mismatches']}")
    if "quantization" in card:
        agreement = card["quantization"]["agreement"]
        print(f"int8: top-1 agreement with the fp32 export {100 * agreement['top1_agreement']:.1f}% on "
              f"{agreement['images']} images, max |Δlogit| {agreement['max_abs_logit_diff']:.3f}")
    evaluation = card["evaluation"]
    if "onnxruntime_test_acc" in evaluation:
        print(f"onnxruntime test accuracy {100 * evaluation['onnxruntime_test_acc']:.2f}% "
              f"(first 1,000: {100 * evaluation['onnxruntime_first_1000_acc']:.2f}%)")
    print(f"model card: {result.card_path}")
    return 0


def cmd_predict(args) -> int:
    from .images import ImageReadError, read_image
    from .serve.inference import Classifier, ModelUnusable
    try:
        classifier = Classifier(args.model)
    except ModelUnusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    results = []
    for name in args.images:
        try:
            tile = read_image(name, name=name).tile
        except ImageReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        prediction = classifier.predict(tile)
        top = prediction.top_k(args.top_k)[0]
        results.append({"image": name, "top_k": [{"class": c, "prob": p} for c, p in top]})
        if not args.json:
            print(f"{name}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    if args.json:
        print(json.dumps({"model": str(args.model), "provider": classifier.provider, "results": results}))
    return 1 if failures else 0


def _preset_names() -> list[str]:
    from .experiments.presets import presets
    return [repr(name) if " " in name else name for name in presets()]


def add_config_source_flags(parser: argparse.ArgumentParser) -> None:
    """--config, --preset and --data: where a run's config and data come from (train, submit, split)."""
    parser.add_argument("--config", help="a config.json to start from (flags override it)")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="start from a preset (--config and flags override it): " + ", ".join(_preset_names()))
    parser.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder (default: $CIFAR10_NPZ, cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_core", description="CIFAR-10 Lab command line")
    parser.add_argument("--runs-root", default=None, help="runs folder (default: $CIFAR_LAB_RUNS or ./runs)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model and write a run record")
    add_config_source_flags(train)
    train.add_argument("--run-id", default=None, help="id of the new run folder (default: generated)")
    train.add_argument("--resume", default=None, metavar="RUN_ID", help="continue a run from its last checkpoint (best.pt when last.pt is damaged); a queued run starts")
    train.add_argument("--no-progress", action="store_true", help="no terminal progress bar")
    train.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    train.add_argument("--estimate", action="store_true",
                       help="print how long the run would take on this machine, with its parts and what the "
                            "estimate is based on (finished runs or a few seconds' probe), and exit without training")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list runs with state and best accuracy")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    submit = sub.add_parser("submit", help="queue a run as a background job (same flags as train)")
    add_config_source_flags(submit)
    add_config_flags(submit)
    submit.set_defaults(func=cmd_submit)

    split = sub.add_parser("split", help="print the per-class counts of a run's training split as JSON "
                                         "(labeled, unlabeled, validation; same flags as train)")
    add_config_source_flags(split)
    add_config_flags(split)
    split.set_defaults(func=cmd_split)

    crt = sub.add_parser("crt", help="classifier re-training (cRT, Kang et al. 2020) of a finished run: its "
                                     "features frozen, the head re-initialised and trained with class-balanced "
                                     "sampling for a few epochs",
                         description="Builds the run from RUN_ID's config (same data, split, seed, model and "
                                     "augmentation) with --init-run RUN_ID --init-mode crt --balance "
                                     "class_balanced_sampling and a short cosine schedule, then trains it here "
                                     "(or queues it with --submit).")
    crt.add_argument("run_id", metavar="RUN_ID", help="a completed run in the runs folder")
    crt.add_argument("--epochs", type=int, default=None,
                     help="epochs of re-training (default: a tenth of the run's, 1 to 10)")
    crt.add_argument("--submit", action="store_true", help="queue it as a background job instead")
    crt.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder (default: $CIFAR10_NPZ, cache)")
    crt.add_argument("--no-progress", action="store_true", help="no terminal progress bar")
    crt.add_argument("--print-config", action="store_true", help="print the cRT run's config and exit")
    crt.set_defaults(func=cmd_crt)

    ensemble = sub.add_parser("ensemble", help="queue an EasyEnsemble: K runs, each on its own balanced "
                                               "under-sample (same flags as train); prints the ensemble id")
    ensemble.add_argument("--members", type=int, default=5, help="K, the number of member runs (2..100; default 5)")
    add_config_source_flags(ensemble)
    add_config_flags(ensemble)
    ensemble.set_defaults(func=cmd_ensemble)

    ensemble_result = sub.add_parser("ensemble-result", help="an ensemble's averaged-logits evaluation and each "
                                                             "member's own, as JSON")
    ensemble_result.add_argument("ensemble_id", metavar="ID")
    ensemble_result.set_defaults(func=cmd_ensemble_result)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_cancel)

    tensorboard = sub.add_parser(
        "tensorboard", help="write runs' metrics as TensorBoard event files (<run>/tensorboard/)",
        description="Rewrite <runs-root>/<run>/tensorboard/ from the run's metrics.jsonl, results.json and "
                    "config.json (a re-run replaces the file, never adds to it; training writes the same "
                    "events live when the tensorboard package is installed). Then: tensorboard --logdir "
                    "<runs-root>")
    tensorboard.add_argument("run_ids", nargs="*", metavar="RUN", help="run ids to convert")
    tensorboard.add_argument("--all", action="store_true", help="every run in the runs root (runs that "
                             "train now are skipped: their events are written live)")
    tensorboard.set_defaults(func=cmd_tensorboard)

    search = sub.add_parser(
        "search", help="search over the config with Optuna: every trial a background run (train flags set "
                       "the fixed part)",
        description="Creates (or continues) an Optuna study whose trials are ordinary runs of the job queue, "
                    "scored by their final validation accuracy (val_size must be > 0), then works on it "
                    "here until the budget is spent (--detach: in a background worker). Other machines "
                    "join with `search-worker --storage URL --study NAME`.")
    search.add_argument("--space", required=True,
                        help="a JSON file mapping field names (lr, model_params.dropout, augment.rotation, "
                             "augment.rotation.degrees ...) to {low, high, log} or {choices}; {} or true: "
                             "the declared range")
    search.add_argument("--trials", type=int, default=20, help="trials in all, over every worker (default 20)")
    search.add_argument("--time-budget-min", type=float, default=0.0,
                        help="start no trial after this many minutes from the study's first start (0: none)")
    search.add_argument("--study", default=None, help="study name (default: search-<date>-<time>)")
    search.add_argument("--storage", default=None,
                        help="SQLAlchemy URL (default: sqlite file <runs>/.searches/<study>.db; PostgreSQL "
                             "for several machines: postgresql+psycopg2://user:pass@host/db)")
    search.add_argument("--sampler", default="tpe", help="tpe (default), random or gp")
    search.add_argument("--sampler-params", default=None, help="the sampler's options: 'k=v,k=v' or JSON")
    search.add_argument("--pruner", default="median", help="median (default), successive_halving, hyperband or none")
    search.add_argument("--pruner-params", default=None, help="the pruner's options: 'k=v,k=v' or JSON")
    search.add_argument("--detach", action="store_true", help="work in a background worker; print and return")
    add_config_source_flags(search)
    add_config_flags(search)
    search.set_defaults(func=cmd_search)

    search_worker = sub.add_parser("search-worker", help="work on an existing study until its budget is spent "
                                                         "(run it on as many machines as you like)")
    search_worker.add_argument("--study", required=True)
    search_worker.add_argument("--storage", default=None,
                               help="the study's SQLAlchemy URL (default: from this runs folder)")
    search_worker.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder")
    search_worker.set_defaults(func=cmd_search_worker)

    search_report = sub.add_parser("search-report", help="a study's trials by state, best trial, fANOVA "
                                                         "importances (JSON); optionally CSV and train the best")
    search_report.add_argument("--study", required=True)
    search_report.add_argument("--storage", default=None, help="default: from this runs folder")
    search_report.add_argument("--csv", default=None, help="write the trials table to this CSV file")
    search_report.add_argument("--train-best", action="store_true", help="queue the best trial's config as a run")
    search_report.add_argument("--epochs", type=int, default=None, help="with --train-best: train this many epochs")
    search_report.add_argument("--train-on-validation", action="store_true",
                               help="with --train-best: give the validation images back to training")
    search_report.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder")
    search_report.set_defaults(func=cmd_search_report)

    active = sub.add_parser(
        "active", help="an active-learning loop: rounds of background runs, each on more labels picked by a query "
                       "strategy (train flags set the per-round training config)",
        description="Round 0 trains on --initial labels (the same number per class); after each round its model "
                    "scores the unlabeled pool, the strategy picks --per-round images, their labels are revealed "
                    "(--labeller oracle) or given by a person on the Active learning page (human), and the next "
                    "round trains on them too. Without train flags a round trains the half-width fast net for 8 "
                    "epochs on the full training pool. Runs here until done (--detach: in a background worker).")
    active.add_argument("--strategy", default="margin",
                        help="query strategy: random, least_confidence, margin (default), entropy, coreset, badge, "
                             "typiclust (python -m cifar_core describe: query_strategies)")
    active.add_argument("--strategy-params", default=None, help="the strategy's options: 'k=v,k=v' or JSON")
    active.add_argument("--initial", type=int, default=1000, help="labels of round 0, a multiple of 10 (default 1000)")
    active.add_argument("--per-round", type=int, default=1000, help="labels each later round adds (default 1000)")
    active.add_argument("--rounds", type=int, default=10, help="training rounds, round 0 included (default 10)")
    active.add_argument("--labeller", default="oracle", help="oracle (CIFAR-10's labels, default) or human")
    active.add_argument("--loop", default=None, help="loop id (default: active-<date>-<time>); the same id and "
                                                      "definition continues a loop")
    active.add_argument("--detach", action="store_true", help="work in a background worker; print and return")
    add_config_source_flags(active)
    add_config_flags(active)
    active.set_defaults(func=cmd_active)

    active_worker = sub.add_parser("active-worker", help="run an active-learning loop until it completes, fails "
                                                         "or waits for a person's labels")
    active_worker.add_argument("--loop", required=True)
    active_worker.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder")
    active_worker.set_defaults(func=cmd_active_worker)

    active_report = sub.add_parser("active-report", help="an active-learning loop's learning curve: test accuracy "
                                                         "against the number of labels")
    active_report.add_argument("--loop", required=True)
    active_report.add_argument("--json", action="store_true", help="print the report as JSON")
    active_report.set_defaults(func=cmd_active_report)

    worker = sub.add_parser("worker", help="the job supervisor (started automatically)")
    worker.add_argument("--idle-exit", type=float, default=None,
                        help="exit after this many idle seconds (default: $CIFAR_LAB_WORKER_IDLE or 60)")
    worker.set_defaults(func=cmd_worker)

    data = sub.add_parser("data", help="find, download or check CIFAR-10")
    data.add_argument("--data", default=None, help="CIFAR-10 .npz or offline folder")
    data.add_argument("--download", action="store_true", help="download with torchvision if missing")
    data.set_defaults(func=cmd_data)

    export = sub.add_parser("export", help="export a completed run to ONNX (+ model card), parity-checked")
    export.add_argument("run_id")
    export.add_argument("--out", default=None, help="the .onnx path (default: <run>/export/<run_id>.onnx)")
    export.add_argument("--name", default=None, help="model name in the card (default: the run id)")
    export.add_argument("--data", default=None,
                        help="CIFAR-10 .npz or offline folder (read only for --evaluate and --int8 calibration)")
    export.add_argument("--fp16-weights", action="store_true",
                        help="store weights as float16 (cast to float32 in the graph): half the file size")
    export.add_argument("--int8", action="store_true",
                        help="statically quantize to int8 (onnxruntime, calibrated on 1,000 training images; "
                             "needs the data): a quarter of the size and faster on CPUs with VNNI")
    export.add_argument("--int8-min-agreement", type=float, default=0.97,
                        help="with --int8: the least top-1 agreement with the fp32 export on the 200 sample "
                             "images (weak models, with many near-ties, agree less)")
    # export.TTA_CHOICES, spelled out so that the CLI does not import torch to build its parser
    export.add_argument("--tta", default="run", choices=("run", "none", "flip", "flip+translate"),
                        help="test-time views inside the graph: as the run evaluated (default), or fewer for "
                             "faster inference (each view is one more pass through the network)")
    export.add_argument("--train-command", default=None,
                        help="the command that trained the run, for the card (default: the one recorded "
                             "in status.json, else one rebuilt from config.json)")
    export.add_argument("--evaluate", action="store_true",
                        help="also measure onnxruntime accuracy on the full test set (written to the card)")
    export.set_defaults(func=cmd_export)

    predict = sub.add_parser("predict", help="classify image files with an exported .onnx model")
    predict.add_argument("model", help="an .onnx file (shipped in checkpoints/ or exported)")
    predict.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF ...)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    predict.set_defaults(func=cmd_predict)

    describe = sub.add_parser("describe", help="print every declared parameter as JSON")
    describe.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = run_command(argv)
    if "RANK" in os.environ:
        from .engine.distributed import in_torchrun, leave_rank
        if in_torchrun():
            leave_rank(code)
    return code


def run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "python -m cifar_core " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        for name in ("run_id", "resume"):  # ids become folder names: check them before anything else
            if isinstance(getattr(args, name, None), str):
                validate_id(getattr(args, name), "run id")
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be used (a file where a folder belongs, permissions, disk full)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
