"""AutoML over the tricks: an Optuna search whose trials are ordinary background runs.

The space comes from the declarations. Any declared field can be searched by its name: a RunConfig
scalar field (``lr``, ``weight_decay``, ``optimizer``), a registry choice field (``schedule``: its
registered names), an option of the fixed config's registry entry (``model_params.dropout``,
``schedule_params.decay_rate``), an augmentation step on or off (``augment.rotation``) and a step's
options or probability (``augment.rotation.degrees``, ``augment.rotation.p``). Each dimension takes
its type and bounds from the field's `Param`; a space file may narrow them (``low``/``high``/``log``
or ``choices``), never widen them.

A study keeps everything a worker needs in its storage (the study's user attributes): the fixed
config, the space, the budget (trials, minutes), the sampler and the pruner. Trial 0 is the fixed
config's own values (when they lie in the space), so every search is measured against its starting
point. Any number of
`python -m cifar_core search-worker --storage URL --study NAME` processes, on this machine or on
others, work on one study; a restarted worker simply goes on. Storage: a SQLite file per study
(``<runs>/.searches/<study>.db``) by default, any SQLAlchemy URL otherwise (PostgreSQL for several
machines: SQLite's file locks are not for a network share).

A trial is a run: the worker samples a config, submits it to this machine's job queue (the run is
tagged with the study and trial number in status.json and owned by the worker, so it is cancelled if
the worker dies), streams its per-epoch validation accuracy to the pruner, cancels it through the
normal cancel path when the pruner says so (the run is marked ``pruned``), and reports the final
validation accuracy. The test set is never looked at: a search needs ``val_size`` > 0.

Workers send Optuna heartbeats: a trial whose worker was killed is marked failed once its heartbeat is
`HEARTBEAT_GRACE` seconds old (by any worker, before it looks at the budget) and queued once more with
the same parameters. A worker stays while the rest of the budget is in flight on other workers, so
such a retry always finds someone to run it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import APPLIES_WHEN, RunConfig
from ..jobs import cancel, owner_of_this_process, submit
from ..params import ConfigError, Param, Registry, validate_id
from ..processes import process_alive, process_start_time
from ..runs import FINAL_STATES, RunStore, atomic_write_json, read_json

SEARCH_DIR = ".searches"
HEARTBEAT_INTERVAL = int(os.environ.get("CIFAR_LAB_SEARCH_HEARTBEAT", "10"))
HEARTBEAT_GRACE = int(os.environ.get("CIFAR_LAB_SEARCH_GRACE", str(4 * HEARTBEAT_INTERVAL)))
POLL_SECONDS = 1.0
TRIALS_REACHED = "trials reached"
SPEC_KEYS = ("base", "space")  # what makes two studies "the same search"
OBJECTIVE = "final validation accuracy (the run's last evaluation, on its val_size held-out images)"

# Fields that are not searched, with the reason the user is told.
NOT_SEARCHABLE = {
    "name": "a label", "seed": "the seed: repeat the best config over seeds instead",
    "device": "where the run trains, not what it learns",
    "log_every": "bookkeeping", "eval_every": "it sets when the pruner gets a value",
    "val_size": "every trial must be scored on the same validation images",
    "test_size": "the test set is not used by the search",
    "subset": "every trial must train on the same images", "subset_size": "every trial must train on the same images",
    "per_class": "every trial must train on the same images", "imbalance": "every trial must train on the same images",
    "label_budget": "every trial must train on the same images",
    "init_run": "a run id, not a setting", "teacher_run": "a run id, not a setting",
    "time_limit_min": "a budget, not a setting",
    "nproc": "how many processes train, not what they learn", "max_restarts": "recovery, not a setting",
}
SEARCHABLE_KINDS = ("int", "float", "bool", "choice")


class SpaceError(ConfigError):
    """Every problem of a space at once: `problems` lists them, the message joins them."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


# ---- the space -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One searched name with its (possibly narrowed) declared range."""

    name: str
    kind: str  # "int" | "float" | "choice" (bools are choices of true/false)
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def to_dict(self) -> dict:
        if self.kind == "choice":
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


def _registry_choice(name: str, registry: Registry) -> Param:
    return Param(name, "choice", registry.names()[0], choices=tuple(registry.names()))


def _step_switch(op: str) -> Param:
    return Param(f"augment.{op}", "bool", False, help=f"whether the augmentation chain has a {op} step")


