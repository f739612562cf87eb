from __future__ import annotations

import pytest
import torch

from visrec.data import DeviceBatches, MixedTargets, Pipeline
from visrec.errors import VisrecError


def batch(n=16, c=3, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, h, w, generator=g), torch.arange(n) % 4


@pytest.mark.parametrize("name, dim", [("hflip", 3), ("vflip", 2)])
def test_flips_mirror_about_half_the_batch(name, dim):
    x, y = batch(n=400)
    out, t = Pipeline([name], seed=0)(x, y)
    assert out.shape == x.shape and torch.equal(t, y)
    flipped = (out == x.flip(dim)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 150 < int(flipped.sum()) < 250


def test_crop_is_a_translation_with_zero_padding():
    x, y = batch(n=64)
    out, _ = Pipeline(["crop:2"], seed=0)(x, y)
    assert out.shape == x.shape
    offsets = []
    for i in range(len(x)):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[:, dy:dy + 8, dx:dx + 8], out[i])]
        assert len(matches) == 1, f"sample {i} is not a shifted copy"
        offsets += matches
    assert len(set(offsets)) > 15  # 25 offsets possible; each sample draws its own


def test_cutout_zeroes_a_square():
    x = torch.ones(32, 1, 16, 16)
    out, _ = Pipeline(["cutout:4"], seed=0)(x, torch.zeros(32, dtype=torch.long))
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max().item() == 16  # a full 4x4 square when not clipped by the border
    assert zeros.min().item() >= 4  # at least a corner of it
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_random_erasing_fills_one_rectangle_of_the_papers_size_in_about_p_of_the_images():
    x = torch.full((2000, 2, 20, 20), 100.0)  # far from any N(0, 1) value: the erased pixels stand out
    y = torch.zeros(2000, dtype=torch.long)
    out, t = Pipeline(["erase:0.5"], seed=0)(x, y)
    assert torch.equal(t, y) and out.shape == x.shape
    changed = out != 100.0
    assert torch.equal(changed[:, 0], changed[:, 1])  # one rectangle through all channels
    hit = changed.flatten(1).any(1)
    assert 900 < int(hit.sum()) < 1100
    mask = changed[hit, 0]
    rows, cols = mask.any(2), mask.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(mask.sum((1, 2)), h * w)  # a full rectangle, not a scatter
    share = (h * w).float() / 400
    assert share.min() >= 0.01 and share.max() <= 0.45 and 0.15 < share.mean() < 0.25  # about U(0.02, 0.4)
    assert (h > 2 * w).any() and (w > 2 * h).any()  # both orientations
    assert abs(out[changed].mean().item()) < 0.05 and abs(out[changed].std().item() - 1) < 0.05
    assert not Pipeline(["erase:0"], seed=0)(x, y)[0].ne(100.0).any()
    with pytest.raises(VisrecError, match=r"(?s)erase:1.5.*within \[0, 1\]"):
        Pipeline(["erase:1.5"])


def test_mixup_and_cutmix_mix_labels():
    x, _ = batch()
    y = torch.arange(16)  # unique labels: t.b is the partner's index
    out, t = Pipeline(["mixup:0.4"], seed=0)(x, y)
    assert isinstance(t, MixedTargets) and 0 <= t.lam <= 1 and torch.equal(t.a, y)
    assert torch.allclose(out, t.lam * x + (1 - t.lam) * x[t.b])
    out2, t2 = Pipeline(["cutmix:1.0"], seed=3)(x, y)
    pasted = torch.isclose(out2, x[t2.b]).all(1) & ~torch.isclose(out2, x).all(1)  # (N, H, W)
    box = (out2 != x).any(1) | pasted
    assert box.float().mean().item() <= 1 - t2.lam + 1e-6
    assert abs(box[t2.b != y].float().mean().item() - (1 - t2.lam)) < 1e-6
    with pytest.raises(VisrecError, match="only one of mixup / cutmix"):
        Pipeline(["mixup", "cutmix"])


