from __future__ import annotations

import math

import pytest
import torch

from visrec.config import LossConfig
from visrec.data.augment import MixedTargets
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.training.losses import build_loss


def zero_linear(classes=10):
    m = create_model("linear", in_chans=1, num_classes=classes, image_size=28)
    torch.nn.init.zeros_(m.head.weight)
    torch.nn.init.zeros_(m.head.bias)
    return m


@pytest.mark.parametrize("classes", [3, 10, 100])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_of_zero_weights_is_ln_c(classes, smoothing):
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, classes, (32,))
    loss = build_loss(LossConfig("cross_entropy", label_smoothing=smoothing))(zero_linear(classes)(x), y)
    assert loss.item() == pytest.approx(math.log(classes), abs=1e-6)


@pytest.mark.parametrize("classes", [3, 10])
def test_hinge_loss_of_zero_weights_is_c_minus_1(classes):
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, classes, (16,))
    loss = build_loss(LossConfig("hinge", margin=1.0))(zero_linear(classes)(x), y)
    assert loss.item() == pytest.approx(classes - 1, abs=1e-6)


def test_hinge_by_hand():
    # The course's example: scores for cat/car/frog with the correct class cat (index 0).
    scores = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    labels = torch.tensor([0, 1, 2])
    loss = build_loss(LossConfig("hinge", margin=1.0))(scores, labels)
    # max(0,5.1-3.2+1)+max(0,-1.7-3.2+1)=2.9; 0; max(0,2.2+3.1+1)+max(0,2.5+3.1+1)=12.9
    assert loss.item() == pytest.approx((2.9 + 0.0 + 12.9) / 3, abs=1e-5)


def test_cross_entropy_by_hand_with_smoothing():
    scores = torch.tensor([[2.0, 1.0, 0.1]])
    labels = torch.tensor([0])
    logp = torch.log_softmax(scores, 1)[0]
    e = 0.1
    expected = -((1 - e) * logp[0] + e * logp.mean())
    got = build_loss(LossConfig("cross_entropy", label_smoothing=e))(scores, labels)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_mixed_targets_weight_the_two_losses():
    scores = torch.randn(8, 5)
    a, b = torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    for name in ("cross_entropy", "hinge"):
        f = build_loss(LossConfig(name, label_smoothing=0.0))
        mixed = f(scores, MixedTargets(a, b, 0.3))
        assert mixed.item() == pytest.approx(0.3 * f(scores, a).item() + 0.7 * f(scores, b).item(), rel=1e-6)


def test_bad_loss_settings():
    with pytest.raises(VisrecError, match="unknown loss 'l2'"):
        build_loss(LossConfig("l2"))
    with pytest.raises(VisrecError, match="label_smoothing"):
        build_loss(LossConfig("cross_entropy", label_smoothing=1.5))
