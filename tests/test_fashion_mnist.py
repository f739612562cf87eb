"""End to end on the real Fashion-MNIST files (a stratified slice, so it stays fast)."""

from __future__ import annotations

import visrec


def test_reader_sees_the_official_splits(fmnist_dir):
    ds = visrec.load_dataset("fashion-mnist", data_dir=fmnist_dir.parent)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.train.class_counts() == [5400] * 10
    assert ds.splits["test"]["kind"] == "official"


def test_default_recipe_on_a_slice_clears_83_percent(fmnist_dir):
    # 6000 training images, 4 epochs of the default recipe at batch 128 (about 11 s): measured 86.4% on
    # the full test set; a broken loss, optimizer, schedule, normalization or augmentation lands far below.
    run = visrec.train("fashion-mnist", epochs=4, batch_size=128, out="runs/fm", progress=False,
                       overrides={"data.subset": 6000})
    assert run.summary["n_test"] == 10000 and run.summary["n_train"] == 6000
    assert run.summary["test_acc"] >= 0.83


def test_doctor_finds_the_default_recipe_healthy(fmnist_dir):
    # The default recipe on the real data, with the experiments scaled down to keep the suite fast.
    from visrec.doctor import ExamOptions, examine

    opts = ExamOptions(lr_steps=70, lr_batch=128, trial_images=2000, trial_val=500, trial_epochs=2)
    diag = examine("fashion-mnist", out="doc", options=opts, overrides={"data.data_dir": str(fmnist_dir.parent)})
    assert diag.worst in ("ok", "info"), [(f.id, f.severity, f.message) for f in diag.findings if f.rank >= 2]
    assert diag.results["lr_range"].conclusive
    assert diag.results["overfit"]["success"]
