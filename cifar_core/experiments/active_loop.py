"""Active learning: a loop of training rounds, each on more labels, picked by a query strategy.

A loop is defined once (`LoopSpec`: the query strategy and its options, the initial labels, the labels
each round adds, the rounds, the per-round training config, the seed and the labeller) and kept with
its progress in a manifest, ``<runs>/.active/<loop>/loop.json``. Round k:

1. its label set ``round-<k>.json`` (training-set positions, their labels and where each label came
   from) is written: round 0 draws the initial labels (the same number per class, seeded); a later
   round adds the labelled batch of the round before;
2. an ordinary background run of the job queue trains on it (its config has ``label_set`` =
   "<loop>/<k>"; status.json is tagged ``active_loop`` / ``active_round``, so it shows on Runs);
3. when the run completes, its model scores the still-unlabeled pool (softmax and penultimate
   embeddings, through the finished-run loader of engine.features) and the strategy picks the next
   batch, ``query-<k>.json``;
4. the batch's labels come from CIFAR-10 at once (labeller "oracle"), or from a person (labeller
   "human": the loop waits in state "awaiting labels" until `submit_labels`); round k+1 follows.

`tick` does whatever the files on disk call for next, as far as it can without waiting, and returns
the loop's state. Every step writes one file atomically and gives the same file when repeated (the
draws are seeded per round; a round's run is found again by its tags), so a killed worker or a
restarted machine simply ticks again. `python -m cifar_core active-worker --loop ID` ticks until the
loop completes, fails, is stopped or waits for labels. The round runs have no owner: they keep
training when the worker dies, and the next worker takes them up.

Every strategy scores with the round's own classifier: TypiClust (tagged self_supervised, made for a
self-supervised encoder's embeddings) gets that classifier's penultimate features here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..active import QUERY_STRATEGIES, PoolView, select
from ..active.strategies import NEEDS_EMBEDDINGS, NEEDS_LABELED, NEEDS_PROBS
from ..config import RunConfig
from ..data import CLASSES, NUM_CLASSES, label_budget, load_cifar10, to_device_tensors
from ..devices import resolve_device
from ..engine.features import load_feature_model, model_input
from ..engine.prepare import ACTIVE_DIR, label_set_path, read_label_set, run_split
from ..jobs import cancel, file_lock, submit
from ..models import classifier_head
from ..params import ConfigError, Param, reject_unknown, validate_id
from ..processes import process_start_time
from ..runs import FINAL_STATES, RunRecord, RunStore, atomic_write_json, final_metrics, mean_std, read_json_object

LABELLERS = ("oracle", "human")
# where a loop stands (the manifest's "state"); the worker keeps ticking in the first two
TRAINING, SCORING, AWAITING, COMPLETED, FAILED, STOPPED = (
    "training", "scoring", "awaiting labels", "completed", "failed", "stopped")
BUSY_STATES = (TRAINING, SCORING)
SOURCES = {"initial": "CIFAR-10's labels of the initial random draw", "oracle": "CIFAR-10's labels, revealed",
           "human": "a person's labels"}
POLL_SECONDS = 1.0
SCORE_BATCH = 500  # images per forward pass when scoring the pool
INITIAL_STAGE, SELECT_STAGE = 0, 1  # seed streams: the initial draw, each round's selection

LOOP_PARAMS = (
    Param("initial", "int", 1000, 10, 50000, help="Labeled images of round 0: the same number of each class, "
          "drawn at random (seeded) from the training pool."),
    Param("per_round", "int", 1000, 1, 50000, help="Images the query strategy picks after each round; once "
          "labelled, the next round trains on them too."),
    Param("rounds", "int", 10, 1, 200, help="Training rounds: round 0 on the initial labels, each later one on "
          "per_round more."),
    Param("seed", "int", 0, 0, 2**31 - 1, help="Seeds the initial draw, every selection and every round's run: "
          "loops that differ only by it are repeats (the page shows their mean ± std)."),
    Param("labeller", "choice", "oracle", choices=LABELLERS, help="oracle: CIFAR-10's labels of the picked images "
          "are revealed at once; human: the loop waits until a person labels them (Active learning page)."),
)

# The per-round training config when none is given: the fast net at half width, a few epochs, evaluated
# once at the end on the whole test set (the learning curve's point).
ROUND_DEFAULTS: dict = {
    "model": "fastnet", "model_params": {"width": 0.5, "whiten": True, "dropout": 0.0},
    "subset": "full", "val_size": 0, "test_size": 0, "epochs": 8, "eval_every": 8, "log_every": 5,
    "batch_size": 250, "optimizer": "sgd", "lr": 0.6, "momentum": 0.85, "nesterov": True,
    "weight_decay": 1.33e-3, "bias_lr_scale": 64.0, "schedule": "onecycle",
    "schedule_params": {"warmup_fraction": 0.23, "start_factor": 0.2, "final_factor": 0.07},
    "label_smoothing": 0.2, "tta_flip": True, "alternating_flip": True,
    "augment": [{"name": "random_crop", "params": {"padding": 2, "pad_mode": "reflect"}, "p": 1.0}],
}


# ---- the definition ---------------------------------------------------------------------------------------

@dataclass
class LoopSpec:
    """What a loop does: `base` is the per-round training config (a RunConfig dict; the loop sets its
    label_set, seed and name each round)."""

    base: dict
    strategy: str = "margin"
    strategy_params: dict | None = None
    initial: int = 1000
    per_round: int = 1000
    rounds: int = 10
    seed: int = 0
    labeller: str = "oracle"

    def validated(self) -> "LoopSpec":
        values = {p.name: p.validate(getattr(self, p.name), "active") for p in LOOP_PARAMS}
        if values["initial"] % NUM_CLASSES:
            raise ConfigError(f"active.initial {values['initial']} must be a multiple of {NUM_CLASSES} (the same "
                              "number of labels per class)")
        if not isinstance(self.base, dict):
            raise ConfigError("active.base: the per-round training config must be an object of RunConfig fields")
        base = RunConfig.from_dict(self.base)
        if base.label_budget or base.label_set:
            raise ConfigError("the per-round training config sets label_budget or label_set, but the loop decides "
                              "which images are labeled: set label_budget to 0 and label_set empty")
        params = QUERY_STRATEGIES.validate(self.strategy, self.strategy_params)
        base = base.replace(seed=values["seed"], name="")
        return LoopSpec(base=base.to_dict(), strategy=self.strategy, strategy_params=params, **values)

    def labels_at(self, round_number: int) -> int:
        """Labeled images of round `round_number`."""
        return self.initial + round_number * self.per_round

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Any) -> "LoopSpec":
        if not isinstance(data, dict):
            raise ConfigError("an active-learning loop's definition must be a JSON object")
        reject_unknown(data, cls.__dataclass_fields__, "active", "key(s)")
        if "base" not in data:
            raise ConfigError("active: the definition has no per-round training config (base)")
        return cls(**data)


def round_config(spec: LoopSpec, loop_id: str, round_number: int) -> RunConfig:
    """The config of round `round_number`'s run: the per-round config on that round's label set."""
    return RunConfig.from_dict({**spec.base, "label_set": f"{loop_id}/{round_number}", "label_budget": 0,
                                "seed": spec.seed, "name": f"active {loop_id} round {round_number}"})


def training_pool(spec: LoopSpec, y_train: np.ndarray) -> np.ndarray:
    """Positions in the training set of the pool every round draws from (the per-round config's subset,
    less its validation hold-out and imbalance), sorted."""
    return run_split(RunConfig.from_dict(spec.base), y_train).train_idx


def check_pool(spec: LoopSpec, y_train: np.ndarray) -> None:
    """ConfigError unless the pool holds the initial draw and every round's batch."""
    pool = training_pool(spec, y_train)
    needed = spec.labels_at(spec.rounds - 1)
    if needed > len(pool):
        raise ConfigError(f"{spec.rounds} rounds label {needed:,} images in the end ({spec.initial:,} + "
                          f"{spec.rounds - 1} × {spec.per_round:,}), but the training pool holds {len(pool):,}: "
                          "fewer rounds, fewer labels per round, or a larger pool")
    label_budget(y_train, pool, spec.initial, 0)  # a class too small for the initial draw: said here


