from __future__ import annotations

import pytest

from visrec.config import Config, list_presets, load_preset, parse_override, resolve_config
from visrec.errors import VisrecError


def test_default_preset_spells_out_the_defaults():
    # The shipped default.yaml documents the dataclass defaults; they must not drift apart.
    assert resolve_config("default").to_dict() == Config().to_dict()


def test_every_preset_resolves():
    names = list_presets()
    assert {"default", "quick", "linear", "svm", "mlp", "lenet5", "resnet20"} <= set(names)
    for name in names:
        resolve_config(name)


def test_layers_apply_in_order():
    cfg = resolve_config("quick", ["train.epochs=5", "optim.lr=0.05", "data.augment=hflip,crop:2"])
    assert cfg.train.epochs == 5
    assert cfg.optim.lr == 0.05
    assert cfg.data.augment == ["hflip", "crop:2"]


def test_values_are_typed():
    cfg = resolve_config(None, {"train.epochs": 3.0, "optim.lr": 1, "data.subset": "none", "data.download": "false"})
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.subset is None
    assert cfg.data.download is False
    assert parse_override("optim.betas=[0.8, 0.9]") == ("optim.betas", [0.8, 0.9])


def test_nested_model_kwargs():
    cfg = resolve_config(None, ["model.kwargs.widths=[8,16,32]"])
    assert cfg.model.kwargs == {"widths": [8, 16, 32]}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=0.1", "unknown key of section 'optim' 'lrr'"),
        ("optimizer.lr=0.1", "unknown config section 'optimizer'"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("train.epochs=abc", "train.epochs must be an integer"),
        ("optim.lr", "not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, expected):
    with pytest.raises(VisrecError) as e:
        resolve_config(None, [override])
    assert expected in str(e.value)


def test_unknown_key_lists_valid_ones_and_suggests():
    with pytest.raises(VisrecError) as e:
        resolve_config(None, ["optim.lrr=0.1"])
    assert "weight_decay" in str(e.value) and "did you mean 'lr'" in str(e.value)


@pytest.mark.parametrize("given,hint", [("optim.learning_rate=0.1", "did you mean optim.lr?"),
                                        ("optim.wd=0.1", "did you mean optim.weight_decay?"),
                                        ("train.bs=8", "did you mean train.batch_size?"),
                                        ("data.batch=8", "did you mean train.batch_size or eval.batch_size?"),
                                        ("optim.epochs=3", "did you mean train.epochs?"),
                                        ("learning_rate=0.1", "did you mean optim.lr?")])
def test_other_tools_names_for_a_key_are_suggested_never_applied(given, hint):
    with pytest.raises(VisrecError) as e:
        resolve_config(None, [given])
    assert hint in str(e.value)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(VisrecError, match="unknown preset 'fastest'.*default"):
        load_preset("fastest")
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  epochs: 7\n")
    assert resolve_config(str(p)).train.epochs == 7
    p.write_text("train:\n  epoch: 7\n")
    with pytest.raises(VisrecError, match="mine.yaml"):
        resolve_config(str(p))


def test_round_trip_through_dict():
    cfg = resolve_config("mlp", ["train.seed=3"])
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    keys = Config().keys()
    assert "optim.lr" in keys and "loss.label_smoothing" in keys


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.select=bst", "train.select='bst' is not one of its values: last, best"),
        ("optim.name=adm", "did you mean 'adam'"),
        ("model.channels_last=sometimes", "auto, on, off"),
        ("train.epochs=0", "train.epochs=0 must be >= 1"),
        ("average.ema=1", "average.ema=1.0 must be >= 0 and < 1"),
        ("device.name=gpu", "use auto, cpu, cuda, cuda:N or mps"),
        ("optim.betas=[0.9,1.5]", "must be >= 0 and < 1"),
        ("data.channels=2", "1, 3"),
    ],
)
def test_choices_and_ranges_fail_where_parsed(override, expected):
    with pytest.raises(VisrecError) as e:
        resolve_config(None, [override])
    assert expected in str(e.value)


def test_yaml_on_off_reads_as_a_choice():
    assert resolve_config(None, ["model.channels_last=off"]).model.channels_last == "off"


def test_directly_set_attributes_are_checked_before_training():
    from visrec.config import validate
    from visrec.training.setup import check_config

    cfg = Config()
    validate(cfg)
    cfg.train.select = "bst"
    with pytest.raises(VisrecError, match="train.select"):
        check_config(cfg)


