"""Initialise a run from a finished run's weights: fine-tuning, linear probe, classifier re-training.

`init_run` names a completed run in the same runs root; its weights are read through the one
checkpoint reader with its rule for finished runs (`last.pt`, the weights its test report measured,
else `best.pt`), and the weights that run was evaluated with are used (its EMA when it kept one).
The model and its options must be the source's (regularization-only options, dropout and stochastic
depth, may differ: they change no weight). `init_mode` says what trains:

* finetune: every weight is loaded and every weight the model trains trains again (a model's own
  frozen parts stay frozen: fastnet's whitening conv and BatchNorm scales).
* linear_probe: every weight is loaded; only the classifier head (`models.classifier_head`) trains.
* crt: classifier re-training (Kang et al. 2020, "Decoupling Representation and Classifier for
  Long-Tailed Recognition"): load, re-initialise the head, train only it. Kang et al. pair it with
  class-balanced sampling and a few epochs; `crt_config` builds that recipe from a finished run.

A source that learned a self-supervised pretext (config.PRETEXT_OBJECTIVES: its objective, e.g. rotation)
has a head that predicts the pretext's targets, not the classes: its head is not loaded but re-initialised,
in every mode (finetune trains it with the rest, linear_probe trains only it), unless this run continues
the same pretext. status.json's `init_from` says which (`pretext`, `head`).

In the two frozen modes the feature extractor (everything outside the head) is frozen as a whole:
its parameters get requires_grad False, so the optimizer never sees them (`build_optimizer` takes
trainable parameters only) and weight decay cannot shrink them, and its modules stay in eval mode
for good: BatchNorm normalizes with the source's running statistics and never updates them, and
dropout / stochastic depth are off, so the head trains on the features the source run's evaluation
computed. The loop calls `model.train()` before every step; each frozen module's own `train` is
replaced by one that always sets eval mode (`keep_in_eval`), so no step of the loop has to know,
`module.training` always tells the truth, and copies of the model (the EMA) keep the rule.
A forward pre-hook could force eval mode too, but it would leave `training` True between calls.

A model that initialises from data (fastnet's patch whitening) does so first, as on resume, so that
it sets its own frozen parts; the source's weights then replace every value that computed.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch.nn as nn

from ..config import INIT_MODES, MODEL_PARAM_SECTIONS, PRETEXT_OBJECTIVES, RunConfig
from ..models import MODELS, classifier_head
from ..params import ConfigError
from ..runs import RunRecord, RunStore
from .checkpoints import (FINISHED_ORDER, Checkpoint, CheckpointError, finished_source, read_checkpoint,
                          weights_sources)

__all__ = ["INIT_MODES", "InitSource", "check_init_run", "load_init_source", "init_candidates",
           "freeze_all_but_head", "keep_in_eval", "architecture_params", "crt_config", "crt_epochs",
           "pretext_of"]

CRT_BALANCE = "class_balanced_sampling"  # Kang et al.'s sampler for the classifier stage


def architecture_params(model: str, params: dict | None) -> dict:
    """The model's options with defaults filled in, less those that change no weight (dropout, drop
    path: the config's regularization-section model options)."""
    values = MODELS.validate(model, params or {})
    return {k: v for k, v in values.items() if k not in MODEL_PARAM_SECTIONS}


def _describe(model: str, params: dict) -> str:
    return f"{model} ({', '.join(f'{k}={v}' for k, v in sorted(params.items())) or 'no options'})"


def check_same_model(run_id: str, source_model: str, source_params: dict | None, model: str,
                     model_params: dict | None) -> None:
    """ConfigError naming both models when the source's weights do not fit `model` with `model_params`."""
    try:
        source = architecture_params(source_model, source_params)
    except ConfigError as exc:
        raise ConfigError(f"init_run {run_id}: its model cannot be rebuilt here ({exc})") from None
    mine = architecture_params(model, model_params)
    if source_model == model and source != mine:  # name only the options that differ
        differing = {k for k in source.keys() | mine.keys() if source.get(k) != mine.get(k)}
        source = {k: v for k, v in source.items() if k in differing}
        mine = {k: v for k, v in mine.items() if k in differing}
    if source_model != model or source != mine:
        raise ConfigError(f"init_run {run_id} trained {_describe(source_model, source)} but this run builds "
                          f"{_describe(model, mine)}: its weights fit only the same model with the same "
                          "options (set model and model options to the source's, or pick another run)")