def stage_seed(seed: int, stage: int, round_number: int = 0) -> int:
    return int(np.random.SeedSequence([int(seed), stage, int(round_number)]).generate_state(1)[0])


# ---- files ------------------------------------------------------------------------------------------------

def loops_dir(store: RunStore) -> Path:
    return store.root / ACTIVE_DIR


def loop_dir(store: RunStore, loop_id: str) -> Path:
    return loops_dir(store) / validate_id(loop_id, "active-learning loop id")


def manifest_path(store: RunStore, loop_id: str) -> Path:
    return loop_dir(store, loop_id) / "loop.json"


def round_path(store: RunStore, loop_id: str, round_number: int) -> Path:
    return label_set_path(store, f"{loop_id}/{round_number}")


def query_path(store: RunStore, loop_id: str, round_number: int) -> Path:
    return loop_dir(store, loop_id) / f"query-{round_number}.json"


def worker_lock_path(store: RunStore, loop_id: str) -> Path:
    return loop_dir(store, loop_id) / "worker.lock"


@dataclass
class Loop:
    """A loop as its manifest holds it: the definition and where it stands."""

    loop_id: str
    spec: LoopSpec
    created: float
    data_source: str | None = None
    state: str = TRAINING
    error: str | None = None
    stopped: bool = False
    rounds: dict[int, dict] = field(default_factory=dict)  # round -> {"run_id", "labels", "test_acc", ...}

    def curve(self) -> list[dict]:
        """The learning curve so far: one row per finished round (round, labels, test_acc, run_id)."""
        return [{"round": k, "labels": info.get("labels"), "test_acc": info.get("test_acc"),
                 "run_id": info.get("run_id")}
                for k, info in sorted(self.rounds.items()) if info.get("test_acc") is not None]