def test_augmentation_is_deterministic_under_a_seed():
    x, y = batch()
    spec = ["hflip", "crop:2", "cutout:3", "mixup:0.2"]
    a, ta = Pipeline(spec, seed=7)(x, y)
    b, tb = Pipeline(spec, seed=7)(x, y)
    c, _ = Pipeline(spec, seed=8)(x, y)
    assert torch.equal(a, b) and ta.lam == tb.lam and torch.equal(ta.b, tb.b)
    assert not torch.equal(a, c)
    p = Pipeline(spec, seed=7)
    p(x, y)
    state = p.get_state()
    d, _ = p(x, y)
    p.set_state(state)
    e, _ = p(x, y)
    assert torch.equal(d, e)


def test_unknown_augmentation_lists_valid_ones():
    with pytest.raises(VisrecError) as e:
        Pipeline(["hflipp"])
    assert "hflip" in str(e.value) and "cutout" in str(e.value) and "did you mean 'hflip'" in str(e.value)
    with pytest.raises(VisrecError, match="not a number"):
        Pipeline(["crop:big"])


def test_device_batches_cover_each_epoch_once():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    labels = torch.arange(10)
    b = DeviceBatches(images, labels, 3, seed=0)
    assert len(b) == 3  # drop_last
    e0 = torch.cat([y for _, y in b.epoch(0)])
    assert len(e0) == 9 and len(set(e0.tolist())) == 9
    assert torch.equal(torch.cat([y for _, y in b.epoch(0)]), e0)  # same order again
    assert not torch.equal(torch.cat([y for _, y in b.epoch(1)]), e0)  # a new order next epoch
    tail = torch.cat([y for _, y in b.epoch(0, start=1)])
    assert torch.equal(tail, e0[3:])  # resuming at batch 1 sees exactly the rest
    full = DeviceBatches(images, labels, 3, drop_last=False, shuffle=False)
    assert len(full) == 4 and torch.equal(torch.cat([y for _, y in full.epoch(0)]), labels)


def test_alternating_flip_shows_each_image_mirrored_in_every_other_epoch():
    images = torch.arange(40 * 4, dtype=torch.uint8).view(40, 1, 2, 2)  # every image distinct, none symmetric
    labels = torch.arange(40)
    b = DeviceBatches(images, labels, 8, seed=3, alternate_flip=True)

    def mirrored(epoch: int) -> dict[int, bool]:
        out = {}
        for x, y in b.epoch(epoch):
            for img, i in zip(x, y.tolist(), strict=True):
                assert torch.equal(img, images[i]) or torch.equal(img, images[i].flip(2))
                out[i] = torch.equal(img, images[i].flip(2))
        return out

    e0, e1, e2 = mirrored(0), mirrored(1), mirrored(2)
    assert 10 < sum(e0.values()) < 30  # a random half in the first epoch
    assert all(e1[i] != e0[i] for i in e0) and e2 == e0  # then alternating
    assert mirrored(0) == e0  # deterministic under the seed, like the order
    assert DeviceBatches(images, labels, 8, seed=4, alternate_flip=True).flip_start.tolist() != b.flip_start.tolist()
    boxes = {"boxes": torch.tensor([[[0.0, 0.0, 1.0, 2.0]]]).repeat(40, 1, 1), "box_labels": torch.zeros(40, 1)}
    bb = DeviceBatches(images, boxes, 40, seed=3, alternate_flip=True)
    x, y = next(bb.epoch(0))
    moved = y["boxes"][:, 0, 0] == 1.0  # the box x in [0, 1] of a 2-pixel-wide image, mirrored: [1, 2]
    assert torch.equal(moved, bb.flip_start[bb.order(0)])
    assert y["boxes"][moved, 0].tolist() == [[1.0, 0.0, 2.0, 2.0]] * int(moved.sum())
    assert Pipeline(["altflip", "hflip"]).steps[0].name == "hflip"  # the pipeline leaves altflip to the batches


def _color_set(n=32, seed=0):
    from visrec.data import Normalizer

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    norm = Normalizer.fit(images)
    return images, norm, norm(images)


