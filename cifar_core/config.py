"""RunConfig: the one validated object that describes a training run.

The CLI flags, the app's Train form and the run record's config.json are all generated from the
field declarations below (a Param per scalar field; registry-backed dict fields for the options of
the chosen model, schedule, imbalance profile and balancing strategy; a list for the augmentation
chain).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .params import ConfigError, Param, Registry, reject_unknown, validate_id

INIT_MODES = ("finetune", "linear_probe", "crt")  # how init_run's weights are used (engine/init_from.py)
MAX_NPROC = 64  # processes of one run on one machine (`nproc`)
MAX_TEACHERS = 8  # runs of an ensemble teacher (`teacher_run`): each runs a forward pass every step
# What a training step's loss is made of: each name is an entry of engine.objectives.OBJECTIVES (a test
# checks both lists agree). Semi-supervised objectives also learn from the unlabeled pool that
# label_budget leaves; a pretext (self-supervised) objective learns from unlabeled images only.
OBJECTIVE_NAMES = ("supervised", "pseudo_label", "mixmatch", "fixmatch", "flexmatch", "rotation")
SEMI_SUPERVISED_OBJECTIVES = ("pseudo_label", "mixmatch", "fixmatch", "flexmatch")  # engine/semisup.py
THRESHOLD_OBJECTIVES = ("pseudo_label", "fixmatch", "flexmatch")  # train on confident pseudo-labels only
# Self-supervised pretexts (engine/pretext.py): they learn from images alone, their head learns the pretext
# (a run initialised from one re-initialises its head), so their 10-class test accuracy means nothing.
PRETEXT_OBJECTIVES = ("rotation",)
SECTIONS = ("run", "model", "data", "augment", "optim", "regularization", "evaluation", "semi", "distill",
            "speed")
# Where the form shows them: architecture in "model", what fights overfitting (weight decay, smoothing,
# clipping, EMA, and the models' own dropout / stochastic depth, see MODEL_PARAM_SECTIONS) in
# "regularization", how the optimizer moves the weights (lookahead included) in "optim", and how the
# model is evaluated (how often, test-time augmentation) in "evaluation".
SECTION_LABELS = {"run": "Run", "model": "Model", "data": "Data", "augment": "Augmentation",
                  "optim": "Optimizer", "regularization": "Regularization", "evaluation": "Evaluation",
                  "semi": "Few labels", "distill": "Distillation", "speed": "Speed"}
# Model parameters (model_params) that belong to another section than the model's architecture: they change
# no weight's shape, so a run may start from another run's weights with other values of them.
MODEL_PARAM_SECTIONS = {"dropout": "regularization", "drop_path": "regularization", "whiten_bias_epochs": "optim"}


def _p(section: str, param: Param, label: str, default=MISSING):
    """A scalar field: its section, its declared Param and its human label (the form's; the CLI
    flag stays the field name)."""
    meta = {"section": section, "param": param, "label": label}
    return field(default=param.default if default is MISSING else default, metadata=meta)


def _reg(section: str, registry: str, label: str, owner: str | None = None, factory=dict):
    """A dict/list field whose content is declared by a registry entry (named by `owner`)."""
    return field(default_factory=factory, metadata={"section": section, "registry": registry,
                                                    "owner": owner, "label": label})


@dataclass
class RunConfig:
    # run
    name: str = _p("run", Param("name", "str", "", help="A label for the run (not a path)."), "Run name")
    seed: int = _p("run", Param("seed", "int", 0, 0, 2**31 - 1), "Random seed")
    device: str = _p("run", Param("device", "choice", "auto", choices=("auto", "cpu", "cuda"),
                                  help="auto: CUDA if available, else CPU."), "Device")
    epochs: int = _p("run", Param("epochs", "int", 10, 1, 2000), "Epochs")
    time_limit_min: float = _p("run", Param("time_limit_min", "float", 0.0, 0.0, 100000.0,
                                            help="Stop after this many minutes (0 = no limit)."),
                               "Time limit (minutes)")
    log_every: int = _p("run", Param("log_every", "int", 10, 1, 100000,
                                     help="Write a training metric line every this many steps."),
                        "Log every … steps")
    eval_every: int = _p("evaluation", Param("eval_every", "int", 1, 1, 2000,  # up to the most epochs
                                             help="Evaluate every this many epochs."), "Evaluate every … epochs")
    # model
    model: str = _p("model", Param("model", "str", "resnet18"), "Model")
    model_params: dict = _reg("model", "model", "Model options", owner="model")
    # initial weights from a finished run (fine-tuning, linear probe, cRT: engine/init_from.py)
    init_run: str = _p("model", Param("init_run", "str", "",
                                      help="Start from the weights of a completed run in the same runs folder "
                                           "(the weights its test report measured: last checkpoint, else best); "
                                           "same model and model options. Empty: random initialisation."),
                       "Initialise from run (id)")
    init_mode: str = _p("model", Param(
        "init_mode", "choice", "finetune", choices=INIT_MODES,
        help="With an init run: finetune = load every weight and train them all; linear_probe = load every "
             "weight and train only the classifier head (the rest frozen, its BatchNorm statistics too); "
             "crt = classifier re-training (Kang et al. 2020, decoupling): load, re-initialise the head and "
             "train only it, best with class-balanced sampling and a few epochs."),
        "Initialisation mode")
    # data
    subset: str = _p("data", Param("subset", "choice", "full", choices=("full", "random", "per_class"),
                                   help="Which training images to use."), "Training images")
    subset_size: int = _p("data", Param("subset_size", "int", 10000, 10, 50000,
                                        help="Images for subset=random (the report used 10,000)."),
                          "Random subset size")
    per_class: int = _p("data", Param("per_class", "int", 1000, 1, 5000,
                                      help="Images per class for subset=per_class."), "Images per class")
    val_size: int = _p("data", Param("val_size", "int", 0, 0, 25000,
                                     help="Held out of training for validation (0: validate on test)."),
                       "Validation images")
    test_size: int = _p("data", Param("test_size", "int", 0, 0, 10000,
                                      help="Evaluate on a stratified subset of the test set (0 = all 10,000)."),
                        "Test images")
    imbalance: str = _p("data", Param("imbalance", "str", "none"), "Class imbalance")
    imbalance_params: dict = _reg("data", "imbalance", "Imbalance options", owner="imbalance")
    label_budget: int = _p("data", Param("label_budget", "int", 0, 0, 50000,
                                         help="Keep only this many labels (0 = all labeled)."),
                           "Labeled images")
    label_set: str = _p("data", Param("label_set", "str", "",
                                      help="LOOP/ROUND: train on exactly the labeled images of round ROUND of the "
                                           "active-learning loop LOOP (the label set it wrote in "
                                           "<runs>/.active/LOOP/round-ROUND.json, with their labels, a person's "
                                           "included); the rest of the training pool is unlabeled. Empty: "
                                           "label_budget decides."), "Active-learning label set (loop/round)")
    balance: str = _p("data", Param("balance", "str", "none"), "Balancing")
    balance_params: dict = _reg("data", "balance", "Balancing options", owner="balance")
    # augmentation chain: [{"name": ..., "params": {...}, "p": 0.5}, ...]
    augment: list = _reg("augment", "augment", "Augmentation chain", factory=lambda: [
        {"name": "random_crop", "params": {}, "p": 1.0}, {"name": "hflip", "params": {}, "p": 0.5}])
    alternating_flip: bool = _p("augment", Param(
        "alternating_flip", "bool", False,
        help="airbench's derandomized flip, in place of a random hflip step: each image gets one random "
             "flip state in the first epoch and the opposite state every odd epoch, so over any two "
             "epochs every image is seen once each way."), "Alternating flips")
    # optimization
    optimizer: str = _p("optim", Param(
        "optimizer", "choice", "sgd", choices=("sgd", "adam", "adamw", "muon"),
        help="sgd, adam, adamw: one rule for every weight. muon (airbench94_muon, CNNs only): Muon for the conv "
             "filters at muon_lr with muon_momentum (each filter bank's momentum, as an out_channels × in·k·k "
             "matrix, orthogonalized by a Newton–Schulz iteration; the bank renormalized first, which suits convs "
             "followed by a norm layer); the head, biases and norms take SGD as with sgd."),
        "Optimizer")
    lr: float = _p("optim", Param("lr", "float", 0.05, 1e-6, 10.0, log=True), "Learning rate")
    momentum: float = _p("optim", Param("momentum", "float", 0.9, 0.0, 0.999,
                                        help="SGD momentum (Adam: beta1)."), "Momentum")
    nesterov: bool = _p("optim", Param("nesterov", "bool", True), "Nesterov momentum")
    muon_lr: float = _p("optim", Param("muon_lr", "float", 0.24, 1e-4, 10.0, log=True,
                                       help="Optimizer muon: the conv filters' learning rate (the LR schedule "
                                            "scales it as it scales lr). A Muon step's size does not depend on "
                                            "the gradient's scale, so neither on the batch size nor on the loss's "
                                            "sum or mean (airbench94_muon: 0.24)."),
                        "Muon learning rate (conv filters)")
    muon_momentum: float = _p("optim", Param("muon_momentum", "float", 0.6, 0.0, 0.999,
                                             help="Optimizer muon: momentum of the conv filters' updates "
                                                  "(airbench94_muon: 0.6; momentum stays the SGD momentum of "
                                                  "the other parameters)."),
                              "Muon momentum (conv filters)")
    batch_size: int = _p("optim", Param("batch_size", "int", 128, 1, 8192), "Batch size")
    bias_lr_scale: float = _p("optim", Param("bias_lr_scale", "float", 1.0, 0.01, 256.0,
                                             help="LR multiplier for biases and norm parameters "
                                                  "(airbench trains BN biases 64× faster)."),
                              "LR scale of biases and norms")
    schedule: str = _p("optim", Param("schedule", "str", "cosine"), "LR schedule")
    schedule_params: dict = _reg("optim", "schedule", "Schedule options", owner="schedule")
    # regularization
    weight_decay: float = _p("regularization", Param("weight_decay", "float", 5e-4, 0.0, 1.0), "Weight decay")
    label_smoothing: float = _p("regularization", Param("label_smoothing", "float", 0.0, 0.0, 0.5),
                                "Label smoothing")
    grad_clip: str = _p("regularization", Param("grad_clip", "choice", "none",
                                                 choices=("none", "norm", "value")), "Gradient clipping")
    clip_max_norm: float = _p("regularization", Param("clip_max_norm", "float", 1.0, 1e-6, 1e6),
                              "Largest gradient norm")
    clip_norm_type: str = _p("regularization", Param("clip_norm_type", "choice", "2",
                                                     choices=("1", "2", "inf")), "Norm type (p)")
    clip_value: float = _p("regularization", Param("clip_value", "float", 1.0, 1e-6, 1e6),
                           "Largest gradient value")
    ema_decay: float = _p("regularization", Param("ema_decay", "float", 0.0, 0.0, 0.99999,
                                                  help="EMA of weights (0 = off); evaluated with EMA."),
                          "Weight EMA decay")
    lookahead_every: int = _p("optim", Param(
        "lookahead_every", "int", 0, 0, 1000,
        help="Lookahead (airbench94): every this many steps the slow weights move towards the trained "
             "weights and the trained weights restart from them (0 = off). Training ends on the slow "
             "weights."), "Lookahead every … steps")
    lookahead_decay: float = _p("optim", Param(
        "lookahead_decay", "float", 0.95, 0.0, 0.9999,
        help="Per-step decay of the lookahead average; the decay applied at an update is "
             "decay^every · progress³, so the average starts as a copy and grows slower to the end."),
        "Lookahead decay")
    tta_flip: bool = _p("evaluation", Param("tta_flip", "bool", False,
                                            help="Test-time flip: average logits of image and mirror."),
                        "Test-time flip")
    tta_translate: bool = _p("evaluation", Param("tta_translate", "bool", False,
                                                 help="Also average views shifted by one pixel "
                                                      "(with tta_flip: airbench's TTA level 2)."),
                             "Test-time 1-pixel shifts")
    tta_confident: float = _p("evaluation", Param(
        "tta_confident", "float", 0.0, 0.0, 1.0,
        help="Test-time views only where the model is unsure: an image whose plain view's top softmax "
             "probability reaches this keeps the plain view's logits, the others get the averaged views of "
             "tta_flip / tta_translate (0: every image gets them). Saves evaluation time when most images "
             "are easy; with label smoothing the top probability stays well below 1."),
        "Test-time views only below this confidence")
    # learning from few labels (engine/objectives.py)
    objective: str = _p("semi", Param("objective", "choice", "supervised", choices=OBJECTIVE_NAMES,
                                      help="What each step learns from: supervised = the labeled images only; "
                                           "pseudo_label, mixmatch, fixmatch, flexmatch = also the unlabeled "
                                           "pool label_budget leaves (semi-supervised); rotation = a "
                                           "self-supervised pretext on unlabeled images, whose encoder "
                                           "another run starts from (init_run)."), "Objective")
    ssl_threshold: float = _p("semi", Param(
        "ssl_threshold", "float", 0.95, 0.0, 1.0,
        help="pseudo_label, fixmatch, flexmatch: an unlabeled image is trained on only when the model's top "
             "probability on its weak view reaches this confidence τ (FixMatch: 0.95; flexmatch lowers it "
             "per class by how well the class is learned)."), "Confidence threshold (τ)")
    ssl_unlabeled_ratio: int = _p("semi", Param(
        "ssl_unlabeled_ratio", "int", 7, 1, 64,
        help="Unlabeled images drawn per step, as a multiple μ of the labeled batch (FixMatch: 7; the "
             "MixMatch paper: 1, and each of them is seen mixmatch_k times)."), "Unlabeled per labeled (μ)")
    ssl_weight: float = _p("semi", Param(
        "ssl_weight", "float", 1.0, 0.0, 100.0,
        help="pseudo_label, fixmatch, flexmatch: weight λ_u of the unlabeled loss (FixMatch: 1)."),
        "Unlabeled loss weight (λᵤ)")
    ssl_rampup: float = _p("semi", Param(
        "ssl_rampup", "float", 0.0, 0.0, 1.0,
        help="Share of training over which the unlabeled loss weight grows linearly from 0 to its value "
             "(0 = full weight from the first step; MixMatch ramps it up)."), "Unlabeled weight ramp-up")
    ssl_weak_pass: str = _p("semi", Param(
        "ssl_weak_pass", "choice", "joint", choices=("joint", "separate"),
        help="fixmatch, flexmatch: where the weak view's pseudo-labels come from. joint = one forward pass "
             "with the labeled batch and the strong view (FixMatch's: BatchNorm normalizes all three "
             "together, and the backward pass runs through the weak images too); separate = a forward "
             "pass of their own without gradients: about a third less compute a step, but BatchNorm then "
             "normalizes the weak images by their own statistics, and in a measured FlexMatch run their "
             "pseudo-labels were far worse (bench/README.md)."), "Weak view's forward pass")
    mixmatch_k: int = _p("semi", Param(
        "mixmatch_k", "int", 2, 1, 8,
        help="mixmatch: augmentations K of each unlabeled image whose predictions are averaged into its "
             "guessed label (MixMatch: 2)."), "Augmentations per unlabeled image (K)")
    mixmatch_temperature: float = _p("semi", Param(
        "mixmatch_temperature", "float", 0.5, 0.01, 1.0,
        help="mixmatch: sharpening temperature T of the guessed labels, p^(1/T) renormalized (1 = none)."),
        "Sharpening temperature (T)")
    mixmatch_alpha: float = _p("semi", Param(
        "mixmatch_alpha", "float", 0.75, 0.0, 4.0,
        help="mixmatch: MixUp weight λ ~ Beta(α, α), kept as max(λ, 1 − λ) so each mix stays closer to its "
             "own image (0 = no MixUp)."), "MixUp alpha (α)")
    mixmatch_weight: float = _p("semi", Param(
        "mixmatch_weight", "float", 75.0, 0.0, 1000.0,
        help="mixmatch: weight λ_u of the L2 loss between the predictions and the mixed guessed labels "
             "of the unlabeled part (a mean over images and classes, so it is small: the paper uses 75 "
             "on CIFAR-10)."), "MixMatch unlabeled weight (λᵤ)")
    # knowledge distillation from a finished run (DeiT-style)
    distill: str = _p("distill", Param("distill", "choice", "none", choices=("none", "hard", "soft"),
                                       help="Learn from a finished run's predictions too: hard = cross-entropy "
                                            "to the teacher's top class (DeiT), soft = KL divergence to its "
                                            "softened probabilities."), "Distillation")
    teacher_run: str = _p("distill", Param("teacher_run", "str", "",
                                           help="Run id of the teacher: a completed run in the same runs "
                                                "folder (its last checkpoint, else its best). Several ids "
                                                f"separated by commas (at most {MAX_TEACHERS}) teach as an "
                                                "ensemble: the mean of their logits."), "Teacher run id(s)")
    distill_alpha: float = _p("distill", Param("distill_alpha", "float", 0.5, 0.0, 1.0,
                                               help="Weight of the distillation loss; the true-label loss "
                                                    "gets 1 - alpha (0.5: DeiT's plain average)."),
                              "Distillation weight (alpha)")
    distill_temperature: float = _p("distill", Param("distill_temperature", "float", 3.0, 0.5, 20.0,
                                                     help="Softmax temperature T of soft distillation "
                                                          "(its loss is scaled by T²)."), "Temperature (T)")
    # speed
    precision: str = _p("speed", Param("precision", "choice", "fp32", choices=("fp32", "bf16", "fp16"),
                                       help="Autocast dtype with fp32 master weights. bf16 works on the CPU too (about "
                                            "twice as fast as fp32 on CPUs with AVX-512 BF16); fp16 needs CUDA "
                                            "(with device auto on a CPU it runs in fp32)."), "Precision")
    channels_last: bool = _p("speed", Param("channels_last", "bool", False), "Channels-last memory layout")
    # several processes (DistributedDataParallel under torchrun: engine/distributed.py)
    nproc: int = _p("speed", Param(
        "nproc", "int", 1, 1, MAX_NPROC,
        help="Processes on this machine, one per GPU (or CPU processes with the gloo backend), trained with "
             "DistributedDataParallel under torchrun. batch_size stays the global batch: each process takes "
             "batch_size / nproc images of every step's batch. A queued run takes nproc slots of its device."),
        "Processes (GPUs)")
    sync_bn: bool = _p("speed", Param(
        "sync_bn", "bool", False,
        help="With several processes: SyncBatchNorm, batch statistics over the whole global batch as one "
             "process would compute them, instead of each process's share (CUDA only)."),
        "Synchronized BatchNorm")
    max_restarts: int = _p("speed", Param(
        "max_restarts", "int", 0, 0, 100,
        help="With several processes: how often torchrun restarts all of them after one fails (a crash, a "
             "killed process); each restart resumes from the last checkpoint. 0: the first failure fails "
             "the run."), "Restarts after a failure")
    # data selection by a small proxy model (engine/selection.py)
    select_keep: float = _p("speed", Param(
        "select_keep", "float", 1.0, 0.05, 1.0,
        help="Below 1: each step trains on only this share of its batch, the images with the highest loss "
             "under a small proxy model (the run's network at select_proxy_width) that trains alongside, as "
             "airbench96_faster does (it keeps 512 of 1,024). A step then costs about this share of a full "
             "one, plus the proxy's. 1 = every image, no proxy."), "Train on the hardest share of each batch")
    select_proxy_width: float = _p("speed", Param(
        "select_proxy_width", "float", 0.25, 0.125, 1.0,
        help="With select_keep below 1: the proxy's width multiplier (its other model parameters are the "
             "run's); airbench96_faster's proxy is about a quarter of its network's width."),
        "Proxy model width")
    select_proxy_every: int = _p("speed", Param(
        "select_proxy_every", "int", 4, 1, 100,
        help="With select_keep below 1: the proxy ranks every batch but takes an optimizer step (on its own "
             "selection) only every this many steps (airbench96_faster: 4)."), "Proxy trains every … steps")

    # --- declarations -------------------------------------------------------------------------
    @classmethod
    def scalar_params(cls) -> dict[str, Param]:
        return {f.name: f.metadata["param"] for f in fields(cls) if "param" in f.metadata}

    @classmethod
    def labels(cls) -> dict[str, str]:
        """{field: its human label} for every field (the app's form; flags keep the field names)."""
        return {f.name: f.metadata["label"] for f in fields(cls)}

    @classmethod
    def sections(cls) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {s: [] for s in SECTIONS}
        for f in fields(cls):
            out[f.metadata["section"]].append(f.name)
        return out

    @staticmethod
    def applies(name: str, values: dict) -> bool:
        """Whether field `name` has an effect, given the other fields' values (a dict of at least the
        controlling field): subset_size only counts for subset=random, clip_value for grad_clip=value..."""
        rule = APPLIES_WHEN.get(name)
        return rule is None or values.get(rule[0]) in rule[1]

    @staticmethod
    def registries() -> dict[str, Registry]:
        """The registry behind each choice field: {"model": MODELS, "schedule": ..., "imbalance": ...,
        "balance": ...}; the field's options live in `<field>_params`."""
        from .data import IMBALANCE
        from .imbalance import BALANCING
        from .models import MODELS
        from .schedules import SCHEDULES
        return {"model": MODELS, "schedule": SCHEDULES, "imbalance": IMBALANCE, "balance": BALANCING}

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, validate: bool = True) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a JSON object, got {type(data).__name__}")
        reject_unknown(data, (f.name for f in fields(cls)), "", "config key(s)")
        cfg = cls(**data)
        return cfg.validated() if validate else cfg

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    # --- validation -----------------------------------------------------------------------------
    def validated(self) -> "RunConfig":
        """Return a copy with every value coerced and every registry's defaults filled in."""
        from .augment import validate_chain
        from .models import check_model

        values = {}
        for name, param in self.scalar_params().items():
            values[name] = param.validate(getattr(self, name))
        for key, registry in self.registries().items():
            registry.get(values[key])  # unknown name -> ConfigError listing the choices
            params = getattr(self, f"{key}_params")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise ConfigError(f"{key}_params must be an object of parameter values")
            values[f"{key}_params"] = registry.validate(values[key], params)
        values["model_params"] = check_model(values["model"], values["model_params"])
        values["augment"] = validate_chain(self.augment)
        self.check_cross_field(values)
        return RunConfig(**values)

    @staticmethod
    def check_cross_field(v: dict) -> None:
        """The rules between fields of a dict of validated scalar values; ConfigError for the first
        one broken."""
        if v["label_budget"] and v["label_budget"] % 10:
            raise ConfigError("label_budget must be a multiple of 10 (the same number per class)")
        if v["test_size"] % 10:
            raise ConfigError("test_size must be a multiple of 10 (the same number per class)")
        if v["label_set"]:
            parse_label_set(v["label_set"])
            if v["label_budget"]:
                raise ConfigError("label_set names the labeled images itself: set label_budget to 0")
        if v["subset"] == "random" and v["val_size"] >= v["subset_size"]:
            raise ConfigError(f"val_size {v['val_size']} leaves no training images out of "
                              f"subset_size {v['subset_size']}")
        if v["subset"] == "per_class" and v["val_size"] >= 10 * v["per_class"]:
            raise ConfigError(f"val_size {v['val_size']} leaves no training images out of "
                              f"{10 * v['per_class']} (per_class × 10)")
        if v["subset"] == "full" and v["val_size"] >= 50000:
            raise ConfigError("val_size must leave some of the 50,000 training images for training")
        if v["precision"] == "fp16" and v["device"] == "cpu":
            raise ConfigError("precision fp16 needs CUDA; use fp32 (or bf16) on the CPU")
        if v["alternating_flip"] and any(step.get("name") == "hflip" for step in v["augment"]):
            raise ConfigError("alternating_flip replaces random horizontal flips: remove the hflip step from "
                              "the augmentation chain (or turn alternating_flip off)")
        if v["teacher_run"]:
            check_teacher_ids(v["teacher_run"])
        if v["init_run"]:
            try:
                validate_id(v["init_run"], "run id")
            except ConfigError as exc:
                raise ConfigError(f"init_run: {exc}") from None
        if v["init_mode"] != "finetune" and not v["init_run"]:
            raise ConfigError(f"init_mode={v['init_mode']} needs an init_run: the id of a completed run in the same "
                              "runs folder whose weights to start from (choose one in the 'Initialise from a "
                              "finished run' list, or pass --init-run RUN_ID)")
        check_processes(v)
        check_muon(v)
        check_selection(v)
        check_label_budget(v)
        check_pretext(v)
        if v["distill"] != "none" and v["objective"] != "supervised":
            raise ConfigError(f"distill={v['distill']} trains with the supervised objective; objective "
                              f"{v['objective']} cannot be combined with distillation")
        if v["distill"] != "none" and not v["teacher_run"]:
            raise ConfigError(f"distill={v['distill']} needs a teacher_run: the id of a completed run in the "
                              "same runs folder (choose one or more in the 'Teacher run(s)' list, or pass "
                              "--teacher-run RUN_ID)")

    @classmethod
    def checked(cls, data: "dict | RunConfig") -> tuple["RunConfig | None", list[str]]:
        """(validated config, []) or (None, the problems a user must fix). Each part (every field, the
        registries' options, the model build, the augmentation chain, the cross-field rules) is checked
        on its own, so that independent problems are all reported at once."""
        if isinstance(data, RunConfig):
            data = data.to_dict()
        try:
            return cls.from_dict(data), []
        except ConfigError as exc:
            first = str(exc)
        except Exception as exc:  # a bug in a check must still read as a message
            return None, [f"{type(exc).__name__}: {exc}"]
        if not isinstance(data, dict):
            return None, [first]
        problems = cls._problems_by_part(data)
        if first not in problems:
            problems.insert(0, first)
        return None, problems

    @classmethod
    def problems(cls, data: "dict | RunConfig") -> list[str]:
        """Every user-facing problem of a config dict (or object); [] when it is valid."""
        return cls.checked(data)[1]

    @classmethod
    def _problems_by_part(cls, values: dict) -> list[str]:
        from .augment import validate_chain
        from .models import check_model

        values = {**RunConfig().to_dict(), **values}  # fields not given take their defaults, as in from_dict
        problems: list[str] = []

        def check(fn, *args):
            try:
                return fn(*args)
            except ConfigError as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
            except Exception as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
            return None

        declared = cls.scalar_params()
        scalars = {name: check(param.validate, values[name]) for name, param in declared.items()}
        for owner, registry in cls.registries().items():
            if scalars.get(owner) is None or check(registry.get, scalars[owner]) is None:
                continue
            params = check(registry.validate, scalars[owner], values.get(f"{owner}_params") or {})
            if owner == "model" and params is not None:
                check(check_model, scalars["model"], params)
        chain = check(validate_chain, values.get("augment", []))
        if all(v is not None for v in scalars.values()):
            check(cls.check_cross_field, {**scalars, "augment": chain or []})
        return problems

    # --- command line ---------------------------------------------------------------------------
    def to_flags(self) -> list[str]:
        """The `python -m cifar_core train` arguments that rebuild this config (the inverse of
        cli.config_from_args): a flag for every field that differs from the defaults (model and schedule
        always, for the reader), registry options only where they differ from the chosen entry's
        defaults."""
        mine = self.validated().to_dict()
        default = RunConfig().validated().to_dict()
        registries = self.registries()
        flags: list[str] = []
        for name, value in mine.items():
            flag = flag_name(name)
            if name.endswith("_params"):
                owner = name[:-len("_params")]
                base = json.loads(json.dumps(registries[owner].get(mine[owner]).defaults()))
                changed = {k: v for k, v in value.items() if base.get(k) != v}
                if changed:
                    flags += [flag, json.dumps(changed, separators=(",", ":"))]
            elif value == default[name] and name not in ALWAYS_FLAGGED:
                continue
            elif name == "augment":
                flags += [flag, json.dumps(value, separators=(",", ":")) if value else "none"]
            elif isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                text = str(value)  # str() of a float reads back exactly
                flags += [f"{flag}={text}"] if text.startswith("-") else [flag, text]  # not taken for a flag
        return flags

    def to_command(self, command: str = "train") -> str:
        """The shell line `python -m cifar_core <command> <to_flags()>`, quoted for a POSIX shell."""
        return shlex.join(["python", "-m", "cifar_core", command, *self.to_flags()])

    # --- summaries for tables -------------------------------------------------------------------
    def key_tricks(self) -> list[str]:
        """Short human labels of what is switched on, for run tables."""
        tricks = [step["name"] for step in self.augment]
        if self.weight_decay:
            tricks.append(f"wd={self.weight_decay:g}")
        if self.schedule != "none":
            tricks.append(self.schedule)
        if self.label_smoothing:
            tricks.append(f"ls={self.label_smoothing:g}")
        if self.grad_clip != "none":
            tricks.append(f"clip-{self.grad_clip}")
        if self.ema_decay:
            tricks.append("ema")
        if self.optimizer == "muon":
            tricks.append("muon")
        if self.lookahead_every:
            tricks.append("lookahead")
        if self.alternating_flip:
            tricks.append("alt-flip")
        if self.tta_flip:
            tricks.append("tta")
        if self.balance != "none":
            tricks.append(self.balance)
        if self.distill != "none":
            tricks.append(f"distill-{self.distill}")
        if self.init_run:
            tricks.append(f"init-{self.init_mode}")
        if self.sync_bn and self.nproc > 1:
            tricks.append("sync-bn")
        norm = self.model_params.get("norm")
        if norm and norm != "batch":
            tricks.append(f"norm={norm}")
        if self.model_params.get("dropout"):
            tricks.append(f"dropout={self.model_params['dropout']:g}")
        return tricks