def read_loop(store: RunStore, loop_id: str) -> Loop:
    """The loop `loop_id` of this runs root; ConfigError when there is none or its manifest is damaged."""
    path = manifest_path(store, loop_id)
    data, why = read_json_object(path)
    if data is None and why is None:
        raise ConfigError(f"no active-learning loop {loop_id!r} in {store.root}")
    try:
        if why:
            raise ConfigError(why)
        spec = LoopSpec.from_dict(data.get("spec")).validated()
        rounds = {}
        for info in data.get("rounds", []):
            if not isinstance(info, dict) or not isinstance(info.get("round"), int):
                raise ConfigError("a round entry is not an object with a round number")
            rounds[info["round"]] = info
        return Loop(loop_id, spec, float(data.get("created", 0)), data.get("data_source"),
                    str(data.get("state", TRAINING)), data.get("error"), bool(data.get("stopped")), rounds)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"active-learning loop {loop_id}: its manifest {path} is damaged ({exc}); delete the "
                          "folder to start the loop again, or start one under another id") from None


def update_loop(store: RunStore, loop_id: str, round_info: tuple[int, dict] | None = None, **changes) -> None:
    """Change the manifest's fields (and one round's entry) under the loop's lock, so the worker and the
    page never lose each other's writes."""
    path = manifest_path(store, loop_id)
    with file_lock(loop_dir(store, loop_id) / ".lock"):
        data, why = read_json_object(path)
        if data is None:
            raise ConfigError(f"active-learning loop {loop_id}: its manifest {path} is " + (why or "missing"))
        data.update(changes)
        if round_info is not None:
            number, info = round_info
            rounds = {r["round"]: r for r in data.get("rounds", []) if isinstance(r, dict) and "round" in r}
            rounds[number] = {**rounds.get(number, {}), **info, "round": number}
            data["rounds"] = [rounds[k] for k in sorted(rounds)]
        data["updated"] = time.time()
        atomic_write_json(path, data)


def start_loop(loop_id: str, spec: LoopSpec, store: RunStore, data_source: str | None = None) -> Loop:
    """Create the loop (or continue the same one: same definition) after checking it against the data;
    a worker (`run_worker`, `launch_worker`) then runs it."""
    validate_id(loop_id, "active-learning loop id")
    spec = spec.validated()
    check_pool(spec, load_cifar10(data_source).y_train)
    path = manifest_path(store, loop_id)
    existing, why = read_json_object(path)
    if why:
        raise ConfigError(f"active-learning loop {loop_id} exists but its manifest is damaged ({why}): choose "
                          "another id")
    if existing is not None:
        if json.dumps(existing.get("spec"), sort_keys=True) != json.dumps(spec.to_dict(), sort_keys=True):
            raise ConfigError(f"active-learning loop {loop_id} already exists with another definition: choose "
                              "another id, or repeat the same definition to continue it")
        update_loop(store, loop_id, stopped=False)
        return read_loop(store, loop_id)
    atomic_write_json(path, {"loop": loop_id, "created": time.time(), "spec": spec.to_dict(),
                             "data_source": data_source, "rounds": [], "state": TRAINING, "error": None,
                             "stopped": False})
    return read_loop(store, loop_id)


def list_loops(store: RunStore) -> tuple[list[Loop], dict[str, str]]:
    """(this runs root's loops, newest first; {loop id: why its manifest cannot be read})."""
    loops, problems = [], {}
    folder = loops_dir(store)
    for path in sorted(folder.glob("*/loop.json")) if folder.is_dir() else []:
        try:
            loops.append(read_loop(store, path.parent.name))
        except ConfigError as exc:
            problems[path.parent.name] = str(exc)
    return sorted(loops, key=lambda loop: loop.created, reverse=True), problems


# ---- label sets and queries -------------------------------------------------------------------------------

@dataclass
class LabelSet:
    """A round's labeled images: training-set positions, their labels, each label's source
    (SOURCES) and the round it was added in."""

    indices: np.ndarray
    labels: np.ndarray
    sources: list[str]
    added: list[int]


def read_round(store: RunStore, loop_id: str, round_number: int, n_train: int) -> LabelSet:
    """Round `round_number`'s label set; ConfigError when it is missing or damaged."""
    indices, labels = read_label_set(store, f"{loop_id}/{round_number}", n_train)
    data = read_json_object(round_path(store, loop_id, round_number))[0] or {}
    sources, added = data.get("sources"), data.get("added")
    if not (isinstance(sources, list) and isinstance(added, list) and len(sources) == len(added) == len(indices)):
        raise ConfigError(f"label_set {loop_id}/{round_number}: its file is damaged: 'sources' and 'added' must "
                          "list one entry per image")
    return LabelSet(indices, labels, [str(s) for s in sources], [int(a) for a in added])


