"""One-click studies: a batch of background runs that together test one claim.

Each entry of `STUDIES` declares its own parameters (with `Param`, so the app's form is generated
from them) and a builder that turns validated parameters into one RunConfig per cell × seed:

- ``bn_vs_gn``: BatchNorm vs GroupNorm across batch sizes (Wu & He, "Group Normalization", 2018,
  cited by the source report: BN's error grows quickly as the batch shrinks, GN's stays flat).
  Every batch size trains for the same number of epochs (same images seen) with the learning rate
  scaled linearly with the batch size: lr = base_lr × batch_size / base_batch.
- ``samplers``: an imbalanced training set (``profile``: the report's, each class keeps 500–1000
  images drawn at random; or CIFAR-10-LT with imbalance ratio ρ) trained with each balancing strategy;
  compared on per-class recall and balanced accuracy.
- ``ablation``: the report's cumulative trick ablation (baseline → + crop & flip → + rotation →
  + weight decay → + inverse-time LR decay → + dropout → + gradient clipping). The steps come from
  `cifar_core.experiments.presets` (the Train page's presets), so they are defined once.
- ``few_labels``: the same few labels (250) and the same number of labeled steps for supervised-only
  training, pseudo-labelling, MixMatch and FixMatch (which also learn from the rest of the pool,
  unlabeled), and for a fine-tune from a rotation pretext (self-supervised, on the whole pool) against
  supervised-only from scratch. The fine-tune starts from its seed's pretext run: see "Runs that start
  from another run of the study" below.

Whether a study's claim held is `cifar_core.experiments.verdicts` (from its results, with the numbers).

Scales: every study has a ``scale`` parameter, and each scale its default number of seeds
(`SCALE_SEEDS`). "cpu-quick" is a smoke test: small subsets, a reduced model, one or two epochs and
one seed, so a whole study finishes in minutes; its accuracies are far from converged values (see
`StudyInfo.note`), and one seed cannot give a verdict. "cpu" (the default without CUDA) is sized from
what each claim needs, with 3 seeds (mean ± std, a t-interval), to finish in 30 minutes or less on a
2-core CPU, one run after another. "gpu" (the default with CUDA) uses the report's data sizes and more
epochs. How long a study takes on this machine is `estimate_study` (`cifar_core.experiments.estimate`:
the sum over its runs, measured here); on the 2-core dev box the cpu-quick ablation took 8.4 min, with
every run a fresh process that imports torch, loads the data and ends with the 10,000-image test
evaluation.

How cpu-quick was chosen (single cells timed on the 2-core box):
- Every run ends with an evaluation on the 10,000 test images (the trainer always does it). With
  ResNet-18's usual CIFAR stem (3×3 conv, 32×32 maps in stage 1) that alone takes about a minute on
  this CPU, so the CPU scales use ResNet-18 with the "imagenet" stem (7×7 stride-2 conv + max-pool,
  8×8 maps in stage 1, ~16× less compute, the same blocks and the same normalization layers) for
  bn_vs_gn and ablation. They validate during training on a small held-out set (100–500 images)
  instead of the test set.
- A ResNet-18 optimizer step costs ~47 ms whatever the batch (updating 11 M weights), so at batch 2
  the steps are what cost: bn_vs_gn trains on 500 images for 1 epoch (250 steps at batch 2).
- samplers needs the whole imbalanced set (~7,500 images) to mean anything, so it uses the fast net
  at half width, 2 epochs (~58 % test accuracy).
- ablation: 1,800 training images, 2 epochs, batch 64. Measured: baseline 27.7 %, all seven tricks
  18.4 %: too short for any regularizer to pay, the opposite of the report's claim.
- few_labels: the fast net at quarter width, 250 labels of a 1,000-image pool, 3 epochs of the labels
  (24 steps of 32), a one-epoch rotation pretext, 1,000 test images: the 6 runs trained in 94 s in one
  process (1 thread, beside another benchmark; fixmatch 25 s and mixmatch 34 s of it).

How cpu was sized. The cost model, from the quiet 2-core box (bench/README.md: a run's start-up
~11 s, the cpu-quick ablation's ResNet-18 at ~105 images/s at batch 64 and 13 s per 10,000-image
test pass, the quick preset's half-width fast net at ~300 images/s), and side-by-side single-thread
step timings of the candidate models (taken while 5 agents shared the CPU, so only their ratios were
used): a half-width ResNet-18 with the imagenet stem costs ~0.4× the full one's per-step overhead
(~19 ms a step) and ~0.3× its per-image cost (~2.8 ms an image; GroupNorm about the same), and
evaluates 10,000 test images in ~4 s. Those per-image figures proved ~7× too slow: on a quiet 2-core
AVX-512 box the estimator's own probe gives ~12 ms a step and ~0.4 ms an image, and the ablation
sized with the old ones took 6 min, so it was resized (below). `tests/test_studies.py` puts the
corrected figures through the estimator and checks that each cpu study (default parameters and seeds)
fits in 30 minutes.
- bn_vs_gn (24 runs, ~21 min): the claim needs both norms to learn at every batch size from the same
  images, so the half-width ResNet-18 (~4× cheaper per image and ~2.5× per step than the full one)
  trains 2 epochs on 2,500 images (per_class 260, 100 held out), 5,000 images per run, at batch 2, 4,
  16 and 64 (2 and 4 where Wu & He see BatchNorm fail, 16 and 64 where it works; batch 2 alone is
  ~45 % of the training time), lr = 0.1 × batch / 128 with half an epoch of warm-up, then cosine.
  GroupNorm with 16 groups (2 channels a group in the first stage, as Wu & He's 32 groups of 64).
- samplers (12 runs, 15–23 min): none, the weighted sampler, Balanced Softmax and LDAM-DRW (those of
  them registered), half-width fast net, as many whole epochs as fit in 25,000 training images (3 of
  the report's ~7,100–7,500, 2 of CIFAR-10-LT ρ=100's 12,406; ρ=10 and 50: 1), no validation split
  (LT keeps its standard counts) and a single test evaluation at the end.
- ablation (21 runs; measured end to end on a quiet 2-core AVX-512 box: 1,193 s, estimated 1,237 s):
  augmentation pays only once the baseline has fit its training images, so the half-width ResNet-18
  trains 15 epochs (1,065 steps of 64) on 4,500 images (500 held out) rather than 2 on 1,800; every
  step sees the same subset per seed, so steps are compared pairwise over seeds. The first cpu size,
  15 epochs on 1,000 images, took 372 s there and left the claim within the noise (crop & flip +1.5 ±
  0.9 points, accuracies 30–38 %); at 4,500 images crop & flip gains +6.7 ± 0.6, the largest step.
- few_labels (18 runs; measured end to end on a quiet 2-core box: 1,141 s, estimated 21 min): the
  semi-supervised objectives process many more images a step than the labeled batch (fixmatch
  32 + 2 × 7 × 32, which the estimator counts through each objective's images_per_labeled); from
  single-thread step times on a busy box (supervised 0.28 s, pseudo_label 1.2, fixmatch 3.0,
  mixmatch 3.7, a pretext step 0.59) the half-width fast net gets 8 epochs of the 250 labels (64 steps of
  32) on a 5,000-image pool and a one-epoch pretext. MixMatch's λ_u is 8, ramped over the whole run:
  the paper's 75 with no ramp collapsed every seed to one class (10.00%) at 64 steps.

Runs that start from another run of the study: a builder sets such a config's init_run to the
placeholder `cell_ref(cell)` of the cell it starts from (``cell-rotation-pretext``), built before it in
the same seed. `launch_study` queues the runs in order and replaces the placeholder with the run id
that cell's run of the same seed got. The job queue starts a device's runs oldest first, so with one
slot per device (the default) the source finishes before its follower starts; with more slots, the
follower can start while its source still trains, and then fails at once ("init_run ... is running,
not completed"): resume it when the source is done.

Files: launching writes ``<runs>/.studies/<study_id>.json`` (kind, params, seeds, run ids, created);
each run's status.json carries {"study", "study_kind", "cell", "seed"}. Results are read back from
the run records (`study_results`), so a study fills in as its runs finish.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..devices import cuda_available
from ..params import ID_RE, ConfigError, Param, Registry, reject_unknown, validate_id
from ..runs import FINAL_STATES, RunStore, atomic_write_json, read_json
from .estimate import Estimate, estimate_run, estimate_runs, run_counts

STUDIES = Registry("study")
SCALES = ("cpu-quick", "cpu", "gpu")
SEEDS_PARAM = Param("seeds", "int", 1, 1, 5, help="Repeat every cell with seeds 0 … n-1 (mean ± std "
                                                   "over seeds in the results; a verdict needs 3).")
# Seeds each scale launches by default: a claim's verdict needs MIN_SEEDS (3) paired seeds per cell;
# cpu-quick is a smoke test, one seed.
SCALE_SEEDS = {"cpu-quick": 1, "cpu": 3, "gpu": 3}
MANIFEST_DIR = ".studies"
SEED_VALUE = RunConfig.scalar_params()["seed"]
METRICS = ("test_acc", "balanced_acc", "macro_f1", "train_seconds")
CLASS_METRICS = ("test_acc", "balanced_acc", "macro_f1")  # what a pretext run's head cannot score
EXTRA_METRICS = ("linear_probe_acc",)  # a column only where some run has it (pretext runs)
CELL_REF_PREFIX = "cell-"  # an init_run "cell-<cell>" names another cell's run of the same seed (launch_study)
RECALL_PREFIX = "recall_"
COUNT_PREFIX = "train_count_"  # a run's training images of each class (its split, before balancing)


@dataclass(frozen=True)
class StudyInfo:
    title: str
    tests: str          # one sentence: what the study tests
    claim: str          # the claim it reproduces, and where it comes from
    cell_keys: tuple    # the columns that identify a cell
    scale_notes: dict = dataclasses.field(default_factory=dict)  # scale -> what to expect from it

    def note(self, scale: str) -> str:
        return self.scale_notes.get(scale, "")


INFO: dict[str, StudyInfo] = {}
# Per study and scale: the parameter defaults for that scale (the declared defaults are cpu-quick's).
SCALE_DEFAULTS: dict[str, dict[str, dict]] = {}


def default_scale() -> str:
    """"gpu" when CUDA is available, else "cpu"."""
    return "gpu" if cuda_available() else "cpu"


def _scale_param() -> Param:
    return Param("scale", "choice", "cpu-quick", choices=SCALES,
                 help="cpu-quick: a smoke test, the whole study in a few minutes on a CPU (small subsets, "
                      "reduced model, 1–2 epochs, one seed: far from converged accuracies). cpu: sized "
                      "to test the claim, 3 seeds, 30 minutes or less on a 2-core CPU. gpu: the report's "
                      "data sizes and more epochs (needs a CUDA GPU to finish in reasonable time).")


def default_seeds(scale: str | None = None) -> int:
    """How many seeds a study at `scale` (default: this machine's) launches unless told (SCALE_SEEDS)."""
    return SCALE_SEEDS[_scale_param().validate(scale or default_scale(), "seeds")]


def seeds_param(scale: str | None = None) -> Param:
    """SEEDS_PARAM with the scale's default number of seeds."""
    return dataclasses.replace(SEEDS_PARAM, default=default_seeds(scale))


def _register(kind: str, info: StudyInfo, params: tuple[Param, ...], scale_defaults: dict[str, dict]):
    """Register a builder fn(seeds: list[int], **params) -> list[(cell, RunConfig)]."""
    cpu = scale_defaults["cpu-quick"]
    declared = tuple(dataclasses.replace(p, default=cpu.get(p.name, p.default)) for p in params)
    for scale in SCALES:
        unknown = set(scale_defaults[scale]) - {p.name for p in params}
        if unknown:
            raise ValueError(f"{kind}: scale defaults name unknown params {sorted(unknown)}")

    def decorator(fn: Callable) -> Callable:
        STUDIES.register(kind, (_scale_param(),) + declared, description=info.tests)(fn)
        INFO[kind] = info
        SCALE_DEFAULTS[kind] = {s: dict(scale_defaults[s]) for s in SCALES}
        return fn
    return decorator


# ---- parameters ----------------------------------------------------------------------------------

def study_params(kind: str, scale: str | None = None) -> tuple[Param, ...]:
    """The declared parameters of a study with their defaults for `scale` (default: this machine's)."""
    entry = STUDIES.get(kind)
    scale = scale or default_scale()
    if scale not in SCALES:
        raise ConfigError(f"scale {scale!r} is not one of: {', '.join(SCALES)}")
    defaults = {"scale": scale, **{name: value() if callable(value) else value
                                   for name, value in SCALE_DEFAULTS[kind][scale].items()}}
    return tuple(dataclasses.replace(p, default=defaults.get(p.name, p.default)) for p in entry.params)


def validate_params(kind: str, params: dict | None) -> dict:
    """Fill the scale's defaults, coerce types, reject unknown names. Returns a new dict."""
    params = dict(params or {})
    scale = params.get("scale") or default_scale()
    scale = _scale_param().validate(scale, kind)
    declared = study_params(kind, scale)
    reject_unknown(params, (p.name for p in declared), kind)
    return {p.name: p.validate(params.get(p.name, p.default), kind) for p in declared}


def parse_int_list(text, name: str, low: int = 1, high: int = 8192) -> list[int]:
    """"2, 4,8" -> [2, 4, 8] (sorted, unique); ConfigError naming the bad item."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(";", ",").split(",")
    out = []
    for raw in items:
        raw = str(raw).strip()
        if not raw:
            continue
        out.append(Param(name, "int", low, low, high).validate(raw))
    if not out:
        raise ConfigError(f"{name}: give at least one whole number (comma-separated)")
    return sorted(set(out))


def parse_name_list(text, name: str, choices: list[str]) -> list[str]:
    items = text if isinstance(text, (list, tuple)) else str(text).replace(";", ",").split(",")
    out = []
    for raw in items:
        raw = str(raw).strip()
        if not raw:
            continue
        if raw not in choices:
            raise ConfigError(f"{name}: {raw!r} is not one of: {', '.join(choices)}")
        if raw not in out:
            out.append(raw)
    if not out:
        raise ConfigError(f"{name}: choose at least one of: {', '.join(choices)}")
    return out


def _models_with(param_name: str) -> tuple[str, ...]:
    from ..models import MODELS
    return tuple(n for n, e in MODELS.entries.items() if any(p.name == param_name for p in e.params))


def _all_models() -> tuple[str, ...]:
    from ..models import MODELS
    return tuple(MODELS.names())


def _model_params_for(model: str, wanted: dict) -> dict:
    """Keep only the parameters that `model` declares (others would be rejected)."""
    from ..models import MODELS
    declared = {p.name for p in MODELS.get(model).params}
    return {k: v for k, v in wanted.items() if k in declared}


def _seeded(cells: list[tuple[dict, dict]], seeds: list[int]) -> list[tuple[dict, RunConfig]]:
    """Validated configs in seed-major order (all cells of seed 0 first, so every cell gets a first
    result early). Each cell is validated once; its other seeds differ only in `seed`."""
    validated = [(cell, RunConfig.from_dict({**fields, "seed": seeds[0]})) for cell, fields in cells]
    out = []
    for seed in seeds:
        for cell, cfg in validated:
            if seed != cfg.seed:
                cfg = copy.deepcopy(cfg)
                cfg.seed = SEED_VALUE.validate(seed)
            out.append((dict(cell), cfg))
    return out


def _label(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k != "step")


# ---- 1. BatchNorm vs GroupNorm across batch sizes ------------------------------------------------

@_register(
    "bn_vs_gn",
    StudyInfo(
        title="BatchNorm vs GroupNorm across batch sizes",
        tests="Trains the same ResNet with BatchNorm and with GroupNorm at each batch size, for the "
              "same number of epochs, with the learning rate scaled linearly with the batch size.",
        claim="Group Normalization (Wu & He, 2018), cited by the source report: BatchNorm's error "
              "rises sharply as the batch gets small (its batch statistics become noisy), while "
              "GroupNorm, which normalizes within each image, is nearly independent of the batch size.",
        cell_keys=("norm", "batch_size"),
        scale_notes={
            "cpu-quick": "At cpu-quick a ResNet-18 sees 500 images once: test accuracies stay around "
                         "10–25 %, GroupNorm (which starts learning more slowly) can look worse than "
                         "BatchNorm, and the largest batches get only a handful of steps. The claim is "
                         "about trained networks: use the cpu or gpu scale.",
            "cpu": "At cpu a half-width ResNet-18 trains 2 epochs on 2,500 images at batch 2, 4, 16 "
                   "and 64, 3 seeds: every batch size sees the same images, and accuracies stay well "
                   "short of trained values. With 32-pixel inputs and the cheap stem the last "
                   "stage's maps are 1×1, so BatchNorm at batch 2 normalizes each channel over 2 "
                   "numbers: a harsher test than ImageNet's 7×7 maps."}),
    params=(
        Param("batch_sizes", "str", "2,4,8,16,32,128",
              help="Comma-separated batch sizes; each is trained with norm=batch and norm=group."),
        Param("model", "choice", "resnet18", choices=("resnet18", "resnet34"),
              help="A model whose normalization layer can be switched (norm=batch|group)."),
        Param("stem", "choice", "imagenet", choices=("cifar", "imagenet"),
              help="cifar: 3×3 stride-1 stem (full-size ResNet for CIFAR); imagenet: 7×7 stride-2 + "
                   "max-pool, ~16× cheaper (the CPU scales' choice, same blocks and norm layers)."),
        Param("width", "float", 1.0, 0.25, 2.0,
              help="ResNet width multiplier (0.5: 32–256 channels, ~4× fewer weights: the cpu scale)."),
        Param("groups", "int", 32, 1, 64,
              help="GroupNorm groups (must divide every stage's channel count: 64, 128, 256, 512 × width)."),
        Param("per_class", "int", 60, 2, 5000,
              help="Training pool: this many images per class (5000 = the whole training set)."),
        Param("val_size", "int", 100, 0, 25000,
              help="Held out of the pool to validate during training (0: validate on the test set). "
                   "The final numbers are always on the 10,000 test images."),
        Param("epochs", "int", 1, 1, 500, help="The same for every batch size (same images seen)."),
        Param("base_lr", "float", 0.1, 1e-5, 10.0, log=True,
              help="Learning rate at base_batch; lr = base_lr × batch_size / base_batch."),
        Param("base_batch", "int", 128, 1, 8192, help="The batch size that gets base_lr."),
        Param("warmup_epochs", "float", 0.5, 0.0, 100.0,
              help="Linear LR warm-up (then cosine decay), as in the linear-scaling recipe; it keeps "
                   "the first steps of an unnormalized start from blowing up."),
    ),
    scale_defaults={
        "cpu-quick": {"batch_sizes": "2,4,8,16,32,128", "model": "resnet18", "stem": "imagenet",
                      "width": 1.0, "groups": 32, "per_class": 60, "val_size": 100, "epochs": 1,
                      "base_lr": 0.1, "base_batch": 128, "warmup_epochs": 0.5},
        "cpu": {"batch_sizes": "2,4,16,64", "model": "resnet18", "stem": "imagenet", "width": 0.5,
                "groups": 16, "per_class": 260, "val_size": 100, "epochs": 2, "base_lr": 0.1,
                "base_batch": 128, "warmup_epochs": 0.5},
        "gpu": {"batch_sizes": "2,4,8,16,32,128", "model": "resnet18", "stem": "cifar", "width": 1.0,
                "groups": 32, "per_class": 1000, "val_size": 0, "epochs": 10, "base_lr": 0.1,
                "base_batch": 128, "warmup_epochs": 1.0},
    })
def build_bn_vs_gn(seeds: list[int], scale: str, batch_sizes: str, model: str, stem: str, width: float,
                   groups: int, per_class: int, val_size: int, epochs: int, base_lr: float,
                   base_batch: int, warmup_epochs: float) -> list[tuple[dict, RunConfig]]:
    sizes = parse_int_list(batch_sizes, "batch_sizes", low=2)
    n_train = 10 * per_class - val_size
    if n_train < 1:
        raise ConfigError(f"bn_vs_gn: val_size {val_size} leaves no training images out of "
                          f"{10 * per_class}")
    lonely = [b for b in sizes if n_train % b == 1]
    if lonely:
        raise ConfigError(f"bn_vs_gn: with {n_train} training images, batch size(s) "
                          f"{', '.join(map(str, lonely))} leave a last batch of a single image, which "
                          "BatchNorm cannot normalize; change per_class or val_size by a few images")
    cells = []
    for norm in ("batch", "group"):
        for bs in sizes:
            lr = base_lr * bs / base_batch
            fields = {
                "name": f"bn_vs_gn {norm} bs{bs}", "model": model, "epochs": epochs,
                "model_params": {"norm": norm, "groups": groups, "stem": stem, "width": width},
                "subset": "full" if per_class >= 5000 else "per_class", "per_class": min(per_class, 5000),
                "val_size": val_size, "batch_size": bs, "lr": lr, "schedule": "cosine",
                "schedule_params": {"warmup_epochs": warmup_epochs, "final_factor": 0.0},
                "log_every": max(1, min(50, math.ceil(n_train / bs / 10))),
            }
            cells.append(({"norm": norm, "batch_size": bs}, fields))
    return _seeded(cells, seeds)


# ---- 2. balancing strategies on an imbalanced set (the report's, or CIFAR-10-LT) ---------------------

def _balancing_names() -> list[str]:
    from ..imbalance import BALANCING
    return BALANCING.names()


# The cpu scale's strategies: none, the report's weighted sampler, and two cost-sensitive losses
# (those of them that the balancing registry has when the study is built).
CPU_STRATEGIES = ("none", "weighted_sampler", "balanced_softmax", "ldam_drw")
PROFILES = ("report", "long_tail")
# samplers with epochs=0 (the cpu scale): as many whole epochs as fit in this many training images
AUTO_EPOCH_IMAGES = 25_000


def _registered(names: tuple[str, ...]) -> Callable[[], str]:
    """A default computed when asked: `names` that the balancing registry has, comma-separated."""
    return lambda: ",".join(n for n in names if n in _balancing_names())


@_register(
    "samplers",
    StudyInfo(
        title="Balancing strategies on imbalanced CIFAR-10",
        tests="Trains the same model on an imbalanced training set (the report's: each class keeps a "
              "random 500–1000 images; or CIFAR-10-LT with imbalance ratio ρ) with each balancing "
              "strategy, and compares per-class recall and balanced accuracy on the (balanced) test set.",
        claim="The source report: re-balancing (weighted sampling, a class-weighted or cost-sensitive "
              "loss, over-/under-sampling) moves recall from the large classes to the small ones; with "
              "mild imbalance plain training already does reasonably, so balanced accuracy moves less.",
        cell_keys=("balance",),
        scale_notes={
            "cpu-quick": "At cpu-quick the fast net (half width) trains 2 epochs: about 55–60 % test "
                         "accuracy, enough to see recall move between classes, with seed noise of a "
                         "few points.",
            "cpu": "At cpu the fast net (half width) trains up to 25,000 images per run (3 epochs of the "
                   "report's set, 2 of CIFAR-10-LT ρ=100), 3 seeds, 4 strategies: accuracies well short "
                   "of trained ones, meant to be enough for recall to move between classes "
                   "beyond the seed noise."}),
    params=(
        Param("strategies", "str", "none,weighted_sampler,class_weighted_loss,random_oversample,"
              "random_undersample", help="The balancing strategies to compare (a comma-separated list of "
                                         "the balancing registry's names; the Studies page picks them "
                                         "from a list)."),
        Param("profile", "choice", "report", choices=PROFILES,
              help="report: each class keeps a random low–high images (the source report's set); "
                   "long_tail: CIFAR-10-LT, class c keeps 5000 · ρ^(-c/9) images."),
        Param("low", "int", 500, 1, 5000, help="profile=report: fewest training images a class keeps."),
        Param("high", "int", 1000, 1, 5000, help="profile=report: most training images a class keeps."),
        Param("imbalance_ratio", "float", 100.0, 1.0, 1000.0, log=True,
              help="profile=long_tail: ρ, the largest class over the smallest (10, 50, 100, 200 are "
                   "the usual benchmarks)."),
        Param("model", "choice", "fastnet", choices=("fastnet", "resnet18", "resnet34", "lenet", "alexnet"),
              help="The network (the CPU scales: the fast net at half width)."),
        Param("width", "float", 0.5, 0.25, 4.0, help="Width multiplier (fastnet, alexnet and the ResNets)."),
        Param("epochs", "int", 2, 0, 500,
              help=f"0: as many whole epochs as fit in {AUTO_EPOCH_IMAGES:,} training images (at least "
                   "one; the same for every strategy)."),
        Param("batch_size", "int", 128, 2, 8192),
        Param("lr", "float", 0.2, 1e-5, 10.0, log=True,
              help="Peak learning rate (cosine schedule). The fast net needs a larger one than a ResNet."),
        Param("val_size", "int", 500, 0, 25000,
              help="Held out (balanced, before the imbalance) to validate during training; 0: no "
                   "validation, the test set is evaluated once at the end (long_tail keeps its standard "
                   "counts only then). Final numbers are always on the 10,000 test images."),
    ),
    scale_defaults={
        "cpu-quick": {"profile": "report", "model": "fastnet", "width": 0.5, "epochs": 2,
                      "batch_size": 128, "lr": 0.2, "val_size": 500},
        "cpu": {"strategies": _registered(CPU_STRATEGIES), "profile": "report", "model": "fastnet",
                "width": 0.5, "epochs": 0, "batch_size": 128, "lr": 0.2, "val_size": 0},
        "gpu": {"profile": "report", "model": "resnet18", "width": 1.0, "epochs": 30, "batch_size": 128,
                "lr": 0.1, "val_size": 0},
    })
def build_samplers(seeds: list[int], scale: str, strategies: str, profile: str, low: int, high: int,
                   imbalance_ratio: float, model: str, width: float, epochs: int, batch_size: int,
                   lr: float, val_size: int) -> list[tuple[dict, RunConfig]]:
    names = parse_name_list(strategies, "strategies", _balancing_names())
    if val_size % 10:
        raise ConfigError("samplers: val_size must be a multiple of 10 (the same number per class)")
    if profile == "report":
        if low > high:
            raise ConfigError(f"samplers: low {low} is greater than high {high}")
        if 5000 - val_size // 10 < high:
            raise ConfigError(f"samplers: after holding out val_size={val_size} a class has "
                              f"{5000 - val_size // 10} images, fewer than high={high}")
        imbalance = {"imbalance": "report_random", "imbalance_params": {"low": low, "high": high}}
    else:
        imbalance = {"imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": imbalance_ratio}}
    study = {"model": model, "model_params": _model_params_for(model, {"width": width}), "subset": "full",
             "val_size": val_size, "batch_size": batch_size, "lr": lr, "channels_last": True, **imbalance}
    epochs = epochs or _auto_epochs(study)
    # without a validation split every evaluation is the 10,000 test images: only the final one
    study.update(epochs=epochs, eval_every=epochs if val_size == 0 else 1)
    cells = [({"balance": name}, {**study, "name": f"samplers {name}", "balance": name}) for name in names]
    return _seeded(cells, seeds)


def _auto_epochs(study: dict) -> int:
    """Whole epochs (at least one) of this imbalanced set (seed 0's draw, before balancing) that fit in
    AUTO_EPOCH_IMAGES training images."""
    images = training_images(RunConfig.from_dict({**study, "balance": "none", "epochs": 1, "seed": 0}))
    return max(1, AUTO_EPOCH_IMAGES // images)


# ---- parameters that are lists of registry names ---------------------------------------------------
# {study: {parameter: the allowed names}}: stored as a comma-separated string (manifests, links and
# the CLI stay plain), shown by the Studies page as a multiselect over the names.
NAME_LISTS: dict[str, dict[str, Callable[[], list[str]]]] = {"samplers": {"strategies": _balancing_names},
                                                            "few_labels": {"methods": lambda: _few_label_methods()}}
# (a lambda: _few_label_methods is defined with its study, below)


# Study parameters that only some values of another parameter read: {study: {parameter: (that parameter,
# its values)}}. Forms hide them otherwise (the study's default is then used; it has no effect anyway).
PARAM_APPLIES_WHEN: dict[str, dict[str, tuple[str, tuple]]] = {
    "samplers": {"low": ("profile", ("report",)), "high": ("profile", ("report",)),
                 "imbalance_ratio": ("profile", ("long_tail",))}}


def param_applies(kind: str, param_name: str, values: dict) -> bool:
    """Whether parameter `param_name` of study `kind` has an effect given the other values chosen so far
    (a parameter whose controller is not chosen yet counts as applying)."""
    rule = PARAM_APPLIES_WHEN.get(kind, {}).get(param_name)
    return rule is None or rule[0] not in values or values[rule[0]] in rule[1]


def name_list_choices(kind: str, param_name: str) -> list[str] | None:
    """The allowed names when `param_name` of study `kind` is a list of registry names, else None."""
    choices = NAME_LISTS.get(kind, {}).get(param_name)
    return list(choices()) if choices else None


def name_list_default(kind: str, param: Param) -> list[str]:
    """A name-list parameter's default (or any stored value) as a list, keeping only allowed names."""
    choices = name_list_choices(kind, param.name) or []
    raw = param.default
    items = raw if isinstance(raw, (list, tuple)) else str(raw).replace(";", ",").split(",")
    return [name for name in dict.fromkeys(str(item).strip() for item in items) if name in choices]


# ---- 3. cumulative trick ablation ----------------------------------------------------------------

def ablation_steps() -> list[tuple[str, dict]]:
    """The report's cumulative ablation, from cifar_core.experiments.presets: [(label, full partial config)],
    each step including all the previous ones."""
    from .presets import ablation_presets
    return list(ablation_presets().items())


def _short_step_label(label: str) -> str:
    return label.split(":", 1)[1].strip() if ":" in label else label


@_register(
    "ablation",
    StudyInfo(
        title="Cumulative trick ablation",
        tests="Trains the report's baseline, then adds one trick at a time (random crop & flip, rotation, "
              "weight decay, inverse-time LR decay, dropout, gradient clipping), each step keeping all "
              "the previous ones.",
        claim="The source report's ablation: augmentation (crop & flip) gives the largest single gain "
              "over the baseline; the later tricks add smaller, less certain improvements (repeat with "
              "several seeds to see which ones stand out of the noise).",
        cell_keys=("step", "trick"),
        scale_notes={
            "cpu-quick": "At cpu-quick every step trains 2 epochs on 1,800 images: regularizers "
                         "(augmentation, dropout, clipping) slow down early learning, so later steps can "
                         "score *below* the baseline (measured here: baseline 27–30 %, all seven tricks "
                         "18–20 %). The report's gains show with longer training: use the cpu or gpu scale.",
            "cpu": "At cpu a half-width ResNet-18 trains 15 epochs on 4,500 images (500 more held out "
                   "for validation), 3 seeds, about 20 minutes: long enough for the baseline to fit its "
                   "training images, which is when augmentation pays (measured on a 2-core CPU: crop & "
                   "flip +6.7 ± 0.6 points, the largest step; gradient clipping at norm 1 −6.2). "
                   "Accuracies (44–51 %) stay far below the report's (10,000 images, full width)."}),
    params=(
        Param("model", "choice", "resnet18", choices=("resnet18", "resnet34", "fastnet", "lenet", "alexnet"),
              help="The network (every model has a dropout parameter for the dropout step)."),
        Param("stem", "choice", "imagenet", choices=("cifar", "imagenet"),
              help="ResNet stem (ignored by other models); imagenet is ~16× cheaper on a CPU."),
        Param("width", "float", 1.0, 0.25, 2.0,
              help="Width multiplier (the ResNets, fastnet and alexnet; ignored by lenet)."),
        Param("subset_size", "int", 2000, 10, 50000, help="Random training subset (the report used 10,000)."),
        Param("val_size", "int", 200, 0, 25000, help="Held out of the subset for validation."),
        Param("epochs", "int", 2, 1, 500),
        Param("batch_size", "int", 64, 2, 8192),
        Param("lr", "float", 0.01, 1e-5, 10.0, log=True),
    ),
    scale_defaults={
        "cpu-quick": {"model": "resnet18", "stem": "imagenet", "width": 1.0, "subset_size": 2000,
                      "val_size": 200, "epochs": 2, "batch_size": 64, "lr": 0.01},
        "cpu": {"model": "resnet18", "stem": "imagenet", "width": 0.5, "subset_size": 5000,
                "val_size": 500, "epochs": 15, "batch_size": 64, "lr": 0.01},
        "gpu": {"model": "resnet18", "stem": "cifar", "width": 1.0, "subset_size": 10000, "val_size": 1000,
                "epochs": 30, "batch_size": 128, "lr": 0.01},
    })
def build_ablation(seeds: list[int], scale: str, model: str, stem: str, width: float, subset_size: int,
                   val_size: int, epochs: int, batch_size: int, lr: float) -> list[tuple[dict, RunConfig]]:
    if val_size >= subset_size:
        raise ConfigError(f"ablation: val_size {val_size} leaves no training images out of {subset_size}")
    study = {"model": model, "subset": "random", "subset_size": subset_size, "val_size": val_size,
             "epochs": epochs, "batch_size": batch_size, "lr": lr}
    cells = []
    for i, (label, preset) in enumerate(ablation_steps()):
        fields = copy.deepcopy(preset)
        step_model_params = dict(fields.get("model_params") or {})
        fields.update(study)
        fields["model_params"] = _model_params_for(model, {"stem": stem, "width": width, **step_model_params})
        fields["name"] = f"ablation {i}"
        cells.append(({"step": i, "trick": _short_step_label(label)}, fields))
    return _seeded(cells, seeds)


# ---- 4. learning from few labels ---------------------------------------------------------------------

FEW_LABEL_METHODS = ("supervised", "pseudo_label", "mixmatch", "fixmatch", "flexmatch", "rotation")
PRETEXT_CELL = {"method": "rotation pretext"}        # the self-supervised run on the whole pool ...
FINETUNE_CELL = {"method": "fine-tune from rotation"}  # ... and the few-label fine-tune that starts from it


def _few_label_methods() -> list[str]:
    """The few_labels methods whose objective is registered (engine.OBJECTIVES)."""
    from ..engine import OBJECTIVES
    return [m for m in FEW_LABEL_METHODS if m in OBJECTIVES.names()]


@_register(
    "few_labels",
    StudyInfo(
        title="Learning from few labels",
        tests="With the same labeled images (250) and the same number of labeled steps, trains supervised-only, "
              "pseudo-labelling, MixMatch and FixMatch (these three also learn from the rest of the pool, "
              "unlabeled), and a rotation pretext on the whole pool (labels ignored) followed by a fine-tune "
              "on the labeled images, to compare with supervised-only from scratch.",
        claim="Semi-supervised learning (MixMatch, Berthelot et al. 2019; FixMatch, Sohn et al. 2020): with "
              "250 CIFAR-10 labels, also learning from the unlabeled images lifts test accuracy far above "
              "supervised training on the labels alone (FixMatch: about 95% against about 50% with a "
              "WideResNet-28-2 and a million steps); a self-supervised rotation pretext (Gidaris et al. 2018) "
              "is a better start for the few labels than random weights.",
        cell_keys=("method",),
        scale_notes={
            "cpu-quick": "At cpu-quick every run sees 250 labels of a 1,000-image pool for 3 epochs of the "
                         "labels (24 steps of 32) and is scored on 1,000 test images: a smoke test of the "
                         "pipeline, accuracies near chance, no ranking to read.",
            "cpu": "At cpu the fast net (half width) trains 8 epochs of the 250 labels (64 steps of 32) on a "
                   "5,000-image pool, 3 seeds: the same labeled steps for every method, so the "
                   "semi-supervised runs take several times longer (train_seconds). Far too short for "
                   "FixMatch's gains, which take hundreds of thousands of steps: bench/bench_few_labels.py "
                   "compares the methods at an hour each. The rotation pretext's row scores its linear "
                   "probe (linear_probe_acc), not a classifier."}),
    params=(
        Param("methods", "str", "supervised,pseudo_label,mixmatch,fixmatch,rotation",
              help="The methods to compare (comma-separated): supervised (labels only: the from-scratch "
                   "baseline), pseudo_label, mixmatch, fixmatch, flexmatch (semi-supervised objectives), "
                   "rotation (a rotation pretext on the pool, then a fine-tune on the labels from it)."),
        Param("label_budget", "int", 250, 10, 5000,
              help="Labeled images, the same for every method (a multiple of 10: as many per class)."),
        Param("pool_size", "int", 1000, 20, 50000,
              help="The training pool, a random subset of the training set (50,000: all of it): "
                   "label_budget of it labeled, the rest the unlabeled pool; the pretext trains on all of it."),
        Param("model", "choice", "fastnet", choices=("fastnet", "resnet18", "lenet"),
              help="The network (the CPU scales: the fast net)."),
        Param("width", "float", 0.25, 0.25, 4.0, help="Width multiplier (fastnet and resnet18)."),
        Param("epochs", "int", 3, 1, 2000,
              help="Epochs of the labeled images, the same for every few-label run (label_budget / "
                   "batch_size steps an epoch)."),
        Param("pretext_epochs", "int", 1, 1, 500, help="rotation: epochs of the pretext over the whole pool."),
        Param("batch_size", "int", 32, 2, 1024,
              help="Labeled images a step (the semi-supervised objectives draw μ times as many unlabeled)."),
        Param("lr", "float", 0.05, 1e-5, 10.0, log=True, help="Peak learning rate (cosine schedule)."),
        Param("test_size", "int", 1000, 0, 10000,
              help="Test images the runs are scored on (a stratified subset; 0: all 10,000)."),
        Param("mixmatch_weight", "float", 75.0, 0.0, 1000.0,
              help="mixmatch: the unlabeled loss weight λ_u (the paper's 75 needs its 16,000-step ramp; at "
                   "the CPU scales' few dozen steps it collapses the run to one class, so they use 8)."),
        Param("mixmatch_rampup", "float", 0.016, 0.0, 1.0,
              help="mixmatch: the share of the run over which λ_u ramps up from 0 (the paper's 16,000 of a "
                   "million steps: 0.016; the CPU scales ramp over the whole run). The other objectives "
                   "keep their own defaults (no ramp, as in FixMatch)."),
    ),
    scale_defaults={
        "cpu-quick": {"pool_size": 1000, "width": 0.25, "epochs": 3, "pretext_epochs": 1, "batch_size": 32,
                      "test_size": 1000, "mixmatch_weight": 8.0, "mixmatch_rampup": 1.0},
        "cpu": {"pool_size": 5000, "width": 0.5, "epochs": 8, "pretext_epochs": 1, "batch_size": 32,
                "test_size": 0, "mixmatch_weight": 8.0, "mixmatch_rampup": 1.0},
        "gpu": {"pool_size": 50000, "width": 1.0, "epochs": 1000, "pretext_epochs": 30, "batch_size": 64,
                "test_size": 0, "mixmatch_weight": 75.0, "mixmatch_rampup": 0.016},
    })
def build_few_labels(seeds: list[int], scale: str, methods: str, label_budget: int, pool_size: int, model: str,
                     width: float, epochs: int, pretext_epochs: int, batch_size: int, lr: float,
                     test_size: int, mixmatch_weight: float, mixmatch_rampup: float) -> list[tuple[dict, RunConfig]]:
    names = parse_name_list(methods, "methods", _few_label_methods())
    if label_budget % 10 or label_budget >= pool_size:
        raise ConfigError(f"few_labels: label_budget {label_budget} must be a multiple of 10 and leave "
                          f"unlabeled images in the pool of {pool_size}")
    pool = {"subset": "full"} if pool_size >= 50000 else {"subset": "random", "subset_size": pool_size}
    study = {"model": model, "model_params": _model_params_for(model, {"width": width}), **pool, "val_size": 0,
             "test_size": test_size, "batch_size": batch_size, "lr": lr}
    few = {**study, "label_budget": label_budget, "epochs": epochs, "eval_every": epochs}  # one test evaluation
    cells = []
    for name in names:
        if name != "rotation":
            semi = {"mixmatch_weight": mixmatch_weight, "ssl_rampup": mixmatch_rampup} if name == "mixmatch" else {}
            cells.append(({"method": name}, {**few, **semi, "name": f"few_labels {name}", "objective": name}))
            continue
        cells.append((dict(PRETEXT_CELL), {**study, "name": "few_labels rotation pretext", "objective": "rotation",
                                           "label_budget": 0, "epochs": pretext_epochs,
                                           "eval_every": pretext_epochs}))
        cells.append((dict(FINETUNE_CELL), {**few, "name": "few_labels fine-tune from rotation",
                                            "init_run": cell_ref(PRETEXT_CELL), "init_mode": "finetune"}))
    return _seeded(cells, seeds)


def cell_ref(cell: dict) -> str:
    """The init_run placeholder that names `cell`'s run of the same seed: "cell-" and its values, as an id."""
    text = "-".join(str(v) for v in cell.values())
    return CELL_REF_PREFIX + "".join(c if c.isascii() and c.isalnum() else "-" for c in text).strip("-")


def follow_cell_ref(cell: dict, cfg: RunConfig, earlier: dict[tuple[str, int], str]) -> RunConfig:
    """`cfg` with its init_run placeholder (`cell_ref`), if it has one, replaced by the run id that
    `earlier` ({(cell_ref, seed): run id} of the runs queued before it) holds for that cell and seed;
    ConfigError when it names no earlier cell of the same seed."""
    if not cfg.init_run.startswith(CELL_REF_PREFIX):
        return cfg
    source = earlier.get((cfg.init_run, cfg.seed))
    if source is None:
        raise ConfigError(f"study cell {_label(cell)} starts from {cfg.init_run}, which is no cell built before "
                          f"it with seed {cfg.seed}")
    return cfg.replace(init_run=source)


def check_cell_refs(planned: list[tuple[dict, RunConfig]]) -> None:
    """ConfigError unless every init_run placeholder of `planned` names a cell built before it, same seed."""
    earlier: dict[tuple[str, int], str] = {}
    for cell, cfg in planned:
        follow_cell_ref(cell, cfg, earlier)
        earlier[(cell_ref(cell), cfg.seed)] = cell_ref(cell)


# ---- building ------------------------------------------------------------------------------------

def build_study(kind: str, params: dict | None = None, seeds: int | None = None) -> list[tuple[dict, RunConfig]]:
    """[(cell, validated RunConfig)], one per cell × seed (seeds 0 … seeds-1; None: the scale's default,
    SCALE_SEEDS). ConfigError if invalid."""
    values = validate_params(kind, params)
    n = study_seeds(values["scale"], seeds)
    return STUDIES.get(kind).fn(seeds=list(range(n)), **values)


def study_seeds(scale: str, seeds: int | None) -> int:
    """The validated number of seeds; None: the scale's default."""
    return seeds_param(scale).validate(default_seeds(scale) if seeds is None else seeds)


# ---- time estimates ------------------------------------------------------------------------------

def _on_device(cfg: RunConfig, device_kind: str | None) -> RunConfig:
    return cfg if device_kind is None or cfg.device == device_kind else cfg.replace(device=device_kind)


def training_images(cfg: RunConfig) -> int:
    """Images per epoch (after the split, imbalance and balancing)."""
    return run_counts(cfg).train


def estimate_run_seconds(cfg: RunConfig, device_kind: str | None = None, store: RunStore | None = None,
                         data_source: str | None = None) -> float:
    """Seconds of one run on this machine (`cifar_core.experiments.estimate`); `device_kind` overrides
    the config's device."""
    return estimate_run(_on_device(cfg, device_kind), store, data_source).seconds


def estimate_study(kind: str, params: dict | None = None, seeds: int | None = None, store: RunStore | None = None,
                   data_source: str | None = None, device_kind: str | None = None) -> Estimate:
    """The study's runs one after another (they queue on one job slot per device): the sum of their
    estimates, with its range, parts and basis."""
    planned = build_study(kind, params, seeds)
    return estimate_runs([_on_device(cfg, device_kind) for _, cfg in planned], store, data_source)


def estimate_seconds(kind: str, params: dict | None = None, seeds: int | None = None, device_kind: str | None = None,
                     store: RunStore | None = None, data_source: str | None = None) -> float:
    """Total seconds of a study when its runs go one after another (one job slot)."""
    return estimate_study(kind, params, seeds, store, data_source, device_kind).seconds


# ---- launching and manifests ---------------------------------------------------------------------

def studies_dir(store: RunStore) -> Path:
    return Path(store.root) / MANIFEST_DIR


def new_study_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind.replace('_', '-')}-{secrets.token_hex(3)}"


def validate_study_id(study_id: str) -> str:
    return validate_id(study_id, "study id")


def manifest_path(store: RunStore, study_id: str) -> Path:
    return studies_dir(store) / f"{validate_study_id(study_id)}.json"


def launch_study(kind: str, params: dict | None, store: RunStore | None = None,
                 data_source: str | None = None, seeds: int | None = None) -> str:
    """Queue every run of a study as a background job (seeds None: the scale's default); returns the
    study id.

    All configs are built and validated before anything is queued, so an invalid study queues
    nothing. The manifest is written even if queuing stops half way (it lists what was queued). A run
    that starts from another cell's run (an init_run placeholder, `cell_ref`) is queued after it with
    that run's id."""
    from .. import jobs

    store = store or RunStore()
    values = validate_params(kind, params)
    n_seeds = study_seeds(values["scale"], seeds)
    planned = build_study(kind, values, n_seeds)
    check_cell_refs(planned)
    study_id = new_study_id(kind)
    info = INFO[kind]
    manifest = {"study_id": study_id, "kind": kind, "title": info.title, "params": values,
                "seeds": n_seeds, "scale": values["scale"], "cell_keys": list(info.cell_keys),
                "created": time.time(), "data_source": data_source, "runs": []}
    queued: dict[tuple[str, int], str] = {}  # (cell_ref, seed) -> run id, for the runs that start from them
    try:
        for cell, cfg in planned:
            cfg = follow_cell_ref(cell, cfg, queued)
            meta = {"study": study_id, "study_kind": kind, "cell": cell, "seed": cfg.seed}
            record = jobs.submit(cfg, store, data_source=data_source, start_worker=False, meta=meta)
            queued[(cell_ref(cell), cfg.seed)] = record.run_id
            manifest["runs"].append({"run_id": record.run_id, "cell": cell, "seed": cfg.seed})
    finally:
        if manifest["runs"]:
            atomic_write_json(manifest_path(store, study_id), manifest)
    jobs.ensure_worker(store)
    return study_id


def read_manifest(store: RunStore, study_id: str) -> dict:
    manifest = read_json(manifest_path(store, study_id))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise ConfigError(f"study {study_id} not found (or its manifest is unreadable) in "
                          f"{studies_dir(store)}")
    return manifest


def list_studies(store: RunStore | None = None) -> list[dict]:
    """Manifests of all studies, newest first (unreadable ones skipped)."""
    store = store or RunStore()
    folder = studies_dir(store)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.json"):
        if not ID_RE.match(path.stem):
            continue
        manifest = read_json(path)
        if isinstance(manifest, dict) and isinstance(manifest.get("runs"), list) and manifest.get("kind"):
            manifest.setdefault("study_id", path.stem)
            out.append(manifest)
    return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


# ---- results -------------------------------------------------------------------------------------

def study_results(store: RunStore, study_id: str):
    """One row per run: cell columns, seed, run_id, state, the final metrics (NaN until finished; a
    pretext run's class metrics NaN, its linear_probe_acc instead),
    lr, per-class test recall columns ``recall_<class>`` and the training images of each class
    ``train_count_<class>`` (from the run's split). df.attrs["cell_keys"] names the cell."""
    import pandas as pd

    manifest = read_manifest(store, study_id)
    cell_keys = list(manifest.get("cell_keys") or INFO.get(manifest["kind"], StudyInfo("", "", "", ())).cell_keys)
    rows = []
    for entry in manifest["runs"]:
        run_id = entry.get("run_id")
        row = {k: (entry.get("cell") or {}).get(k) for k in cell_keys}
        row.update(seed=entry.get("seed"), run_id=run_id)
        try:
            record = store.record(run_id)
        except ConfigError:
            record = None
        status = record.status() if record is not None and record.exists() else {}
        row["state"] = status.get("state", "deleted") if status else "deleted"
        for metric in METRICS:
            value = status.get(metric)
            row[metric] = float(value) if isinstance(value, (int, float)) else math.nan
        config = record.config_dict() if status else None
        row["lr"] = config.get("lr") if isinstance(config, dict) else math.nan
        row["error"] = status.get("error") if row["state"] in ("failed", "cancelled") else None
        results = record.results() if status and row["state"] == "completed" else None
        if status.get("pretext"):  # its head learned the pretext: no class metric means anything
            row.update({metric: math.nan for metric in CLASS_METRICS}, linear_probe_acc=_number(
                status.get("linear_probe_acc")))
            results = None
        if isinstance(results, dict) and isinstance(results.get("per_class_acc"), dict):
            for cls, acc in results["per_class_acc"].items():
                row[f"{RECALL_PREFIX}{cls}"] = float(acc)
        row.update(_class_counts(status.get("split")))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=cell_keys + ["seed", "run_id", "state", *METRICS, "lr", "error"])
    df.attrs["cell_keys"] = cell_keys
    df.attrs["kind"] = manifest["kind"]
    df.attrs["study_id"] = study_id
    return df


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _class_counts(split) -> dict:
    """{train_count_<class>: n} from a run's split summary (empty when it has none)."""
    if not isinstance(split, dict):
        return {}
    counts, classes = split.get("train_per_class"), split.get("classes")
    if not isinstance(counts, list) or not isinstance(classes, list) or len(counts) != len(classes):
        return {}
    return {f"{COUNT_PREFIX}{cls}": float(n) for cls, n in zip(classes, counts)}


