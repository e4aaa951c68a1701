"""The training engine: one RunConfig in, one run record out.

Top-down: set up the objective (a teacher fails here, before any data) → load the data onto the
device as uint8 → build the model, optimizer, schedule and tricks → (resume from `last`, else
`best`) → epochs of steps: the labeled batch goes through the batch hooks (alternating flips) and the
augmentation chain, the objective gives the loss, backward, clip, optimizer step, after-step hooks
(EMA, lookahead) → after each epoch evaluate (with the EMA when kept) and checkpoint → final test
report.

Every batch's randomness (the epoch's order, the augmentation draws, the objective's own draws) is
derived from (seed, epoch) and (seed, step) alone, and checkpoints keep the global generators' states
(dropout), so a run resumed from any checkpoint continues exactly as if it had never stopped.

One process at a time trains a run: the trainer holds `<run>/.train.lock` (flock) while it runs, and a
second one is refused before it touches the record. A completed run is never trained again.

Several processes (nproc > 1, engine/distributed.py): `train_run` outside torchrun launches them (the
launcher holds the lock); in each, the model is wrapped in DistributedDataParallel and every rank builds
the same global batch (same epoch order, batch hooks and augmentation draws as one process) and trains
on its share of it. The step's loss, accuracy, metrics and the stop request are summed over the ranks
in one all_reduce before backward, so all ranks log, stop and fail at the same step. Rank 0 alone
evaluates and writes the record; on resume it reads the checkpoint and sends it to the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from typing import Callable

import torch
from tqdm import tqdm

from ..config import SEMI_SUPERVISED_OBJECTIVES, RunConfig
from ..data import CLASSES, NUM_CLASSES
from ..devices import device_description, free_memory_bytes
from ..models import count_params, create_model
from ..params import ConfigError
from ..processes import LockHeld, process_lock, process_start_time
from ..runs import RunRecord, RunStore, atomic_write_bytes, atomic_write_json
from ..schedules import build_schedule
from ..tensorboard_export import NoEvents, live_events
from .checkpoints import (RESUME_ORDER, Checkpoint, CheckpointError, normalizer_states, read_checkpoint,
                          write_checkpoint)
from .distributed import (Ranks, ReadOnlyRecord, check_world, close_distributed, in_torchrun, init_distributed_mode,
                          launch_ranks, launched_here, restart_count, restarts_left)
from .evaluation import evaluate, logits_report, predict_logits
from .init_from import InitSource, load_init_source
from .muon import MuonSGD
from . import semisup  # noqa: F401  (registers pseudo_label, fixmatch, flexmatch, mixmatch in OBJECTIVES)
from . import pretext  # noqa: F401  (registers the rotation pretext in OBJECTIVES)
from . import selection  # noqa: F401  (registers proxy_select, data selection by a proxy model, in OBJECTIVES)
from .objectives import LabeledBatch, Objective, RunContext, StepContext, objective_for
from .prepare import Prepared, epoch_order, init_from_training_images, model_input, prepare
from .rng import (AUGMENTATION, OBJECTIVE_DRAWS, global_rng_states, restore_global_rng_states,
                  seeded_generator)
from .tricks import Tricks, autocast_context, build_tricks, clip_gradients, decay_groups, effective_precision

TRAIN_LOCK = ".train.lock"  # in the run folder: held by the one process that trains the run


class StopTraining(Exception):
    """Raised inside the loop to stop at a safe point (cancel, NaN, test hook)."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the model's trainable parameters. Each param group's `lr_scale` is its LR as a
    multiple of cfg.lr: the trainer's schedule sets every group's lr to lr × schedule × lr_scale, and to 0
    from a group's `until_epoch` on (the model's temporary_params, each in a group of its own)."""
    temporary = temporary_groups(cfg, model)
    held = {id(p) for group in temporary for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if cfg.optimizer == "muon":
        return build_muon(cfg, trainable, temporary)
    groups = decay_groups(cfg, trainable) + temporary
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def temporary_groups(cfg: RunConfig, model: torch.nn.Module) -> list[dict]:
    """One group per set of the model's temporary_params that still trains: no weight decay, the bias LR."""
    listed = getattr(model, "temporary_params", None)
    return [{"params": params, "weight_decay": 0.0, "lr_scale": cfg.bias_lr_scale, "until_epoch": epochs}
            for params, epochs in (listed() if callable(listed) else [])
            if all(p.requires_grad for p in params)]


