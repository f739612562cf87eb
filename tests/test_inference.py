"""Inference backends: onnxruntime answers like torch on test images, is exported once per checkpoint, and `auto`
falls back to torch, saying why, whenever it cannot."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.runs import Run, dataset_from_config

SYN = "synthetic:classes=4,size=16,train=256,test=64"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three small classification runs: the default convnet, a ResNet (batch norm, residuals) and the fmnist-fast
    layout (a whitening stem: preprocessing torch keeps; a grid-pooled head, 4x4 -> 3x3 overlapping cells), each
    trained two epochs."""
    root = tmp_path_factory.mktemp("inference")
    out = {}
    for name, kw in {"convnet": {}, "resnet20": {"model": "resnet20"},
                     "whiten": {"overrides": ["model.kwargs.stem=whiten", "model.kwargs.widths=[18,16,16]",
                                        "model.kwargs.pools=[1,1,0,0]", "model.kwargs.pool_grid=3",
                                        "eval.tta=flip",
                                        "data.augment=[hflip]"]}}.items():
        out[name] = visrec.train(SYN, epochs=2, out=str(root / name), progress=False, **kw).path
    return out


@pytest.mark.parametrize("name", ["convnet", "resnet20", "whiten"])
def test_every_backend_gives_the_same_predictions_on_test_images(runs, name):
    path = runs[name]
    torch_res = Run(path).evaluate(backend="torch")
    for backend in ("onnx", "auto"):
        res = Run(path).evaluate(backend=backend)
        assert res.backend == "onnx"
        assert torch.equal(res.confusion, torch_res.confusion)
        assert res.loss == pytest.approx(torch_res.loss, abs=1e-4)
    # and image by image, through predict, with test-time flips, crops and scales
    test = dataset_from_config(Run(path).config).test.images[:24]
    images = list(test)
    for tta in ("none", "flip", "crops+flip", "scales"):
        a = Run(path).predict(images, tta=tta, backend="torch", top_k=2)
        b = Run(path).predict(images, tta=tta, backend="onnx", top_k=2)
        assert [p.label for p in a] == [p.label for p in b]
        assert [p.top[0][1] for p in a] == pytest.approx([p.top[0][1] for p in b], abs=1e-4)


def test_the_registry_backends_answer_like_eager_torch_and_declare_what_they_give(runs):
    from visrec.inference import BACKENDS, backend_names

    assert backend_names() == ("auto", "torch", "channels_last", "compile", "onnx")
    assert BACKENDS["onnx"].outputs == {"tensor"} and not BACKENDS["onnx"].gradients
    assert "structured" in BACKENDS["channels_last"].outputs and BACKENDS["channels_last"].gradients
    run = Run(runs["convnet"])
    images = list(dataset_from_config(run.config).test.images[:16])
    eager = run.predict(images, backend="torch", top_k=3)
    for name in ("channels_last", "compile"):
        other = run.predictor(backend=name)
        assert other.backend == name
        got = other.predict(images, top_k=3)
        assert [p.label for p in got] == [p.label for p in eager]
        assert [p.top[0][1] for p in got] == pytest.approx([p.top[0][1] for p in eager], abs=1e-4)
    # a backend works on its own copy: the eager model keeps its memory format
    lm = run.load_model()
    assert all(p.is_contiguous(memory_format=torch.channels_last if lm.channels_last else torch.contiguous_format)
               for p in lm.model.parameters() if p.dim() == 4)


def test_the_graph_is_exported_once_per_checkpoint_and_again_when_it_changes(runs, tmp_path):
    import shutil

    path = tmp_path / "run"
    shutil.copytree(runs["convnet"], path)
    lm = Run(path).load_model(backend="onnx")
    graph = lm.model.path
    assert graph.parent == path / "export" and graph.name == "network-last.onnx"
    stamp = graph.stat().st_mtime_ns
    assert Run(path).load_model(backend="onnx").model.path.stat().st_mtime_ns == stamp  # reused
    # the checkpoint is replaced (here by the best one's weights): the graph is made again, from the new weights
    shutil.copy(path / "checkpoints" / "best.json", path / "checkpoints" / "last.json")
    again = Run(path).load_model("last", backend="onnx")
    assert again.model.path.stat().st_mtime_ns != stamp
    images = dataset_from_config(Run(path).config).test.images[:16]
    assert [p.label for p in Run(path).predict(list(images), which="best", backend="torch")] == \
        [p.label for p in Run(path).predict(list(images), which="last", backend="onnx")]
    # the torch model of the same Run is untouched by the export (still its own module)
    run = Run(path)
    assert run.load_model(backend="onnx").backend == "onnx" and run.load_model().backend == "torch"
    assert not hasattr(run.load_model().model, "session")