# Fields that have an effect only for some values of another field: field -> (that field, its values)
APPLIES_WHEN = {
    "subset_size": ("subset", ("random",)),
    "per_class": ("subset", ("per_class",)),
    "clip_max_norm": ("grad_clip", ("norm",)),
    "clip_norm_type": ("grad_clip", ("norm",)),
    "clip_value": ("grad_clip", ("value",)),
    "nesterov": ("optimizer", ("sgd", "muon")),
    "muon_lr": ("optimizer", ("muon",)),
    "muon_momentum": ("optimizer", ("muon",)),
    "ssl_threshold": ("objective", THRESHOLD_OBJECTIVES),
    "ssl_unlabeled_ratio": ("objective", SEMI_SUPERVISED_OBJECTIVES),
    "ssl_weight": ("objective", THRESHOLD_OBJECTIVES),
    "ssl_rampup": ("objective", SEMI_SUPERVISED_OBJECTIVES),
    "ssl_weak_pass": ("objective", ("fixmatch", "flexmatch")),
    "mixmatch_k": ("objective", ("mixmatch",)),
    "mixmatch_temperature": ("objective", ("mixmatch",)),
    "mixmatch_alpha": ("objective", ("mixmatch",)),
    "mixmatch_weight": ("objective", ("mixmatch",)),
}
ALWAYS_FLAGGED = ("model", "schedule")


