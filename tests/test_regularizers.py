"""DropConnect (`model.kwargs.dropconnect`): weights, not activations, dropped in training only."""

from __future__ import annotations

import pytest
import torch

import visrec
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.models.layers import DropConnectLinear


def test_dropconnect_drops_weights_in_training_only():
    torch.manual_seed(0)
    plain = create_model("mlp", in_chans=1, num_classes=4, image_size=8)
    torch.manual_seed(0)
    dc = create_model("mlp", in_chans=1, num_classes=4, image_size=8, dropconnect=0.5)
    layers = [m for m in dc.modules() if isinstance(m, DropConnectLinear)]
    assert layers and all(m.p == 0.5 for m in layers)
    assert plain.state_dict().keys() == dc.state_dict().keys()  # checkpoints and exports are unchanged
    x = torch.randn(64, 1, 8, 8)
    dc.eval()
    plain.eval()
    assert torch.equal(dc(x), plain(x))  # eval: the plain layers
    dc.train()
    a, b = dc(x), dc(x)
    assert not torch.equal(a, b)  # a new weight mask each forward pass
    # one layer: each output is a sum over kept weights, scaled by 1/(1-p): the mean over masks is the plain output
    layer = layers[0]
    xs = torch.randn(4, layer.in_features)
    mean = torch.stack([layer(xs) for _ in range(2000)]).mean(0)
    ref = torch.nn.functional.linear(xs, layer.weight, layer.bias)
    assert torch.allclose(mean, ref, atol=0.15 * ref.abs().mean().item() + 0.05)


def test_dropconnect_is_checked_and_trains(tmp_path):
    with pytest.raises(VisrecError, match="not a probability"):
        create_model("mlp", in_chans=1, num_classes=4, image_size=8, dropconnect=1.5)
    run = visrec.train("synthetic:classes=3,size=8,train=96,test=24", model="mlp", epochs=1, out=str(tmp_path / "r"),
                       progress=False, overrides={"model.kwargs.dropconnect": 0.3, "log.report": False,
                                                  "train.batch_size": 32})
    assert run.summary["status"] == "completed"
    lm = run.load_model()  # rebuilt from the checkpoint's options, dropconnect included, in eval mode
    assert any(isinstance(m, DropConnectLinear) for m in lm.model.modules()) and not lm.model.training


def test_fractional_max_pooling_shrinks_by_root_two_and_is_fixed_in_eval():
    m = create_model("convnet", in_chans=1, num_classes=4, image_size=28, downsample="fractional")
    pools = [x for x in m.modules() if type(x).__name__ == "FractionalMaxPool"]
    assert len(pools) == 2
    x = torch.randn(2, 8, 28, 28)
    assert tuple(pools[0](x).shape[-2:]) == (19, 19)  # 28 / sqrt(2)
    pools[0].train()
    assert not torch.equal(pools[0](x), pools[0](x))  # regions drawn anew in training
    pools[0].eval()
    assert torch.equal(pools[0](x), pools[0](x))  # and fixed in eval: evaluation is deterministic
    m.eval()
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 4)
    with pytest.raises(VisrecError, match="use max or fractional"):
        create_model("convnet", in_chans=1, num_classes=4, image_size=28, downsample="avg")