def test_old_train_keys_still_load():
    # Run folders and presets written before the train section was split by concern.
    old = {"train": {"epochs": 2, "device": "cpu", "precision": "fp32", "threads": 1, "ema": 0.9, "swa": 0.25,
                     "swa_lr": 0.1, "swa_every": 3, "log_every": 7, "report": False, "histograms": 0},
           "model": {"kwargs": {"pretrained": True, "drop_rate": 0.1}}}
    cfg = Config.from_dict(old)
    assert (cfg.device.name, cfg.device.precision, cfg.device.threads) == ("cpu", "fp32", 1)
    assert (cfg.average.ema, cfg.average.swa, cfg.average.swa_lr, cfg.average.swa_every) == (0.9, 0.25, 0.1, 3)
    assert (cfg.log.every, cfg.log.report, cfg.log.histograms) == (7, False, 0)
    assert cfg.model.pretrained is True and cfg.model.kwargs == {"drop_rate": 0.1}
    assert resolve_config(None, ["train.ema=0.5", "model.kwargs.pretrained=true"]).average.ema == 0.5
    every = Config().keys()
    assert "train.ema" not in every and "average.ema" in every


def test_choices_match_the_registries_that_act_on_them():
    from visrec.config import choices
    from visrec.device import PRECISIONS
    from visrec.evaluate import TTA_MODES
    from visrec.training.finetune import STRATEGIES
    from visrec.training.losses import LOSSES
    from visrec.training.optim import OPTIMIZERS
    from visrec.training.schedules import SCHEDULES

    assert set(choices("optim.name")) == set(OPTIMIZERS)
    assert set(choices("schedule.name")) == set(SCHEDULES)
    assert set(choices("loss.name")) == set(LOSSES)
    assert set(choices("finetune.strategy")) == set(STRATEGIES)
    assert set(choices("device.precision")) == set(PRECISIONS)
    assert set(choices("eval.tta")) == {"auto", *TTA_MODES}
    assert choices("train.precision") == choices("device.precision")


def test_pretrained_is_a_key_and_refused_for_built_in_models():
    from visrec.models import create_model

    with pytest.raises(VisrecError, match="model.pretrained=true: 'convnet' has no published pretrained weights"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=28, pretrained=True)


def test_an_explicit_epoch_count_replaces_a_presets_time_budget():
    from visrec.config import parse_duration, resolve_config

    assert resolve_config("fmnist-best").train.time_budget == "55m"
    assert parse_duration(resolve_config("fmnist-best").train.time_budget) == 3300.0
    assert resolve_config("fmnist-best", options={"train.epochs": 3}).train.time_budget == ""
    assert resolve_config("fmnist-best", ["train.epochs=3"]).train.time_budget == ""
    kept = resolve_config("fmnist-best", ["train.epochs=3", "train.time_budget=2m"])
    assert (kept.train.epochs, kept.train.time_budget) == (3, "2m")


def test_anchored_makes_existing_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "net.py").write_text("")
    (tmp_path / "teacher").mkdir()
    cfg = Config()
    cfg.data.name, cfg.data.data_dir, cfg.model.name = "folder:photos", "photos", "net.py:build"
    cfg.distill.teachers = ["teacher:best", "teacher", "gone:last"]
    a = cfg.anchored()
    assert a.data.name == f"folder:{tmp_path / 'photos'}" and a.data.data_dir == str(tmp_path / "photos")
    assert a.model.name == f"{tmp_path / 'net.py'}:build"
    assert a.distill.teachers == [f"{tmp_path / 'teacher'}:best", str(tmp_path / "teacher"), "gone:last"]
    assert cfg.data.name == "folder:photos"  # a copy: the config itself is unchanged
    for name in ("fashion-mnist", "synthetic:classes=3", "folder:missing"):  # no path, or none that exists
        cfg.data.name = name
        assert cfg.anchored().data.name == name
    assert cfg.anchored().task.options == {} and Config().anchored().model.name == "convnet"
    cfg.task.options = {"style": "net.py", "style_net": "random_vgg", "other": "vgg16:net.py"}  # a task's files too
    assert cfg.anchored().task.options == {"style": str(tmp_path / "net.py"), "style_net": "random_vgg",
                                           "other": f"vgg16:{tmp_path / 'net.py'}"}


def test_a_run_folder_written_before_tasks_declared_their_options_still_loads():
    old = Config().to_dict()
    old["task"] = {"name": "localization", "box_loss": "giou", "box_weight": 2.0, "per_class_boxes": False,
                   "seg_loss": "ce", "ignore_index": 255, "min_word_count": 1, "beam": 1, "attention_reg": 1.0,
                   "style": "", "style_net": "random_vgg", "style_size": 0, "content_weight": 1.0,
                   "style_weight": 5.0, "tv_weight": 1.0}  # the one flat task section of older versions
    cfg = Config.from_dict(old, "config.yaml")
    assert cfg.task.options == {"box_loss": "giou", "box_weight": 2.0, "per_class_boxes": False}
    old["task"]["not_an_option"] = 1
    with pytest.raises(VisrecError, match="not_an_option"):
        Config.from_dict(old, "config.yaml")