def parse_label_set(text: str) -> tuple[str, int]:
    """(loop id, round) of a label_set value "LOOP/ROUND"; ConfigError otherwise (the id becomes a folder
    name, the round a file name: nothing else gets in)."""
    loop_id, slash, round_text = text.partition("/")
    if not slash or not (round_text.isascii() and round_text.isdigit()) or len(round_text) > 6:
        raise ConfigError(f"label_set: expected LOOP/ROUND, an active-learning loop id and a round number "
                          f"(e.g. al-margin/3), got {text!r}")
    try:
        validate_id(loop_id, "active-learning loop id")
    except ConfigError as exc:
        raise ConfigError(f"label_set: {exc}") from None
    return loop_id, int(round_text)


def teacher_ids(teacher_run: str) -> list[str]:
    """The run ids `teacher_run` names: one, or several separated by commas (an ensemble teacher)."""
    return [part.strip() for part in teacher_run.split(",")] if teacher_run.strip() else []


def check_teacher_ids(teacher_run: str) -> None:
    """ConfigError unless `teacher_run` names 1 to MAX_TEACHERS distinct valid run ids."""
    ids = teacher_ids(teacher_run)
    for run_id in ids:
        try:
            validate_id(run_id, "run id")
        except ConfigError as exc:
            raise ConfigError(f"teacher_run: {exc}") from None
    repeated = sorted({run_id for run_id in ids if ids.count(run_id) > 1})
    if repeated:
        raise ConfigError(f"teacher_run names {', '.join(repeated)} more than once: list each run of an "
                          "ensemble teacher once")
    if len(ids) > MAX_TEACHERS:
        raise ConfigError(f"teacher_run names {len(ids)} runs: an ensemble teacher has at most {MAX_TEACHERS} "
                          "(each one's forward pass runs at every training step)")


