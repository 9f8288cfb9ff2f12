"""Files and directories that never lose data: the one atomic writer, output checks made before any
work, and the cleaning of what a killed run left behind.

- **Atomic writes** (``atomic_write_bytes/text/json``, ``atomic_file``, ``AtomicDir``): the content goes
  to a uniquely named temp file or directory beside the target, is flushed and fsynced, then renamed
  over the target with ``os.replace``. A reader sees the old content or the new, never half of it.
- **Temp names** say who made them: ``.<target>.moequant-tmp-<pid>-<host>-<rand>`` (also ``-old-`` for
  a directory being replaced, ``moequant-act-…`` for activation spills). ``<host>`` is a short hash of
  the host name, so a shared filesystem never sees one machine clean another's live files.
- **Stale leftovers**: before writing into a directory, ``clean_stale`` removes the temp names there
  whose process (same host) is no longer alive, one log line each; live ones are left alone.
- **Output checks** (``check_writable``, ``check_output``, ``check_replaceable``): run at the start of a
  command; ``--overwrite`` may replace only an empty directory or one moequant wrote (``is_moequant_output``),
  never ``/``, the home directory, the cwd or an ancestor of it, the zoo cache (except our own runs in
  it), or the input model's directory or an ancestor of it.
- **Locks** (``file_lock``): an exclusive ``flock`` while one process builds what others will read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from moequant.errors import MoequantError

log = logging.getLogger(__name__)

TEMP_KINDS = ("tmp", "old", "act")
_LEFTOVER = re.compile(r"^(?:\.(?P<stem>.+)\.)?moequant-(?P<kind>tmp|old|act)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})"
                       r"-[0-9a-f]{8}(?:\.[a-z]+)?$")


def host_tag() -> str:
    """6 hex digits of SHA-256 of the host name: which machine made a temp name."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_name(kind: str = "tmp", stem: str = "", suffix: str = "") -> str:
    """``.<stem>.moequant-<kind>-<pid>-<host>-<rand><suffix>`` (``moequant-<kind>-…`` without a stem)."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temp kind {kind!r} not in {TEMP_KINDS}")
    core = f"moequant-{kind}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}{suffix}"
    return f".{stem}.{core}" if stem else core


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(directory: Path) -> list[Path]:
    """Remove the moequant temp files/directories in ``directory`` left by dead processes of this host;
    returns what was removed. Live processes' temp names and everything else are left alone. An
    ``-old-`` directory whose target is missing (killed between the two renames of ``AtomicDir``) is
    renamed back to its target instead."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.search(entry.name)
        if m is None or m["host"] != host_tag():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = Path(entry.path)
        target = path.parent / m["stem"] if m["stem"] else None
        if m["kind"] == "old" and target is not None and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(path, target)
                log.warning("restored %s from %s, left aside by process %d that no longer runs", target, path, pid)
                continue
        remove_path(path)
        log.info("removed %s, left behind by process %d that no longer runs", path, pid)
        removed.append(path)
    return removed


def make_temp_dir(parent: Path, stem: str = "", kind: str = "tmp") -> Path:
    """A new, empty directory with a moequant temp name in ``parent`` (created, stale ones cleaned)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    while True:
        path = parent / temp_name(kind, stem)
        try:
            path.mkdir(mode=0o755)
            return path
        except FileExistsError:  # 32 random bits: practically never
            continue


@contextlib.contextmanager
def temp_dir(parent: Path | None = None, kind: str = "tmp") -> Iterator[Path]:
    """``make_temp_dir`` in ``parent`` (default: the system temp directory), removed on exit."""
    path = make_temp_dir(Path(parent) if parent is not None else Path(tempfile.gettempdir()), kind=kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, what: str = "") -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed; never deleted, so no race on it).
    Waits, with one log line, while another process holds it. Where the lock file cannot be created
    (a read-only cache), goes on without it. Yields whether the lock is held (the kernel releases it when
    the holder dies, however it dies)."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        log.debug("no lock %s (%s): going on without it", path, e)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another moequant process to finish %s (lock %s)", what or path.stem, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------ atomic files

@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success fsync it and rename it over ``path``;
    on any exception (KeyboardInterrupt included) remove it and leave ``path`` as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = path.parent / temp_name("tmp", path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def json_text(obj: Any, indent: int | None = 1, sort_keys: bool = True, default: Callable | None = None) -> str:
    """The JSON moequant writes: sorted keys (same content, same bytes), a final newline."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, sort_keys: bool = True,
                      default: Callable | None = None) -> None:
    atomic_write_text(path, json_text(obj, indent, sort_keys, default))


