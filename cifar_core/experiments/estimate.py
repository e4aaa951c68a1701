"""How long a run, or a study's runs, will take on this machine: the one duration estimator of the lab.

Where the time of `python -m cifar_core train` goes, and where each part's numbers come from:

- start: interpreter start and imports (torch, torchvision, the engine), plus scikit-learn for the
  final report. Measured once per machine and device kind by timing exactly that in a fresh Python
  process (`measure_machine`), which also times loading CIFAR-10 onto the device.
- prepare: that data load, building the model (fastnet's whitening init sees up to 5,000 images),
  fitting the chain's normalizers (ZCA) and the first, slow step.
- resampling: the balancing strategies that resample the images once before training (SMOTE,
  cluster-based oversampling), a cost model scaled by the pool's and the new images, calibrated on
  this dev box (`resampling_seconds`); in a finished run's feature space, plus that run's model's
  forward over the pool, probed here (`probe_features`).
- train: epochs × steps, each step timed at its own batch size (a 200-image epoch at batch 128 is a
  step of 128 and one of 72): a part per step (the optimizer update of every weight, zero_grad, the
  loss sync), which dominates small batches and short epochs, and a part per image (forward and
  backward); plus the augmentation chain and a distillation teacher's forward, a pass over the
  weights per EMA update or lookahead sync, and the gradient norm (every step when clipping, else
  every log_every-th step, as the loop does). A run that trains only the classifier head of a
  finished run's model (init_mode linear_probe or crt: the backbone frozen) has steps of its own:
  the probe freezes its model the same way (`FROZEN_STEP_SHARE` for finished runs).
- evaluation: after every eval_every-th epoch and the last one, the val split (or the test set)
  × the TTA views, forward only, in batches of 1,000 (a per-batch part and a per-image part).
- checkpoints: `last` after every epoch and `best` after every evaluation (assumed to improve), each
  the serialized size over this disk's measured write speed, plus the status write.
- final test: the test set (test_size or 10,000) × views, unless the last evaluation already ran on
  the test set (the loop reuses those logits).

Throughput comes from this machine, in this order:
1. finished runs in the runs root with the same model and params, batch size, precision,
   channels_last and device, and the same frozen backbone or not: the median images/s of their train
   rows (only windows that do not span an epoch end: those include the evaluation and the
   checkpoints), the duration of their evaluation rows, and their time from start to the first step
   (of the runs that did not resample: theirs holds the resampling). A frozen run with only
   full-training runs of its setting takes theirs, its steps scaled by FROZEN_STEP_SHARE (CPU only);
2. else a probe (`probe_model`): real training steps (forward, backward, optimizer step) on random
   images at batch sizes growing ×4 from 2 up to the run's own batch size, or until a step takes
   STEP_TARGET_S; a step at any batch size is then read piecewise linearly off those points (beyond
   them, along the last segment: steps are close to linear in the batch on a CPU, far from it on a
   GPU, hence measuring up to the real size). Then forward-only evaluation batches, grown the same
   way, with a fitted per-batch and per-image part. About PROBE_BUDGET_S in all. It is cached in
   ``<runs>/.estimates.json`` per (model, params, precision, channels_last, optimizer, device, torch
   threads, torch version, host, frozen backbone); a later run with a larger batch adds its sizes to
   the same entry (`probe_more_steps`). The augmentation chain (`probe_chain`) and a teacher's forward
   (`probe_teacher`) are timed and cached on their own.

A probe on a busy machine is unreliable: with other processes on the cores, PyTorch's threads wait for
each other at every operation, which slows small batches far more than a run's (fastnet on the 2-core
dev box under load: a probe that stopped at batch 8 read 13 images/s where the run then trained at
41 at batch 128; growing the batch until a step takes STEP_TARGET_S, it read 32 against 40). The
estimate says so (`Estimate.notes`), and finished runs replace the probe as soon as there are some.

Everything measured in this process is also kept in memory, so that a second runs root on the same
machine does not measure again (`clear_memory` forgets it).
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, teacher_ids
from ..params import ConfigError
from ..runs import RunRecord, RunStore, atomic_write_bytes, atomic_write_json, read_json

__all__ = ["CACHE_NAME", "PARTS", "Estimate", "estimate_run", "estimate_runs", "combine", "human_duration",
           "run_counts", "RunCounts", "measure_machine", "probe_model", "probe_more_steps", "needs_more_steps",
           "step_seconds", "probe_chain", "probe_teacher", "probe_features", "resampling_seconds",
           "trains_head_only", "finished_throughput", "clear_memory"]

CACHE_NAME = ".estimates.json"
CACHE_VERSION = 3
PARTS = ("start", "prepare", "resampling", "train", "evaluation", "checkpoints", "final test")
# Relative range around the estimate: finished runs of the same setting repeat well; a probe of a few
# steps is more exposed to what else the machine does, so its range is wider.
RANGE = {"finished": (0.85, 1.2), "probe": (0.8, 1.3)}

SMALL_BATCH = 2            # the probe's first batch size: mostly the per-step cost, then ×4 up
PROBE_BUDGET_S = 4.0       # the probe's timed steps and batches stop about here (building the model aside)
STEP_TARGET_S = 0.5        # the step sizes grow until one step takes about this long
EVAL_TARGET_S = 0.3        # likewise for the forward-only evaluation batches
INIT_PROBE_IMAGES = 1000   # fastnet's whitening init is timed on this many images, then scaled
INIT_MAX_IMAGES = 5000     # build_model initialises from at most this many training images
FIT_PROBE_IMAGES = 2000    # likewise for fitting the chain's normalizers (ZCA)
STARTUP_TIMEOUT_S = 300
BUSY_LOAD_PER_CPU = 1.25   # above this load while probing, the estimate says the probe may be off
TRAIN_LABELS_PER_CLASS = 5000  # CIFAR-10's training set: 5,000 images of each class
TEST_IMAGES = 10000
NUM_CLASSES = 10

_MEMORY: dict[tuple[str, str], dict] = {}


def clear_memory() -> None:
    """Forget the timings measured in this process (the runs roots' cache files stay)."""
    _MEMORY.clear()


# ---- the result ------------------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """45 s · 2 min 20 s · 34 min · 2 h 15 min."""
    s = max(0.0, float(seconds))
    if round(s) < 60:
        return f"{max(1, round(s))} s"
    if s < 600:
        minutes, rest = divmod(int(round(s / 10) * 10), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    hours, minutes = divmod(int(round(s / 300) * 5), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


@dataclass(frozen=True)
class Estimate:
    """Seconds for a run (or several, one after the other), a range, where they go, and their basis."""

    seconds: float
    low: float
    high: float
    parts: dict                 # PARTS name -> seconds
    basis: str                  # "from 3 finished runs", "from a 4 s probe", ...
    runs: int = 1
    device: str = "cpu"
    train_images: int = 0       # per epoch (of a single run)
    epochs: int = 0
    images_per_s: float = 0.0   # training throughput at the run's batch size (of a single run)
    notes: tuple = field(default_factory=tuple)
    labels: dict = field(default_factory=dict)  # PARTS name -> how it is shown, where it says more

    @property
    def text(self) -> str:
        return f"about {human_duration(self.seconds)}"

    @property
    def range_text(self) -> str:
        return f"{human_duration(self.low)} – {human_duration(self.high)}"

    def parts_text(self) -> str:
        return " · ".join(f"{self.labels.get(name, name)} {human_duration(s) if s >= 1 else '<1 s'}"
                          for name, s in self.parts.items() if s > 0)

    def report(self) -> str:
        """A few lines for a terminal."""
        where = "the GPU" if self.device == "cuda" else "the CPU"
        lines = [f"estimated duration: {self.text} ({self.range_text}) on {where}, {self.basis}",
                 f"  {self.parts_text()}"]
        if self.runs == 1 and self.train_images:
            lines.append(f"  {self.train_images:,} training images × {self.epochs} epoch(s) at "
                         f"~{self.images_per_s:,.0f} images/s")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def combine(estimates: list[Estimate]) -> Estimate:
    """Runs queued one after the other on one slot: the sum of their estimates."""
    if not estimates:
        raise ConfigError("nothing to estimate: no runs")
    parts = {name: sum(e.parts.get(name, 0.0) for e in estimates) for name in PARTS}
    bases = list(dict.fromkeys(e.basis for e in estimates))
    basis = "; ".join(bases[:3]) + (f"; and {len(bases) - 3} more" if len(bases) > 3 else "")
    notes = tuple(dict.fromkeys(n for e in estimates for n in e.notes))
    labels = {}
    for name in PARTS:  # a label that all the runs with this part share ("resampling (SMOTE on pixels)")
        shown = {e.labels.get(name, name) for e in estimates if e.parts.get(name, 0.0) > 0}
        if len(shown) == 1 and shown != {name}:
            labels[name] = shown.pop()
    return Estimate(seconds=sum(e.seconds for e in estimates), low=sum(e.low for e in estimates),
                    high=sum(e.high for e in estimates), parts=parts, basis=basis,
                    runs=sum(e.runs for e in estimates), device=estimates[0].device, notes=notes, labels=labels)


# ---- what a config trains on -------------------------------------------------------------------------

@dataclass(frozen=True)
class RunCounts:
    train: int        # images per epoch (after balancing)
    pool: int         # labeled training images on the device (what init and normalizer fits see)
    eval: int         # images of each evaluation
    eval_split: str   # "val" or "test"
    test: int         # images of the final test report
    views: float      # test-time views per image (fewer on average when only unsure images get them all)
    steps_per_epoch: int
    evals: int        # evaluations during training
    classes: tuple = ()  # labeled training images per class, before balancing

    @property
    def final_reuses_eval(self) -> bool:
        return self.eval_split == "test"


def run_counts(cfg: RunConfig) -> RunCounts:
    """The image counts of a run, from the real split and balancing code run on CIFAR-10's label counts
    (5,000 per class; exact for full and per_class subsets, the same total for random ones)."""
    import numpy as np

    from ..data import build_split
    from ..imbalance.strategies import planned_epoch_images

    labels = np.tile(np.arange(NUM_CLASSES, dtype=np.int64), TRAIN_LABELS_PER_CLASS)
    split = build_split(labels, {
        "subset": cfg.subset, "subset_size": cfg.subset_size, "per_class": cfg.per_class,
        "imbalance": cfg.imbalance, "imbalance_params": cfg.imbalance_params,
        "val_size": cfg.val_size, "label_budget": cfg.label_budget}, cfg.seed)
    labeled = split.train_idx[split.labeled_mask]
    train = planned_epoch_images(cfg.balance, cfg.balance_params, labels[labeled], cfg.seed, NUM_CLASSES)
    test = cfg.test_size or TEST_IMAGES
    n_val = len(split.val_idx)
    steps = max(1, math.ceil(train / cfg.batch_size))
    evals = cfg.epochs // cfg.eval_every + (1 if cfg.epochs % cfg.eval_every else 0)
    return RunCounts(train=train, pool=len(labeled), eval=n_val or test,
                     eval_split="val" if n_val else "test", test=test, views=tta_view_count(cfg),
                     steps_per_epoch=steps, evals=evals,
                     classes=tuple(int(n) for n in np.bincount(labels[labeled], minlength=NUM_CLASSES)))


def tta_view_count(cfg: RunConfig) -> float:
    return expected_views(cfg.tta_flip, cfg.tta_translate, cfg.tta_confident)


# With tta_confident c, every image gets the plain view and only those whose top probability is below c
# get the rest. The share of such images comes from a finished fast-muon model (93.90%) on the test set
# (bench/README.md, "Test-time views only where the model is unsure"): its evaluation took 10.5, 13.5,
# 16.6 and 26.5 s at c = 0.5, 0.6, 0.7 and 0.8 against 43.8 s for all 6 views. A less accurate model is
# unsure more often, so for early or weak models this undercounts.
UNSURE_SHARE = ((0.0, 0.0), (0.5, 0.09), (0.6, 0.17), (0.7, 0.26), (0.8, 0.53), (1.0, 1.0))


def unsure_share(confident: float) -> float:
    """Expected share of test images below `confident` top probability (UNSURE_SHARE, linear between)."""
    for (c0, s0), (c1, s1) in zip(UNSURE_SHARE, UNSURE_SHARE[1:]):
        if confident <= c1:
            return s0 + (s1 - s0) * (confident - c0) / (c1 - c0)
    return 1.0


def expected_views(flip: bool, translate: bool, confident: float = 0.0) -> float:
    """Forward passes per evaluated image: all TTA views, or with `confident` > 0 the plain view plus
    the rest for the unsure share."""
    views = (3 if translate else 1) * (2 if flip else 1)
    if views == 1 or not confident:
        return float(views)
    return 1.0 + (views - 1) * unsure_share(confident)


# ---- the cache file ----------------------------------------------------------------------------------

class TimingCache:
    """``<runs>/.estimates.json``: {"version", "machine": {key: ...}, "models": {...}, "chains": {...}}.
    Written atomically; two writers at once may drop each other's new entry, which is then measured
    again (no lock needed for numbers that can be re-measured)."""

    def __init__(self, root: Path):
        self.path = Path(root) / CACHE_NAME

    def _read(self) -> dict:
        data = read_json(self.path, default=None)
        return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {"version": CACHE_VERSION}

    def get(self, section: str, key: str) -> tuple[dict | None, bool]:
        """(timing, from this process's memory) or (None, False)."""
        entry = self._read().get(section, {}).get(key)
        if isinstance(entry, dict):
            _MEMORY[(section, key)] = entry
            return entry, False
        entry = _MEMORY.get((section, key))
        if entry is not None:
            if entry.get("persist", True):
                self.put(section, key, entry)
            return entry, True
        return None, False

    def put(self, section: str, key: str, value: dict) -> None:
        _MEMORY[(section, key)] = value
        data = self._read()
        data.setdefault(section, {})[key] = value
        try:
            atomic_write_json(self.path, data)
        except OSError:  # a read-only runs root: the estimate still works, it measures again next time
            pass


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def _host_fields(device) -> dict:
    import torch

    from ..devices import device_description
    return {"host": platform.node(), "device": device_description(device), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- measuring the machine ------------------------------------------------------------------------------

# What `python -m cifar_core train` does before its first step, minus the model: the imports (the CLI
# and the engine), scikit-learn (imported for the final report) and the data on the device.
MACHINE_SCRIPT = r"""
import json, sys, time
start = time.perf_counter()
import cifar_core.cli, cifar_core.engine
imported = time.perf_counter()
import sklearn.metrics
reported = time.perf_counter()
out = {"imports_in_process_s": imported - start, "sklearn_s": reported - imported, "data_s": None}
from cifar_core.config import RunConfig
from cifar_core.engine import prepare
try:
    prepare(RunConfig(device=sys.argv[1], subset="full").validated(), sys.argv[2] or None)
    out["data_s"] = time.perf_counter() - reported
except Exception as exc:
    out["data_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def measure_machine(device_kind: str, data_source: str | None, root: Path) -> dict:
    """Start-up costs of a training process on this machine (a fresh Python process is timed), and the
    checkpoint write speed of the disk under `root`."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", MACHINE_SCRIPT, device_kind, data_source or ""],
                              capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise ConfigError(f"measuring the start-up of a training process took over {STARTUP_TIMEOUT_S} s; "
                          "is the machine overloaded?") from None
    wall = time.perf_counter() - started
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ConfigError("measuring the start-up of a training process failed: "
                          f"{(done.stderr or done.stdout).strip()[-500:]}") from None
    data_s = out.get("data_s") or 0.0
    out["imports_s"] = max(0.0, wall - data_s - out["sklearn_s"])  # interpreter start and exit included
    out.update(measure_disk(root), measured=time.time(), wall_s=wall)
    return out


def measure_disk(root: Path) -> dict:
    """Seconds per byte of a checkpoint write (torch.save + atomic write with fsync) and of a status write."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    target = root / ".estimate-probe.tmp"
    state = {"weights": torch.zeros(4 * 2**20)}  # 16 MiB
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(target, buffer.getvalue())
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    atomic_write_json(target, {f"field_{i}": i * 0.5 for i in range(100)})  # about a status.json
    status_s = time.perf_counter() - started
    target.unlink(missing_ok=True)
    return {"write_s_per_byte": write_s / len(buffer.getvalue()), "status_write_s": status_s}


def machine_timing(cache: TimingCache, device, data_source: str | None) -> dict:
    key = _key("machine", _host_fields(device), sys.executable)
    entry, _ = cache.get("machine", key)
    if entry is None:
        entry = measure_machine(device.type, data_source, cache.path.parent)
        if entry.get("data_s") is None:  # no data yet: this process keeps it, the file does not
            entry["persist"] = False
            _MEMORY[("machine", key)] = entry
        else:
            cache.put("machine", key, entry)
    return entry


# ---- the probe ------------------------------------------------------------------------------------------

class _Clock:
    """perf_counter with the device synchronised (GPU work is counted where it happens) and a deadline:
    repeated samples stop once the probe's budget is spent, so a slow or busy machine still gets its
    estimate in about PROBE_BUDGET_S (one sample per stage at least)."""

    def __init__(self, device, budget_s: float = 0.0):
        import torch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def time(self, fn, *args) -> float:
        self.sync()
        started = time.perf_counter()
        fn(*args)
        self.sync()
        return time.perf_counter() - started

    def median(self, n: int, fn, *args) -> float:
        samples = [self.time(fn, *args)]
        while len(samples) < n and self.left() > samples[-1]:
            samples.append(self.time(fn, *args))
        return statistics.median(samples)


def _load_per_cpu() -> float:
    """The 1-minute load average per CPU (0 where the OS does not tell)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def _model_input(x_uint8, mean, std, channels_last: bool):
    import torch
    x = (x_uint8.float().div_(255) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _random_batch(device, size: int):
    """Random uint8 images and labels (the probes' input: what the data costs, not what it shows)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    return images, torch.randint(0, NUM_CLASSES, (size,), generator=gen).to(device)


def _normalizer(device):
    import torch

    from ..data import CIFAR_MEAN, CIFAR_STD
    return (torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))


class TrainingStep:
    """cfg's model and optimizer, built as the loop builds them, and step(b): one training step on the
    first b of some random images, as the loop's (forward, loss, backward, optimizer step, the syncs).
    A run that trains only the head (linear_probe, crt) gets its backbone frozen as init_from freezes
    it: no backward through it, no update of its weights, its BatchNorms in eval mode."""

    def __init__(self, cfg: RunConfig, device, largest: int):
        import torch

        from ..engine import build_optimizer
        from ..engine.evaluation import EVAL_BATCH
        from ..models import create_model

        started = time.perf_counter()
        self.model = create_model(cfg.model, cfg.model_params, NUM_CLASSES)
        self.build_s = time.perf_counter() - started
        self.init_per_image_s = _time_init(self.model, device)
        if trains_head_only(cfg):
            from ..engine.init_from import freeze_all_but_head
            freeze_all_but_head(self.model)
        self.model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
        self.cfg, self.device = cfg, device
        self.mean, self.std = _normalizer(device)
        self.images, self.labels = _random_batch(device, max(largest, EVAL_BATCH))

    def __call__(self, b: int) -> None:
        import torch.nn.functional as F

        from ..engine import autocast_context
        self.model.train()
        x = _model_input(self.images[:b], self.mean, self.std, self.cfg.channels_last)
        with autocast_context(self.cfg, self.device):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), self.labels[:b])
        loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        (logits.argmax(1) == self.labels[:b]).sum().item()


def probe_model(cfg: RunConfig, device) -> dict:
    """Time real training steps and evaluation batches of `cfg`'s model on random images (see the module
    docstring): steps at sizes ×4 from 2 up to cfg's batch size (or until one takes STEP_TARGET_S)."""
    started, busy = time.perf_counter(), _load_per_cpu()
    step = TrainingStep(cfg, device, cfg.batch_size)
    clock = _Clock(device, 0.6 * PROBE_BUDGET_S)
    cold = clock.time(step, min(SMALL_BATCH, cfg.batch_size))  # allocations, the optimizer's state, kernels
    points = _ramp(clock, step, SMALL_BATCH, cfg.batch_size, STEP_TARGET_S)
    evaluate = _time_forward(_Clock(device, 0.3 * PROBE_BUDGET_S), _forward_fn(step.model, cfg, device, step.images))
    misc = _Clock(device, 0.1 * PROBE_BUDGET_S)
    return {"steps": points, "forward_fixed_s": evaluate["fixed_s"], "forward_per_image_s": evaluate["per_image_s"],
            "build_s": step.build_s, "init_per_image_s": step.init_per_image_s,
            "warmup_s": max(0.0, cold - points[0][1]) + evaluate["warmup_s"],
            "grad_norm_s": misc.median(3, _grad_norm, step.model), "weights_pass_s": _time_weights_pass(misc, step.model),
            "checkpoint_bytes": _checkpoint_bytes(step.model, step.optimizer, cfg),
            "load_per_cpu": max(busy, _load_per_cpu()), "probe_s": time.perf_counter() - started,
            "measured": time.time()}


def probe_more_steps(cfg: RunConfig, device, points: list) -> list:
    """`points` extended with steps at larger sizes up to cfg's batch size (a run with a larger batch than
    the probe that measured this model)."""
    step = TrainingStep(cfg, device, cfg.batch_size)
    clock = _Clock(device, 0.6 * PROBE_BUDGET_S)
    largest = max(size for size, _ in points)
    clock.time(step, largest)  # allocations and the optimizer's state
    more = _ramp(clock, step, min(cfg.batch_size, 4 * largest), cfg.batch_size, STEP_TARGET_S, min_points=1)
    return sorted([list(p) for p in points] + [list(p) for p in more])


def needs_more_steps(points: list, batch: int) -> bool:
    """True when `batch` lies beyond the measured sizes and the probe stopped for its budget rather
    than because the steps had become long (then larger batches are extrapolated)."""
    largest, seconds = max(points)
    return batch > largest and seconds <= STEP_TARGET_S


def step_seconds(points: list, batch: int) -> float:
    """A training step's seconds at `batch`, piecewise linear through the measured (size, seconds)
    points; beyond them along the last segment's per-image slope."""
    points = sorted(points)
    if len(points) == 1:
        size, seconds = points[0]
        return seconds * max(1.0, batch / size)
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if batch <= b1:
            break
    slope = (t1 - t0) / (b1 - b0)
    if slope <= 0:  # noise: grow in proportion to the batch instead
        slope = t1 / b1
    return max(0.5 * t0 if batch < b0 else 0.0, t1 + slope * (batch - b1))


def _forward_fn(net, cfg: RunConfig, device, images, channels_last: bool | None = None):
    """forward(b): an evaluation-mode, no-grad forward of the first b images, as the run would do it."""
    import torch

    from ..engine import autocast_context
    mean, std = _normalizer(device)
    channels_last = cfg.channels_last if channels_last is None else channels_last

    @torch.no_grad()
    def forward(b: int) -> None:
        net.eval()
        with autocast_context(cfg, device):
            net(_model_input(images[:b], mean, std, channels_last)).float()
    return forward


def probe_teacher(teacher: dict, cfg: RunConfig, device) -> dict:
    """Seconds per image of a distillation teacher's forward (channels_last, under the student's
    autocast), which the student's every training step runs."""
    import torch

    from ..engine.evaluation import EVAL_BATCH
    from ..models import create_model
    started = time.perf_counter()
    net = create_model(teacher["model"], teacher.get("model_params"), NUM_CLASSES).to(device)
    net = net.to(memory_format=torch.channels_last)
    images, _ = _random_batch(device, EVAL_BATCH)
    timed = _time_forward(_Clock(device, 0.35 * PROBE_BUDGET_S), _forward_fn(net, cfg, device, images, True))
    return {"fixed_s": timed["fixed_s"], "per_image_s": timed["per_image_s"], "probe_s": time.perf_counter() - started,
            "measured": time.time()}


def _time_init(model, device) -> float:
    """Seconds per image of a model's init from data (fastnet's whitening); 0 for other models."""
    import torch
    init = getattr(model, "init_from_data", None)
    if not callable(init):
        return 0.0
    sample = torch.randn(INIT_PROBE_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    started = time.perf_counter()
    init(sample)
    return (time.perf_counter() - started) / INIT_PROBE_IMAGES


def _ramp(clock: _Clock, fn, first: int, ceiling: int, target_s: float, min_points: int = 2) -> list[list]:
    """[batch size, seconds] at sizes growing ×4 from `first` up to `ceiling`, until a call takes over
    `target_s` or the budget would not fit the next size — but at `min_points` sizes at least, so that
    a slow machine still separates the per-call part from the per-image part. The first call at each
    size is set aside when there is time for more (a new shape sets up its kernels)."""
    points, size = [], min(first, ceiling)
    while True:
        samples = [clock.time(fn, size)]
        while len(samples) < 3 and clock.left() > samples[-1]:
            samples.append(clock.time(fn, size))
        points.append([size, statistics.median(samples[1:]) if len(samples) > 1 else samples[0]])
        seconds = points[-1][1]
        if size >= ceiling or (len(points) >= min_points and (seconds > target_s or clock.left() < 2 * 4 * seconds)):
            return points
        size = min(ceiling, 4 * size)


def _fit_line(points: list) -> tuple[float, float]:
    """(a, c) of seconds = a + c·batch, least squares on the relative errors, so that small batches
    settle the per-step part and large ones the per-image part; neither is negative."""
    import numpy as np
    if len(points) == 1:
        size, seconds = points[0]
        return seconds, 0.0
    b = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    (a, c), *_ = np.linalg.lstsq(np.stack([1 / t, b / t], axis=1), np.ones_like(t), rcond=None)
    if c < 0:
        return float(np.median(t)), 0.0
    if a < 0:
        return 0.0, float(np.sum(b * t) / np.sum(b * b))
    return float(a), float(c)


def _time_forward(clock: _Clock, forward) -> dict:
    """Seconds per image of forward-only batches, at the largest size that fits the budget (up to the
    loop's evaluation batch)."""
    from ..engine.evaluation import EVAL_BATCH
    cold = clock.time(forward, 32)
    points = _ramp(clock, forward, 32, EVAL_BATCH, EVAL_TARGET_S)
    fixed, per_image = _fit_line(points)
    return {"fixed_s": fixed, "per_image_s": per_image, "warmup_s": max(0.0, cold - points[0][1])}


def _grad_norm(model) -> None:
    import torch
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, float("inf")).item()


def _time_weights_pass(clock: _Clock, model) -> float:
    """One lerp over every weight: what an EMA update or a lookahead sync costs."""
    import torch
    weights = [p.detach() for p in model.parameters()]
    copies = [w.clone() for w in weights]

    def lerp():
        with torch.no_grad():
            for copy, weight in zip(copies, weights):
                copy.lerp_(weight, 0.01)
    return clock.median(3, lerp)


def _checkpoint_bytes(model, optimizer, cfg: RunConfig) -> int:
    import torch
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    total = len(buffer.getvalue())
    extra_copies = (cfg.ema_decay > 0) + (cfg.lookahead_every > 0)  # EMA and lookahead keep the weights again
    if extra_copies:
        weights = io.BytesIO()
        torch.save(model.state_dict(), weights)
        total += extra_copies * len(weights.getvalue())
    return total


def probe_chain(cfg: RunConfig, device, batch: int) -> dict:
    """Seconds per image of the augmentation chain on a batch (and of fitting its normalizers)."""
    import torch

    from ..augment import AugmentChain

    chain = AugmentChain(cfg.augment)
    gen = torch.Generator().manual_seed(0)
    fit_per_image = 0.0
    if chain.needs_fit:
        sample = torch.rand(FIT_PROBE_IMAGES, 3, 32, 32, generator=gen).to(device)
        started = time.perf_counter()
        chain.fit(sample)
        fit_per_image = (time.perf_counter() - started) / FIT_PROBE_IMAGES
    size = max(1, min(batch, 256))
    x = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=gen).to(device)
    clock = _Clock(device, 0.5)
    apply = lambda: chain(x, y, torch.Generator().manual_seed(1))  # CPU generators, as the loop's
    clock.time(apply)
    return {"per_image_s": clock.median(2, apply) / size, "fit_per_image_s": fit_per_image, "measured": time.time()}


def model_timing(cache: TimingCache, cfg: RunConfig, device) -> tuple[dict, bool]:
    """(timing, measured in this call or this process) for cfg's model on this machine: from the cache,
    else a probe; steps at a larger batch size than measured so far are added to the entry."""
    from ..engine import effective_precision
    key = _key("model", cfg.model, cfg.model_params, effective_precision(cfg, device), cfg.channels_last,
               cfg.optimizer, _host_fields(device), *(["head only"] if trains_head_only(cfg) else []))
    entry, remembered = cache.get("models", key)
    if entry is None:
        entry = probe_model(cfg, device)
    elif needs_more_steps(entry["steps"], cfg.batch_size):
        started = time.perf_counter()
        entry = {**entry, "steps": probe_more_steps(cfg, device, entry["steps"])}
        entry["probe_s"] += time.perf_counter() - started
    else:
        return entry, remembered
    cache.put("models", key, entry)
    return entry, True


def teacher_timing(cache: TimingCache, cfg: RunConfig, device, teachers: list[dict]) -> tuple[float, float]:
    """(seconds per step, per training image) of the distillation teachers' forwards ((0, 0) without):
    the sum over an ensemble teacher's members, each model probed once."""
    from ..engine import effective_precision
    fixed_s = per_image_s = 0.0
    for teacher in teachers:
        key = _key("teacher", teacher["model"], teacher["model_params"], effective_precision(cfg, device),
                   _host_fields(device))
        entry, _ = cache.get("teachers", key)
        if entry is None:
            entry = probe_teacher(teacher, cfg, device)
            cache.put("teachers", key, entry)
        fixed_s, per_image_s = fixed_s + entry["fixed_s"], per_image_s + entry["per_image_s"]
    return fixed_s, per_image_s


def chain_timing(cache: TimingCache, cfg: RunConfig, device) -> dict:
    batch = min(cfg.batch_size, 256)
    key = _key("chain", cfg.augment, batch, _host_fields(device))
    entry, _ = cache.get("chains", key)
    if entry is None:
        entry = probe_chain(cfg, device, batch)
        cache.put("chains", key, entry)
    return entry


# ---- finished runs --------------------------------------------------------------------------------------

_RUN_MEMORY: dict[tuple, dict | None] = {}


def _same_setting(cfg: RunConfig, precision: str, device_text: str, config: dict, status: dict) -> bool:
    return (config.get("model") == cfg.model and config.get("model_params") == cfg.model_params
            and config.get("batch_size") == cfg.batch_size and bool(config.get("channels_last")) == cfg.channels_last
            and status.get("precision") == precision and status.get("device") == device_text)


def run_timing(record: RunRecord) -> dict | None:
    """What a completed run measured: train throughput from windows inside an epoch, forward seconds per
    image-view from its evaluation rows, its time from start to the first step, its checkpoint size.
    None when it has no usable rows. Cached per run by its metrics file's size and time."""
    try:
        stat = record.metrics_path.stat()
    except FileNotFoundError:
        return None
    memo_key = (str(record.path), stat.st_size, stat.st_mtime)
    if memo_key not in _RUN_MEMORY:
        _RUN_MEMORY[memo_key] = _read_run_timing(record)
    return _RUN_MEMORY[memo_key]


def _read_run_timing(record: RunRecord) -> dict | None:
    status, config = record.status(), record.config_dict() or {}
    steps_per_epoch = status.get("steps_per_epoch")
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1 or status.get("resumed_at_step"):
        return None
    rows = [r for r in record.read_metrics() if r.get("kind") in ("train", "eval") and _is_number(r.get("time"))]
    clean_ips, forward = [], []
    try:
        views, eval_images = _eval_images_of(config)
    except (TypeError, ValueError):
        return None
    previous = None
    for row in rows:
        if row["kind"] == "train" and _is_clean_window(previous, steps_per_epoch):
            clean_ips.append(row.get("images_per_s"))
        elif row["kind"] == "eval" and previous is not None and previous.get("kind") == "train":
            forward.append((row["time"] - previous["time"]) / (eval_images * views))
        previous = row
    clean_ips = [v for v in clean_ips if _is_number(v) and v > 0]
    if not clean_ips or not forward:
        return None
    first, started = rows[0], status.get("started")
    prepare_s = first["time"] - first["elapsed"] - started if _is_number(first.get("elapsed")) and _is_number(started) \
        else None
    size = record.checkpoint_path("last").stat().st_size if record.checkpoint_path("last").exists() else 0
    return {"images_per_s": statistics.median(clean_ips), "forward_per_image_s": statistics.median(forward),
            "prepare_s": prepare_s, "checkpoint_bytes": size,
            "head_only": bool(config.get("init_run")) and config.get("init_mode") in HEAD_ONLY_MODES,
            "resampled": config.get("balance") in RESAMPLING}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_clean_window(previous: dict | None, steps_per_epoch: int) -> bool:
    """A train row's window holds only training steps when it follows the start of training or a train
    row inside the same epoch (after an epoch's last row come the evaluation and the checkpoints)."""
    if previous is None:
        return True
    return previous.get("kind") == "train" and previous.get("step", 0) % steps_per_epoch != 0


def _eval_images_of(config: dict) -> tuple[int, int]:
    views = expected_views(bool(config.get("tta_flip")), bool(config.get("tta_translate")),
                           float(config.get("tta_confident") or 0.0))
    return views, int(config.get("val_size") or config.get("test_size") or TEST_IMAGES)


def finished_throughput(store: RunStore, cfg: RunConfig, device) -> dict | None:
    """Medians over the completed runs of the same setting in the runs root (see run_timing), with
    "runs": how many, and "frozen_share": the factor their training time was scaled by (1 when they
    trained as this run does; FROZEN_STEP_SHARE for a head-only run on full-training runs); None when
    there are none. Their time to the first step counts only from the runs that did not resample."""
    from ..devices import device_description
    from ..engine import effective_precision

    precision, device_text = effective_precision(cfg, device), device_description(device)
    found = []
    for record in store.records():
        status = record.status()
        if status.get("state") != "completed":
            continue
        if not _same_setting(cfg, precision, device_text, record.config_dict() or {}, status):
            continue
        timing = run_timing(record)
        if timing is not None:
            found.append(timing)
    head_only, share = trains_head_only(cfg), 1.0
    same = [t for t in found if t["head_only"] == head_only]
    if not same and head_only and device.type == "cpu" and cfg.model in FROZEN_STEP_SHARE:
        same, share = found, FROZEN_STEP_SHARE[cfg.model]
    found = same
    if not found:
        return None
    prepares = [t["prepare_s"] for t in found
                if t["prepare_s"] is not None and t["prepare_s"] >= 0 and not t["resampled"]]
    return {"runs": len(found), "frozen_share": share,
            "images_per_s": statistics.median(t["images_per_s"] for t in found) / share,
            "forward_per_image_s": statistics.median(t["forward_per_image_s"] for t in found),
            "prepare_s": statistics.median(prepares) if prepares else None,
            "checkpoint_bytes": statistics.median(t["checkpoint_bytes"] for t in found)}


# ---- resampling before training, and frozen backbones ----------------------------------------------------

RESAMPLING = {"smote": "SMOTE", "cluster_oversample": "k-means"}  # strategies that resample the images once
HEAD_ONLY_MODES = ("linear_probe", "crt")  # init_modes that train the classifier head alone (engine.init_from)
PIXEL_VALUES = 32 * 32 * 3                 # a CIFAR image's numbers: the columns SMOTE on pixels works on
POOLED_VALUES = 8 * 8 * 3                  # an image 4×4-pooled (imbalance.strategies.pooled_pixels)

# The resampling cost models, calibrated on the 2-core AMD EPYC dev box (scikit-learn 1.9.1,
# imbalanced-learn 0.14.2) by the wall time the resampling adds to engine.prepare (prepare with the
# strategy minus prepare without, numpy/scikit-learn threads at their defaults, imports warmed, best of
# 2, on real CIFAR-10 pools, the machine shared with other work at load 2.5-3.5). N pool images, S new
# ones, P the pairs of same-class images among the classes SMOTE grows (the sum of their squared
# counts); "model": the constants below on these counts, the import aside:
#   pool (fastnet defaults)      N       S       P      SMOTE   model   k-means k=4  model   k=16   model
#   report_random                7,108   2,452   4.3e6  1.97 s  1.31 s  0.56 s       0.71 s  2.95 s 1.77 s
#   long_tail ρ=100              12,406  37,594  1.4e7  7.32 s  6.21 s  2.67 s       1.24 s  2.18 s 3.10 s
#   long_tail ρ=10               20,431  29,569  3.7e7  10.35 s 10.88 s 1.67 s       2.04 s  4.26 s 5.10 s
#   step ρ=10, 5 minority        27,500  22,500  1.3e6  2.69 s  2.65 s  3.46 s       2.74 s  8.52 s 6.86 s
#   long_tail ρ=100, n_max 1,000 2,478   7,522   5.6e5  0.54 s  0.75 s  0.19 s       0.25 s  0.61 s 0.62 s
# SMOTE, profiled (cProfile on one thread's process_time, long_tail ρ=100, 7.0 s): the same-class
# neighbour search 2.2 s (P), making the new images and rounding them back to uint8 3.4 s (S), stacking
# and copying the balanced set 1.4 s (N + S); its one-thread CPU time was within 30 % of the wall times
# above. With features (space=features) its rows carry them before the pixels: 512 random features
# took 7-15 % longer, their share of the columns. k-means on one thread took 5-15× less than the wall
# times above (0.2-1.4 s): its OpenMP threads wait on each other on a busy machine, so an idle one may
# do it in less. Its model is fitted on pooled pixels (192 dimensions) and scaled by the dimensions
# for features (one thread's CPU time per image and dimension was the same on 512 features). Importing
# imbalanced-learn after scikit-learn: 0.6 s wall (0.25 s CPU). A feature-space strategy first runs the
# feature run's model over the pool, which `probe_features` times here (the report's set, 7,108
# images in batches of 500, at load 4-8: fastnet 23 s, 3.2 ms an image; resnet18 117 s, 16.5 ms an
# image; resnet18 again at load 1.5: 7.3 ms an image, where the probe read 6.8 ms).
RESAMPLE_IMPORT_S = 0.6
SMOTE_PAIR_S = 2.2e-7        # per pair of same-class images of a grown class (3,072 columns)
SMOTE_IMAGE_S = 2.5e-5       # per image of the balanced set (N + S)
SMOTE_NEW_S = 5e-5           # per new image (S)
KMEANS_VALUE_S = 1.4e-7      # per image and dimension
KMEANS_CLUSTER_VALUE_S = 6.5e-8  # per image, dimension and cluster
KMEANS_POOL_S = 2.3e-5       # per image: the 4×4 pooling of its pixels (space=pixels)

# A training step with the backbone frozen (linear_probe, crt), as a share of a full step of the same
# model and batch on a CPU: the forward through the backbone stays, its backward and its weights'
# update go. Used where a head-only run has only full-training finished runs of its setting to go by
# (the probe times frozen steps itself, on any model and device). Measured on the 2-core dev box with
# the probe's own TrainingStep, one full and one frozen (engine.init_from.freeze_all_but_head, the
# optimizer rebuilt on what trains), steps alternated, median of 5-7 after 2 warm-up steps, in three
# sittings at load 4-9 (the absolute times swung with the load; the shares held):
#   fastnet  batch 16: 0.18, 0.38 · batch 128: 0.38, 0.37, 0.31 · batch 512: 0.36, 0.41, 0.36
#   resnet18 batch 16: 0.34, 0.27 · batch 32: 0.35 · batch 128: 0.33, 0.37, 0.27
# (small batches, where the per-step update of every weight weighs most, gain more: the shares below
# are the larger batches' medians, on the safe side there). The probe, freezing its model, read a crt
# run's training at 0.43 (fastnet) and 0.37 (resnet18) of the same finetune run's, at batch 128 with
# the default augmentation (which a frozen backbone does not make cheaper).
FROZEN_STEP_SHARE = {"fastnet": 0.37, "resnet18": 0.33}


def trains_head_only(cfg: RunConfig) -> bool:
    """Whether `cfg` trains only the classifier head on a finished run's frozen backbone."""
    return bool(cfg.init_run) and cfg.init_mode in HEAD_ONLY_MODES


def _feature_model_of(cfg: RunConfig, store: RunStore) -> dict | None:
    """The model of the finished run whose features the balancing strategy measures distances in."""
    from ..imbalance.strategies import feature_run_of
    run_id = feature_run_of(cfg.balance, cfg.balance_params)
    if run_id is None:
        return None
    config = store.record(run_id).config_dict()
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"{cfg.balance}.feature_run {run_id!r}: no readable config.json in {store.root}")
    return {"model": config["model"], "model_params": config.get("model_params") or {}}


def probe_features(feature: dict, device) -> dict:
    """What engine.features costs with this model here: building it, then seconds per batch and per
    image of its forward (fp32, channels_last, evaluation mode), and how many features it gives."""
    import torch

    from ..engine.evaluation import EVAL_BATCH
    from ..models import classifier_head, create_model
    started = time.perf_counter()
    net = create_model(feature["model"], feature.get("model_params"), NUM_CLASSES)
    build = time.perf_counter() - started
    net = net.to(device).to(memory_format=torch.channels_last)
    images, _ = _random_batch(device, EVAL_BATCH)
    timed = _time_forward(_Clock(device, 0.35 * PROBE_BUDGET_S),
                          _forward_fn(net, RunConfig(precision="fp32"), device, images, True))
    return {"fixed_s": timed["fixed_s"], "per_image_s": timed["per_image_s"], "build_s": build,
            "dims": classifier_head(net).in_features, "probe_s": time.perf_counter() - started,
            "measured": time.time()}


def feature_timing(cache: TimingCache, device, feature: dict | None) -> dict | None:
    if feature is None:
        return None
    key = _key("features", feature["model"], feature["model_params"], _host_fields(device))
    entry, _ = cache.get("features", key)
    if entry is None:
        entry = probe_features(feature, device)
        cache.put("features", key, entry)
    return entry


def resampling_seconds(cfg: RunConfig, counts: RunCounts, features: dict | None = None) -> float:
    """Seconds of cfg's resampling before training (0 for strategies that do not resample the images):
    the cost models above on the pool's class counts; `features`: the feature model's timing
    (`feature_timing`) when the strategy works in a finished run's feature space (then also that
    model's forward over the pool)."""
    if cfg.balance not in RESAMPLING:
        return 0.0
    from ..engine.features import FEATURE_BATCH
    from ..imbalance.strategies import BALANCING
    params = BALANCING.validate(cfg.balance, cfg.balance_params)
    seconds = RESAMPLE_IMPORT_S
    if features is not None:
        seconds += (features["build_s"] + math.ceil(counts.pool / FEATURE_BATCH) * features["fixed_s"]
                    + counts.pool * features["per_image_s"])
    classes = [n for n in counts.classes if n > 0]
    if cfg.balance == "smote":
        largest = max(classes, default=0)
        short = [n for n in classes if n < largest]
        if not short:
            return seconds  # already balanced: SMOTE has nothing to make (the features were computed)
        balanced = len(classes) * largest
        # features: SMOTE's rows hold the features, then the pixels (imbalance.strategies._smote_table)
        columns = PIXEL_VALUES + (features["dims"] if features is not None else 0)
        return seconds + columns / PIXEL_VALUES * (SMOTE_PAIR_S * sum(n * n for n in short) + SMOTE_IMAGE_S * balanced
                                                   + SMOTE_NEW_S * (balanced - counts.pool))
    dims = features["dims"] if features is not None else POOLED_VALUES
    k = params["clusters"]
    fits = [n for n in classes if min(k, n) > 1]  # a class of one image, or clusters=1, is no k-means
    seconds += KMEANS_POOL_S * counts.pool if features is None else 0.0
    return seconds + sum(n * dims * (KMEANS_VALUE_S + KMEANS_CLUSTER_VALUE_S * min(k, n)) for n in fits)


def _resampling_label(cfg: RunConfig) -> str:
    from ..imbalance.strategies import feature_run_of
    space = "pixels" if feature_run_of(cfg.balance, cfg.balance_params) is None else "a finished run's features"
    return f"resampling ({RESAMPLING[cfg.balance]} on {space})"


# ---- the estimate ---------------------------------------------------------------------------------------

def _validated(cfg) -> RunConfig:
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"an estimate needs a RunConfig, got {type(cfg).__name__}")
    return cfg.validated()