def check_processes(v: dict) -> None:
    """The rules of a run in several processes: the global batch splits evenly over them; SyncBatchNorm
    needs CUDA."""
    nproc, batch = v["nproc"], v["batch_size"]
    if nproc == 1:
        return
    if batch < nproc:
        raise ConfigError(f"batch_size {batch} leaves some of the {nproc} processes without images: batch_size is "
                          f"the global batch, split over the processes (use at least {nproc})")
    if batch % nproc:
        lower, upper = batch - batch % nproc, batch - batch % nproc + nproc
        raise ConfigError(f"batch_size {batch} does not split evenly over {nproc} processes: batch_size is the "
                          f"global batch and each process takes batch_size / nproc images (use a multiple of "
                          f"{nproc}, such as {lower} or {upper})")
    if v["sync_bn"] and v["device"] == "cpu":
        raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm synchronizes GPU tensors only (on the CPU, "
                          "turn it off: each process then normalizes with its own share of the batch)")


def training_pool_size(v: dict) -> int:
    """Training images the split leaves before imbalance and the label budget (pool minus validation)."""
    pool = {"full": 50000, "random": v["subset_size"], "per_class": 10 * v["per_class"]}[v["subset"]]
    return pool - v["val_size"]


def check_label_budget(v: dict) -> None:
    """A semi-supervised objective learns from the images label_budget leaves unlabeled: it needs some."""
    if v["objective"] in SEMI_SUPERVISED_OBJECTIVES and v["nproc"] > 1:
        # every rank would draw the same unlabeled images, and a rank whose batch has no confident image
        # has no pseudo-label accuracy to add to the others' sum
        raise ConfigError(f"objective {v['objective']} trains in one process for now: set nproc to 1")
    if v["objective"] not in SEMI_SUPERVISED_OBJECTIVES or v.get("label_set"):
        return  # an active-learning label set labels some of the pool, the rest stays unlabeled
    pool = training_pool_size(v)
    if not v["label_budget"]:
        raise ConfigError(f"objective {v['objective']} learns from unlabeled images too, and label_budget 0 labels "
                          "every training image: set --label-budget to the number of labeled images to keep "
                          "(e.g. 250 or 4000; the rest become the unlabeled pool)")
    if v["label_budget"] >= pool:
        raise ConfigError(f"objective {v['objective']} needs unlabeled images, but label_budget "
                          f"{v['label_budget']} labels all {pool} training images: set --label-budget below "
                          f"{pool} (e.g. 250 or 4000 of the full training set)")


