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
