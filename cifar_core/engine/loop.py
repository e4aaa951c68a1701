"""The training engine: one RunConfig in, one run record out.

Top-down: resolve device → load data and keep it on the device as uint8 → build the split, the
balancing plan, the augmentation chain, the model and the optimizer → loop over steps (augment a
whole batch on the device, forward, backward, clip, step, EMA) writing metrics lines → evaluate →
checkpoint → final test report.

Every batch's randomness (the epoch's order and the augmentation draws) is derived from
(seed, epoch) and (seed, step) alone, so a run resumed from any checkpoint continues exactly as if
it had never stopped.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import CLASSES, NUM_CLASSES
from ..devices import device_description
from ..models import count_params, create_model
from ..params import ConfigError
from ..runs import RunRecord, RunStore, atomic_write_bytes, atomic_write_json
from ..schedules import build_schedule
from .checkpoints import RESUME_ORDER, normalizer_states, read_checkpoint, write_checkpoint
from .distill import Teacher, distillation_loss, load_teacher
from .evaluation import classification_report, evaluate, predict_logits
from .prepare import Prepared, normalize, prepare
from .rng import seeded_generator
from .tricks import Lookahead, alternating_flips, autocast_context, effective_precision


class StopTraining(Exception):
    """Raised inside the loop to stop at a safe point (cancel, NaN, test hook)."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on weight matrices/kernels only: decaying norm scales and biases only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": cfg.bias_lr_scale}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