def check_pretext(v: dict) -> None:
    """A pretext objective ignores labels and its head does not classify: options that use labels or test
    the classifier are refused, and so are augmentations that make a rotation ambiguous (a flip upside down
    is a 180° turn of the mirror image; a random rotation of 45° or more reaches the next quarter turn; a
    blend of two images has two orientations)."""
    objective = v["objective"]
    if objective not in PRETEXT_OBJECTIVES:
        return
    if v["tta_flip"] or v["tta_translate"]:
        raise ConfigError(f"objective {objective} is a self-supervised pretext: its 10-class test predictions "
                          "mean nothing, so test-time augmentation only costs time: turn tta_flip and "
                          "tta_translate off")
    if v["balance"] != "none":
        raise ConfigError(f"objective {objective} ignores the labels, so balancing the classes "
                          f"(balance={v['balance']}) has nothing to balance: set balance to none")
    from .augment import AUGMENTATIONS

    for step in v["augment"]:
        name = step.get("name")
        entry = AUGMENTATIONS.entries.get(name)
        ambiguous = (name == "vflip" or (entry is not None and "mix" in entry.tags)
                     or (name == "rotation" and (step.get("params") or {}).get("degrees", 0) >= 45))
        if ambiguous:
            raise ConfigError(f"objective {objective} learns which way up an image is, and the augmentation "
                              f"step {name} makes that ambiguous (an upside-down flip is a 180° turn of the "
                              "mirror image, a random rotation of 45° or more reaches the next quarter turn, "
                              "a mix of two images has two orientations): remove it from the chain")


