"""Manifests of cache entries: the SHA-256, size and mtime of every file of a directory the zoo built
(a GGUF alias converted to a Hugging Face directory, a tiny OLMoE build), written atomically when the
entry is made and checked on each use.

Cost (measured on SmolLM2-135M's converted directory, 517 MiB, page cache warm, one core): SHA-256 of
every file 0.80 s, ``stat`` of every file 0.1 ms. Hashing every file on each use would add seconds to
every command on the larger aliases (6.7 GiB for qwen2.5-coder-1.5b), so a use checks the file list,
sizes and mtimes (``verify_manifest(full=False)``) and hashes only a file whose mtime moved (a copy, a
rewrite: same hash -> the manifest is updated, else the entry is corrupted); ``moequant zoo verify
ALIAS`` hashes everything (``full=True``). An entry without a manifest (made by an older moequant) gets
one recorded on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.fsutil import read_json_object, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "moequant-manifest.json"
MANIFEST_VERSION = 1


def _files(directory: Path) -> list[Path]:
    """Regular files of the entry (the manifest and dot files — temp names, editor files — excluded)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def _record(path: Path) -> dict[str, Any]:
    from moequant.zoo.fetch import sha256_file

    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_manifest(directory: Path, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` and write ``MANIFEST`` there (atomically)."""
    directory = Path(directory)
    manifest = {"manifest_version": MANIFEST_VERSION, "algorithm": "sha256",
                "files": {p.name: _record(p) for p in _files(directory)}, "source": source or {}}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    m = read_json_object(Path(directory) / MANIFEST)
    if m is None or not isinstance(m.get("files"), dict):
        return None
    return m


def verify_manifest(directory: Path, what: str, fix: str, full: bool = False) -> dict[str, Any]:
    """Check ``directory`` against its manifest; raise one line naming the entry, the file and ``fix``
    (the command that rebuilds it) when a file is missing, added, resized or changed. ``full`` hashes
    every file; otherwise only the files whose mtime moved. Records a manifest when there is none."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if (directory / MANIFEST).exists():
            raise MoequantError(f"{what}: {directory / MANIFEST} is unreadable; {fix}")
        log.info("%s: no manifest in %s (made by an earlier moequant): recording the SHA-256 of its files now",
                 what, directory)
        return write_manifest(directory)
    files = manifest["files"]
    present = {p.name: p for p in _files(directory)}

    def bad(name: str, why: str) -> MoequantError:
        return MoequantError(f"{what}: cache entry {directory} is corrupted ({name} {why}); {fix}")

    missing, extra = sorted(set(files) - set(present)), sorted(set(present) - set(files))
    if missing:
        raise bad(missing[0], "is missing")
    if extra:
        raise bad(extra[0], "is not in its manifest")
    changed = False
    for name, rec in sorted(files.items()):
        st = present[name].stat()
        if st.st_size != rec.get("size"):
            raise bad(name, f"has {st.st_size} bytes, expected {rec.get('size')}")
        if full or st.st_mtime_ns != rec.get("mtime_ns"):
            got = _record(present[name])
            if got["sha256"] != rec.get("sha256"):
                raise bad(name, f"has SHA-256 {got['sha256'][:16]}..., expected {str(rec.get('sha256'))[:16]}...")
            if got["mtime_ns"] != rec.get("mtime_ns"):
                rec["mtime_ns"], changed = got["mtime_ns"], True
    if changed:
        atomic_write_json(directory / MANIFEST, manifest)
    return manifest
