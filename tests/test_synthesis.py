"""Synthesis from networks: Gram matrices and perceptual losses, style transfer by optimization, texture synthesis,
DeepDream, loss networks (random, VGG with its preprocessing, a visrec run), the fast style task through the loop,
photos as cameras write them, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.models.style import (
    PerceptualLoss,
    RandomMultiScale,
    RandomVGG,
    TransformNet,
    VGGLossNet,
    _vgg_body,
    gram,
    rgb_to_yiq,
    total_variation,
)
from visrec.runs import Run
from visrec.synthesis import activation_norm, dream, load_image, stylize, texture
from visrec.tasks.style import resolve_loss_net

BENCH = Path(__file__).resolve().parents[1] / "bench" / "images"
CONTENT, STYLE = BENCH / "content.png", BENCH / "style.png"


def small_vgg(x: torch.Tensor | None = None) -> RandomVGG:
    net = RandomVGG(width=0.125, depth=3)
    net.calibrate(x if x is not None else torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return net


def test_gram_of_a_known_tensor():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)
    g = gram(f)
    # channel 0 = (1, 2, 3, 4), channel 1 = (0, 1, 0, -1): inner products over the 4 positions, divided by 4
    assert torch.allclose(g, torch.tensor([[[30.0, -2.0], [-2.0, 2.0]]]) / 4)
    assert torch.allclose(gram(2 * f), 4 * g)
    x = torch.zeros(1, 1, 3, 3)
    x[..., 1, 1] = 1.0  # one dot: 2 of the 6 vertical pairs change by 1, and 2 of the 6 horizontal ones
    assert total_variation(x).item() == pytest.approx(2 / 6 + 2 / 6)


def test_style_and_content_losses_of_an_image_with_itself_are_zero_and_scale_free():
    s = load_image(STYLE, 32)
    net = small_vgg(s)
    loss = PerceptualLoss(net, s, tv_weight=0.0)
    part = loss(s, s)
    assert part.style.item() == pytest.approx(0.0, abs=1e-6) and part.content.item() == pytest.approx(0.0, abs=1e-6)
    other = load_image(CONTENT, 32)
    before = loss(other, s).style.item()
    assert before > 0.01
    # the normalization makes the loss independent of feature scale: scaling every layer changes nothing
    scale = 1.0
    for m in net.body:  # every layer's output doubles again: weights x2, biases x(2^layer)
        if isinstance(m, torch.nn.Conv2d):
            scale *= 2
            m.weight.data *= 2
            m.bias.data *= scale
    doubled = PerceptualLoss(net, s, tv_weight=0.0)
    assert doubled(other, s).style.item() == pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_optimization_lowers_the_total_loss(optimizer, tmp_path):
    net = small_vgg(load_image(STYLE, 32))
    Image.open(CONTENT).resize((32, 32)).save(tmp_path / "c32.png")  # at its own size: decoded, not resized
    r = stylize(tmp_path / "c32.png", STYLE, net=net, size=32, steps=6, optimizer=optimizer)
    assert r.history[-1] < r.history[0] and r.image.shape == (1, 3, 32, 32)
    assert r.image.min() >= 0 and r.image.max() <= 1
    path = r.save(tmp_path / "out.png")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["settings"]["optimizer"] == optimizer and meta["losses"]["total"] == pytest.approx(r.losses["total"])
    assert Image.open(path).size == (32, 32)


def test_noise_init_multiscale_and_colour_preservation():
    net = small_vgg(load_image(STYLE, 32))
    r = stylize(CONTENT, STYLE, net=net, size=32, steps=4, optimizer="adam", init="noise", scales=2)
    assert r.image.shape[-2:] == (32, 32) and len(r.history) == 4
    kept = stylize(CONTENT, STYLE, net=net, size=32, steps=3, optimizer="adam", preserve_color=True)
    c = rgb_to_yiq(load_image(CONTENT, 32))[:, 1:]
    got = rgb_to_yiq(kept.image)[:, 1:]
    inside = (kept.image > 0.02).all(1, keepdim=True) & (kept.image < 0.98).all(1, keepdim=True)  # unclipped
    assert (got - c).abs()[inside.expand_as(got)].max() < 1e-3  # the content's chroma, untouched


def test_random_net_texture_matches_the_gram_statistics_better_than_noise():
    for net in (small_vgg(load_image(STYLE, 32)), RandomMultiScale(sizes=(3, 5), filters=16)):
        if isinstance(net, RandomMultiScale):
            net.calibrate(load_image(STYLE, 32))
        r = texture(STYLE, net=net, size=32, steps=25, optimizer="adam", lr=0.05)
        assert r.losses["style"] < 0.3 * r.losses["noise_style"], (net.name, r.losses)


def test_deepdream_raises_the_layers_activation():
    img = load_image(CONTENT, 48)
    net = small_vgg(img)
    before = activation_norm(net, img, "relu2_1")
    r = dream(img, net=net, layer="relu2_1", size=48, octaves=2, steps=4, lr=0.02, jitter=2)
    assert r.losses["activation_rms_before"] == pytest.approx(before)
    assert r.losses["activation_rms_after"] > 1.2 * before and r.image.shape[-2:] == (48, 48)


def test_vgg_weights_and_their_preprocessing():
    state = _vgg_body("vgg16").state_dict()
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    tv = VGGLossNet("vgg16", state, convention="torchvision")
    p = tv.preprocess(red)
    assert p[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229) and p[0, 2, 0, 0].item() == pytest.approx(
        -0.406 / 0.225)
    caffe = VGGLossNet("vgg16", {f"features.{k}": v for k, v in state.items()}, convention="caffe")
    q = caffe.preprocess(red)  # BGR, 0..255, mean subtracted: red lands in the last channel
    assert q[0, 2, 0, 0].item() == pytest.approx(255 - 123.68) and q[0, 0, 0, 0].item() == pytest.approx(-103.939)
    assert tv.layers[:4] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2") and tv.downsampling["relu4_3"] == 8
    assert caffe(torch.rand(1, 3, 32, 32), ["relu2_2"])["relu2_2"].shape == (1, 128, 16, 16)
    with pytest.raises(VisrecError, match=r"(?s)do not match vgg19.*13 convolutions.*--net vgg16:PATH"):
        VGGLossNet("vgg19", state)
    with pytest.raises(VisrecError, match="missing"):
        VGGLossNet("vgg16", {k: v for k, v in state.items() if not k.startswith("28.")})


def test_a_vgg_file_on_the_command_line_must_exist_and_match(tmp_path):
    bad = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}, bad)
    r = CliRunner().invoke(app, ["texture", str(STYLE), "--net", f"vgg19:{bad}", "--size", "32", "--steps", "1",
                                 "--out", str(tmp_path / "t.png")])
    assert r.exit_code != 0 and "do not match vgg19" in str(r.exception) + r.output
    with pytest.raises(VisrecError, match="needs the weights file"):
        resolve_loss_net("vgg19")
    with pytest.raises(VisrecError, match="not a loss network"):
        resolve_loss_net("alexnet")


def test_bad_input_is_named_with_the_fix(tmp_path):
    net = small_vgg()
    with pytest.raises(VisrecError, match=r"(?s)not a layer.*relu1_1.*relu3_1"):
        dream(CONTENT, net=net, layer="relu9_9", size=32, steps=1)
    deep = RandomVGG(width=0.125, depth=4)
    deep.calibrate(torch.rand(1, 3, 32, 32))
    with pytest.raises(VisrecError, match=r"content image is 12x12 pixels, too small for layer relu4_1.*at least 16"):
        stylize(CONTENT, STYLE, net=deep, size=12, steps=1, style_size=32)
    notimg = tmp_path / "photo.jpg"
    notimg.write_text("not an image")
    with pytest.raises(VisrecError, match="cannot read image .*photo.jpg"):
        stylize(notimg, STYLE, net=net, size=32, steps=1)
    with pytest.raises(VisrecError, match="decompression bomb"):
        stylize(CONTENT, STYLE, net=net, size=32, steps=1, max_pixels=1000)
    with pytest.raises(VisrecError, match="--steps 0"):
        texture(STYLE, net=net, size=32, steps=0)
    r = CliRunner().invoke(app, ["stylize", str(CONTENT)])
    assert r.exit_code != 0 and "CONTENT STYLE" in str(r.exception)


def test_photos_follow_the_image_rules(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "rot.jpg", 40)
    assert x.shape == (1, 3, 40, 20)  # upright: portrait
    rgba = np.zeros((10, 10, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", None).min() == 1.0  # transparent on white
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    c = load_image(tmp_path / "cmyk.jpg", None)[0, :, 5, 5]
    assert c[0] > 0.9 and c[1] < 0.1 and c[2] < 0.1  # red
    Image.fromarray(np.full((8, 16), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png", 32).shape == (1, 3, 16, 32) and load_image(tmp_path / "deep.png",
                                                                                        None).min() == 1.0


def test_the_transformation_network_keeps_any_size():
    net = TransformNet(3, width=4, blocks=1)
    y = net(torch.rand(2, 3, 13, 22) * 255)
    assert y.shape == (2, 3, 13, 22) and y.min() >= 0 and y.max() <= 255
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules()) > 4


@pytest.fixture(scope="module")
def content_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    base = np.asarray(Image.open(CONTENT).resize((24, 24)))
    for i in range(12):
        shifted = np.roll(base, (int(g.integers(-4, 5)), int(g.integers(-4, 5))), (0, 1))
        Image.fromarray(shifted).save(folder / f"p{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def style_run(content_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("style") / "run"
    r = CliRunner().invoke(app, ["train", f"folder:{content_folder}", "--task", "style", "--style", str(STYLE),
                                 "--epochs", "2", "--out", str(out), "--no-progress",
                                 "--set", "model.kwargs={width: 4, blocks: 1}", "--set", "task.style_size=32",
                                 "--set", "train.batch_size=4", "--set", "data.val_fraction=0.2",
                                 "--set", "optim.lr=0.01"])
    assert r.exit_code == 0, r.output
    return Run(out)


def test_a_fast_style_run_trains_saves_reloads_and_stylizes(style_run, content_folder, tmp_path):
    s = style_run.summary
    assert s["task"] == "style" and s["primary_metric"] == "loss" and not s["maximize"]
    assert s["num_classes"] is None  # a folder's one class is not something a style network learns
    losses = [json.loads(line) for line in (style_run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in losses if r.get("split") == "train"]
    assert train[-1] < train[0]  # it learns
    assert (style_run.path / "style.png").is_file() and "random filters" in s["loss_network"]
    r = CliRunner().invoke(app, ["eval", str(style_run.path), "--json"])  # reloaded, the test loss again
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loss"] == pytest.approx(s["test_loss"], rel=1e-4)
    out = tmp_path / "styled.png"
    r = CliRunner().invoke(app, ["stylize", str(content_folder / "p00.png"), "--model", str(style_run.path),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (24, 24) and json.loads(out.with_suffix(".json").read_text())["settings"]["run"]
    r = CliRunner().invoke(app, ["stylize", str(CONTENT), "--model", str(style_run.path), "--size", "40",
                                 "--out", str(tmp_path / "many")])
    assert r.exit_code == 0 and Image.open(tmp_path / "many" / "content-stylized.png").size == (40, 40)
    from visrec.report import build_report

    rep = build_report(style_run.path)
    assert "stylized versions" in rep.path.read_text()


def test_the_style_task_refuses_what_it_cannot_learn(content_folder, tmp_path):
    with pytest.raises(VisrecError, match="needs the style image"):
        visrec.train(f"folder:{content_folder}", task="style", epochs=1, out=str(tmp_path / "a"), progress=False)
    with pytest.raises(VisrecError, match="data.normalize=channel"):
        visrec.train(f"folder:{content_folder}", task="style", epochs=1, out=str(tmp_path / "b"), progress=False,
                     overrides={"task.style": str(STYLE), "data.normalize": "channel"})
    with pytest.raises(VisrecError, match="a classifier needs at least 2"):
        visrec.train(f"folder:{content_folder}", epochs=1, out=str(tmp_path / "c"), progress=False)
    with pytest.raises(VisrecError, match="not a style run"):
        from visrec.synthesis import stylize_with_run

        clf = visrec.train("synthetic:classes=2,size=8,train=32,test=8", epochs=1, out=str(tmp_path / "d"),
                           progress=False, overrides={"train.min_epoch_steps": 0})
        stylize_with_run(clf.path, [CONTENT])


def test_a_classification_run_is_a_loss_network(tmp_path):
    run = visrec.train("synthetic:classes=3,size=16,train=96,test=24", epochs=1, out=str(tmp_path / "clf"),
                       progress=False, overrides={"train.min_epoch_steps": 0, "model.kwargs.widths": [4, 8, 8]})
    net = resolve_loss_net(str(run.path))
    assert net.layers[:3] == ("stage1", "stage2", "stage3") and net.style_layers[0] == "stage1"
    r = CliRunner().invoke(app, ["dream", str(CONTENT), "--net", str(run.path), "--layer", "stage3", "--size", "32",
                                 "--octaves", "2", "--steps", "2", "--out", str(tmp_path / "d.png")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d.json").read_text())["settings"]["layer"] == "stage3"
    r = CliRunner().invoke(app, ["dream", str(CONTENT), "--net", str(run.path), "--layer", "fc9", "--size", "32"])
    assert r.exit_code != 0 and "stage1, stage2" in str(r.exception)