def check_muon(v: dict) -> None:
    """Optimizer muon orthogonalizes conv filters only: on a transformer (a patch or tokenizer conv, and
    every matrix of its blocks on SGD) it would not be Muon."""
    from .models import MODELS

    entry = MODELS.entries.get(v["model"])  # an unknown model is reported on its own
    if v["optimizer"] != "muon" or entry is None or "cnn" in entry.tags:
        return
    raise ConfigError(f"optimizer muon orthogonalizes the updates of conv filters, and {v['model']} is not a "
                      "convolutional network (its blocks' weights are matrices, which would all take SGD): "
                      "choose a CNN (fastnet, resnet18, ...) or another optimizer (sgd, adamw)")


def check_selection(v: dict) -> None:
    """Data selection by a proxy model (select_keep below 1) ranks the supervised batch in one process,
    with a narrower copy of the run's model: the model needs a width parameter that takes the proxy's."""
    if v["select_keep"] >= 1.0:
        return
    keep = v["select_keep"]
    if v["objective"] != "supervised" or v["distill"] != "none":
        raise ConfigError(f"select_keep {keep} (data selection by a proxy model) ranks the labeled batch of the "
                          "supervised objective: set objective to supervised and distill to none, or "
                          "select_keep to 1")
    if v["nproc"] > 1:
        raise ConfigError(f"select_keep {keep} (data selection by a proxy model) trains in one process for now "
                          "(each process would rank only its own share of the batch): set nproc to 1")
    from .models import MODELS

    entry = MODELS.entries.get(v["model"])  # an unknown model is reported on its own
    if entry is None:
        return
    if not any(p.name == "width" for p in entry.params):
        widened = ", ".join(name for name, e in MODELS.entries.items() if any(p.name == "width" for p in e.params))
        raise ConfigError(f"select_keep {keep} trains a narrower copy of the model as its proxy, and "
                          f"{v['model']} has no width parameter: choose a model that has one ({widened}) or "
                          "set select_keep to 1")
    try:
        MODELS.validate(v["model"], {**(v["model_params"] or {}), "width": v["select_proxy_width"]})
    except ConfigError as exc:
        raise ConfigError(f"select_proxy_width {v['select_proxy_width']}: {exc}") from None