def write_round(store: RunStore, loop_id: str, round_number: int, label_set: LabelSet) -> None:
    atomic_write_json(round_path(store, loop_id, round_number), {
        "loop": loop_id, "round": round_number, "indices": label_set.indices.tolist(),
        "labels": label_set.labels.tolist(), "sources": label_set.sources, "added": label_set.added,
        "written": time.time()})


def initial_label_set(spec: LoopSpec, y_train: np.ndarray) -> LabelSet:
    """Round 0: `initial` images, the same number per class, drawn from the pool with the loop's seed."""
    pool = training_pool(spec, y_train)
    picked = pool[label_budget(y_train, pool, spec.initial, stage_seed(spec.seed, INITIAL_STAGE))]
    return LabelSet(picked, y_train[picked].astype(np.int64), ["initial"] * len(picked), [0] * len(picked))


def read_query(store: RunStore, loop_id: str, round_number: int) -> dict:
    """query-<k>.json: the batch round k's model picked ("indices", "scores", most wanted first) and, once
    labelled, "labels" and "labeller"; ConfigError when it is damaged."""
    path = query_path(store, loop_id, round_number)
    data, why = read_json_object(path)
    if data is None:
        raise ConfigError(f"active-learning loop {loop_id}: round {round_number}'s batch "
                          + (f"is damaged ({why})" if why else "has not been picked yet"))
    indices, labels = data.get("indices"), data.get("labels")
    if not (isinstance(indices, list) and indices and all(isinstance(i, int) for i in indices)
            and isinstance(data.get("scores"), list) and len(data["scores"]) == len(indices)
            and (labels is None or (isinstance(labels, list) and len(labels) == len(indices)))):
        raise ConfigError(f"active-learning loop {loop_id}: {path} is damaged (indices, scores and labels must be "
                          "lists of one entry per picked image)")
    return data


def next_label_set(store: RunStore, loop: Loop, round_number: int, y_train: np.ndarray) -> LabelSet | None:
    """Round `round_number`'s label set: the one before plus its labelled batch; None while a person has
    not labelled that batch yet."""
    previous = read_round(store, loop.loop_id, round_number - 1, len(y_train))
    query = read_query(store, loop.loop_id, round_number - 1)
    new = np.asarray(query["indices"], dtype=np.int64)
    if query.get("labels") is not None:
        labels, source = np.asarray(query["labels"], dtype=np.int64), str(query.get("labeller") or "human")
    elif loop.spec.labeller == "oracle":
        labels, source = y_train[new].astype(np.int64), "oracle"
    else:
        return None
    return LabelSet(np.concatenate([previous.indices, new]), np.concatenate([previous.labels, labels]),
                    previous.sources + [source] * len(new), previous.added + [round_number] * len(new))


# ---- scoring the pool with a round's model ----------------------------------------------------------------