def test_color_jitter_keeps_pixels_in_range_and_is_seeded():
    images, norm, x = _color_set()
    y = torch.zeros(len(x), dtype=torch.long)
    spec = ["color_jitter:0.8,0.8,0.8,0.5"]
    a, _ = Pipeline(spec, seed=3, normalizer=norm, images=images)(x, y)
    b, _ = Pipeline(spec, seed=3, normalizer=norm, images=images)(x, y)
    c, _ = Pipeline(spec, seed=4, normalizer=norm, images=images)(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    pixels = a * norm.std + norm.mean
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and not torch.allclose(a, x)
    # brightness alone scales each image's pixels by one factor
    d, _ = Pipeline(["color_jitter:0.3"], seed=0, normalizer=norm, images=images)(x, y)
    before, after = (x * norm.std + norm.mean)[0], (d * norm.std + norm.mean)[0]
    keep = (after > 1) & (after < 254)
    ratio = after[keep] / before[keep].clamp_min(1e-6)
    assert float(ratio.std()) < 1e-3 and 0.7 - 1e-4 <= float(ratio.mean()) <= 1.3 + 1e-4
    # a hue turn of zero changes nothing: the YIQ round trip is exact
    e, _ = Pipeline(["color_jitter:0,0,0,0"], seed=0, normalizer=norm, images=images)(x, y)
    assert torch.allclose(e, x, atol=1e-4)
    for bad, match in (("color_jitter:0.4,0.4,0.4,0.7", "hue 0.7 is outside"), ("color_jitter:1,2,3,4,5", "at most 4"),
                       ("color_jitter:a,b", "not 4 numbers")):
        with pytest.raises(VisrecError, match=match):
            Pipeline([bad])


def test_pca_color_shifts_each_image_by_one_color_and_needs_color():
    images, norm, x = _color_set()
    gray = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)  # mid-gray: no clipping, the shift is visible as is
    xg = norm(gray)
    p = Pipeline(["pca_color:0.5"], seed=1, normalizer=norm, images=images)
    out, _ = p(xg, torch.zeros(4, dtype=torch.long))
    shift = (out * norm.std + norm.mean) - 128  # 0..255 units
    per_image = shift.flatten(2)
    assert torch.allclose(per_image, per_image[:, :, :1].expand_as(per_image), atol=1e-3)  # one color per image
    assert float(shift.abs().max()) > 0.05
    again, _ = Pipeline(["pca_color:0.5"], seed=1, normalizer=norm, images=images)(xg, torch.zeros(4, dtype=torch.long))
    assert torch.equal(out, again)
    from visrec.data import Normalizer

    mono = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    with pytest.raises(VisrecError, match="1 channel"):
        Pipeline(["pca_color"], normalizer=Normalizer.fit(mono), images=mono)


def test_a_run_trains_with_color_augmentations(tmp_path):
    import visrec

    run = visrec.train("synthetic:classes=3,channels=3,size=8,train=96,test=24", epochs=1, out=str(tmp_path / "r"),
                       progress=False, overrides={"data.augment": ["hflip", "color_jitter:0.4,0.4,0.4,0.1",
                                                                   "pca_color:0.1"],
                                                  "model.kwargs.widths": [8, 8, 8], "log.report": False,
                                                  "train.batch_size": 32})
    assert run.summary["status"] == "completed"
    with pytest.raises(VisrecError, match="1 channel"):
        visrec.train("synthetic:classes=3,size=8,train=96,test=24", epochs=1, out=str(tmp_path / "g"),
                     progress=False, overrides={"data.augment": ["pca_color"]})


@pytest.mark.parametrize("spec", ["hflip:3", "altflip:1", "vflip:x"])
def test_an_argument_to_an_augmentation_that_takes_none_is_refused(spec):
    name = spec.split(":")[0]
    with pytest.raises(VisrecError, match=f"{name} takes no argument") as err:
        Pipeline([spec])
    assert err.value.hint == f"write it as {name}"
