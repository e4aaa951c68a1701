import json
import shlex

import pytest

from cifar_core.cli import build_parser, config_from_args
from cifar_core.config import parse_augment, parse_kv
from cifar_core.config import RunConfig, config_diff
from cifar_core.params import ConfigError, Param


def test_defaults_validate_and_fill_registry_params():
    cfg = RunConfig().validated()
    assert cfg.model == "resnet18"
    assert cfg.model_params["norm"] == "batch"          # filled from the model declaration
    assert "warmup_epochs" in cfg.schedule_params        # filled from the schedule declaration
    assert [s["name"] for s in cfg.augment] == ["random_crop", "hflip"]
    assert all("params" in s and "p" in s for s in cfg.augment)


def test_json_round_trip_is_identity():
    cfg = RunConfig(model="resnet34", model_params={"norm": "group", "groups": 16}, lr=0.1,
                    schedule="inverse_time", schedule_params={"decay_rate": 0.5},
                    augment=[{"name": "cutout", "params": {"size": 10}, "p": 0.5}]).validated()
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


@pytest.mark.parametrize("changes, fragment", [
    ({"lr": -1}, "lr: -1.0 is below the minimum"),
    ({"epochs": 2.5}, "epochs: expected a whole number"),
    ({"optimizer": "rmsprop"}, "optimizer: 'rmsprop' is not one of"),
    ({"model": "vgg99"}, "unknown model 'vgg99'"),
    ({"schedule": "warp"}, "unknown LR schedule 'warp'"),
    ({"model_params": {"norm": "group", "groups": 24}}, "groups"),
    ({"model_params": {"dropout": 1.5}}, "dropout"),
    ({"model_params": {"depth": 3}}, "unknown parameter(s) depth"),
    ({"augment": [{"name": "rotation", "params": {"degrees": 400}}]}, "degrees"),
    ({"augment": [{"name": "teleport"}]}, "teleport"),
    ({"label_budget": 255}, "multiple of 10"),
    ({"subset": "random", "subset_size": 1000, "val_size": 1000}, "leaves no training images"),
    ({"lr": float("nan")}, "finite"),
    ({"nesterov": "maybe"}, "expected true or false"),
    ({"imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 0}}, "imbalance_ratio"),
    ({"balance": "no_such_strategy"}, "unknown balancing strategy"),
])
def test_invalid_values_raise_clear_errors(changes, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes).validated()
    assert fragment in str(err.value)


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{nope")


def test_param_coercion():
    assert Param("x", "int", 1, 0, 10).validate("7") == 7
    assert Param("x", "float", 1.0).validate("0.5") == 0.5
    assert Param("x", "bool", False).validate("true") is True
    assert Param("x", "float_pair", (0, 1), 0, 1).validate([0.2, 0.4]) == (0.2, 0.4)
    with pytest.raises(ConfigError):
        Param("x", "float_pair", (0, 1), 0, 1).validate([0.6, 0.4])
    with pytest.raises(ConfigError):
        Param("x", "int", 1).validate(True)


def test_cli_flags_mirror_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "resnet18", "--model-params", "norm=group,groups=32",
                              "--lr", "0.2", "--no-nesterov", "--augment", "random_crop:padding=2;hflip@0.5",
                              "--schedule", "step", "--schedule-params", '{"step_epochs": 5}'])
    cfg = config_from_args(args)
    assert cfg.lr == 0.2 and cfg.nesterov is False
    assert cfg.model_params["norm"] == "group"
    assert cfg.augment[0]["params"]["padding"] == 2 and cfg.augment[1]["p"] == 0.5
    assert cfg.schedule_params == {"step_epochs": 5, "gamma": 0.1}
    # every scalar config field has a flag
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["train"]._actions}
    assert set(RunConfig.scalar_params()) <= flags


def test_cli_config_file_overridden_by_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(RunConfig(lr=0.3, epochs=3).validated().to_json())
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "5"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.3 and cfg.epochs == 5


def test_cli_preset_then_config_then_flags(tmp_path):
    from cifar_core.experiments.presets import preset
    args = build_parser().parse_args(["train", "--preset", "fast", "--epochs", "16"])
    cfg = config_from_args(args)
    assert cfg.to_dict() == RunConfig.from_dict({**preset("fast"), "epochs": 16}).to_dict()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5}))
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--config", str(path)]))
    assert cfg.lr == 0.5 and cfg.batch_size == preset("fast")["batch_size"]
    with pytest.raises(ConfigError, match="unknown preset"):
        config_from_args(build_parser().parse_args(["train", "--preset", "nope"]))


def test_parse_helpers():
    assert parse_kv("a=1,b=x,c=true") == {"a": 1, "b": "x", "c": True}
    assert parse_augment("none") == []
    with pytest.raises(ConfigError):
        parse_kv("a")


def test_config_diff_only_differing_keys():
    a = RunConfig().validated().to_dict()
    b = RunConfig(lr=0.1, model_params={"norm": "group"}).validated().to_dict()
    diff = config_diff(a, b)
    assert set(diff) == {"lr", "model_params.norm"}