def flag_name(field_name: str) -> str:
    """The command-line flag of a RunConfig field: lr -> --lr, model_params -> --model-params."""
    return "--" + field_name.replace("_", "-")


def config_diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two config dicts (nested keys joined by dots)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        path = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(config_diff(va, vb, path + "."))
        elif va != vb:
            out[path] = (va, vb)
    return out


def config_value(config: dict, dotted: str) -> Any:
    """The value at a config_diff key ("model_params.norm") of a config dict; None where there is none."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---- text forms of the registry-backed fields (CLI flags, links, the app's text boxes) ----------

def parse_kv(text: str) -> dict:
    """'a=1,b=x' or a JSON object -> dict (values parsed as JSON when they can be)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {text!r} ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"expected a JSON object, got {text!r}")
        return value
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_scalar(raw.strip())
    return out


def parse_scalar(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_augment(text: str) -> list[dict]:
    """JSON list, or 'random_crop:padding=4,pad_mode=zero;hflip;cutout:size=8@0.5' ('@p' = probability;
    without it a step gets its own default, 1 for most, 0.5 for the flips); 'none' or '' for no
    augmentation."""
    text = text.strip()
    if text in ("", "none"):
        return []
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"augment is not valid JSON: {exc}") from None
    chain = []
    for part in text.split(";"):
        part = part.strip()
        step: dict = {}
        if "@" in part:
            part, p_text = part.rsplit("@", 1)
            step["p"] = parse_scalar(p_text)
        name, _, params = part.partition(":")
        chain.append({"name": name.strip(), "params": parse_kv(params), **step})
    return chain


def parse_chain(text: str) -> list[dict]:
    """An augmentation chain in either text form (see parse_augment), validated: ConfigError otherwise."""
    from .augment import validate_chain
    return validate_chain(parse_augment(text))
