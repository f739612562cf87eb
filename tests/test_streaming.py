"""Folders streamed from their files: worker processes, random-resized crops from the originals, the evaluation
transform recorded and applied by predict and serve, bad files left out and counted, exact resume, shares per rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visrec
from visrec.config import Config
from visrec.data.images import Fit, decode, random_resized_box
from visrec.data.stream import LoaderBatches, StreamedImages
from visrec.errors import VisrecError
from visrec.runs import Run

SIZES = [(40, 30), (30, 40), (48, 36), (36, 36)]  # photos of several shapes; shorter sides 30, 30, 36, 36


def _photos(root: Path, per_class: int = 12) -> Path:
    """JPEGs of three classes told apart by colour, with texture, in four sizes and shapes."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for k, name in enumerate(("red", "green", "blue")):
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            a = np.clip(np.array(colours[k]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            p = root / name / f"{i:03d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p, quality=90)
    return root


def _cfg(data: Path | str, **sets) -> Config:
    cfg = Config()
    cfg.data.name = data if str(data).startswith("wds:") else f"folder:{data}"
    cfg.model.name = "convnet"
    cfg.model.kwargs = {"widths": [8, 16, 16]}
    cfg.train.epochs = 3
    cfg.train.batch_size = 8
    cfg.train.min_epoch_steps = 0
    cfg.data.workers = 2
    cfg.data.memory_budget = "1KB"  # any real folder is above it: auto streams
    cfg.log.report = False
    for key, value in sets.items():
        cfg.set(key.replace("__", "."), value)
    return cfg


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _photos(tmp_path_factory.mktemp("photos") / "p")


@pytest.fixture(scope="module")
def packed(photos, tmp_path_factory) -> Path:
    """The photos as shards of about 24 KB (several per split), packed as `visrec data pack` does."""
    from typer.testing import CliRunner

    from visrec.cli import app

    dest = tmp_path_factory.mktemp("shards") / "p"
    r = CliRunner().invoke(app, ["data", "pack", str(photos), str(dest), "--shard-size", "24KB"])
    assert r.exit_code == 0, r.output
    assert f"train with: visrec train wds:{dest}" in r.output
    return dest


@pytest.fixture(scope="module")
def streamed_run(photos, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("runs") / "s"
    return visrec.Trainer(_cfg(photos), out=str(out), progress=False, quiet=True).fit()


def test_a_folder_above_the_memory_budget_streams_and_learns(streamed_run):
    s = streamed_run.summary
    assert s["status"] == "completed"
    # several sizes and no data.image_size: the median shorter side of the sample (30 and 36 -> 36 at the middle)
    assert s["data_input"] == {"cache": "none", "size": [36, 36], "crop_pct": 0.875, "mode": "crop", "workers": 2,
                               "read_by_rank0": s["steps"] * s["batch_size"]}
    assert s["test_acc"] >= 0.8  # colour is easy: the crops and the transform must not lose it
    windows = [r for r in streamed_run.metrics("train") if r["kind"] == "window"]
    assert windows and all(0 <= r["data_share"] <= 1 and r["data_seconds"] >= 0 for r in windows)
    assert "skipped_files" not in s


def test_predict_and_serve_apply_the_recorded_evaluation_transform(streamed_run, photos):
    from visrec.serve.model import ServedModel

    lm = streamed_run.load_model()
    assert lm.fit == Fit(36, 36, 0.875)
    wide = photos / "red" / "000.jpg"  # 40x30: resized to cover 41x41, centre 36x36
    expected = StreamedImages([wide], 3, lm.fit)[0]
    assert torch.equal(torch.from_numpy(decode(wide, 3, lm.fit)).permute(2, 0, 1), expected)
    assert torch.equal(streamed_run.predictor(resize=True, convert=True).load(wide).x, expected)
    served = ServedModel(streamed_run.path).load().prepare(wide.read_bytes(), wide.name)
    assert torch.equal(served.x, expected)
    (pred,) = streamed_run.predict([str(wide)])
    assert pred.label == "red"


def test_the_evaluation_transform_keeps_the_aspect_ratio(tmp_path):
    # a 60x20 image with a bright left third: squashing keeps it in a third of the output, the crop loses it all
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20] = 255
    Image.fromarray(a).save(tmp_path / "w.png")
    squashed = decode(tmp_path / "w.png", 3, 10)
    cropped = decode(tmp_path / "w.png", 3, Fit(10, 10))
    assert squashed[:, :3].mean() > 250 and cropped.mean() < 10  # the centre 20x20 of the original is dark
    assert decode(tmp_path / "w.png", 3, Fit(10, 30)).shape == (10, 30, 3)


def test_random_resized_boxes_stay_inside_and_follow_the_seed():
    rng = np.random.default_rng(0)
    boxes = [random_resized_box(64, 48, rng) for _ in range(200)]
    assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in boxes)
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    assert min(areas) >= 0.07 and max(areas) <= 1.0 and np.std(areas) > 0.1  # scale (0.08, 1): varied crops
    again = [random_resized_box(64, 48, np.random.default_rng(0)) for _ in range(1)]
    assert again[0] == boxes[0]


def test_bad_files_mid_stream_are_left_out_counted_and_named(photos, tmp_path):
    data = tmp_path / "bad"
    shutil.copytree(photos, data)
    whole = (data / "red" / "001.jpg").read_bytes()
    (data / "red" / "001.jpg").write_bytes(whole[: len(whole) // 2])  # header intact, pixels cut off
    (data / "green" / "junk.jpg").write_bytes(b"not a jpeg at all")
    run = visrec.Trainer(_cfg(data, data__max_bad_fraction=0.2, data__val_fraction=0.0, train__epochs=1),
                         out=str(tmp_path / "r"), progress=False, quiet=True).fit()
    s = run.summary
    assert s["status"] == "completed"
    skipped = {Path(r["path"]).name: r["problem"] for r in s["skipped_files"]}
    assert set(skipped) <= {"001.jpg", "junk.jpg"} and skipped  # those in the training or test split, as read
    assert "junk.jpg" not in skipped or "cannot read image" in skipped["junk.jpg"]
    with pytest.raises(VisrecError) as e:
        visrec.Trainer(_cfg(data, data__max_bad_fraction=0.0, data__val_fraction=0.0, train__epochs=1),
                       out=str(tmp_path / "r0"), progress=False, quiet=True).fit()
    assert "data.max_bad_fraction=0" in e.value.message and (".jpg" in e.value.message)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_a_streamed_run_resumes_mid_epoch_exactly(photos, packed, tmp_path, source):
    data = photos if source == "folder" else f"wds:{packed}"
    cfg = _cfg(data, train__epochs=2)
    whole = visrec.Trainer(cfg, out=str(tmp_path / "whole"), progress=False, quiet=True).fit()
    cut = visrec.Trainer(_cfg(data, train__epochs=2), out=str(tmp_path / "cut"), progress=False, quiet=True)
    assert cut.fit(stop_after_steps=3).status == "interrupted"
    resumed = visrec.Trainer.resume(tmp_path / "cut", progress=False).fit()
    a, b = whole.load_model("last"), resumed.load_model("last")
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == whole.summary["steps"]


def test_ranks_share_each_epoch_and_see_every_image_once(photos):
    files = sorted(photos.rglob("*.jpg"))
    images = StreamedImages(files, 3, Fit(16, 16))
    labels = torch.arange(len(files))
    seen = []
    for rank in range(2):
        b = LoaderBatches(images, labels, 8, device=torch.device("cpu"), seed=3, rank=rank, world=2, workers=1)
        for x, y in b.epoch(1):
            assert x.shape[1:] == (3, 16, 16) and len(x) == 4  # half of each global batch of 8
            seen += y.tolist()
        b.close()
    n = len(files) // 8 * 8  # the last partial batch is dropped
    assert len(seen) == n and len(set(seen)) == n


def test_pack_writes_webdataset_shards_with_an_index(packed, photos):
    import tarfile

    index = json.loads((packed / "index.json").read_text())
    assert index["classes"] == ["blue", "green", "red"] and index["format"] == "visrec-webdataset-1"
    splits = index["splits"]
    assert sum(s["samples"] for s in splits.values()) == 36 and len(splits["train"]["shards"]) >= 3
    assert splits["test"]["samples"] == visrec.load_dataset(f"folder:{photos}").splits["test"]["n"]  # the same split
    shard = splits["train"]["shards"][0]
    with tarfile.open(packed / shard["name"]) as tar:
        names = tar.getnames()
        keys = {n.split(".", 1)[0] for n in names}
        assert len(keys) == shard["samples"] and len(names) == 3 * len(keys)  # key.jpg, key.cls, key.json
        first = sorted(keys)[0]
        label = int(tar.extractfile(f"{first}.cls").read())
        meta = json.loads(tar.extractfile(f"{first}.json").read())
        original = Path(meta["file"]).read_bytes()
        assert tar.extractfile(f"{first}.jpg").read() == original and meta["label"] == index["classes"][label]
    k, offset, size = splits["train"]["members"][0]
    assert (packed / splits["train"]["shards"][k]["name"]).read_bytes()[offset:offset + size] == original
    # the training samples are shuffled: the first shard does not hold one class only
    assert len({lab for lab in splits["train"]["labels"][:8]}) > 1


def test_training_on_shards_matches_the_folder(packed, streamed_run, tmp_path):
    run = visrec.Trainer(_cfg(f"wds:{packed}"), out=str(tmp_path / "w"), progress=False, quiet=True).fit()
    s, f = run.summary, streamed_run.summary
    assert s["status"] == "completed" and s["data_input"]["cache"] == "none"
    assert (s["n_train"], s["n_val"], s["n_test"]) == (f["n_train"], f["n_val"], f["n_test"])
    assert s["test_acc"] >= 0.8 and abs(s["test_acc"] - f["test_acc"]) <= 0.25
    (pred,) = run.predict([str(sorted(Path(json.loads((packed / "index.json").read_text())["source"][7:])
                                      .rglob("*.jpg"))[0])])
    assert pred.label == "blue"
    # a brace pattern names some of the training shards; the other splits come from the index beside them
    n0 = json.loads((packed / "index.json").read_text())["splits"]["train"]["shards"][0]["samples"]
    n1 = json.loads((packed / "index.json").read_text())["splits"]["train"]["shards"][1]["samples"]
    ds = visrec.load_dataset(f"wds:{packed}/train-{{000000..000001}}.tar", val_fraction=0)
    assert len(ds.train) == n0 + n1 and len(ds.test) == s["n_test"]


def test_a_damaged_shard_member_is_left_out_and_counted(packed, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(packed, data)
    index = json.loads((data / "index.json").read_text())
    train = index["splits"]["train"]
    k, offset, size = train["members"][1]
    shard = data / train["shards"][k]["name"]
    raw = bytearray(shard.read_bytes())
    raw[offset:offset + 16] = bytes(16)  # the JPEG's header bytes zeroed
    shard.write_bytes(bytes(raw))
    last = data / train["shards"][-1]["name"]
    last.write_bytes(last.read_bytes()[:700])  # a shard cut short: its members end early
    run = visrec.Trainer(_cfg(f"wds:{data}", data__max_bad_fraction=0.5, train__epochs=1), out=str(tmp_path / "r"),
                         progress=False, quiet=True).fit()
    problems = {r["path"]: r["problem"] for r in run.summary["skipped_files"]}
    assert any(p.endswith("train#1") and "cannot" in why for p, why in problems.items())
    assert any(train["shards"][-1]["name"] in p and "ends" in why for p, why in problems.items())


def test_downstream_commands_work_on_a_streamed_run(streamed_run, photos, tmp_path):
    from visrec.doctor.exam import ExamOptions, examine
    from visrec.ensemble import ensemble
    from visrec.explain import explain
    from visrec.report import write_report

    s = streamed_run.summary
    assert streamed_run.evaluate().acc == pytest.approx(s["test_acc"], abs=1e-9)  # test split read again, alike
    assert write_report(streamed_run).is_file()
    assert explain(streamed_run, "gradcam", [str(photos / "green" / "001.jpg")], out=tmp_path / "x") is not None
    assert explain(streamed_run, "neighbors", n=2, out=tmp_path / "n") is not None  # reads the training images
    rep = ensemble([f"{streamed_run.path}:last", f"{streamed_run.path}:best"])
    assert len(rep.members) == 2 and rep.combined and rep.best_member_acc >= 0.8
    d = examine(f"folder:{photos}", model="convnet", out=tmp_path / "doc",
                overrides={"data.memory_budget": "1KB", "data.workers": 1, "model.kwargs": {"widths": [8, 16, 16]}},
                options=ExamOptions(overfit_steps=10, lr_steps=8, trial_images=24, trial_val=8, trial_epochs=1,
                                    trial_min_steps=4, checks=("data", "trial")))
    found = {f.id: f for f in d.findings}
    assert found["train-test-overlap"].severity == "ok" and "constant-images" not in found


def test_the_monitor_names_a_data_bound_run_and_the_fix():
    from visrec.doctor.monitor import data_findings

    windows = [{"data_share": 0.9}] + [{"data_share": s} for s in (0.4, 0.5, 0.45)]  # the first window is left out
    (f,) = data_findings(windows, {"data_input": {"cache": "none", "workers": 2}})
    assert f.id == "data-bound" and f.severity == "warn" and "45%" in f.message
    assert "data.workers" in f.fix and "data.cache=disk" in f.fix and f.evidence["workers"] == 2
    (ok,) = data_findings([{"data_share": 0.9}, {"data_share": 0.02}, {"data_share": 0.04}], {})
    assert ok.severity == "ok"
    assert data_findings([{"loss": 1.0}] * 5, {}) == []  # runs that did not measure it


def test_sequential_shard_reading_trains_resumes_exactly_and_counts_damage(packed, tmp_path):
    seq = {"data__shard_read": "sequential", "data__shuffle_buffer": 4, "train__batch_size": 4}
    whole = visrec.Trainer(_cfg(f"wds:{packed}", train__epochs=3, **seq), out=str(tmp_path / "whole"),
                           progress=False, quiet=True).fit()
    s = whole.summary
    assert s["status"] == "completed" and s["test_acc"] > 0.5  # three classes: above chance
    assert s["data_input"]["read_by_rank0"] == s["steps"] * s["batch_size"]  # whole batches of its own shards
    cut = visrec.Trainer(_cfg(f"wds:{packed}", train__epochs=3, **seq), out=str(tmp_path / "cut"), progress=False,
                         quiet=True)
    assert cut.fit(stop_after_steps=3).status == "interrupted"
    resumed = visrec.Trainer.resume(tmp_path / "cut", progress=False).fit()
    for (k, v), w in zip(whole.load_model("last").model.state_dict().items(),
                         resumed.load_model("last").model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k  # the stopped epoch's first batches were skipped, the rest read alike

    data = tmp_path / "d"
    shutil.copytree(packed, data)
    train = json.loads((data / "index.json").read_text())["splits"]["train"]
    k, offset, _ = train["members"][0]
    raw = bytearray((data / train["shards"][k]["name"]).read_bytes())
    raw[offset:offset + 16] = bytes(16)
    (data / train["shards"][k]["name"]).write_bytes(bytes(raw))
    last = data / train["shards"][-1]["name"]
    last.write_bytes(last.read_bytes()[:700])  # cut short: its samples are lost
    run = visrec.Trainer(_cfg(f"wds:{data}", data__max_bad_fraction=0.5, train__epochs=1, **seq),
                         out=str(tmp_path / "r"), progress=False, quiet=True).fit()
    problems = [r["problem"] for r in run.summary["skipped_files"]]
    assert any("cannot" in p for p in problems) and any("ends" in p for p in problems)  # damaged; cut short


def test_each_rank_and_worker_reads_its_own_shards():
    from visrec.data.shards import ShardStream

    shards = [{"url": f"s{k}.tar", "samples": 5, "index": {}} for k in range(7)]
    for epoch in (0, 1):
        taken = []
        for rank in range(2):
            stream = ShardStream(shards, 3, Fit(8, 8), 4, seed=1, rank=rank, world=2, scale=(0.5, 1), ratio=(1, 1),
                                 buffer=8)
            for mine in stream.assignment(epoch, workers=3):
                taken += [sh["url"] for sh in mine]
        assert sorted(taken) == sorted(sh["url"] for sh in shards)  # every shard once, by one worker of one rank
    first = ShardStream(shards, 3, Fit(8, 8), 4, 1, 0, 2, (0.5, 1), (1, 1), 8)
    assert first.assignment(0, 3) != first.assignment(1, 3)  # dealt out anew each epoch


PEAK = """
import sys
from visrec.data import load_dataset
from visrec.data.preprocess import Normalizer

def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024

base = status("VmRSS")
ds = load_dataset(sys.argv[1], image_size=96, cache=sys.argv[2], memory_budget=sys.argv[3])
Normalizer.fit(ds.train.images if not ds.streamed else ds.train.images.sample(512), "channel")
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_loading_a_folder_peaks_near_the_decoded_images_and_streaming_near_nothing(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / "f" / str(k)).mkdir(parents=True)
        for i in range(600):
            a = rng.integers(0, 255, (72, 120, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "f" / str(k) / f"{i}.bmp")
    decoded = 1200 * 3 * 96 * 96  # 33 MB: every split together, at the size training reads

    def peak(cache: str, budget: str = "auto") -> int:
        out = subprocess.run([sys.executable, "-c", PEAK, f"folder:{tmp_path / 'f'}", cache, budget],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    memory, streamed = peak("memory"), peak("auto", "1MB")
    # one copy, the decoders' working set and one 16 MB chunk of the normalizer's statistics (before: 5.3x decoded)
    assert memory < 1.3 * decoded + 50e6, memory / decoded  # (50 MB: modules imported on the way, thread stacks)
    assert streamed < 0.5 * decoded + 50e6, streamed / decoded  # a sample and a batch, never the set


def test_pack_errors_name_what_is_wrong(photos, tmp_path):
    from visrec.data.shards import pack

    with pytest.raises(VisrecError, match="does not exist"):
        pack(f"folder:{tmp_path / 'nothing'}", str(tmp_path / "s"))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VisrecError, match="cannot write the shards to"):
        pack(f"folder:{photos}", str(tmp_path / "file" / "s"), "1MB")
    with pytest.raises(VisrecError, match="--shard-size 'lots' is not a size"):
        pack(f"folder:{photos}", str(tmp_path / "s"), "lots")
    with pytest.raises(VisrecError, match="no index.json"):
        visrec.load_dataset(f"wds:{tmp_path}")