def _round_trip_configs() -> list[RunConfig]:
    from cifar_core.experiments.presets import DISTILLED_PRESETS, presets
    out = [RunConfig.from_dict({**p, "teacher_run": "teacher-1"} if name in DISTILLED_PRESETS else p)
           for name, p in presets().items()]
    out += [RunConfig().validated(),
            RunConfig(name="-a name with 'quotes' and spaces", nesterov=False, augment=[], lr=1e-5,
                      model="lenet", model_params={"activation": "tanh"}, grad_clip="norm",
                      clip_norm_type="inf", alternating_flip=True).validated(),
            RunConfig(model="resnet34", model_params={"norm": "group", "groups": 16}, schedule="step",
                      schedule_params={"step_epochs": 3}, subset="per_class", per_class=50, val_size=20,
                      imbalance="long_tail", imbalance_params={"imbalance_ratio": 10.0},
                      balance="random_oversample", precision="bf16", channels_last=True,
                      augment=[{"name": "cutout", "params": {"size": 6}, "p": 0.5},
                               {"name": "random_resized_crop", "params": {"scale": [0.3, 1.0]}}]).validated()]
    return out


@pytest.mark.parametrize("cfg", _round_trip_configs(), ids=lambda c: c.name or c.model)
def test_to_flags_round_trips_through_the_cli_parser(cfg):
    args = build_parser().parse_args(["train", *cfg.to_flags()])
    assert config_from_args(args).to_dict() == cfg.to_dict()
    assert shlex.split(cfg.to_command()) == ["python", "-m", "cifar_core", "train", *cfg.to_flags()]


def test_to_flags_lists_only_what_differs():
    assert RunConfig().to_flags() == ["--model", "resnet18", "--schedule", "cosine"]
    flags = RunConfig(lr=0.1, nesterov=False, model_params={"norm": "group"}).to_flags()
    assert flags == ["--model", "resnet18", "--model-params", '{"norm":"group"}', "--lr", "0.1", "--no-nesterov",
                     "--schedule", "cosine"]


def test_problems_reports_every_independent_problem():
    assert RunConfig.problems(RunConfig().to_dict()) == []
    problems = RunConfig.problems({"lr": -1, "epochs": 0, "model_params": {"norm": "group", "groups": 24},
                                   "augment": [{"name": "teleport"}]})
    assert len(problems) == 4, problems
    assert any("lr: -1.0 is below the minimum" in p for p in problems)
    assert any("epochs: 0 is below the minimum" in p for p in problems)
    assert any("groups=24" in p for p in problems)
    assert any("teleport" in p for p in problems)
    # cross-field rules see the augmentation chain too
    assert any("alternating_flip replaces" in p for p in RunConfig.problems({"alternating_flip": True}))
    cfg, problems = RunConfig.checked({"model": "lenet", "epochs": 3})
    assert problems == [] and cfg.model == "lenet" and cfg.model_params["activation"] == "relu"
    assert RunConfig.checked({"learning_rate": 0.1})[0] is None
    assert "unknown config key" in RunConfig.problems({"learning_rate": 0.1})[0]


def test_every_field_has_a_human_label_and_the_flags_keep_the_names():
    from dataclasses import fields

    labels = RunConfig.labels()
    assert set(labels) == {f.name for f in fields(RunConfig)}
    for name, label in labels.items():
        assert label and "_" not in label and label != name, (name, label)
    assert labels["time_limit_min"] == "Time limit (minutes)"
    assert labels["bias_lr_scale"] == "LR scale of biases and norms"
    # the command line is unchanged: flags are the field names
    args = build_parser().parse_args(["train", "--time-limit-min", "3", "--bias-lr-scale", "2"])
    cfg = config_from_args(args)
    assert cfg.time_limit_min == 3.0 and cfg.bias_lr_scale == 2.0


def test_sections_group_regularizers_optimizer_and_evaluation():
    from cifar_core.config import MODEL_PARAM_SECTIONS

    sections = RunConfig.sections()
    assert {"tta_flip", "tta_translate", "eval_every"} <= set(sections["evaluation"])
    assert {"lookahead_every", "lookahead_decay"} <= set(sections["optim"])
    assert not {"tta_flip", "lookahead_every"} & set(sections["regularization"])
    assert MODEL_PARAM_SECTIONS["dropout"] == "regularization"  # a model's dropout sits with the regularizers


def test_older_config_with_a_flip_probability_still_loads():
    old = {"augment": [{"name": "random_crop", "params": {"padding": 4, "pad_mode": "reflect"}, "p": 1.0},
                       {"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}]}
    cfg = RunConfig.from_dict(old)
    assert cfg.augment[1] == {"name": "hflip", "params": {}, "p": 0.5}
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # the text form: a flip without '@p' flips half of the images, as before
    assert RunConfig.from_dict({"augment": parse_augment("random_crop;hflip")}).augment[1]["p"] == 0.5
    assert RunConfig.from_dict({"augment": parse_augment("hflip@0.2")}).augment[0]["p"] == 0.2
    assert RunConfig().validated().augment[1] == {"name": "hflip", "params": {}, "p": 0.5}


def test_distillation_without_a_teacher_points_to_the_control_not_a_page():
    problems = RunConfig.problems({"distill": "hard"})
    message = next(m for m in problems if "needs a teacher_run" in m)
    assert "Train page" not in message and "on the" not in message
    assert "'Teacher run(s)'" in message and "--teacher-run RUN_ID" in message


def test_every_preset_has_a_summary_and_no_summary_is_stale():
    from cifar_core.experiments.presets import PRESET_SUMMARIES, ablation_presets, preset_summary, presets
    named = set(presets()) - set(ablation_presets())
    assert set(PRESET_SUMMARIES) == named  # a new preset needs its line; a renamed one loses the old line
    summaries = [preset_summary(name) for name in presets()]
    assert all(len(s) > 30 for s in summaries)
    assert len({preset_summary(name) for name in ablation_presets()}) == len(ablation_presets())