def pretext_of(config: dict | None) -> str | None:
    """The self-supervised pretext a run's config dict trained (its objective), or None."""
    objective = config.get("objective") if isinstance(config, dict) else None
    return objective if objective in PRETEXT_OBJECTIVES else None


def check_init_run(store: RunStore, cfg: RunConfig, run_id: str | None = None) -> RunRecord:
    """The source run's record, or ConfigError saying why this run cannot start from it (itself,
    missing, unfinished, no checkpoint, another model). Cheap: reads config.json and status.json only
    (the trainer checks the checkpoint's own model record again when it loads it)."""
    source_id = cfg.init_run
    record = finished_source(store, source_id, "init_run", "start from its own weights", "start", run_id)
    config = record.config_dict()
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"init_run {source_id} has no readable config.json")
    check_same_model(source_id, config["model"], config.get("model_params"), cfg.model, cfg.model_params)
    return record


def init_candidates(store: RunStore, model: str | None = None, model_params: dict | None = None) -> list[dict]:
    """Completed runs with a checkpoint, newest first: [{run_id, name, model, test_acc, fits, pretext}];
    `fits`: whether its weights fit `model` with `model_params` (None without a model, or when they are
    invalid); `pretext`: the self-supervised pretext it learned (its test_acc then means nothing), or None."""
    out = []
    for record, status, config in weights_sources(store):
        fits = None
        if model is not None:
            try:
                architecture_params(model, model_params)
            except ConfigError:
                pass  # this run's own model options are wrong: the form says so, not the list
            else:
                try:
                    check_same_model(record.run_id, config.get("model", "?"), config.get("model_params"), model,
                                     model_params)
                    fits = True
                except ConfigError:
                    fits = False
        out.append({"run_id": record.run_id, "name": config.get("name", ""), "model": config.get("model", "?"),
                    "test_acc": status.get("test_acc"), "fits": fits, "pretext": pretext_of(config)})
    return out


# ---- freezing -----------------------------------------------------------------------------------

def _eval_only(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)  # whatever mode is asked for


def keep_in_eval(module: nn.Module) -> None:
    """Put `module` in eval mode and keep it there: its `train()` (called by its parent's) always
    sets eval mode. Survives deepcopy (the EMA's copy keeps it, bound to the copy)."""
    module.train = types.MethodType(_eval_only, module)
    module.eval()


def _head_path(model: nn.Module, head: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is head)


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Freeze every parameter outside the classifier head and keep every module outside it (and not
    above it) in eval mode. Returns the names of the modules kept in eval mode."""
    head = classifier_head(model)
    path = _head_path(model, head)
    model.requires_grad_(False)
    head.requires_grad_(True)
    ancestors = {".".join(path.split(".")[:i]) for i in range(len(path.split(".")))}  # "" is the model
    frozen = []
    for name, module in model.named_modules():
        if name in ancestors or name == path or name.startswith(path + "."):
            continue
        keep_in_eval(module)
        frozen.append(name)
    return frozen


# ---- the source ---------------------------------------------------------------------------------

@dataclass
class InitSource:
    """A finished run's checkpoint, ready to initialise a model of the same architecture."""

    run_id: str
    mode: str
    checkpoint: Checkpoint
    test_acc: float | None = None     # the source's (None for a pretext source: its head did not classify)
    pretext: str | None = None        # the pretext the source learned, when its head is not loaded for it
    linear_probe_acc: float | None = None  # a pretext source's linear-probe accuracy

    @property
    def reinitialises_head(self) -> bool:
        return self.mode == "crt" or self.pretext is not None

    @property
    def head(self) -> str:
        """Where the head's initial weights come from, in words."""
        if self.pretext is not None:
            return f"re-initialised (the source learned the {self.pretext} pretext, not the classes)"
        return "re-initialised (cRT)" if self.mode == "crt" else "loaded from the source"

    @property
    def info(self) -> dict:
        """What status.json records under `init_from`."""
        ckpt = self.checkpoint
        info = {"run_id": self.run_id, "mode": self.mode, "checkpoint": ckpt.path.name,
                "weights": ckpt.evaluation_weights()[1], "step": ckpt.step, "fallback": ckpt.fallback,
                "test_acc": self.test_acc, "head": self.head}
        if self.pretext is not None:
            info.update(pretext=self.pretext, linear_probe_acc=self.linear_probe_acc)
        return info

    def apply(self, model: nn.Module) -> nn.Module:
        """Load the source's weights into `model` (on the CPU, before it moves to the device) and freeze
        it as the mode says; crt, and any mode from a pretext source, give the head back the values it was
        built with (this run's seed)."""
        head = classifier_head(model)
        fresh_head = {k: v.clone() for k, v in head.state_dict().items()}
        state, _ = self.checkpoint.evaluation_weights()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"init_run {self.run_id}: {self.checkpoint.path.name} does not fit this "
                                  f"model: {exc}") from None
        if self.reinitialises_head:
            head.load_state_dict(fresh_head)
        if self.mode in ("linear_probe", "crt"):
            freeze_all_but_head(model)
        return model