def build_muon(cfg: RunConfig, params: list[torch.Tensor], temporary: list[dict] = ()) -> MuonSGD:
    """Muon for the conv filters (4-D weights) at cfg.muon_lr with cfg.muon_momentum, no weight decay;
    SGD for the rest (the head and other matrices with weight decay at cfg.lr, biases and norms at
    cfg.lr × bias_lr_scale), Nesterov for both as cfg.nesterov says. The filter group comes last, so
    groups 0 and 1 are those of optimizer sgd."""
    filters = [p for p in params if p.ndim == 4]
    rest = [p for p in params if p.ndim != 4]
    sgd = [{**group, "momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}
           for group in [*decay_groups(cfg, rest), *temporary]]
    muon = {"params": filters, "orthogonalize": True, "weight_decay": 0.0, "lr_scale": cfg.muon_lr / cfg.lr,
            "momentum": cfg.muon_momentum, "nesterov": cfg.nesterov and cfg.muon_momentum > 0}
    return MuonSGD([*sgd, muon], lr=cfg.lr)


def build_model(cfg: RunConfig, prep: Prepared, source: InitSource | None = None) -> torch.nn.Module:
    """The network on the device; models that initialise from data (fastnet's whitening) see 5,000
    training images first. With a `source` (init_run), its weights then replace the initial ones and
    the parts its mode freezes are frozen (engine/init_from.py)."""
    model = create_model(cfg.model, cfg.model_params, NUM_CLASSES)
    init_from_training_images(model, prep)
    if source is not None:
        source.apply(model)  # after the data init, so the loaded weights win
    model.to(prep.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def activation_bytes_per_image(cfg: RunConfig, model: torch.nn.Module, prep: Prepared) -> int:
    """Bytes of layer outputs one training image leaves for the backward pass: the outputs of every leaf
    module in a forward pass of two images, in eval mode (the BatchNorm statistics do not move) and under
    the run's autocast, halved."""
    sizes = []

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        x = model_input(prep, prep.train_x[:2])
        with autocast_context(cfg, prep.device):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return sum(sizes) // 2


def check_step_fits(cfg: RunConfig, model: torch.nn.Module, prep: Prepared, objective: Objective,
                    share: float = 1.0) -> None:
    """Refuse, before the first step, a step whose activations alone exceed the device's free memory (a
    lower bound of what it needs: the gradients and the optimizer come on top), instead of letting the
    kernel kill the process or CUDA fail mid-run. `share`: the part of the global batch in this memory
    (1/world for one GPU per rank; 1 where every rank shares the CPU's memory)."""
    free = free_memory_bytes(prep.device)
    if free is None:
        return
    per_labeled = objective.images_per_labeled(cfg)
    needed = cfg.batch_size * share * per_labeled * activation_bytes_per_image(cfg, model, prep)
    if needed <= free:
        return
    per_step = (f"batch {cfg.batch_size} × {per_labeled:g} images a labeled one for objective {cfg.objective}"
                if cfg.objective != "supervised" else f"batch {cfg.batch_size}")
    lower = "batch_size" + (" or ssl_unlabeled_ratio" if cfg.objective in SEMI_SUPERVISED_OBJECTIVES else "")
    raise ConfigError(f"a training step would hold at least {memory_text(needed)} of activations ({per_step}), "
                      f"more than the {memory_text(free)} free on {device_description(prep.device)}: lower {lower}")


def memory_text(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


class LogWindow:
    """Sums over the steps since the last train row; per-image means when the row is written. Also the
    learning rate and grad norm of its latest step."""

    def __init__(self):
        self.reset(time.time())

    def reset(self, now: float) -> None:
        self.started, self.steps, self.n, self.loss, self.correct = now, 0, 0, 0.0, 0.0
        self.lr, self.grad_norm = 0.0, None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, n: int, loss: float, correct: int, metrics: dict[str, float], lr: float,
            grad_norm: float | None) -> None:
        self.steps += 1
        self.lr, self.grad_norm = lr, grad_norm
        self.n += n
        self.loss += loss * n
        self.correct += correct
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * n
            self.counts[name] = self.counts.get(name, 0) + n

    def means(self, now: float) -> dict:
        return {"train_loss": self.loss / self.n, "train_acc": self.correct / self.n,
                "images_per_s": self.n / max(1e-9, now - self.started)}

    def metric_means(self) -> dict:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class Trainer:
    """Runs one config against one run record. `objective`: the training objective (default:
    objective_for(cfg))."""

    # built by _build
    prep: Prepared
    model: torch.nn.Module        # the network (checkpoints, evaluation, tricks)
    train_model: torch.nn.Module  # what training steps call: DDP around `model` with several ranks, else `model`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Callable[[int], float]
    tricks: Tricks
    precision: str
    images_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    def __init__(self, cfg: RunConfig, record: RunRecord, data_source: str | None = None,
                 progress: bool = False, stop_at_step: int | None = None, objective: Objective | None = None,
                 ranks: Ranks | None = None):
        self.cfg, self.record, self.data_source = cfg, record, data_source
        self.progress, self.stop_at_step = progress, stop_at_step
        self.objective = objective
        self.ranks = ranks or Ranks()
        self.stop_requested: str | None = None
        self.stop_agreed = False  # several ranks: some rank was asked to stop (summed with the step's numbers)
        self.step, self.best_acc, self.elapsed_before, self.t0 = 0, -1.0, 0.0, 0.0
        self.window = LogWindow()
        self.events = NoEvents()  # the TensorBoard event file, opened when training starts
        self._eval_logits: tuple[int, torch.Tensor] | None = None  # (step, logits) of the last eval of prep.eval_x

    # ---- signals -------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self.stop_requested = "cancelled by request (SIGTERM)"

    def _install_signal_handlers(self):
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            signal.signal(signal.SIGINT, self._on_sigterm)
        except ValueError:  # not the main thread (tests may call run() from a thread)
            pass

    # ---- main ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> str:
        """Train (resume: from the newest usable checkpoint) and return the final state. ConfigError,
        before anything of the record changes, when another process trains the run or it is completed.
        Under torchrun, train_rank (or the launcher) has taken the lock and checked the run already."""
        if in_torchrun():
            return self._run_locked(resume)
        with train_lock(self.record):
            refuse_completed(self.record)
            return self._run_locked(resume)

    def _run_locked(self, resume: bool) -> str:
        self._install_signal_handlers()
        # nothing left over from an earlier attempt (a cancel, an error)
        self.record.update_status(state="running", **self._process_fields(), started=time.time(),
                                  cancel_requested=None, error=None, reason=None,
                                  finished=None, resumed_from=None, resume_fallback=None)
        try:
            state, reason = self._train(resume)
        except StopTraining as stop:
            state, reason = stop.state, stop.reason
        except ConfigError as exc:
            state, reason = "failed", str(exc)
        except Exception as exc:  # a crash leaves the record failed with the error
            state, reason = "failed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            self.events.close()
        self.record.update_status(**self._final_status(state, reason))
        return state

    def _final_status(self, state: str, reason: str) -> dict:
        """What status.json says at the end; a failure that torchrun answers with a restart of every rank
        (from the last checkpoint) leaves the run "starting" instead of failed for a moment."""
        if state == "failed" and self.ranks.distributed and restarts_left():
            return {"state": "starting", "error": None, "reason": f"restarting after a failure: {reason}"}
        return {"state": state, "error": None if state == "completed" else reason, "reason": reason,
                "finished": time.time()}

    def _process_fields(self) -> dict:
        """This process's own pid and start time, so that cancel and the supervisor never signal or judge
        a reused pid; none when a launcher of this machine started the ranks (its pid is the run's)."""
        if launched_here():
            return {}
        pid = os.getpid()
        return {"pid": pid, "pid_start": process_start_time(pid), "host": os.uname().nodename}

    def _train(self, resume: bool) -> tuple[str, str]:
        self._build()
        if resume:
            self._resume()
        self._record_setup(resume)
        if self.ranks.is_main:
            self.events = live_events(self.record)  # rebuilt from metrics.jsonl (as a resume left it), then live
        self.t0 = time.time() - self.elapsed_before
        self.window.reset(time.time())
        with tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                  disable=not self.progress) as bar:
            self._train_epochs(bar)
        if self.ranks.is_main:
            self._final_report()
        limit_note = " (time limit reached)" if self.step < self.total_steps else ""
        return "completed", f"finished {self.step} steps{limit_note}"

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the model's initial weights (and a teacher's, built first)
        self.objective = self.objective or objective_for(cfg)
        store = RunStore(self.record.root)
        self.objective.setup(RunContext(cfg, self.record, store))  # before the data
        source = load_init_source(store, cfg, self.record.run_id)  # before the data too: a bad source fails at once
        if source is not None:
            self.record.update_status(init_from=source.info)
        prep = self.prep = prepare(cfg, self.data_source, store)
        if self.ranks.distributed:
            check_world(cfg, prep.device, self.ranks.world)
        self.objective.attach(prep)
        self.model = self.ranks.convert_norms(build_model(cfg, prep, source), cfg.sync_bn)
        check_step_fits(cfg, self.model, prep, self.objective,
                        1 / self.ranks.world if prep.device.type == "cuda" else 1.0)
        self.optimizer = build_optimizer(cfg, self.model)
        self.precision = effective_precision(cfg, prep.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.images_per_epoch = self.ranks.images_per_epoch(len(prep.epoch_indices), cfg.batch_size)
        self.steps_per_epoch = max(1, math.ceil(self.images_per_epoch / cfg.batch_size))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.schedule = build_schedule(cfg.schedule, cfg.schedule_params, self.total_steps, self.steps_per_epoch)
        self.tricks = build_tricks(cfg, self.model, prep.train_x.shape[0], self.total_steps, prep.device)
        self.train_model = self.ranks.wrap(self.model, prep.device)

    def _resume(self) -> None:
        """Continue from the newest usable checkpoint (`last`, else `best`), or from step 0 when there is
        none; the earlier attempt's metric lines after that step go, so every step appears once. Rank 0
        reads the checkpoint and sends it to the other ranks (their machines need not see the run folder)."""
        ckpt = self._resume_checkpoint() if self.ranks.is_main else None
        state = self.ranks.from_main(ckpt.data if ckpt is not None else None)
        if state is not None:
            self._load_training_state(state)
        if self.ranks.is_main:
            self._truncate_metrics_after(self.step)

    def _resume_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to resume from; None: start at step 0 (none was written yet, or none is
        readable: then status.json and the log say why)."""
        if not any(self.record.checkpoint_path(which).exists() for which in RESUME_ORDER):
            return None  # queued, or stopped before its first checkpoint
        # several ranks: on the CPU, each rank's load_state_dict then moves it to its own device
        where = torch.device("cpu") if self.ranks.distributed else self.prep.device
        try:
            ckpt = read_checkpoint(self.record, RESUME_ORDER, map_location=where)
        except CheckpointError as exc:
            self._note_resume_fallback(None, f"{exc}; training again from step 0")
            return None
        if ckpt.fallback:
            self._note_resume_fallback(ckpt, f"{ckpt.fallback}; resumed from {ckpt.path.name} at step {ckpt.step}")
        else:
            self.record.update_status(resumed_from=ckpt.path.name)
        return ckpt

    def _note_resume_fallback(self, ckpt: Checkpoint | None, note: str) -> None:
        print(f"resume: {note}", file=sys.stderr, flush=True)
        self.record.update_status(resumed_from=ckpt.path.name if ckpt else None, resume_fallback=note)

    def _load_training_state(self, data: dict) -> None:
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        if data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        self.tricks.resume(data, self.model)
        self.objective.load_state_dict(data.get("objective") or {})
        self.step, self.best_acc = int(data["step"]), float(data["best_acc"])
        self.elapsed_before = float(data.get("elapsed", 0.0))
        restore_global_rng_states(data.get("rng"), self.prep.device)  # last: nothing may draw after it

    # ---- the epoch / step loop -----------------------------------------------------------------
    def _train_epochs(self, bar) -> None:
        """Epochs of steps, each followed by evaluation and checkpoints. A stop (cancel, NaN) first writes
        the steps since the last train row as a partial row; a cancel also saves `last`."""
        try:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                order = epoch_order(self.prep, self.cfg.seed, epoch)[:self.images_per_epoch]
                at_limit = self._train_epoch(order, epoch, bar)
                self._end_epoch(at_limit)
                if at_limit:
                    break
        except StopTraining as stop:
            self._log_train(partial=True)
            if stop.state == "cancelled":
                self._save_checkpoint("last")
                self.record.update_status(step=self.step, epoch=self.step / self.steps_per_epoch)
            raise

    def _train_epoch(self, order: torch.Tensor, epoch: int, bar) -> bool:
        """The epoch's remaining steps; True when the time limit cut it short."""
        cfg, last_batch = self.cfg, self.steps_per_epoch - 1
        for b in range(self.step % self.steps_per_epoch, self.steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            lr = self._set_lr()
            loss, correct, grad_norm, metrics = self._step(idx, epoch)
            self.step += 1
            at_limit = self._time_is_up()
            self.tricks.after_step(self.model, self.step, final=self.step >= self.total_steps or at_limit)
            self.window.add(idx.shape[0], loss, correct, metrics, lr, grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}")
            row_due = self.step % cfg.log_every == 0 or b == last_batch
            if row_due or at_limit:
                self._log_train(partial=not row_due)
            self._check_stop()
            if at_limit:
                return True
        return False

    def _step(self, idx: torch.Tensor, epoch: int) -> tuple[float, int, float | None, dict[str, float]]:
        """One optimizer step on the labeled images `idx`: (loss, correct predictions, grad norm or
        None, the objective's metrics)."""
        cfg, prep = self.cfg, self.prep
        self.model.train()
        batch = self._rank_share(self._labeled_batch(idx, epoch))
        ctx = StepContext(prep, self.step, seeded_generator(cfg.seed, OBJECTIVE_DRAWS, self.step), self.total_steps)
        with autocast_context(cfg, prep.device):
            result = self.objective.loss(self.train_model, batch, ctx)
        loss, correct, metrics = self._step_totals(result, batch.y.shape[0])
        if not math.isfinite(loss):
            raise StopTraining("failed", f"loss became {loss} at step {self.step}: training diverged "
                                         "(try a lower learning rate or gradient clipping)")
        grad_norm = self._optimizer_step(result.loss)
        return loss, correct, grad_norm, metrics

    def _rank_share(self, batch: LabeledBatch) -> LabeledBatch:
        """This rank's share of the global batch (the batch itself in one process). Every rank builds the
        whole batch first, so that each image gets the augmentation draws it gets in one process."""
        if not self.ranks.distributed:
            return batch
        share = self.ranks.batch_slice(batch.y.shape[0])
        return LabeledBatch(*(getattr(batch, f.name)[share] for f in dataclasses.fields(batch)))

    def _step_totals(self, result, n: int) -> tuple[float, int, dict[str, float]]:
        """The step's loss, correct predictions and metrics over the global batch (this rank's `n` images
        and the others'), in one all_reduce that also tells every rank whether any was asked to stop."""
        metrics = result.metric_values()
        if not self.ranks.distributed:
            return result.loss.item(), result.correct(), metrics
        local = [result.loss.item() * n, result.correct(), n, float(self.stop_requested is not None),
                 *(value * n for value in metrics.values())]
        total = self.ranks.sum(torch.tensor(local, dtype=torch.float64, device=self.prep.device)).tolist()
        loss_sum, correct, images, stops = total[:4]
        self.stop_agreed = stops > 0
        return loss_sum / images, int(correct), {name: s / images for name, s in zip(metrics, total[4:])}

    def _labeled_batch(self, idx: torch.Tensor, epoch: int) -> LabeledBatch:
        prep = self.prep
        x_uint8, y = self.tricks.on_batch(prep.train_x[idx], idx, epoch), prep.train_y[idx]
        x_augmented, y_soft, _ = prep.chain(x_uint8, y, seeded_generator(self.cfg.seed, AUGMENTATION, self.step))
        return LabeledBatch(x_uint8, x_augmented, model_input(prep, x_augmented), y, y_soft)

    def _optimizer_step(self, loss: torch.Tensor) -> float | None:
        """Backward, clip, step. The grad norm is measured when clipping and on steps that log."""
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if cfg.grad_clip != "none" or (self.step + 1) % cfg.log_every == 0:
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(cfg, self.model)
        scaler.step(optimizer)
        scaler.update()
        return grad_norm

    def _set_lr(self) -> float:
        lr = self.cfg.lr * self.schedule(self.step)
        epoch = self.step / self.steps_per_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if epoch >= group.get("until_epoch", math.inf) else lr * group["lr_scale"]
        return lr

    def _time_is_up(self) -> bool:
        limit = self.cfg.time_limit_min
        if not limit:
            return False
        return self.ranks.any(time.time() - self.t0 > 60 * limit, self.prep.device)  # all ranks stop together

    def _check_stop(self) -> None:
        if self.ranks.distributed and self.stop_agreed:
            raise StopTraining("cancelled", self.stop_requested or "cancelled: another process of the run was "
                                                                   "asked to stop (SIGTERM)")
        if not self.ranks.distributed and self.stop_requested:
            raise StopTraining("cancelled", self.stop_requested)
        if self.stop_at_step is not None and self.step >= self.stop_at_step:
            raise StopTraining("cancelled", f"stopped at step {self.step} (test hook)")

    def _end_epoch(self, at_limit: bool) -> None:
        """Evaluate when due (a new best also saves `best`), save `last`, record the progress."""
        epoch_done = self.step // self.steps_per_epoch
        eval_due = epoch_done % self.cfg.eval_every == 0 or self.step >= self.total_steps or at_limit
        if eval_due and self.ranks.is_main:  # the other ranks go on to the next step's all_reduce and wait there
            acc = self._log_eval()
            if acc > self.best_acc:
                self.best_acc = acc
                self._save_checkpoint("best")
        self._save_checkpoint("last")
        self.record.update_status(step=self.step, epoch=epoch_done, best_val_acc=self.best_acc)

    # ---- records -------------------------------------------------------------------------------
    def _record_setup(self, resume: bool) -> None:
        prep = self.prep
        self.record.update_status(
            device=device_description(prep.device), precision=self.precision, data_origin=prep.data_origin,
            params=count_params(self.model), total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            train_images=len(prep.epoch_indices), eval_split=prep.eval_split, split=prep.split_summary,
            resumed_at_step=self.step if resume else None, distributed=self._distributed_summary())

    def _distributed_summary(self) -> dict | None:
        """status.json's "distributed": the ranks, each one's batch, SyncBatchNorm, torchrun's restarts so far
        and the images an epoch leaves out so that its last batch splits evenly; None in one process."""
        ranks, cfg = self.ranks, self.cfg
        if not ranks.distributed:
            return None
        return {"world_size": ranks.world, "per_rank_batch": cfg.batch_size // ranks.world,
                "sync_bn": cfg.sync_bn, "restarts": restart_count(),
                "images_left_out_per_epoch": len(self.prep.epoch_indices) - self.images_per_epoch}

    def _epoch_of(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)

    def _log_train(self, partial: bool = False) -> None:
        """A train row of the window's steps. `partial`: a stop cut the window short; the row then says
        which steps it covers (first_step .. step)."""
        now, window = time.time(), self.window
        if window.n == 0:
            return
        means = window.means(now)
        cut_short = {"partial": True, "first_step": self.step - window.steps + 1} if partial else {}
        row = {"kind": "train", "step": self.step, "epoch": self._epoch_of(self.step),
               "train_loss": means["train_loss"], "train_acc": means["train_acc"], "lr": window.lr,
               "grad_norm": window.grad_norm, "images_per_s": means["images_per_s"], "elapsed": now - self.t0,
               "time": now, **window.metric_means(), **cut_short}
        self.record.append_metrics(row)
        self.events.add(row)
        window.reset(now)

    def _log_eval(self) -> float:
        prep, cfg = self.prep, self.cfg
        result = evaluate(self.tricks.eval_model(self.model), prep, prep.eval_x, prep.eval_y, cfg.tta_flip,
                          cfg.tta_translate)
        self._eval_logits = (self.step, result["logits"])  # the final report reuses them (TTA is costly on CPU)
        now = time.time()
        row = {"kind": "eval", "step": self.step, "epoch": self._epoch_of(self.step), "val_loss": result["loss"],
               "val_acc": result["acc"], "eval_split": prep.eval_split, "elapsed": now - self.t0, "time": now}
        self.record.append_metrics(row)
        self.events.add(row)
        return result["acc"]

    def _save_checkpoint(self, which: str) -> None:
        """Rank 0 writes it (the ranks hold the same weights, optimizer state and RNG states)."""
        if not self.ranks.is_main:
            return
        cfg = self.cfg
        write_checkpoint(self.record, which, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **self.tricks.state_dicts(),  # ema, lookahead (None when off)
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step, "best_acc": self.best_acc, "elapsed": time.time() - self.t0,
            "model_name": cfg.model, "model_params": cfg.model_params,
            "eval_weights": self.tricks.eval_weights,
            "normalizers": normalizer_states(self.prep.chain),
            "tta": {"flip": cfg.tta_flip, "translate": cfg.tta_translate},
            "objective": self.objective.state_dict(),
            "rng": global_rng_states(self.prep.device)})

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop the metric lines (train and eval) written after the checkpoint's step, all of
        them at step 0, so curves don't repeat."""
        if not self.record.metrics_path.exists():
            return
        rows = self.record.read_metrics()
        kept = [r for r in rows if r.get("step", 0) <= step] if step else []
        atomic_write_bytes(self.record.metrics_path,
                           "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _final_report(self) -> None:
        """results.json (metrics.imbalance_report of the test logits), logits.npz (test and validation
        logits of the final model, the training counts) and the headline numbers in status.json."""
        prep, cfg = self.prep, self.cfg
        test_logits = self._final_logits(prep.test_x, "test")
        val_logits = self._final_logits(prep.eval_x, "val") if prep.eval_split == "val" else None
        train_counts = prep.labeled_counts  # before balancing, synthetic images left out
        report = logits_report(test_logits, prep.test_y, train_counts, list(CLASSES))
        report.update(steps=self.step, total_steps=self.total_steps, train_seconds=time.time() - self.t0,
                      evaluated_with=self.tricks.eval_weights,
                      tta_flip=cfg.tta_flip, tta_translate=cfg.tta_translate, test_images=int(prep.test_y.shape[0]),
                      **self.objective.results())
        self._save_logits(test_logits, val_logits, train_counts)
        atomic_write_json(self.record.results_path, report)
        self.events.add_results(report)
        self.record.update_status(test_acc=report["test_acc"], balanced_acc=report["balanced_acc"],
                                  macro_f1=report["macro_f1"], ece=report["ece"], train_seconds=report["train_seconds"])

    def _final_logits(self, x_uint8: torch.Tensor, split: str) -> torch.Tensor:
        """The final evaluation model's logits of `x_uint8` (TTA as configured): the last evaluation's when
        it ran at this step on `split`."""
        cached, prep, cfg = self._eval_logits, self.prep, self.cfg
        if cached is not None and cached[0] == self.step and prep.eval_split == split:
            return cached[1]
        return predict_logits(self.tricks.eval_model(self.model), prep, x_uint8, cfg.tta_flip, cfg.tta_translate)

    def _save_logits(self, test_logits: torch.Tensor, val_logits: torch.Tensor | None, train_counts) -> None:
        """logits.npz (RunRecord.write_logits): empty validation arrays when the run has no validation split."""
        prep = self.prep
        if val_logits is None:
            val_logits, val_labels = torch.zeros(0, NUM_CLASSES), torch.zeros(0, dtype=torch.int64)
        else:
            val_labels = prep.eval_y
        self.record.write_logits(test_logits=test_logits.float().cpu().numpy(), test_labels=prep.test_y.cpu().numpy(),
                                 val_logits=val_logits.float().cpu().numpy(), val_labels=val_labels.cpu().numpy(),
                                 train_counts=train_counts)


@contextlib.contextmanager
def train_lock(record: RunRecord):
    """Hold the run's train lock; ConfigError naming the holder when another process trains the run."""
    try:
        with process_lock(record.path / TRAIN_LOCK):
            yield
    except LockHeld as held:
        raise ConfigError(being_trained_message(record.run_id, held)) from None


def refuse_completed(record: RunRecord) -> None:
    if record.state() == "completed":
        raise ConfigError(f"run {record.run_id} is completed; nothing to resume (its results stay "
                          "as they are: train a new run to train again)")


def being_trained_message(run_id: str, held: LockHeld) -> str:
    who = f"process {held.pid}" if held.pid else "another process"
    if held.since:
        who += f" (started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.since))})"
    return (f"run {run_id} is being trained by {who}; wait for it or cancel it "
            f"(python -m cifar_core cancel {run_id})")


def create_new_record(cfg: RunConfig, store: RunStore, run_id: str | None = None,
                      meta: dict | None = None) -> RunRecord:
    """A new queued run record (`meta` added to its status.json); ConfigError when `run_id` is taken."""
    if run_id and store.record(run_id).exists():
        raise ConfigError(f"run {run_id} already exists in {store.root}: continue it with "
                          f"`train --resume {run_id}`, or choose another --run-id")
    try:
        record = store.create(cfg, run_id=run_id, state="queued")
    except FileExistsError:
        raise ConfigError(f"a folder {run_id} already exists in {store.root}; choose another --run-id") from None
    if meta:
        record.update_status(**meta)
    return record


def train_run(cfg: RunConfig, store: RunStore | None = None, run_id: str | None = None,
              data_source: str | None = None, resume: bool = False, progress: bool = False,
              stop_at_step: int | None = None, objective: Objective | None = None,
              meta: dict | None = None) -> RunRecord:
    """Train a new run (`run_id` must be free; `meta` goes into its status.json), or with `resume` the
    existing run `run_id`, in this process. ConfigError, with the record untouched, when the id is
    taken, the run to resume is missing or completed, or another process trains it."""
    store = store or RunStore()
    if in_torchrun():
        return train_rank(cfg, store, run_id, data_source, resume, stop_at_step, objective, meta)
    record = existing_record(store, run_id) if resume else create_new_record(cfg, store, run_id, meta)
    if cfg.nproc > 1:
        with train_lock(record):
            refuse_completed(record)
            launch_ranks(record, cfg, data_source)
        return record
    Trainer(cfg, record, data_source, progress=progress, stop_at_step=stop_at_step,
            objective=objective).run(resume=resume)
    return record


def existing_record(store: RunStore, run_id: str | None) -> RunRecord:
    if not run_id or not store.record(run_id).exists():
        raise ConfigError(f"run {run_id} not found in {store.root}: nothing to resume")
    return store.record(run_id)


def train_rank(cfg: RunConfig, store: RunStore, run_id: str | None, data_source: str | None, resume: bool,
               stop_at_step: int | None, objective: Objective | None, meta: dict | None) -> RunRecord:
    """This process's part of a run under torchrun. Rank 0 opens the record and sends the others the
    run's id and config (a problem reaches every rank as the same ConfigError); the ranks train it
    together and only rank 0 writes it. Returns the record (a ReadOnlyRecord on the other ranks, whose
    state is this rank's outcome)."""
    ranks = init_distributed_mode()
    try:
        with contextlib.ExitStack() as held:
            opened = open_as_main(cfg, store, run_id, resume, meta, held) if ranks.is_main else None
            opened = ranks.from_main(opened)
            if isinstance(opened, str):
                raise ConfigError(opened)
            config, run_id, resume = opened
            cfg = RunConfig.from_dict(config)
            record = store.record(run_id) if ranks.is_main else ReadOnlyRecord(store.root, run_id)
            Trainer(cfg, record, data_source, stop_at_step=stop_at_step, objective=objective, ranks=ranks).run(resume)
            return record
    finally:
        close_distributed()


def open_as_main(cfg: RunConfig, store: RunStore, run_id: str | None, resume: bool, meta: dict | None,
                 held: contextlib.ExitStack) -> tuple[dict, str, bool] | str:
    """Rank 0 of a torchrun run: (config, run id, resume) of the run it opened, its train lock held in
    `held` unless a launcher of this machine holds it, or the ConfigError's message. A new run needs
    --run-id (every rank must train the same one); torchrun's restart of it resumes it."""
    try:
        restarted = bool(run_id) and restart_count() > 0 and store.record(run_id).exists()
        if resume or restarted:
            record, resume = existing_record(store, run_id), True
        elif not run_id:
            raise ConfigError("under torchrun, name the run with --run-id (every process must train the same run), "
                              "or continue one with --resume RUN_ID")
        else:
            record = create_new_record(cfg, store, run_id, meta)
        if not launched_here():
            held.enter_context(train_lock(record))
        refuse_completed(record)
        return record.config().to_dict(), record.run_id, resume
    except ConfigError as exc:
        return str(exc)