def _teachers_of(cfg: RunConfig, store: RunStore) -> list[dict]:
    """The model of every run that teaches (none without distillation; several for an ensemble teacher)."""
    if cfg.distill == "none":
        return []
    teachers = []
    for run_id in teacher_ids(cfg.teacher_run):
        config = store.record(run_id).config_dict()
        if not isinstance(config, dict) or "model" not in config:
            raise ConfigError(f"teacher run {run_id!r}: no readable config.json in {store.root}")
        teachers.append({"model": config["model"], "model_params": config.get("model_params") or {}})
    return teachers


def _extra_per_step(cfg: RunConfig, grad_norm_s: float, weights_pass_s: float) -> float:
    """Per-step work besides forward/backward/update: grad norm, EMA update, lookahead sync."""
    extra = grad_norm_s if cfg.grad_clip != "none" else grad_norm_s / cfg.log_every
    if cfg.ema_decay > 0:
        extra += weights_pass_s
    if cfg.lookahead_every:
        extra += 2 * weights_pass_s / cfg.lookahead_every  # lerp the slow weights, copy them back
    return extra


def _train_seconds_probed(cfg: RunConfig, counts: RunCounts, model: dict, chain: dict,
                          teacher: tuple[float, float]) -> tuple[float, float]:
    """(seconds of all training steps, images/s at the run's batch size) from the probes."""
    from ..engine import objective_class
    per_image = chain["per_image_s"] + teacher[1]
    fixed = teacher[0] + _extra_per_step(cfg, model["grad_norm_s"], model["weights_pass_s"])
    # a semi-supervised or pretext step also trains on unlabeled images (or rotated copies): the same
    # step at that many images
    images = objective_class(cfg).images_per_labeled(cfg)

    def step(b: int) -> float:
        return step_seconds(model["steps"], b * images) + fixed + per_image * b * images

    full, rest = divmod(counts.train, cfg.batch_size)
    epoch = full * step(cfg.batch_size) + (step(rest) if rest else 0.0)
    return cfg.epochs * epoch, cfg.batch_size / step(cfg.batch_size)


