"""train.engine=numpy: visrec.ref's networks and update rules trained through visrec's loop, and paired with the
PyTorch engine step by step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import visrec
from visrec.config import OptimConfig
from visrec.errors import VisrecError
from visrec.runs import Run
from visrec.training.optim import build_optimizer, build_ref_optimizer


@pytest.mark.parametrize("model_name,kwargs,shape", [
    ("fc_net", {"hidden_dims": [16, 12], "normalization": "batchnorm"}, (1, 6, 6)),
    ("convnet3", {"num_filters": 4, "filter_size": 3, "hidden_dim": 10}, (2, 6, 4)),
])
@pytest.mark.parametrize("opt", [
    OptimConfig(name="momentum", lr=0.05, momentum=0.9, weight_decay=1e-3),
    OptimConfig(name="adam", lr=3e-3, weight_decay=1e-3),
])
def test_the_engines_give_the_same_losses_step_by_step_in_float64(model_name, kwargs, shape, opt):
    torch.manual_seed(0)
    base = visrec.create_model(model_name, in_chans=shape[0], num_classes=5, image_size=shape[1:], **kwargs).double()
    nets = {e: copy.deepcopy(base) for e in ("numpy", "torch")}  # the same initial weights
    for e, m in nets.items():
        m.engine = e
    opts = {"numpy": build_ref_optimizer(nets["numpy"], opt), "torch": build_optimizer(nets["torch"], opt)}
    g = torch.Generator().manual_seed(1)
    data = torch.randn(200, *shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (200,), generator=g)
    losses = {"numpy": [], "torch": []}
    for _ in range(100):
        idx = torch.randint(0, 200, (20,), generator=g)  # the same batches
        for e, m in nets.items():
            opts[e].zero_grad()
            loss = F.cross_entropy(m(data[idx]), labels[idx])
            loss.backward()
            opts[e].step()
            losses[e].append(loss.item())
    a, b = np.array(losses["numpy"]), np.array(losses["torch"])
    assert np.max(np.abs(a - b) / np.abs(b)) < 1e-8
    assert a[-10:].mean() < a[:10].mean()  # and they learn
    for name, p in nets["numpy"].named_parameters():
        assert torch.allclose(p, dict(nets["torch"].named_parameters())[name], rtol=1e-7, atol=1e-8), name
    if model_name == "fc_net":  # the running statistics follow the course's momentum in both engines
        assert torch.allclose(nets["numpy"].running_var1, nets["torch"].running_var1, rtol=1e-7)


FAST = {"train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 10, "data.subset": 500,
        "log.report": False}


@pytest.fixture(scope="module")
def numpy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ne") / "mlp"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = visrec.train("digits", model="mlp", epochs=3, out=str(out), progress=False,
                           overrides={**FAST, "train.engine": "numpy",
                                      "model.kwargs": {"hidden": 32, "depth": 3, "normalization": "batchnorm"}})
        assert torch.get_num_threads() == 2  # torch's threads, lowered to one while NumPy trained, are back
    finally:
        torch.set_num_threads(before)
    return run


def test_a_numpy_run_is_a_run_like_any_other(numpy_run, tmp_path):
    run = Run(numpy_run.path)
    s = run.summary
    assert s["engine"] == "numpy" and run.config.train.engine == "numpy"
    assert s["test_acc"] > 0.85
    lm = run.load_model()
    assert type(lm.model).__name__ == "FCNet" and lm.model.engine == "numpy"
    assert run.evaluate().acc == pytest.approx(s["test_acc"], abs=1e-9)
    # The same weights in the torch engine give the same predictions.
    from visrec.runs import dataset_from_config

    x = lm.normalizer(dataset_from_config(run.config).test.images[:64])
    with torch.no_grad():
        a = lm.model(x)
        lm.model.engine = "torch"
        b = lm.model(x)
        lm.model.engine = "numpy"
    assert torch.allclose(a, b, atol=1e-4)


def test_a_numpy_run_resumes_exactly(tmp_path):
    over = {**FAST, "train.engine": "numpy", "optim.name": "adam", "optim.lr": 0.003,
            "model.kwargs": {"hidden": 16, "depth": 2}, "data.augment": []}
    full = visrec.train("digits", model="mlp", epochs=2, out=str(tmp_path / "full"), progress=False, overrides=over)
    from visrec import Trainer
    from visrec.config import resolve_config

    cfg = resolve_config(None, [], options={"data.name": "digits", "model.name": "mlp", "train.epochs": 2,
                                            **{k: v for k, v in over.items()}})
    t = Trainer(cfg, out=str(tmp_path / "cut"), progress=False)
    t.fit(stop_after_steps=17)
    resumed = Trainer.resume(tmp_path / "cut", progress=False).fit()
    assert resumed.summary["test_loss"] == pytest.approx(full.summary["test_loss"], rel=1e-6)


def test_the_numpy_engine_refuses_what_it_cannot_do(tmp_path):
    def go(**over):
        visrec.train("digits", model=over.pop("model", "mlp"), epochs=1, out=str(tmp_path / "x"), progress=False,
                     overrides={**FAST, "train.engine": "numpy", **over})

    with pytest.raises(VisrecError, match="model 'resnet18' has no numpy implementation"):
        go(model="resnet18")
    with pytest.raises(VisrecError, match=r"cannot use optim.name=adamw \(its update rules: sgd, momentum"):
        go(**{"optim.name": "adamw"})
    with pytest.raises(VisrecError, match="device.name=cuda"):
        go(**{"device.name": "cuda"})
    with pytest.raises(VisrecError, match="act='tanh'"):
        go(**{"model.kwargs": {"act": "tanh"}})
