from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visrec.config import OptimConfig, ScheduleConfig
from visrec.errors import VisrecError
from visrec.training.averaging import EMA
from visrec.training.optim import build_optimizer, param_groups
from visrec.training.schedules import LRSchedule, schedule_factor


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_no_weight_decay_on_biases_and_norms():
    groups = param_groups(Tiny(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(2, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # fc.bias, bn.weight, bn.bias
    assert len(param_groups(Tiny(), 0.1, decay_all=True)) == 1


def _run(name, steps, grads, **kw):
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    model = nn.Module()
    model.w = w
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.0, **kw))
    out = []
    for g in grads[:steps]:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out


GRADS = [torch.tensor([0.5, -1.0]), torch.tensor([0.2, 0.3]), torch.tensor([-0.4, 0.1])]


def test_sgd_momentum_nesterov_follow_their_formulas():
    lr, mu = 0.1, 0.9
    w0 = torch.tensor([1.0, -2.0])
    # plain SGD: w -= lr g
    sgd = _run("sgd", 3, GRADS, lr=lr)
    assert torch.allclose(sgd[-1], w0 - lr * sum(GRADS))
    # momentum: v = mu v + g; w -= lr v
    v, w = torch.zeros(2), w0.clone()
    for g in GRADS:
        v = mu * v + g
        w = w - lr * v
    assert torch.allclose(_run("momentum", 3, GRADS, lr=lr, momentum=mu)[-1], w)
    # Nesterov (Sutskever form): v = mu v + g; w -= lr (g + mu v)
    v, w = torch.zeros(2), w0.clone()
    for g in GRADS:
        v = mu * v + g
        w = w - lr * (g + mu * v)
    assert torch.allclose(_run("nesterov", 3, GRADS, lr=lr, momentum=mu)[-1], w)


def test_adagrad_rmsprop_adam_follow_their_formulas():
    lr, eps = 0.1, 1e-8
    w0 = torch.tensor([1.0, -2.0])
    cache, w = torch.zeros(2), w0.clone()
    for g in GRADS:
        cache = cache + g * g
        w = w - lr * g / (cache.sqrt() + 1e-10)
    assert torch.allclose(_run("adagrad", 3, GRADS, lr=lr, eps=1e-10)[-1], w, atol=1e-6)
    alpha = 0.99
    cache, w = torch.zeros(2), w0.clone()
    for g in GRADS:
        cache = alpha * cache + (1 - alpha) * g * g
        w = w - lr * g / (cache.sqrt() + eps)
    assert torch.allclose(_run("rmsprop", 3, GRADS, lr=lr, alpha=alpha, momentum=0.0, eps=eps)[-1], w, atol=1e-5)
    b1, b2 = 0.9, 0.999
    m, v, w = torch.zeros(2), torch.zeros(2), w0.clone()
    for t, g in enumerate(GRADS, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    assert torch.allclose(_run("adam", 3, GRADS, lr=lr, betas=[b1, b2], eps=eps)[-1], w, atol=1e-6)


def test_adamw_decouples_weight_decay():
    w = nn.Parameter(torch.tensor([[2.0]]))  # a matrix: biases get no decay
    model = nn.Module()
    model.w = w
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5))
    w.grad = torch.zeros(1, 1)
    opt.step()
    assert w.item() == pytest.approx(2.0 * (1 - 0.1 * 0.5))  # zero gradient: only the decay acts


def test_unknown_optimizer_lists_valid():
    with pytest.raises(VisrecError) as e:
        build_optimizer(Tiny(), OptimConfig(name="adamax"))
    assert "adamw" in str(e.value) and "nesterov" in str(e.value)


T, SPE = 100, 10