def _loop_parts(cfg: RunConfig, counts: RunCounts, machine: dict, speed: "_Speed") -> dict:
    from ..engine.evaluation import EVAL_BATCH

    def evaluating(images: int) -> float:  # in batches of EVAL_BATCH, one forward per view
        return counts.views * (math.ceil(images / EVAL_BATCH) * speed.forward_fixed_s + images * speed.forward_s)

    train_s = speed.train_s
    evaluation = counts.evals * evaluating(counts.eval)
    checkpoint = speed.checkpoint_bytes * machine["write_s_per_byte"]
    checkpoints = cfg.epochs * (checkpoint + machine["status_write_s"]) + counts.evals * checkpoint
    final = 0.0 if counts.final_reuses_eval else evaluating(counts.test)
    parts = {"train": train_s, "evaluation": evaluation, "checkpoints": checkpoints, "final test": final}
    if cfg.time_limit_min:  # the loop stops at the limit, then evaluates once more and saves
        loop = train_s + evaluation + checkpoints
        cap = 60 * cfg.time_limit_min + evaluating(counts.eval) + 2 * checkpoint
        if loop > cap:
            scale = cap / loop
            parts.update(train=train_s * scale, evaluation=evaluation * scale, checkpoints=checkpoints * scale)
    return parts


