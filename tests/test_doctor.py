"""The training doctor on deliberately broken setups ("patients"): each must get the right finding,
at warn or error, among its most severe findings; a healthy setup must get nothing above info."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import visrec
from visrec.cli import app
from visrec.doctor import FINDINGS, ExamOptions, examine
from visrec.doctor.exam import overlap
from visrec.doctor.gradcheck import gradient_check

DATA = "synthetic:classes=4,size=8,train=480,test=160,noise=0.1"
# Small and fast: a 64-input MLP world. About 2-4 s per patient on 2 cores.
FAST = ExamOptions(overfit_examples=24, overfit_steps=150, lr_steps=60, trial_images=400, trial_val=200,
                   trial_epochs=3, trial_min_steps=60)
BASE = {"optim.name": "momentum", "optim.lr": 0.05, "optim.weight_decay": 1e-4, "train.batch_size": 32,
        "data.augment": [], "loss.label_smoothing": 0.0, "schedule.name": "constant", "data.val_fraction": 0.25}

PATIENTS = '''
import torch
from torch import nn


def _mlp(in_chans, num_classes, image_size, hidden=64, depth=2, act=nn.ReLU):
    d = in_chans * image_size[0] * image_size[1]
    layers = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def healthy(in_chans, num_classes, image_size):
    return _mlp(in_chans, num_classes, image_size)


def zero_init(in_chans, num_classes, image_size):
    m = _mlp(in_chans, num_classes, image_size)
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def _deep_tanh(in_chans, num_classes, image_size, std):
    m = _mlp(in_chans, num_classes, image_size, hidden=64, depth=8, act=nn.Tanh)
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)
    return m


def tanh_tiny(in_chans, num_classes, image_size):
    return _deep_tanh(in_chans, num_classes, image_size, 0.01)


def tanh_huge(in_chans, num_classes, image_size):
    return _deep_tanh(in_chans, num_classes, image_size, 1.0)


def dead_relu(in_chans, num_classes, image_size):
    m = _mlp(in_chans, num_classes, image_size)
    with torch.no_grad():
        m[1].bias.fill_(-50.0)
    return m


def softmax_out(in_chans, num_classes, image_size):
    return nn.Sequential(_mlp(in_chans, num_classes, image_size), nn.Softmax(dim=1))


class _WrongLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.t() @ x) * 0.5, g.sum(0)  # the weight gradient is off by a factor of 2


class MyLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return _WrongLinear.apply(x, self.w, self.b)


class ToGray8(nn.Module):  # casts its input, as real code often does; autograd differentiates it
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 8)


def casts(in_chans, num_classes, image_size):
    return nn.Sequential(ToGray8(), _mlp(1, num_classes, (8, 8)))


def bad_backward(in_chans, num_classes, image_size):
    d = in_chans * image_size[0] * image_size[1]
    return nn.Sequential(nn.Flatten(), MyLinear(d, 64), nn.ReLU(), nn.Linear(64, num_classes))


def tiny(in_chans, num_classes, image_size):
    return _mlp(in_chans, num_classes, image_size, hidden=2, depth=1)


def huge(in_chans, num_classes, image_size):
    return _mlp(in_chans, num_classes, image_size, hidden=1024, depth=2)


def three_outputs(in_chans, num_classes, image_size):
    return _mlp(in_chans, 3, image_size)
'''


@pytest.fixture
def patients(tmp_path):
    path = tmp_path / "patients.py"
    path.write_text(textwrap.dedent(PATIENTS))
    return lambda name: f"{path}:{name}"


def _examine(model, data=DATA, out="doc", **over):
    return examine(data, model=model, overrides={**BASE, **over}, options=FAST, out=out)


def _assert_top(diag, expected: str):
    """`expected` is present at warn or error, and nothing is more severe than it."""
    f = diag.get(expected)
    listing = [(x.id, x.severity) for x in diag.findings if x.severity != "ok"]
    assert f is not None and f.severity in ("warn", "error"), f"{expected} missing in {listing}"
    assert f.rank == diag.findings[0].rank, f"{expected} is {f.severity}, below {listing[0]}"
    assert f.evidence and f.fix and f.message


def _dataset(**kw):
    return visrec.load_dataset(DATA, val_fraction=0.25, **kw)


def test_healthy_patient_gets_nothing_above_info(patients):
    diag = _examine(patients("healthy"))
    assert diag.worst in ("ok", "info"), [(f.id, f.severity, f.message) for f in diag.findings if f.rank >= 2]
    assert set(diag.checks) == {"data", "model", "initial-loss", "regularization", "gradient-check", "overfit",
                                "lr-range", "trial"}
    ids = {f.id for f in diag.findings}
    assert {"initial-loss-off", "cannot-overfit", "lr-too-high", "train-test-overlap"} <= ids  # checked, all ok
    assert (diag.out / "doctor.md").exists() and (diag.out / "plots" / "lr_finder.png").exists()
    assert (diag.out / "trial" / "monitor.json").exists()
    saved = json.loads((diag.out / "findings.json").read_text())
    assert all(set(f) >= {"id", "severity", "message", "evidence", "fix"} for f in saved)


def test_unnormalized_input(patients):
    _assert_top(_examine(patients("healthy"), **{"data.normalize": "none"}), "input-not-normalized")


def test_learning_rate_100x_too_high(patients):
    _assert_top(_examine(patients("healthy"), **{"optim.lr": 5.0}), "lr-too-high")


def test_a_rate_far_too_high_is_named_as_the_cause_of_the_units_it_kills():
    """Plain SGD at lr 80 on digits kills the MLP's ReLUs and it cannot overfit: the rate is the cause (one update
    moves the weights by far more than their own norm), the dead units and the failed overfit its consequences."""
    diag = examine("digits", model="mlp", overrides={"optim.name": "sgd", "optim.lr": 80.0}, options=FAST, out="doc")
    _assert_top(diag, "lr-too-high")
    rate = diag.get("lr-too-high")
    assert rate.severity == "error" and "primary cause of" in rate.message
    assert rate.evidence["first_update_ratio"] > 1  # one step moves the weights by more than their norm
    consequences = [f for f in diag.findings if f.id in ("dead-units", "cannot-overfit") and f.severity != "ok"]
    assert consequences and all(f.severity == "warn" and "consequence" in f.message for f in consequences)


def test_learning_rate_1000x_too_low(patients):
    diag = _examine(patients("healthy"), **{"optim.lr": 5e-5})
    _assert_top(diag, "lr-too-low")
    assert diag.get("lr-too-low").evidence["configured_lr"] == 5e-5


def test_all_zero_initialization(patients):
    _assert_top(_examine(patients("zero_init")), "symmetric-init")


def test_deep_tanh_with_tiny_weights_vanishes(patients):
    _assert_top(_examine(patients("tanh_tiny")), "vanishing-gradients")


def test_deep_tanh_with_huge_weights_saturates(patients):
    _assert_top(_examine(patients("tanh_huge")), "saturated-units")


def test_relus_killed_by_a_negative_bias(patients):
    _assert_top(_examine(patients("dead_relu")), "dead-units")


def test_softmax_before_cross_entropy(patients):
    diag = _examine(patients("softmax_out"))
    _assert_top(diag, "output-is-probabilities")
    assert diag.get("cannot-overfit").severity in ("warn", "error")


def test_custom_layer_with_a_wrong_backward(patients):
    diag = _examine(patients("bad_backward"))
    _assert_top(diag, "gradient-check-failed")
    ev = diag.get("gradient-check-failed").evidence
    assert ev["module"] == "1" and ev["backward"] == "_WrongLinear" and ev["precision"] == "float64"


def _shuffled_labels():
    ds = _dataset()
    g = torch.Generator().manual_seed(0)
    ds.train.labels = ds.train.labels[torch.randperm(len(ds.train), generator=g)]
    ds.val.labels = ds.val.labels[torch.randperm(len(ds.val), generator=g)]
    return ds


def test_randomly_permuted_labels(patients):
    diag = examine(_shuffled_labels(), model=patients("healthy"), overrides=BASE, options=FAST, out="doc")
    _assert_top(diag, "labels-not-learnable")


def test_a_layer_that_casts_is_no_gradient_finding_and_hides_nothing(patients):
    # autograd differentiates it: nothing to check, so shuffled labels are still found as the cause
    diag = examine(_shuffled_labels(), model=patients("casts"), overrides=BASE, options=FAST, out="doc")
    _assert_top(diag, "labels-not-learnable")
    assert diag.get("gradient-check-failed").severity == "ok"


def test_test_images_copied_into_train(patients):
    ds = _dataset()
    ds.train.images = torch.cat([ds.train.images, ds.test.images])
    ds.train.labels = torch.cat([ds.train.labels, ds.test.labels])
    diag = examine(ds, model=patients("healthy"), overrides=BASE, options=FAST, out="doc")
    _assert_top(diag, "train-test-overlap")
    assert diag.get("train-test-overlap").evidence["test_images_in_train"] == len(ds.test)


def test_model_far_too_small_underfits(patients):
    _assert_top(_examine(patients("tiny")), "underfitting")


def test_model_far_too_large_on_a_tiny_set_overfits(patients):
    data = "synthetic:classes=4,size=8,train=64,test=160,noise=0.6"
    diag = _examine(patients("huge"), data=data, **{"optim.weight_decay": 0.0, "data.val_fraction": 0.5})
    _assert_top(diag, "overfitting")


def test_wrong_output_shape_is_reported_not_raised(patients):
    diag = _examine(patients("three_outputs"))
    _assert_top(diag, "bad-output")
    assert diag.checks["trial"]["status"].startswith("skipped")


def test_single_class_dataset_is_reported_not_raised(patients):
    ds = _dataset()
    ds.train.labels = torch.zeros_like(ds.train.labels)
    diag = examine(ds, model=patients("healthy"), overrides=BASE, options=FAST, out="doc")
    _assert_top(diag, "single-class")


def test_only_documented_ids_are_emitted():
    for fid, meaning in FINDINGS.items():
        assert fid == fid.lower() and " " not in fid and meaning
    with pytest.raises(ValueError):
        visrec.doctor.Finding("no-such-id", "warn", "x")


def test_overlap_is_exact_and_finds_every_copy():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (300, 1, 5, 5), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (50, 1, 5, 5), generator=g, dtype=torch.uint8)
    test[[3, 17, 40]] = train[[10, 200, 0]]
    assert overlap(train, test) == [3, 17, 40]


def test_gradient_check_covers_hand_written_backwards_only():
    class Scale(torch.nn.Module):  # a user layer that autograd differentiates: nothing to check
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor([1.5, -0.5]))

        def forward(self, x):
            return torch.tanh(x * self.s)

    class Square(torch.autograd.Function):  # a correct hand-written backward
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class SquareLayer(torch.nn.Module):
        def forward(self, x):
            return Square.apply(x)

    class CastSquare(torch.nn.Module):  # the same backward on a layer that computes in float32 whatever it gets
        def forward(self, x):
            return Square.apply(x.float())

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), Scale(), SquareLayer(), CastSquare(), torch.nn.Linear(2, 2))
    results = {r.module: r for r in gradient_check(model, torch.randn(4, 3))}
    assert set(results) == {"2", "3"}  # Scale (module "1") is autograd's
    assert results["2"].precision == "float64" and results["2"].max_rel_error < 1e-7
    assert results["2"].backward == "Square"
    assert results["3"].precision == "float32" and results["3"].max_rel_error < results["3"].tolerance[0]


def test_monitor_during_training_writes_findings(tmp_path):
    from visrec.doctor import TrainingMonitor

    mon = TrainingMonitor(every=5)
    run = visrec.train(DATA, model="mlp", epochs=2, out="runs/m", progress=False, callbacks=[mon],
                       overrides={"train.batch_size": 32, "data.augment": []})
    assert len(mon.samples) >= 3
    s = mon.samples[-1]
    assert s["acts"] and all("dead" in a for a in s["acts"].values())
    assert all(v["ratio"] > 0 for v in s["layers"].values())
    for name in ("monitor.json", "findings.json", "doctor.md", "plots/update_ratios.png", "plots/activations.png"):
        assert (run.path / name).exists(), name


def test_cli_doctor_json(patients, capsys):
    from typer.testing import CliRunner

    args = ["doctor", DATA, "--model", patients("softmax_out"), "--json", "--out", "d", "--fast"]
    for k, v in BASE.items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert isinstance(found, list) and found[0]["severity"] == "error"
    assert {"id", "severity", "message", "evidence", "fix"} <= set(found[0])
    assert "output-is-probabilities" in [f["id"] for f in found]


def test_cli_train_monitor_prints_findings():
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["train", DATA, "--model", "mlp", "--epochs", "1", "--monitor", "--out", "r",
                                   "--no-progress", "--set", "train.batch_size=32", "--set", "data.augment=[]"])
    assert res.exit_code == 0, res.output
    assert "training monitor" in res.output


def test_readme_documents_every_finding_id():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [fid for fid in FINDINGS if f"| `{fid}` |" not in readme]
    assert not missing, f"README's findings table lacks {missing}"


def test_rate_advice_improves_a_bad_rate_and_leaves_a_working_schedule_alone(patients):
    import re

    # the default recipe's shape: one-cycle Nesterov at a high peak, label smoothing. It trains; no rate fix.
    recipe = {"optim.name": "nesterov", "optim.lr": 0.2, "schedule.name": "one_cycle", "loss.label_smoothing": 0.1}
    ok = _examine(patients("healthy"), out="doc-ok", **recipe).get("lr-too-high")
    assert ok is None or (ok.severity in ("ok", "info") and not ok.fix), ok
    # a truly bad constant rate: the doctor says lower it, and its number trains better
    bad = _examine(patients("healthy"), out="doc-bad", **{"optim.lr": 5.0}).get("lr-too-high")
    assert bad.severity in ("warn", "error") and "--lr" in bad.fix, bad
    fixed_lr = float(re.search(r"--lr ([0-9.e+-]+)", bad.fix).group(1))
    model = patients("healthy")

    def acc(lr):
        return visrec.train(DATA, model=model, epochs=4, out=f"runs/lr{lr}", progress=False,
                            overrides={**BASE, "optim.lr": lr, "log.report": False}).summary["test_acc"]

    assert acc(fixed_lr) > acc(5.0) + 0.1


def test_chance_is_judged_only_when_the_validation_images_can_tell():
    from visrec.doctor.exam import at_chance

    assert at_chance(1.0, 1 / 3, 3) is None  # 3 images: even all right is within guessing's noise
    assert at_chance(0.34, 1 / 3, 1000) is True and at_chance(0.5, 1 / 3, 1000) is False
    assert at_chance(1.0, 1 / 3, 30) is False and at_chance(0.4, 1 / 3, 30) is True
    assert at_chance(0.12, 0.1, 10_000) is True  # at least 5 points of margin, however many images