def _step_probability(op: str) -> Param:
    return Param(f"augment.{op}.p", "float", 1.0, 0.0, 1.0, help=f"probability of the {op} step")


def searchable(base: RunConfig) -> dict[str, Param]:
    """{name: declared Param} of everything that can be searched given the fixed config `base` (its
    registry entries decide which options exist): the page's picker and the space's checker."""
    from ..augment import AUGMENTATIONS
    base = base.validated()
    registries = RunConfig.registries()
    out: dict[str, Param] = {}
    for name, param in RunConfig.scalar_params().items():
        if name in NOT_SEARCHABLE:
            continue
        if name in registries:
            out[name] = _registry_choice(name, registries[name])
        elif param.kind in SEARCHABLE_KINDS:
            out[name] = param
    for owner, registry in registries.items():
        if owner in NOT_SEARCHABLE:
            continue
        for param in registry.get(getattr(base, owner)).params:
            if param.kind in SEARCHABLE_KINDS:
                out[f"{owner}_params.{param.name}"] = param
    for op in AUGMENTATIONS.names():
        out[f"augment.{op}"] = _step_switch(op)
        out[f"augment.{op}.p"] = _step_probability(op)
        for param in AUGMENTATIONS.get(op).params:
            if param.kind in SEARCHABLE_KINDS:
                out[f"augment.{op}.{param.name}"] = param
    return out