def copy_file_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as s, atomic_file(dst) as d:
        shutil.copyfileobj(s, d, 1 << 22)


# ---------------------------------------------------------------------------------------- output checks

def check_writable(path: str | Path, what: str = "output", is_dir: bool = False) -> None:
    """Fail now, naming ``what`` and ``path``, when ``path`` could not be written later: the directory
    that will receive it (its parent when it exists, else its nearest existing ancestor) must be a
    writable directory; an existing ``path`` must be a directory when ``is_dir`` (a file otherwise)."""
    if str(path) == "":
        raise MoequantError(f"{what}: empty path")
    p = Path(path).expanduser().absolute()
    if p.exists() or p.is_symlink():
        if is_dir and not p.is_dir():
            raise MoequantError(f"{what} {path}: exists and is not a directory")
        if not is_dir and p.is_dir():
            raise MoequantError(f"{what} {path}: is a directory, expected a file name")
        anc = p.parent  # written beside it (a temp name), then renamed over it
    else:
        anc = p.parent
        while not (anc.exists() or anc.is_symlink()):
            anc = anc.parent
    if not anc.is_dir():
        raise MoequantError(f"{what} {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MoequantError(f"{what} {path}: directory {anc} is not writable")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None (missing, unreadable, not JSON, not an object)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_moequant_checkpoint(path: Path) -> bool:
    cfg = read_json_object(Path(path) / "config.json")
    q = cfg.get("quantization_config") if cfg else None
    return isinstance(q, dict) and q.get("quant_method") == "moequant"


def is_moequant_output(path: Path) -> bool:
    """A directory moequant wrote: a checkpoint (``config.json`` with ``quantization_config.quant_method
    == "moequant"``), or a run directory whose ``summary.json`` / ``compare.json`` / ``report.json``
    records a ``moequant …`` command."""
    path = Path(path)
    if is_moequant_checkpoint(path):
        return True
    for name in ("summary.json", "compare.json", "report.json"):
        obj = read_json_object(path / name)
        if obj is not None and str(obj.get("command", "")).startswith("moequant "):
            return True
    return False


_DEFAULT_KIND = "a moequant output (checkpoint or run directory) or an empty directory"


def is_empty_dir(path: Path) -> bool:
    return Path(path).is_dir() and not any(Path(path).iterdir())


def is_replaceable_output(path: Path) -> bool:
    """What ``--overwrite`` may replace by default: an empty directory or a moequant output."""
    return is_empty_dir(path) or is_moequant_output(path)


def protected_dirs(sources: Iterable[str | Path] = ()) -> list[tuple[Path, str, bool]]:
    """(directory, why, ancestors protected too) that an output may never replace."""
    from moequant.zoo.fetch import cache_root

    out = [(Path("/"), "the root directory", False), (Path.home(), "the home directory", True),
           (Path.cwd(), "the current directory", True), (cache_root(), "the moequant cache", True)]
    out += [(Path(s), "an input of this command", True) for s in sources]
    return [(p.expanduser().resolve(), why, anc) for p, why, anc in out]


def check_not_inside(out: str | Path, sources: Iterable[str | Path], what: str = "--out",
                     sources_what: str = "model") -> None:
    """``out`` may not be an input (``sources``), lie inside one, or contain one."""
    r = Path(out).expanduser().resolve()
    for s in sources:
        sr = Path(s).expanduser().resolve()
        if r == sr:
            raise MoequantError(f"{what} {out}: is the input {sources_what} {s}; choose another {what}")
        if sr in r.parents:
            raise MoequantError(f"{what} {out}: is inside the input {sources_what} {s}; choose a directory outside it")
        if r in sr.parents:
            raise MoequantError(f"{what} {out}: contains the input {sources_what} {s}; choose another {what}")


def check_replaceable(out: str | Path, what: str = "--out", sources: Iterable[str | Path] = (),
                      is_ours: Callable[[Path], bool] = is_replaceable_output, kind: str = _DEFAULT_KIND) -> None:
    """Raise unless ``--overwrite`` may remove the existing ``out``: a real directory (no symlink) that
    ``is_ours`` accepts (default: empty or a moequant output; inside the cache an empty one is not
    enough), and none of ``protected_dirs``."""
    p = Path(out).expanduser()
    if p.is_symlink():
        raise MoequantError(f"{what} {out}: is a symbolic link; --overwrite replaces only real directories")
    if not p.is_dir():
        raise MoequantError(f"{what} {out}: exists and is not a directory; --overwrite will not replace it")
    r = p.resolve()
    in_cache = False
    for d, why, ancestors in protected_dirs(sources):
        if r == d or (ancestors and r in d.parents):
            rel = "is" if r == d else "is an ancestor of"
            raise MoequantError(f"{what} {out}: {rel} {why} ({d}); --overwrite will not replace it")
        in_cache = in_cache or (why == "the moequant cache" and d in r.parents)
    if is_ours(p) and not (in_cache and is_empty_dir(p)):
        return
    raise MoequantError(f"{what} {out}: exists and is not {kind}, so it is not replaced; remove it yourself "
                        f"or choose another {what}")


def check_output(out: str | Path, overwrite: bool, what: str = "--out", sources: Iterable[str | Path] = (),
                 is_ours: Callable[[Path], bool] = is_replaceable_output, kind: str = _DEFAULT_KIND,
                 sources_what: str = "model") -> None:
    """Every check of an output directory, made before any work: not inside/containing an input,
    writable, and absent unless ``overwrite`` may replace it. Then the stale leftovers of dead runs
    beside it and in the temp directory are removed (``clean_stale``)."""
    sources = list(sources)
    check_not_inside(out, sources, what, sources_what)
    check_writable(out, what, is_dir=True)
    p = Path(out).expanduser()
    clean_stale(p.absolute().parent)
    clean_stale(Path(tempfile.gettempdir()))
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise MoequantError(f"{what} {out}: already exists (choose another {what} or pass --overwrite)")
        check_replaceable(out, what, sources, is_ours, kind)


def is_moequant_result(path: Path) -> bool:
    """A JSON result file moequant wrote: an object recording a ``moequant …`` command."""
    obj = read_json_object(Path(path))
    return obj is not None and str(obj.get("command", "")).startswith("moequant ")


def check_json_output(path: str | Path, what: str = "--json") -> None:
    """A result file: writable now, and an existing file only if moequant wrote it (or it is empty) —
    ``--json model/config.json`` must not destroy the model's config."""
    check_writable(path, what)
    p = Path(path).expanduser()
    if p.is_file() and p.stat().st_size > 0 and not is_moequant_result(p):
        raise MoequantError(f"{what} {path}: exists and is not a moequant result JSON; choose another file "
                            "or remove it yourself")


def input_paths(*specs: str | Path | None) -> list[Path]:
    """The local files/directories among model specs (zoo aliases and hub ids are not paths)."""
    return [Path(s).expanduser() for s in specs if s and Path(s).expanduser().exists()]


# ------------------------------------------------------------------------------------- atomic directory

class AtomicDir:
    """Write a directory under a temp name beside ``out`` and rename it into place on success.

    Refuses an existing ``out`` unless ``overwrite`` and ``check_replaceable`` allows it (checked on
    entry and again before the swap); on any exception the temp dir is removed. The old ``out`` is
    renamed aside (``-old-`` temp name) before the new one takes its place, then removed: a kill at any
    point leaves either ``out`` or a leftover the next run cleans.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, *, what: str = "output directory",
                 is_ours: Callable[[Path], bool] = is_replaceable_output, kind: str = _DEFAULT_KIND) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.what, self.is_ours, self.kind = what, is_ours, kind
        self.tmp: Path | None = None

    def _check(self) -> None:
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise MoequantError(f"{self.what} {self.out} already exists (choose another --out or remove it)")
            check_replaceable(self.out, self.what, is_ours=self.is_ours, kind=self.kind)

    def __enter__(self) -> Path:
        self._check()
        check_writable(self.out, self.what, is_dir=True)
        self.tmp = make_temp_dir(self.out.parent, self.out.name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        try:
            self._check()
            if self.out.exists():
                old = self.out.parent / temp_name("old", self.out.name)
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None and old.exists() and not self.out.exists():
                os.replace(old, self.out)  # interrupted between the two renames: put the old one back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