def model_outputs(model, x_train: np.ndarray, positions: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """(softmax (N, C) float64, penultimate embeddings (N, D) float32) of a finished run's model
    (engine.features' loader) for the training images at `positions`, from one forward pass each: a hook on
    the classifier head reads its input while the model's own forward gives the logits."""
    import torch

    captured: list = []
    hook = classifier_head(model.model).register_forward_hook(
        lambda _module, inputs, _out: captured.append(inputs[0].float().cpu()))
    probs = []
    try:
        with torch.no_grad():
            for start in range(0, len(positions), SCORE_BATCH):
                x = model_input(model, to_device_tensors(x_train[positions[start:start + SCORE_BATCH]], device))
                logits = model.model(x.contiguous(memory_format=torch.channels_last)).float()
                probs.append(torch.softmax(logits, dim=1).cpu())
    finally:
        hook.remove()
    return torch.cat(probs).double().numpy(), torch.cat(captured).numpy().astype(np.float32)


def pool_view(store: RunStore, run_id: str, strategy: str, x_train: np.ndarray, unlabeled: np.ndarray,
              labeled: np.ndarray, device: str) -> PoolView:
    """What `strategy` reads about the unlabeled pool, from the finished run `run_id`'s model (nothing
    for random selection)."""
    tags = QUERY_STRATEGIES.get(strategy).tags
    if not {NEEDS_PROBS, NEEDS_EMBEDDINGS, NEEDS_LABELED} & set(tags):
        return PoolView(size=len(unlabeled))
    target = resolve_device(device)
    model = load_feature_model(store, run_id, "the round's run").to(target)
    try:
        probs, embeddings = model_outputs(model, x_train, unlabeled, target)
        labeled_embeddings = model_outputs(model, x_train, labeled, target)[1] if NEEDS_LABELED in tags else None
    except ConfigError as exc:  # a model without a recognisable classifier head
        raise ConfigError(f"the round's run {run_id}: {exc}") from None
    return PoolView(probs=probs, embeddings=embeddings, labeled_embeddings=labeled_embeddings)


def write_query(store: RunStore, loop: Loop, round_number: int, record: RunRecord, data_source: str | None) -> None:
    """Score the pool still unlabeled after round `round_number` with its run's model, pick the next batch
    and write query-<k>.json."""
    started = time.time()
    arrays = load_cifar10(data_source)
    labeled = read_round(store, loop.loop_id, round_number, len(arrays.y_train)).indices
    unlabeled = np.setdiff1d(training_pool(loop.spec, arrays.y_train), labeled)
    view = pool_view(store, record.run_id, loop.spec.strategy, arrays.x_train, unlabeled, labeled,
                     loop.spec.base["device"])
    positions, scores = select(loop.spec.strategy, loop.spec.strategy_params, view, loop.spec.per_round,
                               stage_seed(loop.spec.seed, SELECT_STAGE, round_number))
    atomic_write_json(query_path(store, loop.loop_id, round_number), {
        "loop": loop.loop_id, "round": round_number, "run_id": record.run_id, "strategy": loop.spec.strategy,
        "strategy_params": loop.spec.strategy_params, "indices": unlabeled[positions].tolist(),
        "scores": [float(s) if np.isfinite(s) else None for s in scores], "pool": int(len(unlabeled)),
        "labels": None, "labeller": None, "selected": time.time(), "seconds": round(time.time() - started, 2)})


# ---- the loop's steps --------------------------------------------------------------------------------------

def round_run(store: RunStore, loop: Loop, round_number: int) -> RunRecord | None:
    """The run of a round: the manifest's, else the newest run tagged with the loop and round (submitted
    by a worker that died before it noted the id); None when there is none."""
    run_id = loop.rounds.get(round_number, {}).get("run_id")
    if run_id and store.record(run_id).exists():
        return store.record(run_id)
    tagged = []
    for record in store.records():
        status = record.status()
        if (status.get("active_loop") == loop.loop_id and status.get("active_round") == round_number
                and not status.get("active_retired")):
            tagged.append((status.get("created", 0), record))
    if not tagged:
        return None
    record = max(tagged, key=lambda pair: pair[0])[1]
    update_loop(store, loop.loop_id, (round_number, {"run_id": record.run_id}))
    return record


def submit_round(store: RunStore, loop: Loop, round_number: int, data_source: str | None) -> RunRecord:
    labels = loop.spec.labels_at(round_number)
    record = submit(round_config(loop.spec, loop.loop_id, round_number), store, data_source=data_source,
                    meta={"active_loop": loop.loop_id, "active_round": round_number, "active_labels": labels})
    update_loop(store, loop.loop_id, (round_number, {"run_id": record.run_id, "labels": labels,
                                                     "submitted": time.time()}))
    return record


def set_state(store: RunStore, loop: Loop, state: str, error: str | None = None) -> str:
    if (loop.state, loop.error) != (state, error):
        update_loop(store, loop.loop_id, state=state, error=error)
        loop.state, loop.error = state, error
    return state


def tick(store: RunStore, loop_id: str, data_source: str | None = None) -> str:
    """Do what the loop's files call for next, as far as it goes without waiting (write a label set,
    queue a round's run, note a finished run's accuracy, score the pool and pick a batch); returns the
    loop's state. Repeating it is harmless. A step that fails leaves the loop "failed" with the reason."""
    loop = read_loop(store, loop_id)
    if loop.stopped:
        return set_state(store, loop, STOPPED, loop.error)
    if loop.state == FAILED:
        return FAILED  # resume_loop clears it
    source = data_source or loop.data_source
    try:
        return advance(store, loop, source)
    except ConfigError as exc:
        return set_state(store, loop, FAILED, str(exc))


def advance(store: RunStore, loop: Loop, source: str | None) -> str:
    spec = loop.spec
    for k in range(spec.rounds):
        if not round_path(store, loop.loop_id, k).is_file():
            y_train = load_cifar10(source).y_train
            label_set = initial_label_set(spec, y_train) if k == 0 else next_label_set(store, loop, k, y_train)
            if label_set is None:
                return set_state(store, loop, AWAITING)
            write_round(store, loop.loop_id, k, label_set)
        record = round_run(store, loop, k)
        if record is None:
            submit_round(store, loop, k, source)
            return set_state(store, loop, TRAINING)
        status = record.status()
        if status.get("state") not in FINAL_STATES:
            return set_state(store, loop, TRAINING)
        if status["state"] != "completed":
            return set_state(store, loop, FAILED, f"round {k}'s run {record.run_id} {status['state']}: "
                                                  f"{str(status.get('error') or 'no reason given')[:500]}")
        if loop.rounds.get(k, {}).get("test_acc") is None:
            test_acc = final_metrics(status, record.results())["test_acc"]
            info = {"run_id": record.run_id, "labels": spec.labels_at(k), "test_acc": test_acc,
                    "finished": status.get("finished")}
            update_loop(store, loop.loop_id, (k, info))
            loop.rounds[k] = {**loop.rounds.get(k, {}), **info}
        if k == spec.rounds - 1:
            return set_state(store, loop, COMPLETED)
        if not query_path(store, loop.loop_id, k).is_file():
            set_state(store, loop, SCORING)
            write_query(store, loop, k, record, source)
    return set_state(store, loop, COMPLETED)


# ---- stopping and resuming -------------------------------------------------------------------------------

def unfinished_runs(store: RunStore, loop_id: str) -> list[RunRecord]:
    return [record for record in store.records()
            if record.status().get("active_loop") == loop_id and record.state() not in FINAL_STATES]


def stop_loop(store: RunStore, loop_id: str) -> list[str]:
    """Stop a loop: its worker leaves at its next tick and the round's unfinished run is cancelled.
    Returns the ids of the runs cancelled."""
    read_loop(store, loop_id)
    update_loop(store, loop_id, stopped=True, state=STOPPED)
    cancelled = []
    for record in unfinished_runs(store, loop_id):
        cancel(record.run_id, store)
        cancelled.append(record.run_id)
    return cancelled


def resume_loop(store: RunStore, loop_id: str) -> Loop:
    """Let a stopped or failed loop go on (a worker then runs it): a round whose run failed or was
    cancelled gets a new run (the old one is kept, marked retired), a failed step is tried again."""
    loop = read_loop(store, loop_id)
    for k, info in loop.rounds.items():
        record = store.record(info["run_id"]) if info.get("run_id") else None
        if record is not None and record.exists() and record.state() in ("failed", "cancelled"):
            record.update_status(active_retired=True)
            update_loop(store, loop_id, (k, {"run_id": None}))
    update_loop(store, loop_id, stopped=False, state=TRAINING, error=None)
    return read_loop(store, loop_id)


# ---- the worker ------------------------------------------------------------------------------------------

def worker_alive(store: RunStore, loop_id: str) -> bool:
    """Whether a worker runs this loop now (it holds the loop's worker lock)."""
    path = worker_lock_path(store, loop_id)
    if not path.parent.is_dir():
        return False
    with file_lock(path, blocking=False) as got:
        return not got


def run_worker(store: RunStore, loop_id: str, data_source: str | None = None, log: Callable[[str], Any] = print,
               poll: float = POLL_SECONDS) -> str:
    """Tick the loop until it completes, fails, is stopped or awaits labels; returns that state (or why
    this worker did not run). At most one worker runs a loop."""
    read_loop(store, loop_id)
    stop = threading.Event()
    with file_lock(worker_lock_path(store, loop_id), blocking=False) as got:
        if not got:
            return "another worker runs this loop"
        previous = (signal.signal(signal.SIGTERM, lambda *_: stop.set())
                    if threading.current_thread() is threading.main_thread() else None)
        try:
            return work(store, loop_id, data_source, log, poll, stop)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def work(store: RunStore, loop_id: str, data_source: str | None, log, poll: float, stop: threading.Event) -> str:
    said_state, said_rounds = None, 0
    while not stop.is_set():
        try:
            state = tick(store, loop_id, data_source)
        except ConfigError:
            raise
        except Exception as exc:  # a bug must leave the loop failed with a reason, not a worker gone silent
            traceback.print_exc()
            state = set_state(store, read_loop(store, loop_id), FAILED, f"{type(exc).__name__}: {exc}")
        loop = read_loop(store, loop_id)
        for row in loop.curve()[said_rounds:]:
            log(f"round {row['round']}: {row['labels']:,} labels, {100 * row['test_acc']:.2f}% test accuracy "
                f"(run {row['run_id']})")
        said_rounds = len(loop.curve())
        if state != said_state:
            log(f"loop {loop_id}: {state}" + (f" ({loop.error})" if loop.error else ""))
            said_state = state
        if state not in BUSY_STATES:
            return state
        stop.wait(poll)
    return "stopped by a signal"


def launch_worker(store: RunStore, loop_id: str) -> int:
    """Start a detached `active-worker` for a loop of this runs root (log: .active/<loop>/worker.log);
    returns its pid, or 0 when one already runs the loop."""
    loop = read_loop(store, loop_id)
    if worker_alive(store, loop_id):
        return 0
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(store.root), "active-worker", "--loop", loop_id]
    if loop.data_source:
        cmd += ["--data", loop.data_source]
    with open(loop_dir(store, loop_id) / "worker.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    atomic_write_json(loop_dir(store, loop_id) / "worker.json", {"pid": proc.pid, "start": process_start_time(proc.pid)})
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends
    return proc.pid


# ---- human labelling ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    """The images round `round`'s model picked: training-set positions (most wanted first), the
    strategy's scores, CIFAR-10's labels, the labeller's labels once given, and the images when asked."""

    loop_id: str
    round: int
    run_id: str
    indices: np.ndarray
    scores: list
    true_labels: np.ndarray
    labels: np.ndarray | None
    labeller: str | None
    images: np.ndarray | None = None  # uint8 (N, 32, 32, 3)

    def class_counts(self) -> dict[str, int]:
        """How many of the picked images belong to each class (by CIFAR-10's labels)."""
        return dict(zip(CLASSES, np.bincount(self.true_labels, minlength=NUM_CLASSES).tolist()))


def picked_rounds(store: RunStore, loop_id: str) -> list[int]:
    """The rounds whose model has picked a batch, in order."""
    folder = loop_dir(store, loop_id)
    found = [int(p.stem.removeprefix("query-")) for p in folder.glob("query-*.json")] if folder.is_dir() else []
    return sorted(k for k in found if query_path(store, loop_id, k).is_file())


def batch(store: RunStore, loop_id: str, round_number: int, data_source: str | None = None,
          with_images: bool = True) -> Batch:
    query = read_query(store, loop_id, round_number)
    arrays = load_cifar10(data_source or read_loop(store, loop_id).data_source)
    indices = np.asarray(query["indices"], dtype=np.int64)
    if indices.min() < 0 or indices.max() >= len(arrays.y_train):
        raise ConfigError(f"active-learning loop {loop_id}: round {round_number}'s batch names images outside "
                          "the training set")
    labels = None if query.get("labels") is None else np.asarray(query["labels"], dtype=np.int64)
    return Batch(loop_id, round_number, str(query.get("run_id")), indices, list(query["scores"]),
                 arrays.y_train[indices].astype(np.int64), labels, query.get("labeller"),
                 arrays.x_train[indices] if with_images else None)


def awaiting_round(store: RunStore, loop_id: str) -> int | None:
    """The round whose batch waits for a person's labels, or None."""
    loop = read_loop(store, loop_id)
    if loop.spec.labeller != "human":
        return None
    for k in reversed(picked_rounds(store, loop_id)):
        if read_query(store, loop_id, k).get("labels") is None and not round_path(store, loop_id, k + 1).is_file():
            return k
    return None


def queried_images(store: RunStore, loop_id: str, data_source: str | None = None) -> Batch:
    """The batch a person must label now, with its images and scores; ConfigError when none waits."""
    k = awaiting_round(store, loop_id)
    if k is None:
        raise ConfigError(f"active-learning loop {loop_id} awaits no labels now")
    return batch(store, loop_id, k, data_source)


def class_index(value: Any) -> int:
    """A label given as a class number 0–9 (or a class name); ConfigError otherwise."""
    if isinstance(value, str) and value.strip() in CLASSES:
        return CLASSES.index(value.strip())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < NUM_CLASSES:
        raise ConfigError(f"label {value!r} is not a class: give 0–{NUM_CLASSES - 1} ({', '.join(CLASSES)})")
    return int(value)


def checked_labels(labels: Any, indices: np.ndarray) -> np.ndarray:
    """The labels of the queried `indices`, in their order, from {index: label} or [(index, label), ...];
    ConfigError unless every queried image gets exactly one label that is a class."""
    pairs = list(labels.items()) if isinstance(labels, dict) else labels
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ConfigError("labels: give {training image: class} or a list of (training image, class) pairs")
    wanted = {int(i): pos for pos, i in enumerate(indices)}
    given: dict[int, int] = {}
    for raw_index, raw_label in pairs:
        try:
            index = int(raw_index)
        except (TypeError, ValueError):
            raise ConfigError(f"labels: {raw_index!r} is not a training image number") from None
        if index not in wanted:
            raise ConfigError(f"labels: training image {index} was not queried in this round")
        if index in given:
            raise ConfigError(f"labels: training image {index} is labelled twice")
        given[index] = class_index(raw_label)
    missing = [i for i in wanted if i not in given]
    if missing:
        raise ConfigError(f"labels: {len(missing)} of the {len(wanted)} queried images have no label yet (the first: "
                          f"training image {missing[0]}); label every one")
    return np.array([given[int(i)] for i in indices], dtype=np.int64)


def submit_labels(store: RunStore, loop_id: str, labels: Any) -> Batch:
    """Record a person's labels of the waiting batch ({training image: class 0–9}, every queried image
    once); the next round trains on them. ConfigError, nothing written, when they do not fit."""
    k = awaiting_round(store, loop_id)
    if k is None:
        raise ConfigError(f"active-learning loop {loop_id} awaits no labels now (a batch is labelled once)")
    path = query_path(store, loop_id, k)
    with file_lock(loop_dir(store, loop_id) / ".lock"):
        query = read_query(store, loop_id, k)
        if query.get("labels") is not None:
            raise ConfigError(f"round {k}'s batch was labelled already")
        given = checked_labels(labels, np.asarray(query["indices"], dtype=np.int64))
        atomic_write_json(path, {**query, "labels": given.tolist(), "labeller": "human", "labelled": time.time()})
    return batch(store, loop_id, k, with_images=False)


def agreement(store: RunStore, loop_id: str, data_source: str | None = None) -> dict:
    """How a person's labels agree with CIFAR-10's, over every batch a person labelled: "images", "agreement"
    (the share equal), "per_round" {round: share}, "per_class" {class: share of its images labelled so},
    "confusion" (rows: CIFAR-10's class, columns: the person's) and "rows" (one per image)."""
    from sklearn.metrics import confusion_matrix

    rows = []
    for k in picked_rounds(store, loop_id):
        labelled = batch(store, loop_id, k, data_source, with_images=False)
        if labelled.labels is None or labelled.labeller != "human":
            continue
        rows += [{"round": k, "index": int(i), "human": int(h), "cifar10": int(t), "agree": bool(h == t)}
                 for i, h, t in zip(labelled.indices, labelled.labels, labelled.true_labels)]
    if not rows:
        return {"images": 0, "agreement": None, "per_round": {}, "per_class": {}, "confusion": None, "rows": []}
    truth = np.array([r["cifar10"] for r in rows])
    given = np.array([r["human"] for r in rows])
    matrix = confusion_matrix(truth, given, labels=list(range(NUM_CLASSES)))
    per_class = {name: float(matrix[c, c] / matrix[c].sum()) for c, name in enumerate(CLASSES) if matrix[c].sum()}
    per_round = {k: float(np.mean([r["agree"] for r in rows if r["round"] == k]))
                 for k in sorted({r["round"] for r in rows})}
    return {"images": len(rows), "agreement": float(np.mean(truth == given)), "per_round": per_round,
            "per_class": per_class, "confusion": matrix.tolist(), "rows": rows}


# ---- learning curves ---------------------------------------------------------------------------------------

def repeat_key(spec: LoopSpec) -> str:
    """What loops that repeat one another (differ only by seed) share."""
    data = spec.to_dict()
    data["seed"] = None
    data["base"] = {**data["base"], "seed": None}
    return json.dumps(data, sort_keys=True)


def group_label(spec: LoopSpec) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (spec.strategy_params or {}).items()
                       if QUERY_STRATEGIES.get(spec.strategy).defaults().get(k) != v)
    return spec.strategy + (f" ({params})" if params else "") + (" · human" if spec.labeller == "human" else "")