def _narrowed(name: str, param: Param, spec: Any) -> Dimension:
    """The dimension of `name` from its declared Param and the space file's entry (a dict, or true /
    {} for the whole declared range)."""
    if spec is True or spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"space: {name}: expected an object with low/high/log or choices, got {spec!r}")
    if param.kind in ("bool", "choice"):
        declared = (False, True) if param.kind == "bool" else param.choices
        extra = set(spec) - {"choices"}
        if extra:
            raise ConfigError(f"space: {name} is a choice: give 'choices' (a subset of {list(declared)}), "
                              f"not {', '.join(sorted(extra))}")
        choices = spec.get("choices", list(declared))
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"space: {name}: choices must be a non-empty list")
        for choice in choices:
            param.validate(choice, "space")
        choices = [param.validate(c) for c in choices]
        if len(set(map(json.dumps, choices))) < 2:
            raise ConfigError(f"space: {name}: one choice ({choices[0]!r}) is not a search; "
                              "fix it in the config instead, or give two choices or more")
        return Dimension(name, "choice", choices=tuple(dict.fromkeys(choices)))
    extra = set(spec) - {"low", "high", "log"}
    if extra:
        raise ConfigError(f"space: {name} is a number: give low/high/log, not {', '.join(sorted(extra))}")
    low = param.validate(spec.get("low", param.low), "space") if spec.get("low", param.low) is not None else None
    high = param.validate(spec.get("high", param.high), "space") if spec.get("high", param.high) is not None else None
    if low is None or high is None:
        raise ConfigError(f"space: {name} has no declared bound: give both low and high")
    if low >= high:
        raise ConfigError(f"space: {name}: low {low} must be below high {high}")
    log = spec.get("log", param.log)
    if not isinstance(log, bool):
        raise ConfigError(f"space: {name}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"space: {name}: a log range needs low > 0 (got {low}); give a positive low")
    kind = "int" if param.kind == "int" else "float"
    return Dimension(name, kind, float(low) if kind == "float" else int(low),
                     float(high) if kind == "float" else int(high), log)


def parse_space(space: Any, base: RunConfig) -> list[Dimension]:
    """The validated dimensions of a space ({name: spec}); ConfigError naming every problem found
    before anything starts: empty, unknown or not-searchable names, ranges outside the declared bounds,
    and contradictions with the fixed config."""
    if not isinstance(space, dict):
        raise ConfigError("space: expected a JSON object mapping field names to ranges or choices")
    if not space:
        raise ConfigError("space: it is empty: name at least one field to search (python -m cifar_core "
                          "describe lists them; e.g. {\"lr\": {\"low\": 0.01, \"high\": 1, \"log\": true}})")
    base = base.validated()
    allowed = searchable(base)
    problems: list[str] = []
    dims: list[Dimension] = []
    for name in space:
        try:
            if name in NOT_SEARCHABLE:
                raise ConfigError(f"space: {name} cannot be searched ({NOT_SEARCHABLE[name]})")
            if name not in allowed:
                raise ConfigError(_unknown_name_message(name, base, allowed))
            dims.append(_narrowed(name, allowed[name], space[name]))
        except ConfigError as exc:
            problems.append(str(exc))
    if not problems:
        problems += _contradictions(dims, base)
    if problems:
        raise SpaceError(problems)
    return dims


def _unknown_name_message(name: str, base: RunConfig, allowed: dict) -> str:
    owner, _, option = name.partition("_params.")
    if option and owner in RunConfig.registries():
        return (f"space: {name}: the fixed {owner} {getattr(base, owner)!r} has no option {option!r} "
                f"(its options: {', '.join(p.name for p in RunConfig.registries()[owner].get(getattr(base, owner)).params) or 'none'})")
    return f"space: unknown field {name!r} (python -m cifar_core describe lists the fields and options)"


def _contradictions(dims: list[Dimension], base: RunConfig) -> list[str]:
    """Dimensions that cannot have an effect whatever the other dimensions take."""
    searched = {d.name: d for d in dims}
    fixed = base.to_dict()
    chain = {step["name"] for step in fixed["augment"]}
    problems = []
    for dim in dims:
        rule = APPLIES_WHEN.get(dim.name)
        if rule:
            controller, values = rule
            reachable = searched[controller].choices if controller in searched else (fixed[controller],)
            if not set(reachable) & set(values):
                problems.append(f"space: {dim.name} has no effect unless {controller} is "
                                f"{' or '.join(map(str, values))} (it is fixed at {fixed[controller]!r})")
        owner, _, _option = dim.name.partition("_params.")
        if _option and owner in searched:
            problems.append(f"space: {dim.name}: {owner} is searched too, and its options differ between "
                            f"entries; fix {owner} to search its options")
        parts = dim.name.split(".")
        if parts[0] == "augment" and len(parts) == 3 and parts[1] not in chain and f"augment.{parts[1]}" not in searched:
            problems.append(f"space: {dim.name}: the fixed augmentation chain has no {parts[1]} step; add "
                            f"it to the chain or search augment.{parts[1]} too")
    return problems


def apply_values(base: RunConfig, values: dict) -> RunConfig:
    """`base` with the sampled values set (dotted names), validated."""
    data = base.to_dict()
    chain = [dict(step, params=dict(step.get("params", {}))) for step in data["augment"]]
    switches = {name.split(".")[1]: on for name, on in values.items() if name.count(".") == 1
                and name.startswith("augment.")}
    for op, on in switches.items():
        present = any(step["name"] == op for step in chain)
        if on and not present:
            chain.append({"name": op, "params": {}})  # at the chain's end, with the step's default p
        if not on:
            chain = [step for step in chain if step["name"] != op]
    for name, value in values.items():
        parts = name.split(".")
        if parts[0] == "augment" and len(parts) == 3:
            for step in chain:
                if step["name"] == parts[1]:
                    if parts[2] == "p":
                        step["p"] = value
                    else:
                        step["params"][parts[2]] = value
        elif "_params." in name:
            owner, option = name.split(".", 1)
            data[owner] = {**data[owner], option: value}
        elif parts[0] != "augment":
            if name in RunConfig.registries() and value != data[name]:
                data[f"{name}_params"] = {}  # another entry: its own options, at their defaults
            data[name] = value
    data["augment"] = chain
    return RunConfig.from_dict(data)


def sample_values(trial, dims: list[Dimension], base: RunConfig) -> dict:
    """One value per dimension from the trial, leaving out each dimension that has no effect under the
    values drawn (or fixed) for its controller (APPLIES_WHEN: muon_lr when the optimizer drawn is sgd), so
    the sampler does not model noise and the trial lists only the parameters it used."""
    fixed = base.to_dict()
    values: dict = {}
    for dim in sorted(dims, key=lambda d: d.name in APPLIES_WHEN):  # controllers before what they control
        rule = APPLIES_WHEN.get(dim.name)
        if rule and values.get(rule[0], fixed.get(rule[0])) not in rule[1]:
            continue
        values[dim.name] = dim.suggest(trial)
    return values


def base_values(base: RunConfig, dims: list[Dimension]) -> dict | None:
    """The values the fixed config itself has for each dimension ({name: value}), or None when one of
    them lies outside its (narrowed) range: then it cannot be a trial of this space."""
    from ..augment import AUGMENTATIONS
    data = base.validated().to_dict()
    steps = {step["name"]: step for step in data["augment"]}
    values = {}
    for dim in dims:
        parts = dim.name.split(".")
        if parts[0] == "augment":
            op = parts[1]
            if len(parts) == 2:
                value = op in steps
            elif parts[2] == "p":
                value = steps[op]["p"] if op in steps else _step_probability(op).default
            else:
                value = steps[op]["params"][parts[2]] if op in steps else AUGMENTATIONS.get(op).param(parts[2]).default
        elif "_params." in dim.name:
            owner, option = dim.name.split(".", 1)
            value = data[owner].get(option)
        else:
            value = data[dim.name]
        if not _within(dim, value):
            return None
        values[dim.name] = value
    return values


def _within(dim: Dimension, value) -> bool:
    if dim.kind == "choice":
        return value in dim.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high


def load_space_file(path: str | Path) -> dict:
    """A space file's JSON object; ConfigError for a missing or malformed file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"space file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"space file {path} cannot be read: {exc}") from None
    try:
        space = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"space file {path} is not valid JSON: {exc}") from None
    if not isinstance(space, dict):
        raise ConfigError(f"space file {path} must hold a JSON object (field name -> range or choices)")
    return space


# ---- samplers and pruners: registries, so the page's forms and the CLI come from the declarations ---

SAMPLERS = Registry("search sampler")
PRUNERS = Registry("search pruner")


@SAMPLERS.register("tpe", (Param("n_startup_trials", "int", 5, 0, 1000, help="Random trials before TPE models the results."),),
                   description="Tree-structured Parzen estimator (Optuna's default); constant liar for parallel workers.")
def _tpe(n_startup_trials: int):
    import optuna
    # group: a multivariate TPE per set of parameters drawn together, for the conditional ones (sample_values)
    with _quiet_optuna():
        return optuna.samplers.TPESampler(n_startup_trials=n_startup_trials, constant_liar=True,
                                          multivariate=True, group=True)


@SAMPLERS.register("random", (), description="Independent uniform sampling: the baseline every sampler must beat.")
def _random():
    import optuna
    return optuna.samplers.RandomSampler()


@SAMPLERS.register("gp", (Param("n_startup_trials", "int", 5, 0, 1000, help="Random trials before the Gaussian process."),),
                   description="Gaussian-process Bayesian optimization: for small budgets of costly trials.")
def _gp(n_startup_trials: int):
    import optuna
    return optuna.samplers.GPSampler(n_startup_trials=n_startup_trials)


@PRUNERS.register("none", (), description="Every trial trains to its end.")
def _no_pruner():
    import optuna
    return optuna.pruners.NopPruner()


@PRUNERS.register("median", (
        Param("n_startup_trials", "int", 3, 0, 1000, help="Trials that finish before any is pruned."),
        Param("n_warmup_steps", "int", 1, 0, 1000, help="Epochs a trial trains before it can be pruned.")),
        description="Stop a trial whose best validation accuracy so far is below the median of the earlier "
                    "trials at the same epoch.")
def _median(n_startup_trials: int, n_warmup_steps: int):
    import optuna
    return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)


@PRUNERS.register("successive_halving", (
        Param("min_resource", "int", 1, 1, 1000, help="Epochs every trial gets before the first rung."),
        Param("reduction_factor", "int", 3, 2, 10, help="Only the best 1/this of the trials at a rung go on.")),
        description="Asynchronous successive halving (ASHA): rungs at min_resource × factor^k epochs.")
def _asha(min_resource: int, reduction_factor: int):
    import optuna
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)


@PRUNERS.register("hyperband", (
        Param("min_resource", "int", 1, 1, 1000, help="Smallest number of epochs a bracket gives a trial."),
        Param("reduction_factor", "int", 3, 2, 10, help="Each bracket keeps 1/this of its trials a rung.")),
        description="Hyperband: several successive-halving brackets with different start budgets.")
def _hyperband(min_resource: int, reduction_factor: int):
    import optuna
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, reduction_factor=reduction_factor)


# ---- what a study holds ------------------------------------------------------------------------------

@dataclass
class SearchSpec:
    """Everything a worker needs, kept in the study's storage."""

    base: dict
    space: dict
    trials: int = 20
    time_budget_min: float = 0.0
    sampler: str = "tpe"
    sampler_params: dict | None = None
    pruner: str = "median"
    pruner_params: dict | None = None

    def validated(self) -> "SearchSpec":
        base = RunConfig.from_dict(self.base)
        if base.val_size <= 0:
            raise ConfigError("a search scores its trials on held-out validation images and never on the test "
                              "set: set val_size (e.g. --val-size 1000)")
        dims = parse_space(self.space, base)
        trials = Param("trials", "int", 20, 1, 100000).validate(self.trials, "search")
        minutes = Param("time_budget_min", "float", 0.0, 0.0, 1e6).validate(self.time_budget_min, "search")
        return SearchSpec(base=base.to_dict(), space={d.name: d.to_dict() for d in dims}, trials=trials,
                          time_budget_min=minutes, sampler=self.sampler,
                          sampler_params=SAMPLERS.validate(self.sampler, self.sampler_params),
                          pruner=self.pruner, pruner_params=PRUNERS.validate(self.pruner, self.pruner_params))

    def dimensions(self) -> list[Dimension]:
        return parse_space(self.space, RunConfig.from_dict(self.base))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.__dict__))

    @classmethod
    def from_attrs(cls, attrs: dict) -> "SearchSpec":
        spec = attrs.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError("this Optuna study was not made by `python -m cifar_core search` (it has no spec)")
        return cls(**{k: spec[k] for k in cls.__dataclass_fields__ if k in spec})