@pytest.mark.parametrize(
    "cfg, checks",
    [
        (ScheduleConfig("constant"), {0: 1.0, 50: 1.0, 99: 1.0}),
        (ScheduleConfig("step", step_epochs=3, gamma=0.1), {0: 1.0, 29: 1.0, 30: 0.1, 60: 0.01, 99: 0.001}),
        (ScheduleConfig("exponential", gamma=0.5), {0: 1.0, 10: 0.5, 25: 0.5**2.5}),
        (ScheduleConfig("inverse_time", decay=0.5), {0: 1.0, 20: 1 / (1 + 0.5 * 2), 50: 1 / 3.5}),
        (ScheduleConfig("linear", end_factor=0.0), {0: 1.0, 50: 0.5, 100: 0.0}),
        (ScheduleConfig("cosine", end_factor=0.0), {0: 1.0, 50: 0.5, 25: (1 + math.cos(math.pi / 4)) / 2, 100: 0.0}),
        (ScheduleConfig("one_cycle", pct_start=0.25, start_factor=0.1, end_factor=0.01),
         {0: 0.1, 25: 1.0, 10: 0.1 + 0.9 * 10 / 25, 100: 0.01, 25 + 75 // 3: 1 + (0.01 - 1) * (25 / 75)}),
        (ScheduleConfig("cosine", warmup_epochs=2, start_factor=0.0, end_factor=0.0), {0: 0.0, 10: 0.5, 20: 1.0,
                                                                                        60: 0.5, 100: 0.0}),
    ],
)
def test_schedules_at_known_steps(cfg, checks):
    f = schedule_factor(cfg, T, SPE)
    for t, want in checks.items():
        assert f(t) == pytest.approx(want, abs=1e-9), (cfg.name, t)


def test_lr_schedule_sets_every_group_and_restores():
    opt = build_optimizer(Tiny(), OptimConfig(name="sgd", lr=0.2))
    s = LRSchedule(opt, schedule_factor(ScheduleConfig("linear", end_factor=0.0), 10, 1))
    for _ in range(4):
        s.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 0.6] * 2)
    state = s.state_dict()
    s2 = LRSchedule(opt, schedule_factor(ScheduleConfig("linear", end_factor=0.0), 10, 1))
    s2.load_state_dict(state)
    assert s2.lr == pytest.approx(0.12) and s2.step_count == 4


def test_unknown_schedule():
    with pytest.raises(VisrecError, match="(?s)unknown schedule 'cosinus'.*did you mean 'cosine'"):
        schedule_factor(ScheduleConfig("cosinus"), 10, 1)


def test_ema_follows_its_formula():
    m = nn.Linear(1, 1, bias=False)
    nn.init.constant_(m.weight, 0.0)
    ema = EMA(m, decay=0.9)
    expected = 0.0
    for step in range(1, 30):
        with torch.no_grad():
            m.weight.fill_(float(step))
        ema.update(m)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * step
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_noise_has_the_scheduled_variance_and_a_run_uses_it(tmp_path):
    import visrec
    from visrec.training.optim import add_gradient_noise, gradient_noise_std

    p = torch.nn.Parameter(torch.zeros(200_000))
    for step in (0, 99):
        p.grad = torch.zeros_like(p)
        torch.manual_seed(step)
        add_gradient_noise([p], 0.3, 0.55, step)
        want = 0.3 / (1 + step) ** 0.55
        assert p.grad.var().item() == pytest.approx(want, rel=0.02) and abs(p.grad.mean().item()) < 0.01
        assert gradient_noise_std(0.3, 0.55, step) ** 2 == pytest.approx(want)
    syn = "synthetic:classes=3,size=8,train=96,test=24"
    base = {"model.kwargs.widths": [8, 8, 8], "log.report": False, "train.batch_size": 32}
    quiet = visrec.train(syn, epochs=1, out=str(tmp_path / "a"), progress=False, overrides=base)
    noisy = visrec.train(syn, epochs=1, out=str(tmp_path / "b"), progress=False,
                         overrides={**base, "optim.grad_noise": 1.0})
    assert noisy.summary["status"] == "completed" and noisy.summary["test_loss"] != quiet.summary["test_loss"]


LBFGS = {"optim.name": "lbfgs", "optim.lr": 1.0, "optim.weight_decay": 0.01, "train.batch_size": 10_000,
         "train.min_epoch_steps": 0, "data.augment": [], "loss.label_smoothing": 0.0, "schedule.name": "constant",
         "log.report": False, "eval.tta": "none"}


def test_lbfgs_reaches_the_optimum_of_a_convex_problem(tmp_path):
    """Softmax regression with L2, full batch: at the end the gradient of the whole objective vanishes."""
    import visrec
    from visrec.runs import dataset_from_config

    syn = "synthetic:classes=3,size=6,train=120,test=30"
    run = visrec.train(syn, model="linear", epochs=15, out=str(tmp_path / "l"), progress=False, overrides=LBFGS)
    lm = run.load_model()
    ds = dataset_from_config(run.config)
    model = lm.model.float().train()
    x, y = lm.normalizer(ds.train.images), ds.train.labels
    objective = torch.nn.functional.cross_entropy(model(x), y) + 0.005 * sum(
        (p**2).sum() for n, p in model.named_parameters() if p.dim() >= 2)
    grads = torch.autograd.grad(objective, [p for p in model.parameters()])
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    sgd = visrec.train(syn, model="linear", epochs=15, out=str(tmp_path / "s"), progress=False,
                       overrides={**LBFGS, "optim.name": "sgd", "optim.lr": 0.1})
    assert sgd.metrics("train")[-1]["loss"] > run.metrics("train")[-1]["loss"]