@dataclass(frozen=True)
class _Speed:
    """What a run's training and evaluation cost here, and where that came from."""
    train_s: float           # all training steps
    images_per_s: float      # training throughput at the run's batch size
    forward_s: float         # seconds per evaluated image and view
    forward_fixed_s: float   # and per evaluation batch and view
    prepare_s: float
    checkpoint_bytes: float
    kind: str                # "finished" or "probe" (RANGE)
    basis: str
    notes: tuple = ()


def _speed_from_finished(cfg: RunConfig, counts: RunCounts, machine: dict, finished: dict) -> _Speed:
    ips, n = finished["images_per_s"], finished["runs"]
    prepare = finished["prepare_s"] if finished["prepare_s"] is not None else (machine.get("data_s") or 0.0)
    scaled = "" if finished["frozen_share"] == 1 else (
        f" (full training; a frozen-backbone step taken as {finished['frozen_share']:.0%} of theirs)")
    return _Speed(cfg.epochs * counts.train / ips, ips, finished["forward_per_image_s"], 0.0, prepare,
                  finished["checkpoint_bytes"], "finished",
                  f"from {n} finished run{'s' if n != 1 else ''} of this setting{scaled}")


def _speed_from_probes(cfg: RunConfig, counts: RunCounts, machine: dict, cache: TimingCache, device,
                       store: RunStore) -> _Speed:
    teacher = teacher_timing(cache, cfg, device, _teachers_of(cfg, store))
    model, fresh = model_timing(cache, cfg, device)
    chain = chain_timing(cache, cfg, device)
    train_s, ips = _train_seconds_probed(cfg, counts, model, chain, teacher)
    prepare = ((machine.get("data_s") or 0.0) + model["build_s"] + model["warmup_s"]
               + model["init_per_image_s"] * min(counts.pool, INIT_MAX_IMAGES)
               + chain["fit_per_image_s"] * counts.pool)
    load = model.get("load_per_cpu", 0.0)
    notes = (f"the machine was busy while probing (load {load:.1f} per CPU), so the estimate may be far "
             "off; it improves once a run of this setting has finished",) if load > BUSY_LOAD_PER_CPU else ()
    return _Speed(train_s, ips, model["forward_per_image_s"], model["forward_fixed_s"], prepare,
                  model["checkpoint_bytes"], "probe",
                  f"from a {model['probe_s']:.0f} s probe" + ("" if fresh else " (cached)"), notes)


