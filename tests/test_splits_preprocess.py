from __future__ import annotations

import pytest
import torch

from visrec.data import Normalizer, load_dataset, stratified_split, stratified_subset


def test_stratified_split_is_disjoint_complete_and_proportional():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    keep2, held2 = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(held, held2)
    _, held3 = stratified_split(labels, 0.1, seed=1)
    assert not torch.equal(held, held3)


def test_every_class_keeps_and_gives_one():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    keep, held = stratified_split(labels, 0.01, seed=0)
    assert sorted(labels[held].tolist()) == [0, 1]  # class 2 has one example: it stays in keep
    assert set(labels[keep].tolist()) == {0, 1, 2}


def test_stratified_subset_keeps_proportions():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_subset(labels, 100, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [60, 30, 10]


def test_val_comes_from_train_and_test_stays_official(tmp_path):
    ds = load_dataset("synthetic:train=200,test=100,classes=4", val_fraction=0.25)
    # 50 per class, a quarter held out: round(12.5) = 12 per class
    assert len(ds.train) == 152 and len(ds.val) == 48 and len(ds.test) == 100
    assert torch.bincount(ds.val.labels).tolist() == [12, 12, 12, 12]
    full = load_dataset("synthetic:train=200,test=100,classes=4", val_fraction=0)
    assert torch.equal(full.test.images, ds.test.images)
    sub = load_dataset("synthetic:train=200,test=100,classes=4", val_fraction=0.25, subset=40)
    assert len(sub.train) == 40 and torch.equal(sub.val.images, ds.val.images)


def test_channel_normalizer_is_fitted_on_train_only():
    train = torch.zeros(10, 2, 4, 4, dtype=torch.uint8)
    train[:, 0] = 100
    train[:5, 1] = 10
    train[5:, 1] = 30
    norm = Normalizer.fit(train, "channel")
    assert norm.mean.flatten().tolist() == pytest.approx([100.0, 20.0])
    assert norm.std.flatten()[1].item() == pytest.approx(10.0)
    out = norm(train)
    assert out[:, 1].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[:, 1].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    test = torch.full((3, 2, 4, 4), 250, dtype=torch.uint8)  # test statistics must not leak in
    assert Normalizer.fit(train, "channel").mean.flatten().tolist() == norm.mean.flatten().tolist()
    assert norm(test)[:, 1].mean().item() == pytest.approx((250 - 20) / 10)


def test_dataset_normalizer_matches_manual_statistics():
    ds = load_dataset("synthetic:channels=3,size=8,train=120,test=60", val_fraction=0.2)
    norm = Normalizer.fit(ds.train.images, "channel")
    x = ds.train.images.double()
    assert torch.allclose(norm.mean.flatten().double(), x.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(norm.std.flatten().double(), x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False),
                          atol=1e-3)
    assert not torch.allclose(norm.mean.flatten().double(), ds.test.images.double().mean((0, 2, 3)), atol=1e-6)


def test_mean_image_and_none_modes_and_state_round_trip():
    x = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    img = Normalizer.fit(x, "image")
    assert img.mean.shape == (1, 4, 4)
    assert torch.allclose(img.mean, x.float().mean(0), atol=1e-4)
    assert img(x).mean(0).abs().max().item() < 1e-4  # the mean image is subtracted per pixel
    raw = Normalizer.fit(x, "none")
    assert torch.equal(raw(x), x.float())
    for n in (img, raw, Normalizer.fit(x, "channel")):
        back = Normalizer.from_state(n.state())
        assert torch.allclose(back(x), n(x))
    with pytest.raises(Exception, match="data.normalize 'pcb' is not valid"):
        Normalizer.fit(x, "pcb")


def test_fitting_the_normalizer_needs_memory_of_a_chunk_not_of_the_whole_set():
    """Photo-sized training sets: the statistics are accumulated over chunks of bounded size (a fixed 8,192-image
    chunk in float64, squared out of place, took 20 GB at 3x224x224). Peak memory is read as the process's VmHWM,
    in a fresh process."""
    import subprocess
    import sys

    code = """
import torch
from visrec.data import Normalizer
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
x = torch.randint(0, 256, (400, 3, 224, 224), dtype=torch.uint8)  # 60 MB decoded, 482 MB in float64
x.add_(0)  # touched: counted in the high-water mark before the fit
before = hwm()
n = Normalizer.fit(x)
grew = hwm() - before
want = torch.stack([x[:, c].double().mean() for c in range(3)])
assert torch.allclose(n.mean.flatten().double(), want, atol=1e-3), (n.mean, want)
print(grew)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 200e6, f"fitting 60 MB of images raised peak memory by {grew / 1e6:.0f} MB"