def recall_columns(df) -> list[str]:
    return [c for c in df.columns if str(c).startswith(RECALL_PREFIX)]


def training_counts_text(store: RunStore, df, params: dict) -> str:
    """'The training set keeps 500–1000 images per class … Seed 0: airplane 734, …' for the samplers
    study, from the first finished run's split summary."""
    if params.get("profile") == "long_tail":
        text = (f"The training set is CIFAR-10-LT with ρ = {params.get('imbalance_ratio', '?')}: class c "
                "keeps 5000 · ρ^(-c/9) images, the same for every seed and strategy.")
    else:
        text = (f"The training set keeps {params.get('low', '?')}–{params.get('high', '?')} images per "
                "class, drawn at random per seed (the same draw for every strategy of a seed).")
    for run_id in df.loc[df["state"] == "completed", "run_id"]:
        split = store.record(run_id).status().get("split") or {}
        counts, classes = split.get("train_per_class"), split.get("classes")
        if counts and classes:
            seed = df.loc[df["run_id"] == run_id, "seed"].iloc[0]
            return text + (f" Seed {seed}: " + ", ".join(f"{c} {n}" for c, n in zip(classes, counts))
                           + f" ({sum(counts):,} images).")
    return text


def summarize(df, cell_keys: list[str] | None = None):
    """Mean ± std over seeds per cell, from completed runs only.

    Columns: the cell keys, runs (how many), done (completed), state ("completed", or e.g.
    "running · 1/3 done"), <metric>_mean and <metric>_std for every metric (and linear_probe_acc where
    a pretext run has it) and recall column (std is NaN with fewer than two completed seeds). Cells keep
    their first-appearance order."""
    import pandas as pd

    cell_keys = list(cell_keys or df.attrs.get("cell_keys") or [])
    if not cell_keys:
        raise ConfigError("summarize: the cell columns are unknown (pass cell_keys)")
    values = [m for m in METRICS + EXTRA_METRICS if m in df.columns] + recall_columns(df)
    out_rows = []
    if df.empty:
        return pd.DataFrame(columns=cell_keys + ["runs", "done", "state"]
                            + [f"{v}_{s}" for v in values for s in ("mean", "std")])
    groups = df.groupby(cell_keys, sort=False, dropna=False)
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(cell_keys, key))
        done = group[group["state"] == "completed"]
        row["runs"] = len(group)
        row["done"] = len(done)
        row["state"] = _cell_state(list(group["state"]))
        for v in values:
            series = pd.to_numeric(done[v], errors="coerce") if v in done else pd.Series(dtype=float)
            row[f"{v}_mean"] = float(series.mean()) if series.notna().any() else math.nan
            row[f"{v}_std"] = float(series.std(ddof=1)) if series.notna().sum() >= 2 else math.nan
        if "lr" in group:
            row["lr"] = group["lr"].iloc[0]
        out_rows.append(row)
    out = pd.DataFrame(out_rows)
    out.attrs["cell_keys"] = cell_keys
    return out


def _cell_state(states: list[str]) -> str:
    n = len(states)
    done = sum(s == "completed" for s in states)
    if done == n:
        return "completed"
    for s in ("running", "starting", "queued"):
        if s in states:
            return f"{s} · {done}/{n} done"
    bad = [s for s in states if s != "completed"]
    return f"{bad[0]} · {done}/{n} done" if bad else "completed"


def is_finished(df) -> bool:
    """True when every run of the study is in a final state (or gone)."""
    return bool(len(df)) and all(s in FINAL_STATES or s == "deleted" for s in df["state"])
