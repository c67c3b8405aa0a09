"""Downloading the registry's data sets (``gradsparse data download NAME``).

Each file is fetched with urllib into a temporary file next to its destination, its checksum
is verified, and only then is it renamed into place: an interrupted or corrupt download never
leaves a file under the real name. Files already present with the right checksum are skipped.
The CIFAR-10 tarball is then extracted, after every member has been checked (no absolute paths,
no "..", no links or devices).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from .registry import FileEntry, _present, get

CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _split(checksum: str) -> tuple[str, str]:
    algo, sep, value = checksum.partition(":")
    if not sep or algo not in ("md5", "sha256") or not value:
        raise ValueError(f"checksum {checksum!r} must be 'md5:<hex>' or 'sha256:<hex>'")
    return algo, value.lower()


def _expected(entry: FileEntry, dest: Path) -> str | None:
    """The entry's checksum, else the sha256 recorded on first download (``FILE.sha256``)."""
    if entry.checksum is not None:
        return entry.checksum
    rec = dest.with_name(dest.name + ".sha256")
    if rec.is_file():
        value = rec.read_text().split()
        return f"sha256:{value[0]}" if value else None
    return None


def verify(entry: FileEntry, path: Path) -> bool:
    """True when ``path`` matches the entry's (or the recorded) checksum, or none is known."""
    expected = _expected(entry, path)
    if expected is None:
        return True
    algo, value = _split(expected)
    return file_digest(path, algo) == value


def safe_members(tar: tarfile.TarFile, tar_path: Path) -> list[tarfile.TarInfo]:
    """The tarball's members, after checking every one: ValueError naming the tarball and the
    member for an absolute path, a ``..`` component, a link or a device."""
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or p.is_absolute() or (len(m.name) > 1 and m.name[1] == ":"):
            raise ValueError(f"{tar_path}: unsafe member {m.name!r} (absolute path); nothing extracted")
        if ".." in p.parts or ".." in PurePosixPath(m.name.replace("\\", "/")).parts:
            raise ValueError(f"{tar_path}: unsafe member {m.name!r} ('..' in the path); nothing extracted")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"{tar_path}: unsafe member {m.name!r} (links and devices are refused); nothing extracted")
    return members


def extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract ``tar_path`` into ``dest`` after :func:`safe_members` accepted all its members;
    returns the extracted files."""
    tar_path, dest = Path(tar_path), Path(dest)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = safe_members(tar, tar_path)
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kw)
    except (tarfile.TarError, EOFError) as exc:
        raise ValueError(f"{tar_path}: not a readable tarball ({type(exc).__name__}: {exc})") from exc
    return [dest / m.name for m in members if m.isfile()]


def _fetch(url: str, dest: Path, entry: FileEntry, progress: bool) -> None:
    """Download ``url`` to a temporary file beside ``dest``, check it, rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    algo, value = _split(entry.checksum) if entry.checksum is not None else ("sha256", None)
    h, sha = hashlib.new(algo), hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = resp.headers.get("Content-Length")
            from tqdm.auto import tqdm

            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=dest.name, disable=not progress, file=sys.stderr,
                      leave=False) as bar:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    sha.update(block)
                    bar.update(len(block))
        got = h.hexdigest()
        if value is not None and got != value:
            raise ValueError(f"{dest.name}: checksum mismatch for {url}: expected {algo} {value}, got {got}; "
                             f"the download was deleted")
        os.replace(tmp, dest)
        if entry.checksum is None:  # checksum unknown: record it on first download
            dest.with_name(dest.name + ".sha256").write_text(f"{sha.hexdigest()}  {dest.name}\n")
    finally:
        if tmp.exists():
            tmp.unlink()


def download(name: str, data_dir: str | os.PathLike | None = None, *, base_url: str | None = None,
             force: bool = False, progress: bool = True) -> list[Path]:
    """Fetch the files of data set ``name`` into ``DATA_DIR/<name>/``; returns their paths.

    ``base_url`` replaces the registry's hosts (each file is fetched from ``base_url/FILE``).
    A file already present (or stood for by its alternative, e.g. the extracted CIFAR-10
    batches) with the right checksum is skipped unless ``force``; one with a wrong checksum is
    fetched again. A download whose checksum does not match is deleted and raises ValueError
    naming the file, the expected and the actual digest; when every URL of a file fails, OSError
    lists them. The CIFAR-10 tarball is extracted (members checked first)."""
    ds = get(name)
    target = ds.target(data_dir)
    paths = []
    for entry in ds.files:
        dest = target / entry.name
        have = dest.is_file()
        if have and not force and verify(entry, dest):
            paths.append(dest)
        elif not have and not force and _present(target, entry) is not None:
            paths.append(_present(target, entry))  # e.g. only the decompressed or extracted copy
            continue
        else:
            if have and not force:
                print(f"{dest}: checksum does not match; downloading it again", file=sys.stderr)
            urls = [base_url.rstrip("/") + "/" + entry.name] if base_url else list(entry.urls)
            errors = []
            for url in urls:
                try:
                    _fetch(url, dest, entry, progress)
                    break
                except (urllib.error.URLError, OSError) as exc:
                    errors.append(f"{url}: {exc}")
            else:
                raise OSError(f"{name}: could not download {entry.name}: " + "; ".join(errors))
            paths.append(dest)
        if entry.extract and (force or any(not (target / a).is_file() for alt in entry.alternatives for a in alt)):
            extract(dest, target)
    return paths