# ---- storage -------------------------------------------------------------------------------------

def searches_dir(store: RunStore) -> Path:
    return store.root / SEARCH_DIR


def default_storage(store: RunStore, study: str) -> str:
    """The default storage of a study: a SQLite file in the runs folder."""
    path = searches_dir(store) / f"{validate_id(study, 'study name')}.db"
    return f"sqlite:///{path.resolve()}"


def masked(url: str) -> str:
    """A storage URL with its password hidden (for messages and pages)."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str):
    """Optuna's RDB storage with heartbeats; ConfigError with the reason when it cannot be opened."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        with _quiet_optuna():
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_INTERVAL,
                              grace_period=HEARTBEAT_GRACE,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"storage {masked(url)}: its database driver is not installed ({exc.name})") from None
    except optuna.exceptions.StorageInternalError as exc:
        raise ConfigError(f"cannot open the search storage {masked(url)}: {_first_line(exc.__cause__ or exc)}") from None
    except Exception as exc:  # sqlalchemy: unreachable server, bad URL, refused login
        raise ConfigError(f"cannot open the search storage {masked(url)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_optuna():
    import warnings

    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def create_search(study: str, spec: SearchSpec, storage: str) -> None:
    """Create the study, or check that an existing one with this name is the same search (same fixed
    config and space) and update its budget. ConfigError before anything starts otherwise."""
    import optuna
    validate_id(study, "study name")
    spec = spec.validated()
    storage_obj = open_storage(storage)
    try:
        existing = optuna.load_study(study_name=study, storage=storage_obj)
    except KeyError:
        existing = None
    if existing is None:
        made = optuna.create_study(study_name=study, storage=storage_obj, direction="maximize")
        made.set_user_attr("spec", spec.to_dict())
        made.set_user_attr("created", time.time())
        made.set_user_attr("objective", OBJECTIVE)
        baseline = base_values(RunConfig.from_dict(spec.base), spec.dimensions())
        if baseline is not None:  # trial 0: the fixed config itself, so the search is measured against it
            made.enqueue_trial(baseline, user_attrs={"baseline": True})
        return
    old = SearchSpec.from_attrs(existing.user_attrs)
    for key in SPEC_KEYS:
        if json.dumps(getattr(old, key), sort_keys=True) != json.dumps(getattr(spec, key), sort_keys=True):
            what = "space" if key == "space" else "fixed config"
            raise ConfigError(f"study {study!r} already exists in {masked(storage)} with another {what}: choose "
                              f"another study name, or repeat the same {what} to continue it")
    existing.set_user_attr("spec", spec.to_dict())  # a new budget, sampler or pruner for the same search
    existing.set_user_attr("stopped", False)
    existing.set_user_attr("finished", None)


def load_search(study: str, storage, sampler=None, pruner=None):
    """(optuna Study, SearchSpec); ConfigError when the study does not exist there. `storage`: a URL, or
    a storage `open_storage` already opened (a worker reloads through one connection pool)."""
    import optuna
    storage_obj = open_storage(storage) if isinstance(storage, str) else storage
    try:
        loaded = optuna.load_study(study_name=study, storage=storage_obj, sampler=sampler, pruner=pruner)
    except KeyError:
        where = masked(storage if isinstance(storage, str) else storage_obj.url)
        raise ConfigError(f"no study {study!r} in {where}") from None
    return loaded, SearchSpec.from_attrs(loaded.user_attrs)


# ---- the worker ----------------------------------------------------------------------------------

class TrialFailed(Exception):
    """A trial's run failed or was cancelled by someone else: the trial is marked failed."""


def budget_left(study, spec: SearchSpec) -> str | None:
    """None while the study may start another trial, else why not."""
    from optuna.trial import TrialState
    if study.user_attrs.get("stopped"):
        return "stopped from the page"
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    if len(counted) >= spec.trials:
        return f"{spec.trials} {TRIALS_REACHED}"
    failed = sum(t.state == TrialState.FAIL for t in trials)
    if failed >= max(3, spec.trials):
        return f"{failed} trials failed: look at their runs' errors"
    started = study.user_attrs.get("started")
    if spec.time_budget_min and started and time.time() - started >= 60 * spec.time_budget_min:
        return f"time budget of {spec.time_budget_min:g} min spent"
    return None


def _running(study) -> int:
    from optuna.trial import TrialState
    return sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def _report_evaluations(trial, rows: list[dict], reported: set) -> None:
    for row in rows:
        if row.get("kind") != "eval" or row.get("val_acc") is None:
            continue
        epoch = int(round(float(row.get("epoch", 0))))
        if epoch not in reported:
            trial.report(float(row["val_acc"]), epoch)
            reported.add(epoch)


def _wait_final(record, timeout: float) -> dict:
    deadline = time.time() + timeout
    status = record.status()
    while status.get("state") not in FINAL_STATES and time.time() < deadline:
        time.sleep(POLL_SECONDS)
        status = record.status()
    return status


class SearchWorker:
    """Runs trials of one study until its budget is spent: `SearchWorker(...).run()`."""

    def __init__(self, store: RunStore, study: str, storage: str, data_source: str | None = None,
                 log=print):
        self.store, self.study_name, self.storage, self.data_source, self.log = store, study, storage, data_source, log
        self.current_run: str | None = None
        self.stop_signal = False

    def run(self) -> str:
        """Work until the budget is spent or a stop; returns why it stopped."""
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.storage)
        study, spec = load_search(self.study_name, storage)
        if not study.user_attrs.get("started"):
            study.set_user_attr("started", time.time())
        sampler, pruner = SAMPLERS.build(spec.sampler, spec.sampler_params), PRUNERS.build(spec.pruner, spec.pruner_params)
        dims = spec.dimensions()
        base = RunConfig.from_dict(spec.base)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while not self.stop_signal:
                # reloaded each round: fresh user attrs (stop, budget)
                study, spec = load_search(self.study_name, storage, sampler, pruner)
                with _quiet_optuna():
                    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, queued again
                why = budget_left(study, spec)
                if why and why.endswith(TRIALS_REACHED) and _running(study):
                    time.sleep(HEARTBEAT_INTERVAL)  # the rest of the budget is in flight: stay until it
                    continue  # lands, so a trial whose worker dies is still retried by someone
                if why:
                    if why.endswith(TRIALS_REACHED) or "time budget" in why:
                        study.set_user_attr("finished", study.user_attrs.get("finished") or time.time())
                    return why
                with _quiet_optuna():
                    study.optimize(lambda trial: self._objective(trial, base, dims), n_trials=1,
                                   catch=(TrialFailed,))
            return "stopped by a signal"
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, *_):
        self.stop_signal = True
        if self.current_run:
            cancel(self.current_run, self.store)

    def _objective(self, trial, base: RunConfig, dims: list[Dimension]) -> float:
        values = sample_values(trial, dims, base)
        try:
            cfg = apply_values(base, values).replace(name=f"search {self.study_name} #{trial.number}")
        except ConfigError as exc:  # a combination the config's cross-field rules refuse
            trial.set_user_attr("error", str(exc))
            raise TrialFailed(str(exc)) from None
        record = submit(cfg, self.store, data_source=self.data_source, owner=owner_of_this_process(),
                        meta={"search": self.study_name, "trial": trial.number})
        trial.set_user_attr("run_id", record.run_id)
        trial.set_user_attr("config", cfg.to_dict())
        self.current_run = record.run_id
        self.log(f"trial {trial.number}: run {record.run_id} {json.dumps(values)}")
        try:
            return self._follow(trial, record)
        finally:
            self.current_run = None

    def _follow(self, trial, record) -> float:
        import optuna
        reader, reported = record.metrics_reader(), set()
        while True:
            status = record.status()
            _report_evaluations(trial, reader.read_new(), reported)
            state = status.get("state")
            if state == "completed":
                evals = [r for r in reader.rows if r.get("kind") == "eval" and r.get("val_acc") is not None]
                if not evals:
                    raise TrialFailed(f"run {record.run_id} completed without a validation evaluation")
                value = float(evals[-1]["val_acc"])
                self.log(f"trial {trial.number}: {100 * value:.2f}% validation accuracy")
                return value
            if state in FINAL_STATES:
                error = status.get("error") or state
                trial.set_user_attr("error", str(error)[:500])
                raise TrialFailed(f"run {record.run_id} {state}: {error}")
            if reported and trial.should_prune():
                epoch = max(reported)
                record.update_status(pruned={"study": self.study_name, "trial": trial.number, "epoch": epoch})
                cancel(record.run_id, self.store)
                final = _wait_final(record, timeout=60).get("state")
                if final == "completed":  # it finished before the cancel reached it: its full result counts
                    record.update_status(pruned=None)
                    self.log(f"trial {trial.number}: finished before the pruner's cancel reached it")
                    continue
                if final == "cancelled":
                    record.update_status(error=f"pruned by search {self.study_name} (trial {trial.number}) after "
                                               f"epoch {epoch}: its validation accuracy trailed the other trials'")
                self.log(f"trial {trial.number}: pruned after epoch {epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")
            if self.stop_signal:
                raise TrialFailed("the search worker was stopped")
            time.sleep(POLL_SECONDS)