class Trainer:
    """Runs one config against one run record."""

    def __init__(self, cfg: RunConfig, record: RunRecord, data_source: str | None = None,
                 progress: bool = False, stop_at_step: int | None = None):
        self.cfg, self.record, self.data_source = cfg, record, data_source
        self.progress, self.stop_at_step = progress, stop_at_step
        self.stop_requested: str | None = None
        self._test_logits: tuple[int, torch.Tensor] | None = None  # (step, logits) of the last test eval
        self.teacher: Teacher | None = None  # set when the config distils from a finished run
        self.lookahead: Lookahead | None = None

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
        self._install_signal_handlers()
        started = time.time()
        self.record.update_status(state="running", pid=os.getpid(), started=started, error=None,
                                  finished=None, host=os.uname().nodename)
        try:
            state, reason = self._train(resume, started)
        except StopTraining as stop:
            state, reason = stop.state, stop.reason
        except ConfigError as exc:
            state, reason = "failed", str(exc)
        except Exception as exc:  # a crash leaves the record failed with the error
            state, reason = "failed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.record.update_status(state=state, error=None if state == "completed" else reason,
                                  reason=reason, finished=time.time())
        return state

    def _train(self, resume: bool, started: float) -> tuple[str, str]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.teacher = self._load_teacher()  # before the data: a bad teacher fails at once
        prep = self.prep = prepare(cfg, self.data_source)
        device = prep.device
        if self.teacher is not None:
            self.teacher.to(device)
        model = create_model(cfg.model, cfg.model_params, NUM_CLASSES)
        init = getattr(model, "init_from_data", None)
        if callable(init):
            sample = prep.train_x[torch.randperm(prep.train_x.shape[0], generator=seeded_generator(cfg.seed, 7))[:5000].to(device)]
            init(normalize(prep, sample))
        model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model)
        ema = None
        if cfg.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        precision = effective_precision(cfg, device)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

        n_epoch = len(prep.epoch_indices)
        steps_per_epoch = max(1, math.ceil(n_epoch / cfg.batch_size))
        total_steps = steps_per_epoch * cfg.epochs
        schedule = build_schedule(cfg.schedule, cfg.schedule_params, total_steps, steps_per_epoch)
        lookahead = Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay, total_steps) \
            if cfg.lookahead_every else None
        self.lookahead = lookahead  # saved with the checkpoints
        flip_base = None
        if cfg.alternating_flip:  # one random flip state per training image, inverted every odd epoch
            flip_base = (torch.rand(prep.train_x.shape[0], generator=seeded_generator(cfg.seed, 3)) < 0.5).to(device)

        step, best_acc, elapsed_before = 0, -1.0, 0.0
        if resume and self.record.checkpoint_path("last").exists():
            ckpt = read_checkpoint(self.record, RESUME_ORDER, map_location=device).data
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if lookahead is not None:  # a checkpoint from before lookahead was on: start from its weights
                lookahead.load_state_dict(ckpt.get("lookahead") or model.state_dict())
            step, best_acc = int(ckpt["step"]), float(ckpt["best_acc"])
            elapsed_before = float(ckpt.get("elapsed", 0.0))
            self._truncate_metrics_after(step)

        n_params = count_params(model)
        self.record.update_status(
            device=device_description(device), precision=precision, data_origin=prep.data_origin, params=n_params,
            total_steps=total_steps, steps_per_epoch=steps_per_epoch, train_images=n_epoch,
            eval_split=prep.eval_split, split=prep.split_summary, resumed_at_step=step if resume else None)

        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
        t0 = time.time() - elapsed_before
        window = {"loss": 0.0, "correct": 0.0, "n": 0, "t": time.time(), "images": 0, "distill": 0.0}
        stop: StopTraining | None = None
        try:
            while step < total_steps:
                epoch = step // steps_per_epoch
                order = self._epoch_order(prep, epoch)
                at_limit = False
                for b in range(step % steps_per_epoch, steps_per_epoch):
                    idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    lr = cfg.lr * schedule(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    flips = None if flip_base is None else alternating_flips(flip_base, idx, epoch)
                    loss, correct, grad_norm, kd = self._step(prep, model, optimizer, scaler, ema, idx, step,
                                                              flips)
                    step += 1
                    at_limit = bool(cfg.time_limit_min) and time.time() - t0 > 60 * cfg.time_limit_min
                    if lookahead is not None:
                        lookahead.after_step(model, step, final=step >= total_steps or at_limit)
                    window["loss"] += loss * idx.shape[0]
                    window["distill"] += kd * idx.shape[0]
                    window["correct"] += correct
                    window["n"] += idx.shape[0]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}")
                    if step % cfg.log_every == 0 or b == steps_per_epoch - 1:
                        self._log_train(window, step, steps_per_epoch, lr, grad_norm, t0)
                    if self.stop_requested:
                        raise StopTraining("cancelled", self.stop_requested)
                    if self.stop_at_step is not None and step >= self.stop_at_step:
                        raise StopTraining("cancelled", f"stopped at step {step} (test hook)")
                    if at_limit:
                        break
                epoch_done = step // steps_per_epoch
                if epoch_done % cfg.eval_every == 0 or step >= total_steps or at_limit:
                    acc = self._log_eval(prep, ema or model, step, steps_per_epoch, t0)
                    if acc > best_acc:
                        best_acc = acc
                        self._save_checkpoint("best", model, optimizer, ema, scaler, step, best_acc, t0)
                self._save_checkpoint("last", model, optimizer, ema, scaler, step, best_acc, t0)
                self.record.update_status(step=step, epoch=epoch_done, best_val_acc=best_acc)
                if at_limit:
                    break
        except StopTraining as exc:
            stop = exc
            if exc.state == "cancelled":
                self._save_checkpoint("last", model, optimizer, ema, scaler, step, best_acc, t0)
                self.record.update_status(step=step, epoch=step / steps_per_epoch)
        finally:
            if bar is not None:
                bar.close()
        if stop is not None:
            raise stop
        self._final_report(prep, ema or model, t0, step, total_steps)
        limit_note = " (time limit reached)" if step < total_steps else ""
        return "completed", f"finished {step} steps{limit_note}"

    def _epoch_order(self, prep: Prepared, epoch: int) -> torch.Tensor:
        gen = seeded_generator(self.cfg.seed, 1, epoch)
        n = len(prep.epoch_indices)
        if prep.sample_weights is not None:
            picks = torch.multinomial(prep.sample_weights, n, replacement=True, generator=gen)
        else:
            picks = torch.randperm(n, generator=gen)
        return torch.as_tensor(prep.epoch_indices)[picks].to(prep.device)

    def _load_teacher(self) -> Teacher | None:
        cfg = self.cfg
        if cfg.distill == "none":
            return None
        teacher = load_teacher(RunStore(self.record.root), cfg.teacher_run, cfg.augment, self.record.run_id)
        self.record.update_status(teacher=teacher.info)
        return teacher

    def _step(self, prep, model, optimizer, scaler, ema, idx, step,
              flips: torch.Tensor | None = None) -> tuple[float, float, float | None, float]:
        """One optimizer step: (loss, correct predictions, grad norm or None, distillation loss or 0).
        `flips` (bool per image) mirrors those images first: the alternating-flip schedule."""
        cfg = self.cfg
        model.train()
        x_uint8, y = prep.train_x[idx], prep.train_y[idx]
        if flips is not None:
            x_uint8 = torch.where(flips[:, None, None, None], x_uint8.flip(-1), x_uint8)
        x_augmented, y_soft, _ = prep.chain(x_uint8, y, seeded_generator(cfg.seed, 2, step))
        x = normalize(prep, x_augmented)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kd_value = 0.0
        with autocast_context(cfg, prep.device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y_soft, weight=prep.class_weights,
                                   label_smoothing=cfg.label_smoothing)
            if self.teacher is not None:  # the teacher sees the same augmented batch
                kd = distillation_loss(cfg.distill, logits.float(), self.teacher.logits(x_augmented, x),
                                       cfg.distill_temperature)
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
                kd_value = kd.item()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise StopTraining("failed", f"loss became {loss_value} at step {step}: training diverged "
                                         "(try a lower learning rate or gradient clipping)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if cfg.grad_clip != "none" or (step + 1) % cfg.log_every == 0:
            scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.grad_clip == "value":
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
                torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
            else:
                max_norm = cfg.clip_max_norm if cfg.grad_clip == "norm" else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, max_norm, norm_type=float(cfg.clip_norm_type)).item()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        correct = (logits.argmax(1) == y_soft.argmax(1)).sum().item()
        return loss_value, correct, grad_norm, kd_value

    # ---- records -------------------------------------------------------------------------------
    def _log_train(self, window, step, steps_per_epoch, lr, grad_norm, t0):
        now = time.time()
        if window["n"] == 0:
            return
        row = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
               "train_loss": window["loss"] / window["n"], "train_acc": window["correct"] / window["n"],
               "lr": lr, "grad_norm": grad_norm,
               "images_per_s": window["n"] / max(1e-9, now - window["t"]), "elapsed": now - t0,
               "time": now}
        if self.teacher is not None:
            row["distill_loss"] = window["distill"] / window["n"]
        self.record.append_metrics(row)
        window.update(loss=0.0, correct=0.0, n=0, t=now, distill=0.0)

    def _log_eval(self, prep, model, step, steps_per_epoch, t0) -> float:
        result = evaluate(model, prep, prep.eval_x, prep.eval_y, self.cfg.tta_flip, self.cfg.tta_translate)
        if prep.eval_split == "test":  # the final report can reuse these logits (TTA is costly on CPU)
            self._test_logits = (step, result["logits"])
        now = time.time()
        self.record.append_metrics({"kind": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4),
                                    "val_loss": result["loss"], "val_acc": result["acc"],
                                    "eval_split": prep.eval_split, "elapsed": now - t0, "time": now})
        return result["acc"]

    def _save_checkpoint(self, which, model, optimizer, ema, scaler, step, best_acc, t0):
        cfg = self.cfg
        write_checkpoint(self.record, which, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "step": step, "best_acc": best_acc, "elapsed": time.time() - t0,
            "model_name": cfg.model, "model_params": cfg.model_params,
            "eval_weights": "ema" if ema is not None else "model",
            "normalizers": normalizer_states(self.prep.chain),
            "tta": {"flip": cfg.tta_flip, "translate": cfg.tta_translate}})

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines written after the checkpoint so curves don't repeat."""
        rows = self.record.read_metrics()
        kept = [r for r in rows if r.get("step", 0) <= step]
        atomic_write_bytes(self.record.metrics_path,
                           "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _final_report(self, prep, model, t0, step, total_steps):
        cached = self._test_logits
        if cached is not None and cached[0] == step:
            logits = cached[1]
        else:
            logits = predict_logits(model, prep, prep.test_x, self.cfg.tta_flip, self.cfg.tta_translate)
        y_true = prep.test_y.cpu().numpy()
        report = classification_report(y_true, logits.argmax(1).cpu().numpy(), list(CLASSES))
        report.update(test_loss=F.cross_entropy(logits, prep.test_y).item(), steps=step,
                      total_steps=total_steps, train_seconds=time.time() - t0,
                      evaluated_with="ema" if self.cfg.ema_decay else "model",
                      tta_flip=self.cfg.tta_flip, tta_translate=self.cfg.tta_translate, test_images=int(y_true.shape[0]))
        if self.teacher is not None:
            report["teacher"] = {**self.teacher.info, "distill": self.cfg.distill, "alpha": self.cfg.distill_alpha,
                                 "temperature": self.cfg.distill_temperature}
        atomic_write_json(self.record.results_path, report)
        self.record.update_status(test_acc=report["test_acc"], balanced_acc=report["balanced_acc"],
                                  macro_f1=report["macro_f1"], train_seconds=report["train_seconds"])


def train_run(cfg: RunConfig, store: RunStore | None = None, run_id: str | None = None,
              data_source: str | None = None, resume: bool = False, progress: bool = False,
              stop_at_step: int | None = None) -> RunRecord:
    """Create (or reopen, for resume) a run record and train it in this process."""
    store = store or RunStore()
    if run_id and store.record(run_id).exists():
        record = store.record(run_id)
    else:
        record = store.create(cfg, run_id=run_id, state="queued")
    Trainer(cfg, record, data_source, progress=progress, stop_at_step=stop_at_step).run(resume=resume)
    return record