def test_an_lbfgs_run_resumes_exactly(tmp_path):
    """The L-BFGS history (lists of tensors, some None until filled) goes into the checkpoint and comes back."""
    import visrec
    from visrec import Trainer
    from visrec.checkpoint import load_checkpoint

    def fit(out, stop=None):
        cfg = visrec.resolve_config(None, {"data.name": "synthetic:classes=3,size=6,train=120,test=30",
                                           "model.name": "linear", "train.epochs": 4, **LBFGS})
        return Trainer(cfg, out=str(tmp_path / out), progress=False, quiet=True).fit(stop_after_steps=stop)

    straight = fit("straight")
    stopped = fit("stopped", stop=2)
    assert stopped.status == "interrupted"
    resumed = visrec.resume(stopped.path, progress=False)
    a = load_checkpoint(straight.path / "checkpoints", "last").weights
    b = load_checkpoint(resumed.path / "checkpoints", "last").weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lbfgs_refuses_a_noisy_objective(tmp_path):
    import visrec

    syn = "synthetic:classes=3,size=6,train=120,test=30"
    with pytest.raises(VisrecError, match="minibatches .* augmentation"):
        visrec.train(syn, model="linear", epochs=1, out=str(tmp_path / "a"), progress=False,
                     overrides={"optim.name": "lbfgs", "data.augment": ["hflip"], "train.batch_size": 16})
    run = visrec.train(syn, model="linear", epochs=1, out=str(tmp_path / "b"), progress=False,
                       overrides={"optim.name": "lbfgs", "optim.lbfgs_noisy": True, "train.batch_size": 16,
                                  "log.report": False})
    assert run.summary["status"] == "completed"


def test_orthogonalize_pushes_every_singular_value_near_one():
    from visrec.training.optim import orthogonalize

    g = torch.Generator().manual_seed(0)
    for shape in ((16, 72), (72, 16), (8, 8)):
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
        m = u @ torch.diag(torch.logspace(-1.5, 1, k)) @ v.T  # a spectrum spread over 2.5 decades
        s = torch.linalg.svdvals(orthogonalize(m))
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s)


def test_muon_orthogonalizes_conv_kernels_and_steps_the_rest_by_nesterov():
    lr, muon_lr, mu = 0.1, 0.05, 0.9
    model = nn.Module()
    model.conv = nn.Conv2d(4, 8, 3, bias=True)
    model.w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(model, OptimConfig(name="muon", lr=lr, muon_lr=muon_lr, momentum=mu, weight_decay=0.0))
    assert sorted((g["muon"], len(g["params"])) for g in opt.param_groups) == [(False, 2), (True, 1)]
    k0 = model.conv.weight.detach().clone()
    w, v = model.w.detach().clone(), torch.zeros(2)
    g = torch.Generator().manual_seed(1)
    for grad in GRADS:
        model.w.grad = grad.clone()
        model.conv.weight.grad = torch.randn(model.conv.weight.shape, generator=g)
        model.conv.bias.grad = torch.zeros(8)
        opt.step()
        v = mu * v + grad
        w = w - lr * (grad + mu * v)
    assert torch.allclose(model.w.detach(), w)  # the non-kernel parameters: Nesterov SGD exactly
    # a kernel's first step: lr times a near-orthogonal (8, 36) matrix (out < in: no extra scale)
    model.conv.weight.data.copy_(k0)
    opt2 = build_optimizer(model, OptimConfig(name="muon", lr=lr, muon_lr=muon_lr, momentum=mu, weight_decay=0.0))
    model.conv.weight.grad = 1000 * torch.randn(model.conv.weight.shape, generator=g)  # the scale does not matter
    opt2.step()
    s = torch.linalg.svdvals((model.conv.weight.detach() - k0).reshape(8, -1)) / muon_lr
    assert s.min() > 0.5 and s.max() < 1.3


def test_a_muon_run_trains_and_resumes_exactly(tmp_path):
    import visrec

    syn = "synthetic:classes=4,size=12,train=256,test=64"
    over = {"optim.name": "muon", "train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 2}
    straight = visrec.train(syn, epochs=2, out=str(tmp_path / "a"), overrides=over, progress=False)
    cut = visrec.Trainer(visrec.resolve_config(None, {**over, "data.name": syn, "train.epochs": 2}),
                         out=str(tmp_path / "b"), progress=False).fit(stop_after_steps=5)
    done = visrec.resume(cut.path, progress=False)
    assert done.summary["test_acc"] == straight.summary["test_acc"]
    assert straight.summary["steps"] == done.summary["steps"]