# ---- launching and listing (the page and the CLI) ------------------------------------------------------

def manifest_path(store: RunStore, study: str) -> Path:
    return searches_dir(store) / f"{validate_id(study, 'study name')}.json"


def start_search(study: str, spec: SearchSpec, store: RunStore, storage: str | None = None,
                 data_source: str | None = None) -> str:
    """Create (or continue) a study and remember it in this runs folder; returns its storage URL."""
    storage = storage or default_storage(store, study)
    create_search(study, spec, storage)
    earlier = read_json(manifest_path(store, study), None)
    created = earlier.get("created") if isinstance(earlier, dict) else None
    atomic_write_json(manifest_path(store, study), {"study": study, "storage": storage, "data_source": data_source,
                                                    "created": created or time.time()})
    return storage


def list_searches(store: RunStore) -> list[dict]:
    """This runs folder's studies (manifests), newest first."""
    out = []
    folder = searches_dir(store)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        manifest = read_json(path, None)
        if isinstance(manifest, dict) and isinstance(manifest.get("study"), str):
            out.append(manifest)
    return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


def read_manifest(store: RunStore, study: str) -> dict:
    manifest = read_json(manifest_path(store, study), None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("storage"), str):
        raise ConfigError(f"no search {study!r} in {store.root} (or its manifest is damaged)")
    return manifest


