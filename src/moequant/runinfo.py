"""What every JSON result records: the command, package versions, the machine, and the code that ran it
(``code_sha256``: a digest of moequant's own source files, known where git is not — a copy of the tree, a wheel).
A resumable job (quantize, a carving build, ``eval ppl``, finetune) also keeps one entry per process that worked
on it (``add_job_run``), so a result finished by a resume after the code changed says so (``job_runs``)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CODE_SUFFIXES = (".py", ".cpp", ".c", ".h")  # what ``code_sha256`` reads: the source that runs


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("moequant", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "moequant " + " ".join(shlex.quote(a) for a in args)


def git_commit() -> str | None:
    """The commit of the source tree moequant runs from (``+dirty`` when it has changes), or None."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def code_sha256(root: Path | None = None) -> str:
    """SHA-256 over the moequant package's source files (``CODE_SUFFIXES``, ``__pycache__`` skipped) under ``root``
    (default: the package in use): each file's path relative to ``root``, its size and its bytes, in the order of
    the paths as strings.
    Two copies of the same tree give the same digest wherever they lie; any edit, addition, removal or rename of a
    source file changes it."""
    return _tree_sha256(Path(root)) if root is not None else _package_sha256()


@functools.lru_cache(maxsize=1)
def _package_sha256() -> str:  # once per process: the code it imported
    return _tree_sha256(Path(__file__).resolve().parent)


def _tree_sha256(root: Path) -> str:
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
             if p.suffix in CODE_SUFFIXES and p.is_file() and "__pycache__" not in p.relative_to(root).parts}
    return code_digest((name, files[name].read_bytes()) for name in sorted(files))


def code_digest(files: Any) -> str:
    """``code_sha256``'s formula over ``(relative posix path, bytes)`` pairs given in sorted path order (also
    computed from a git commit's blobs by ``benchmarks/code_commit.py``)."""
    h = hashlib.sha256()
    for name, data in files:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def run_info(argv: list[str] | None = None) -> dict[str, Any]:
    return {"command": command_line(argv), "versions": versions(), "machine": machine(), "git": git_commit(),
            "code_sha256": code_sha256()}


def add_job_run(runs: Any, resumed: bool, where: str | Path) -> list[dict[str, Any]]:
    """The processes that worked on a resumable job (kept with its progress), this one appended: when it started,
    ``code_sha256`` and ``git``. A resumed job whose record predates this list starts with an unknown entry. Warns
    when the previous process ran other code: what it kept was made by that code, and the result will list both."""
    import datetime

    runs = [dict(r) for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
    if resumed and not runs:
        runs = [{"started": None, "code_sha256": None, "git": None}]
    me = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "code_sha256": code_sha256(), "git": git_commit()}
    if runs and runs[-1].get("code_sha256") != me["code_sha256"]:
        before = runs[-1].get("code_sha256")
        log.warning("--resume: %s was left by other moequant code (code_sha256 %s, now %s): what it kept was made by "
                    "that code; the result lists every run's code (job_runs)", where,
                    before[:12] if isinstance(before, str) else "unknown", me["code_sha256"][:12])
    return [*runs, me]


def job_runs(job: dict[str, Any]) -> dict[str, Any]:
    """``{"job_runs": [...]}`` for a result that more than one process worked on (``job["runs"]``, as
    ``add_job_run`` keeps them), else ``{}``."""
    runs = job.get("runs")
    return {"job_runs": runs} if isinstance(runs, list) and len(runs) > 1 else {}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def return_free_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap pages back to the OS (``malloc_trim``).

    The streaming path frees one layer's tensors per step; without the trim, glibc keeps the freed
    arenas and the process's RSS creeps up layer after layer (measured on SmolLM2: +170 MiB of anonymous
    memory over 30 layers, flat with the trim). A no-op where glibc is not the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Highest RSS seen while the ``with`` block runs, sampled every ``interval`` s by a daemon thread.

    ``ru_maxrss`` is a process-lifetime maximum, so it cannot tell a phase's peak from an earlier one
    (tokenizing the calibration text); this can. ``peak_bytes`` is valid after the block (and, as a
    running value, during it)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = None
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self) -> "RssSampler":
        import threading

        self.peak_bytes = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