def test_a_read_only_run_folder_keeps_the_graph_in_the_user_cache(runs, tmp_path, monkeypatch):
    import shutil

    import visrec.inference as inference

    path = tmp_path / "ro"
    shutil.copytree(runs["convnet"], path)
    shutil.rmtree(path / "export", ignore_errors=True)
    (path / "export").mkdir()
    monkeypatch.setattr(inference.os, "access", lambda p, mode: False)  # as for a user without write permission
    graph = Run(path).load_model(backend="onnx").model.path
    assert graph.parent == tmp_path / "cache" / "visrec" / "onnx"
    assert not any((path / "export").iterdir())


def test_cache_path_falls_back_when_the_folder_cannot_be_made(tmp_path):
    from visrec.inference import cache_path

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    got = cache_path(blocker / "export" / "network-last.onnx", tmp_path / "ckpt")
    assert got.parent == tmp_path / "cache" / "visrec" / "onnx" and got.name.endswith("network-last.onnx")


def test_auto_falls_back_to_torch_and_says_why(runs, monkeypatch):
    path = runs["convnet"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    lm = Run(path).load_model(backend="auto")
    assert lm.backend == "torch" and "onnxruntime" in lm.backend_note
    assert Run(path).evaluate(backend="auto").backend == "torch"
    with pytest.raises(VisrecError, match="onnxruntime"):
        Run(path).load_model(backend="onnx")
    monkeypatch.delitem(sys.modules, "onnxruntime")
    import visrec.inference as inference

    monkeypatch.setattr(inference, "agree", lambda a, b: "the predicted classes differ")
    lm = Run(path).load_model(backend="auto")
    assert lm.backend == "torch" and "disagrees with torch" in lm.backend_note
    with pytest.raises(VisrecError, match="disagrees"):
        Run(path).load_model(backend="onnx")


def test_agree_judges_argmax_and_scale():
    from visrec.inference import agree

    a = torch.tensor([[10.0, 0.0], [0.0, 5.0]])
    assert agree(a, a + 1e-4) is None
    assert "differ by" in agree(a, a + torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    assert "shapes" in agree(a, a[:1])
    assert "classes differ" in agree(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0 + 5e-4]]))


def test_unknown_backend_is_refused_with_the_choices(runs):
    with pytest.raises(VisrecError, match="auto, channels_last, compile, onnx, torch"):
        Run(runs["convnet"]).load_model(backend="tensorrt")


def test_cli_eval_and_predict_say_which_backend_ran(runs, tmp_path):
    from PIL import Image

    path = runs["convnet"]
    r = CliRunner().invoke(app, ["eval", str(path)])
    assert r.exit_code == 0, r.output
    assert "backend onnx" in r.output
    r = CliRunner().invoke(app, ["eval", str(path), "--backend", "torch", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["backend"] == "torch"
    img = dataset_from_config(Run(path).config).test.images[0, 0].numpy()
    Image.fromarray(img).save(tmp_path / "a.png")
    outs = [CliRunner().invoke(app, ["predict", str(path), str(tmp_path / "a.png"), "--backend", b, "--json"])
            for b in ("torch", "onnx")]
    assert all(o.exit_code == 0 for o in outs), [o.output for o in outs]
    a, b = (json.loads(o.output)[0]["top"] for o in outs)
    assert [t["class"] for t in a] == [t["class"] for t in b]
    with pytest.raises(VisrecError, match="auto, channels_last, compile, onnx, torch"):
        CliRunner().invoke(app, ["eval", str(path), "--backend", "nope"], catch_exceptions=False)