def _pid_path(store: RunStore, study: str) -> Path:
    return searches_dir(store) / f"{validate_id(study, 'study name')}.worker.json"


def worker_alive(store: RunStore, study: str) -> bool:
    """Whether a worker started from this runs folder (page or `search --detach`) still works on it."""
    info = read_json(_pid_path(store, study), None)
    return isinstance(info, dict) and process_alive(info.get("pid"), info.get("start"))


def launch_worker(store: RunStore, study: str) -> int:
    """Start a detached `search-worker` for a study of this runs folder (log: .searches/<study>.log);
    returns its pid. Does nothing (returns 0) when one is alive."""
    if worker_alive(store, study):
        return 0
    manifest = read_manifest(store, study)
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(store.root), "search-worker",
           "--study", study, "--storage", manifest["storage"]]
    if manifest.get("data_source"):
        cmd += ["--data", manifest["data_source"]]
    with open(searches_dir(store) / f"{study}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    atomic_write_json(_pid_path(store, study), {"pid": proc.pid, "start": process_start_time(proc.pid)})
    import threading
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends
    return proc.pid


def stop_search(study: str, storage: str, cancel_running_in: RunStore | None = None) -> list[str]:
    """Ask every worker of a study to start no new trial. The running trials finish, unless
    `cancel_running_in`: then their runs in that runs folder are cancelled (those trials end failed).
    Returns the ids of the runs cancelled."""
    from optuna.trial import TrialState
    loaded, _ = load_search(study, storage)
    loaded.set_user_attr("stopped", True)
    cancelled = []
    for trial in loaded.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if cancel_running_in else ():
        record = cancel_running_in.record(trial.user_attrs.get("run_id") or "missing")
        if record.exists() and record.status().get("search") == study and record.state() not in FINAL_STATES:
            cancel(record.run_id, cancel_running_in)
            cancelled.append(record.run_id)
    return cancelled


def resume_search(study: str, storage: str) -> None:
    loaded, _ = load_search(study, storage)
    loaded.set_user_attr("stopped", False)


# ---- reading a study -----------------------------------------------------------------------------------

def trials_frame(study):
    """One row per trial: number, state, value, duration (s), run id, pruned epoch, the parameters."""
    import pandas as pd
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        steps = sorted(trial.intermediate_values)
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                     "duration_s": duration, "epochs": steps[-1] if steps else None,
                     "run_id": trial.user_attrs.get("run_id"), "error": trial.user_attrs.get("error"),
                     **{f"param {k}": v for k, v in trial.params.items()}})
    return pd.DataFrame(rows)


