from __future__ import annotations

import gzip
import pickle
import tarfile

import numpy as np
import pytest
import torch

import visrec
from conftest import make_cifar_folder, make_image_folder, make_mnist_folder, write_idx
from visrec.data import load_dataset
from visrec.data.catalog import dataset_status, locate
from visrec.data.sources import read_idx
from visrec.errors import VisrecError


def test_idx_reader_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        p = write_idx(tmp_path / f"x{compress}-idx3-ubyte", a, compress)
        assert torch.equal(read_idx(p), torch.from_numpy(a))


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 5, 5), np.uint8), compress=False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(VisrecError, match=f"{p}.*truncated"):
        read_idx(p)
    q = tmp_path / "not.gz"
    with gzip.open(q, "wb") as f:
        f.write(b"\x89PNG....")
    with pytest.raises(VisrecError, match="not an IDX file"):
        read_idx(q)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_data_dir(tmp_path, compress):
    made = make_mnist_folder(tmp_path / "d" / "mnist", compress=compress)
    ds = load_dataset("mnist", data_dir=tmp_path / "d", val_fraction=0.2)
    assert ds.train.images.shape[1:] == (1, 28, 28)
    assert len(ds.train) + len(ds.val) == 60 and len(ds.test) == 20
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(made["t10k"][0]))
    assert ds.splits["test"]["kind"] == "official"
    assert ds.classes == [str(i) for i in range(10)]


def test_lookup_order_data_dir_before_env_before_cache(tmp_path, monkeypatch):
    make_mnist_folder(tmp_path / "env" / "mnist", seed=1)
    make_mnist_folder(tmp_path / "cache" / "visrec" / "mnist", seed=2)
    assert locate("mnist") == tmp_path / "cache" / "visrec" / "mnist"
    monkeypatch.setenv("VISREC_DATA", str(tmp_path / "env"))
    assert locate("mnist") == tmp_path / "env" / "mnist"
    make_mnist_folder(tmp_path / "explicit", seed=3)  # files directly in --data-dir
    assert locate("mnist", tmp_path / "explicit") == tmp_path / "explicit"