def load_init_source(store: RunStore, cfg: RunConfig, run_id: str | None = None) -> InitSource | None:
    """The checked source of `cfg.init_run` with its checkpoint read (None when the run starts from
    scratch); ConfigError when it cannot be used. Reads no training data."""
    if not cfg.init_run:
        return None
    if cfg.init_mode not in INIT_MODES:
        raise ConfigError(f"init_mode {cfg.init_mode!r} is not one of: {', '.join(INIT_MODES)}")
    record = check_init_run(store, cfg, run_id)
    try:
        ckpt = read_checkpoint(record, FINISHED_ORDER)
        check_same_model(cfg.init_run, ckpt.model_name, ckpt.model_params, cfg.model, cfg.model_params)
    except KeyError as exc:
        raise CheckpointError(f"init_run {cfg.init_run}: its checkpoint has no {exc} entry") from None
    except CheckpointError as exc:
        raise CheckpointError(f"init_run {cfg.init_run} cannot be loaded: {exc}") from None
    status = record.status()
    pretext = pretext_of(record.config_dict())
    if pretext is None or pretext == cfg.objective:  # continuing the same pretext keeps its head
        return InitSource(cfg.init_run, cfg.init_mode, ckpt, status.get("test_acc"))
    return InitSource(cfg.init_run, cfg.init_mode, ckpt, None, pretext, status.get("linear_probe_acc"))



# ---- the cRT recipe -----------------------------------------------------------------------------

def crt_epochs(source_epochs: int) -> int:
    """cRT's default length: a tenth of the source's epochs, 1 to 10 (Kang et al. re-train the head
    for 10 epochs after 90 to 200)."""
    return max(1, min(10, math.ceil(source_epochs / 10)))


def crt_config(store: RunStore, run_id: str, epochs: int | None = None) -> RunConfig:
    """The classifier re-training run of finished run `run_id`: its data, split, seed, model,
    augmentation and optimizer, with init_run = it, init_mode crt, class-balanced sampling (in place
    of its balancing) and a short cosine schedule without warm-up, EMA or lookahead (their averages
    would lag behind so few steps) or distillation, with the supervised objective (the head learns the
    labeled images' classes, whatever the source learned from). ConfigError when the run cannot be a source."""
    source = RunConfig.from_dict(store.config_dict_of(run_id))
    n_epochs = crt_epochs(source.epochs) if epochs is None else epochs
    cfg = source.replace(name=f"crt {source.name or run_id}"[:80], init_run=run_id, init_mode="crt",
                         balance=CRT_BALANCE, balance_params={}, epochs=n_epochs, time_limit_min=0.0,
                         schedule="cosine", schedule_params={}, ema_decay=0.0, lookahead_every=0,
                         distill="none", teacher_run="", objective="supervised")
    check_init_run(store, cfg)
    return cfg