def curves_frame(study):
    """Long table of every trial's intermediate values: trial, epoch, val_acc, state."""
    import pandas as pd
    rows = [{"trial": t.number, "epoch": step, "val_acc": value, "state": t.state.name.lower()}
            for t in study.get_trials(deepcopy=False) for step, value in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "epoch", "val_acc", "state"])


def importances(study) -> dict[str, float]:
    """fANOVA importances of the searched parameters over the completed trials; ConfigError while there
    are too few of them to say."""
    import optuna
    from optuna.trial import TrialState
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        raise ConfigError(f"parameter importances need two completed trials or more ({len(complete)} so far)")
    try:
        with _quiet_optuna():
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"parameter importances cannot be computed yet: {exc}") from None


def best_trial(study):
    """The best completed trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def best_config(study, epochs: int | None = None, train_on_validation: bool = False) -> RunConfig:
    """The best trial's config, to train fully: optionally more epochs, and the validation images given
    back to training (then the final numbers are on the test set only)."""
    trial = best_trial(study)
    if trial is None or "config" not in trial.user_attrs:
        raise ConfigError("no completed trial yet")
    cfg = RunConfig.from_dict(trial.user_attrs["config"])
    changes: dict = {"name": f"best of search {study.study_name} (trial {trial.number})"}
    if epochs:
        changes["epochs"] = epochs
        if cfg.eval_every > epochs:
            changes["eval_every"] = epochs
    if train_on_validation:
        changes["val_size"] = 0
    return cfg.replace(**changes)


def trials_csv(study) -> bytes:
    return trials_frame(study).to_csv(index=False).encode()


def summary(study, spec: SearchSpec) -> dict:
    """Counts by state, best value and parameters, budget: the CLI's report and the page's header."""
    frame = trials_frame(study)
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    best = best_trial(study)
    started, finished = study.user_attrs.get("started"), study.user_attrs.get("finished")
    elapsed = ((finished or time.time()) - started) / 60 if started else 0.0
    return {"study": study.study_name, "trials": {k: int(v) for k, v in counts.items()},
            "budget": {"trials": spec.trials, "time_budget_min": spec.time_budget_min,
                       "elapsed_min": round(elapsed, 2), "finished": finished},
            "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                               "run_id": best.user_attrs.get("run_id")},
            "stopped": bool(study.user_attrs.get("stopped")), "objective": OBJECTIVE,
            "sampler": spec.sampler, "pruner": spec.pruner,
            "space": spec.space}


def iter_dims_text(dims: list[Dimension]) -> Iterator[str]:
    for dim in dims:
        if dim.kind == "choice":
            yield f"{dim.name} ∈ {{{', '.join(map(str, dim.choices))}}}"
        else:
            yield f"{dim.name} ∈ [{dim.low:g}, {dim.high:g}]{' (log)' if dim.log else ''}"

