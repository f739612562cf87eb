"""data.normalize=pca|pca_whiten|zca: fitted on the training split, saved with the run, used by every consumer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import visrec
from visrec.data import Normalizer
from visrec.errors import VisrecError
from visrec.runs import Run


def _images(n=2000, c=1, h=6, w=6, seed=0):
    """Correlated uint8 images: smooth random fields plus pixel noise, so the covariance is full rank but far
    from diagonal."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 3, 3, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = 0.8 * smooth + 0.2 * torch.rand(n, c, h, w, generator=g)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("mode", ["pca_whiten", "zca"])
def test_whitened_covariance_is_identity_on_the_training_split(mode):
    x = _images()
    norm = Normalizer.fit(x, mode, k=20 if mode == "pca_whiten" else None, eps=1e-8)
    y = norm(x).flatten(1).double()
    cov = torch.cov(y.T)
    if mode == "zca":
        assert tuple(norm(x).shape[1:]) == (1, 6, 6)  # image layout kept
    else:
        assert tuple(norm(x).shape[1:]) == (20, 1, 1)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    assert (cov - eye).abs().max() < 1e-3, (cov - eye).abs().max()
    # Before whitening the pixels are strongly correlated: the check above is not trivially true.
    raw = torch.corrcoef(x.flatten(1).double().T)
    assert (raw - torch.eye(36, dtype=raw.dtype)).abs().max() > 0.5


def test_pca_keeps_the_top_components_and_their_variance():
    x = _images()
    norm = Normalizer.fit(x, "pca", eps=1e-8)
    f, ev = norm.whitening, norm.tensors["eigenvalues"].double()
    k = f["k"]
    share = ev.cumsum(0) / ev.sum()
    assert share[k - 1] >= 0.95 > share[k - 2]  # the default: the fewest components holding 95% of the variance
    var = norm(x).flatten(1).double().var(0)
    assert torch.allclose(var, ev[:k], rtol=1e-3)
    assert bool((var[:-1] >= var[1:] - 1e-9).all())  # in decreasing order


def test_eps_damps_the_small_directions():
    x = _images()
    sharp = Normalizer.fit(x, "zca", eps=1e-8)(x).flatten(1).var(0).mean()
    damped = Normalizer.fit(x, "zca", eps=0.1)(x).flatten(1).var(0).mean()
    assert damped < 0.5 * sharp


def test_bad_settings_are_named_with_the_valid_range():
    x = _images(n=30)
    with pytest.raises(VisrecError, match=r"(?s)data\.pca_k=99 .* 36 values per image.*between 1 and 36"):
        Normalizer.fit(x, "pca", k=99)
    with pytest.raises(VisrecError, match=r"(?s)zca cannot estimate the covariance of 36 .* from 30 training") as e:
        Normalizer.fit(x, "zca")
    assert "data.pca_k below 30" in e.value.hint and "data.pca_eps" in e.value.hint
    Normalizer.fit(x, "zca", k=20)  # what the hint suggests works
    Normalizer.fit(x, "zca", eps=0.1)
    flat = torch.zeros(50, 1, 4, 4, dtype=torch.uint8)
    flat[:, :, :2] = torch.randint(0, 255, (50, 1, 2, 4), dtype=torch.uint8)  # half the pixels never vary
    with pytest.raises(VisrecError, match=r"pca_eps=0: component \d+ of 16 has no variance"):
        Normalizer.fit(flat, "pca_whiten", k=16, eps=0)


def test_state_round_trip_and_module_agree():
    x = _images(n=500, c=3, h=4, w=4)
    for mode in ("pca", "pca_whiten", "zca"):
        norm = Normalizer.fit(x, mode)
        again = Normalizer.from_state(json.loads(json.dumps(norm.state())), norm.tensors)
        assert torch.equal(again(x), norm(x)) and again.same_as(norm)
        assert torch.allclose(norm.module()(x.float()), norm(x), atol=1e-5)
        with pytest.raises(VisrecError, match="lacks its basis"):
            Normalizer.from_state(norm.state())


DIG = {"train.batch_size": 64, "train.min_epoch_steps": 0, "log.every": 10, "data.augment": [],
       "data.subset": 600}


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pw") / "lin"
    return visrec.train("digits", model="linear", epochs=2, out=str(out), progress=False,
                        overrides={**DIG, "data.normalize": "pca_whiten", "data.pca_k": 24})


def test_a_pca_run_reproduces_its_predictions_after_reload_and_export(pca_run, tmp_path):
    run = Run(pca_run.path)
    s = run.summary
    assert s["test_acc"] > 0.8
    lm = run.load_model()
    assert lm.normalizer.mode == "pca_whiten" and lm.in_chans == 1 and tuple(lm.image_size) == (8, 8)
    assert run.evaluate().acc == pytest.approx(s["test_acc"], abs=1e-9)
    from visrec.export import export_run
    from visrec.runs import dataset_from_config

    x = dataset_from_config(run.config).test.images[:32]
    with torch.no_grad():
        want = lm.model(lm.normalizer(x))
    ort = pytest.importorskip("onnxruntime")
    onnx_path = export_run(run.path, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"pixels": x.float().numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4)
    st = load_file(str(export_run(run.path, "safetensors", tmp_path / "m.safetensors")))
    assert {"preprocess.weight", "preprocess.bias"} <= set(st)  # the basis travels with the weights


def test_the_report_shows_the_whitening(pca_run, tmp_path):
    from visrec.report import build_report

    rep = build_report(pca_run.path, tmp_path / "r.html")
    assert rep.figures["whitening"][:4] == b"\x89PNG"
    assert "<h2>Preprocessing</h2>" in rep.path.read_text()
    assert "saliency" in rep.figures  # maps over the pixels, through the whitening


def test_runs_refuse_what_whitening_cannot_do(tmp_path):
    base = {**DIG, "data.subset": 200}
    with pytest.raises(VisrecError, match=r"pca turns each image into .* features, which augmentation \(hflip\)"):
        visrec.train("digits", model="linear", epochs=1, out=str(tmp_path / "a"), progress=False,
                     overrides={**base, "data.normalize": "pca", "data.augment": ["hflip"]})
    with pytest.raises(VisrecError, match=r"convnet cannot take the \d+ features of data.normalize=pca") as e:
        visrec.train("digits", model="convnet", epochs=1, out=str(tmp_path / "b"), progress=False,
                     overrides={**base, "data.normalize": "pca"})
    assert "zca" in e.value.hint
    with pytest.raises(VisrecError, match=r"color_jitter works on pixel values, which data.normalize=zca"):
        visrec.train("digits", model="convnet", epochs=1, out=str(tmp_path / "c"), progress=False,
                     overrides={**base, "data.normalize": "zca", "data.pca_eps": 0.1,
                                "data.augment": ["color_jitter:0.2,0.2,0,0"]})