def strategy_curves(loops: list[Loop]) -> list[dict]:
    """The learning curves of loops grouped by what they repeat (everything but the seed): one row per group
    and number of labels, {"group", "strategy", "labels", "mean", "std", "n", "loops"} (std None for one
    loop), test accuracy over the group's loops that finished that round."""
    groups: dict[str, list[Loop]] = {}
    for loop in loops:
        groups.setdefault(repeat_key(loop.spec), []).append(loop)
    labels_used: dict[str, int] = {}
    rows = []
    for members in groups.values():
        label = group_label(members[0].spec)
        labels_used[label] = labels_used.get(label, 0) + 1
        if labels_used[label] > 1:  # another per-round config or size: keep the groups apart
            label = f"{label} #{labels_used[label]}"
        points: dict[int, list[float]] = {}
        for loop in members:
            for row in loop.curve():
                points.setdefault(row["labels"], []).append(row["test_acc"])
        for labels, values in sorted(points.items()):
            mean, std, n = mean_std(values)
            rows.append({"group": label, "strategy": members[0].spec.strategy, "labels": labels, "mean": mean,
                         "std": std, "n": n, "loops": [loop.loop_id for loop in members]})
    return rows


def loop_report(store: RunStore, loop_id: str) -> dict:
    """A loop's definition, state and learning curve (test accuracy against labels), as JSON-able data."""
    loop = read_loop(store, loop_id)
    spec = loop.spec
    return {"loop": loop_id, "state": loop.state, "error": loop.error, "strategy": spec.strategy,
            "strategy_params": spec.strategy_params, "labeller": spec.labeller, "initial": spec.initial,
            "per_round": spec.per_round, "rounds": spec.rounds, "seed": spec.seed, "model": spec.base["model"],
            "epochs": spec.base["epochs"], "worker_alive": worker_alive(store, loop_id), "curve": loop.curve()}


def curve_text(report: dict) -> str:
    """The learning curve as an aligned text table (the CLI's `active-report`)."""
    lines = [f"loop {report['loop']}: {report['strategy']}, {report['labeller']} labels, "
             f"{report['initial']:,} + {report['rounds'] - 1} × {report['per_round']:,} labels; {report['state']}"
             + (f" ({report['error']})" if report.get("error") else "")]
    lines.append(f"{'round':>5}  {'labels':>7}  {'test acc':>8}  run")
    for row in report["curve"]:
        lines.append(f"{row['round']:>5}  {row['labels']:>7,}  {100 * row['test_acc']:>7.2f}%  {row['run_id']}")
    return "\n".join(lines)