def estimate_run(cfg: RunConfig, store: RunStore | None = None, data_source: str | None = None) -> Estimate:
    """How long `python -m cifar_core train` of this config takes on this machine (see the module
    docstring). May measure: a few seconds per new setting, and once per machine a training process's
    start-up; the measurements are cached in the runs root. ConfigError for a bad config or a missing
    device (or distillation teacher)."""
    from ..devices import resolve_device

    cfg = _validated(cfg)
    store = store if store is not None else RunStore()
    device = resolve_device(cfg.device)
    cache = TimingCache(store.root)
    counts = run_counts(cfg)
    machine = machine_timing(cache, device, data_source)
    finished = finished_throughput(store, cfg, device)
    speed = (_speed_from_finished(cfg, counts, machine, finished) if finished is not None
             else _speed_from_probes(cfg, counts, machine, cache, device, store))
    resampling = resampling_seconds(cfg, counts, feature_timing(cache, device, _feature_model_of(cfg, store)))
    parts = {"start": machine["imports_s"] + machine["sklearn_s"], "prepare": speed.prepare_s,
             "resampling": resampling, **_loop_parts(cfg, counts, machine, speed)}
    parts = {name: float(parts[name]) for name in PARTS}
    total = sum(parts.values())
    low, high = RANGE[speed.kind]
    notes = speed.notes + (() if machine.get("data_s") is not None else (
        "the data could not be loaded while measuring, so its loading time is not counted",))
    return Estimate(seconds=total, low=total * low, high=total * high, parts=parts, basis=speed.basis,
                    device=device.type, train_images=counts.train, epochs=cfg.epochs,
                    images_per_s=speed.images_per_s, notes=notes,
                    labels={"resampling": _resampling_label(cfg)} if resampling else {})


def estimate_runs(cfgs, store: RunStore | None = None, data_source: str | None = None) -> Estimate:
    """Several runs one after the other (a study on one job slot): the sum of their estimates."""
    return combine([estimate_run(cfg, store, data_source) for cfg in cfgs])