def test_missing_dataset_lists_places_and_commands(tmp_path):
    with pytest.raises(VisrecError) as e:
        load_dataset("mnist", data_dir=tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert "not found" in msg and str(tmp_path / "nowhere") in msg and "/usr/share/datasets/mnist" in msg
    assert "visrec data fetch mnist" in msg


def test_unknown_dataset_lists_catalog():
    with pytest.raises(VisrecError) as e:
        load_dataset("fashion_mnist")
    assert "fashion-mnist" in str(e.value) and "cifar10" in str(e.value) and "folder:PATH" in str(e.value)


def test_cifar10_folder_and_archive(tmp_path):
    arrays = make_cifar_folder(tmp_path / "c" / "cifar10" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=tmp_path / "c", val_fraction=0.1)
    assert ds.channels == 3 and ds.image_size == (32, 32)
    assert len(ds.train) + len(ds.val) == 50 and len(ds.test) == 10
    x, _ = arrays["test_batch"]
    assert torch.equal(ds.test.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert ds.classes == [f"c{i}" for i in range(10)]
    # the same files as the official .tar.gz
    archive = tmp_path / "a" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "c" / "cifar10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", data_dir=tmp_path / "a", val_fraction=0.1)
    assert torch.equal(ds2.test.images, ds.test.images)


def test_cifar100_fine_labels(tmp_path):
    arrays = make_cifar_folder(tmp_path / "cifar100" / "cifar-100-python", variant="cifar100")
    ds = load_dataset("cifar100", data_dir=tmp_path, val_fraction=0)
    assert ds.num_classes == 100 and ds.test.labels.tolist() == arrays["test"][1]


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    make_cifar_folder(folder)

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(VisrecError, match="test_batch.*refusing to load builtins.exec"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_digits_gets_a_recorded_stratified_test_split():
    ds = load_dataset("digits", split_seed=0)
    assert ds.image_size == (8, 8) and ds.num_classes == 10
    assert ds.splits["test"]["kind"] == "held-out"
    n_total = len(ds.train) + len(ds.val) + len(ds.test)
    assert n_total == 1797
    assert abs(len(ds.test) - 0.2 * 1797) <= 10
    counts = torch.bincount(ds.test.labels, minlength=10).float()
    assert counts.min() >= 0.8 * counts.max()  # stratified: every class about 20%
    test_idx, val_idx = set(ds.splits["test"]["indices"]), set(ds.splits["val"]["indices"])
    assert not test_idx & val_idx
    again = load_dataset("digits", split_seed=0)
    assert torch.equal(again.test.images, ds.test.images)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.test.labels, ds.test.labels)
    assert int(ds.train.images.max()) == 255  # 0..16 scaled to 0..255


def test_synthetic_is_deterministic_and_configurable():
    a = load_dataset("synthetic:classes=4,channels=3,size=16,train=80,test=40")
    b = load_dataset("synthetic:classes=4,channels=3,size=16,train=80,test=40")
    assert a.train.images.shape[1:] == (3, 16, 16) and a.num_classes == 4
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    c = load_dataset("synthetic:classes=4,channels=3,size=16,train=80,test=40,seed=5")
    assert not torch.equal(a.train.images, c.train.images)
    with pytest.raises(VisrecError, match="unknown parameter 'colors'"):
        load_dataset("synthetic:colors=3")


def test_image_folder_without_splits(tmp_path):
    make_image_folder(tmp_path / "pets", per_class=10, splits=("",))
    ds = load_dataset(f"folder:{tmp_path / 'pets'}", val_fraction=0.2, test_fraction=0.2)
    assert ds.classes == ["cat", "dog", "emu"] and ds.channels == 3 and ds.image_size == (10, 12)
    assert ds.splits["test"]["kind"] == "held-out" and len(ds.test) == 6
    # brightness encodes the class: labels follow folder names
    means = [ds.train.images[ds.train.labels == k].float().mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_image_folder_with_splits_matches_classes_by_name(tmp_path):
    make_image_folder(tmp_path / "p", splits=("train", "test"), mode="L")
    # test/ lacks 'dog': labels must still follow the train class list by name
    import shutil

    shutil.rmtree(tmp_path / "p" / "test" / "dog")
    ds = load_dataset(f"folder:{tmp_path / 'p'}", val_fraction=0)
    assert ds.channels == 1 and ds.splits["test"]["kind"] == "official"
    assert sorted(set(ds.test.labels.tolist())) == [0, 2]
    assert ds.test.images[ds.test.labels == 2].float().mean() > 150  # 'emu' is the bright class


def test_image_folder_errors_name_the_file(tmp_path):
    made = make_image_folder(tmp_path / "p", splits=("",))
    from PIL import Image

    odd = made[""][4]
    Image.new("RGB", (20, 40), (250, 250, 250)).save(odd)  # another size and shape: fitted, never an error
    ds = load_dataset(f"folder:{tmp_path / 'p'}", val_fraction=0)
    h, w = ds.image_size
    assert ds.fit.state() == {"size": [h, w], "crop_pct": 1.0, "mode": "crop"}
    ds = load_dataset(f"folder:{tmp_path / 'p'}", image_size=8, val_fraction=0)
    assert ds.image_size == (8, 8)
    made[""][0].write_bytes(b"not a png")
    with pytest.raises(VisrecError, match=str(made[""][0])):
        load_dataset(f"folder:{tmp_path / 'p'}", image_size=8)


def test_image_folder_structure_errors(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(VisrecError, match="class folder .*only has no images"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    (tmp_path / "none").mkdir()
    with pytest.raises(VisrecError, match="holds no images and no class folders"):
        load_dataset(f"folder:{tmp_path / 'none'}")
    make_image_folder(tmp_path / "single", classes=("cat",))  # one class: data for generative models and style
    assert load_dataset(f"folder:{tmp_path / 'single'}").classes == ["cat"]
    with pytest.raises(VisrecError, match="a classifier needs at least 2"):  # the classification task refuses it
        visrec.train(f"folder:{tmp_path / 'single'}", epochs=1, out=str(tmp_path / "r"), progress=False)
    make_image_folder(tmp_path / "p", splits=("train", "test"))
    (tmp_path / "p" / "test" / "yak").mkdir()
    (tmp_path / "p" / "test" / "yak" / "a.png").write_bytes((tmp_path / "p" / "train" / "cat" / "000.png").read_bytes())
    with pytest.raises(VisrecError, match="class 'yak' does not exist"):
        load_dataset(f"folder:{tmp_path / 'p'}")
    with pytest.raises(VisrecError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


def test_image_conversions(tmp_path):
    from PIL import Image

    from visrec.data.images import decode

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white background
    rgba.save(tmp_path / "t.png")
    assert decode(tmp_path / "t.png", 3).min() == 255
    g16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit white scales to 255, not clipped garbage
    g16.save(tmp_path / "g16.png")
    assert decode(tmp_path / "g16.png", 1).tolist() == np.full((4, 4, 1), 255).tolist()
    half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    half.save(tmp_path / "h16.png")
    assert abs(int(decode(tmp_path / "h16.png", 1)[0, 0, 0]) - 128) <= 1
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert decode(tmp_path / "g.png", 3).shape == (4, 4, 3)


def test_dataset_status_reports_found_and_missing(tmp_path):
    make_mnist_folder(tmp_path / "d" / "mnist")
    rows = {r["name"]: r for r in dataset_status(tmp_path / "d")}
    assert rows["mnist"]["found"] and rows["mnist"]["bytes"] > 0
    assert rows["digits"]["found"] and rows["synthetic"]["found"]
    assert rows["scenes"]["where"] == "generated on demand, cached as COCO"
    assert set(rows) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic", "scenes"}


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on localhost serving the folder it yields (URL, folder)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_download_verifies_checksums(tmp_path, http_root):
    from visrec.data.download import download, md5_of

    url, root = http_root
    (root / "f.gz").write_bytes(b"payload")
    dest = tmp_path / "dl" / "f.gz"
    with pytest.raises(VisrecError, match="checksum mismatch"):
        download(f"{url}/f.gz", dest, "0" * 32)
    assert not dest.exists() and not list(dest.parent.glob(".f.gz*"))  # no partial file left behind
    assert download(f"{url}/f.gz", dest, md5_of(root / "f.gz")).read_bytes() == b"payload"
    with pytest.raises(VisrecError, match="could not download"):
        download(f"{url}/missing.gz", tmp_path / "m.gz", None)


def test_fetch_then_load_from_cache(tmp_path, http_root, monkeypatch):
    """`fetch` downloads every file of a catalog entry into the cache; loading then finds them there."""
    import dataclasses

    from visrec.data import catalog
    from visrec.data.download import md5_of

    url, root = http_root
    make_mnist_folder(root)
    entry = catalog.CATALOG["mnist"]
    files = [u.rsplit("/", 1)[1] for u, _ in entry.downloads]
    local = dataclasses.replace(entry, downloads=[(f"{url}/{f}", md5_of(root / f)) for f in files])
    monkeypatch.setitem(catalog.CATALOG, "mnist", local)
    ds = load_dataset("mnist", val_fraction=0)  # not found anywhere -> downloaded
    assert len(ds.train) == 60 and ds.source == str(tmp_path / "cache" / "visrec" / "mnist")
    assert locate("mnist") == tmp_path / "cache" / "visrec" / "mnist"


def test_the_decoded_cache_is_written_once_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from visrec.data import images as images_module
    from visrec.data.decoded_cache import cache_folder

    made = make_image_folder(tmp_path / "photos", per_class=8, size=(20, 14), splits=("",))[""]
    name = f"folder:{tmp_path / 'photos'}"
    memory = load_dataset(name, image_size=12, cache="memory")
    disk = load_dataset(name, image_size=12, cache="disk")
    for a, b in ((memory.train, disk.train), (memory.val, disk.val), (memory.test, disk.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # the same pixels, either way
    entries = sorted(p.name for p in cache_folder().glob("*.npy"))
    assert len(entries) == 3  # train, val and test

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(images_module, "decode", no_decoding)
        again = load_dataset(name, image_size=12, cache="disk")  # a second run decodes nothing
        assert torch.equal(again.train.images, disk.train.images)
        again.train.images[0] = 0  # copy-on-write: the cache itself is untouched
        assert torch.equal(load_dataset(name, image_size=12, cache="disk").train.images, disk.train.images)

    changed = made[0]
    Image.new("RGB", (20, 14), (255, 255, 255)).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    fresh = load_dataset(name, image_size=12, cache="disk")
    assert torch.equal(fresh.train.images, load_dataset(name, image_size=12, cache="memory").train.images)
    now = sorted(p.name for p in cache_folder().glob("*.npy"))
    assert len(now) == 3 and now != entries  # the changed split rebuilt, its stale entry removed
    with pytest.raises(visrec.VisrecError, match="data.cache='ram' is not valid"):
        load_dataset(name, image_size=12, cache="ram")


def test_a_decoded_cache_that_cannot_be_written_says_where_and_how_to_go_on(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "photos", per_class=4, size=(10, 8), splits=("",))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache's folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    with pytest.raises(visrec.VisrecError, match=r"cannot write the decoded cache .*not-a-folder") as e:
        load_dataset(f"folder:{tmp_path / 'photos'}", cache="disk")
    assert "data.cache=memory" in e.value.hint
    assert len(load_dataset(f"folder:{tmp_path / 'photos'}", cache="memory").train) > 0


def test_the_decoded_cache_is_listed_and_cleared_by_the_command(tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from visrec.cli import app

    for name in ("a", "b"):
        make_image_folder(tmp_path / name, per_class=4, size=(10, 8), splits=("",))
        load_dataset(f"folder:{tmp_path / name}", cache="disk")
    runner = CliRunner()
    rows = json.loads(runner.invoke(app, ["data", "cache", "--json"]).stdout)
    assert len(rows) == 6 and all(r["files_present"] and r["bytes"] > 0 for r in rows)
    assert sum(r["files"] for r in rows) == 24
    shutil.rmtree(tmp_path / "b")  # a folder deleted: its entries are orphans
    res = runner.invoke(app, ["data", "cache", "--clear", "--orphans"])
    assert res.exit_code == 0 and "removed 3 entries" in res.stdout
    assert len(json.loads(runner.invoke(app, ["data", "cache", "--json"]).stdout)) == 3
    assert "3 entries" in runner.invoke(app, ["data", "cache"]).stdout
    res = runner.invoke(app, ["data", "cache", "--clear"])
    assert "removed 3 entries" in res.stdout
    assert json.loads(runner.invoke(app, ["data", "cache", "--json"]).stdout) == []
