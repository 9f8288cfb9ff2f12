"""Nothing of the user's is ever lost: ``--overwrite`` replaces only a moequant output or an empty
directory (never the cwd, an ancestor of it, home, ``/``, the cache, the input model); outputs are
checked writable before any work; every write is atomic; stale leftovers of dead runs are cleaned and
live ones kept. Each refusal is one line naming the path, and a sentinel file proves nothing was deleted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model
from moequant.cli import main
from moequant.errors import MoequantError
from moequant.fsutil import (
    AtomicDir,
    atomic_file,
    atomic_write_json,
    check_output,
    check_replaceable,
    clean_stale,
    host_tag,
    temp_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RTN = ["--method", "int", "--bits", "4", "--group-size", "32", "--solver", "rtn"]
NOT_OURS = ("exists and is not a moequant output (checkpoint or run directory) or an empty directory, so it is "
            "not replaced; remove it yourself or choose another --out")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["-q", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _error_line(err: str) -> str:
    """The one ``moequant: error:`` line of stderr (asserting there is exactly one)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("moequant: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _listing(d: Path) -> dict[str, bytes | None]:
    """Every entry under ``d`` with its bytes (None for directories)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A model directory, a cwd with a sentinel, a home and a cache (both set through the environment)."""
    model = tmp_path / "models" / "m"
    tiny_model("llama").save_pretrained(model)
    cwd = tmp_path / "work" / "sub"
    cwd.mkdir(parents=True)
    (cwd / "sentinel.txt").write_text("keep me")
    home, cache = tmp_path / "home", tmp_path / "cache"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "sentinel.txt").write_text("keep me")
    (cache / "corpora" / "ptb").mkdir(parents=True)
    (cache / "corpora" / "ptb" / "test.txt").write_text("corpus")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MOEQUANT_CACHE", str(cache))
    monkeypatch.chdir(cwd)
    return {"root": tmp_path, "model": model, "cwd": cwd, "home": home, "cache": cache}


# ----------------------------------------------------------------------------------- --overwrite refusals

def test_overwrite_refuses_a_foreign_directory_and_deletes_nothing(env, capsys):
    foreign = env["root"] / "important"
    foreign.mkdir()
    (foreign / "sentinel.txt").write_text("keep me")
    before = _listing(env["root"])
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(foreign), "--overwrite", *RTN)
    assert rc == 2
    assert _error_line(err) == f"moequant: error: --out {foreign}: {NOT_OURS}"
    assert _listing(env["root"]) == before


def _protected_cases(env) -> list[tuple[str, str]]:
    m, cwd, home, cache = env["model"], env["cwd"], env["home"], env["cache"]
    return [
        (".", f"--out .: is the current directory ({cwd}); --overwrite will not replace it"),
        (str(cwd.parent), f"--out {cwd.parent}: is an ancestor of the current directory ({cwd}); --overwrite will "
                          "not replace it"),
        (str(home), f"--out {home}: is the home directory ({home}); --overwrite will not replace it"),
        (str(cache), f"--out {cache}: is the moequant cache ({cache}); --overwrite will not replace it"),
        (str(m), f"--out {m}: is the input model {m}; choose another --out"),
        (str(m.parent), f"--out {m.parent}: contains the input model {m}; choose another --out"),
        ("/", f"--out /: contains the input model {m}; choose another --out"),
        (str(cache / "corpora"), f"--out {cache / 'corpora'}: {NOT_OURS}"),
    ]


def test_overwrite_refuses_every_protected_directory(env, capsys):
    before = _listing(env["root"])
    for out, message in _protected_cases(env):
        rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", out, "--overwrite", *RTN)
        assert rc == 2, out
        assert _error_line(err) == f"moequant: error: {message}", out
    assert _listing(env["root"]) == before


def test_out_inside_the_model_is_an_error_without_overwrite(env, capsys):
    out = env["model"] / "q"
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(out), *RTN)
    assert rc == 2
    assert _error_line(err) == (f"moequant: error: --out {out}: is inside the input model {env['model']}; "
                                "choose a directory outside it")
    assert not out.exists()


def test_root_home_and_cache_protected_whatever_the_inputs(env):
    with pytest.raises(MoequantError, match=r"^--out /: is the root directory \(/\); --overwrite will not replace it$"):
        check_replaceable("/")
    inside = env["cache"] / "models" / "empty"
    inside.mkdir(parents=True)  # an empty directory is replaceable, except inside the cache
    with pytest.raises(MoequantError, match="exists and is not a moequant output"):
        check_replaceable(inside)
    outside = env["root"] / "empty"
    outside.mkdir()
    check_replaceable(outside)  # an empty directory elsewhere is fine


def test_symlink_is_never_replaced(env, capsys, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "sentinel.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(link), "--overwrite", *RTN)
    assert rc == 2
    assert _error_line(err) == (f"moequant: error: --out {link}: is a symbolic link; --overwrite replaces only "
                                "real directories")
    assert (target / "sentinel.txt").read_text() == "keep me"


def test_overwrite_replaces_a_checkpoint_and_an_empty_dir_leaving_nothing_behind(env, capsys, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    q = outs / "q"
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(q), *RTN)
    assert rc == 0, err
    first = (q / "config.json").read_bytes()
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(q), *RTN)
    assert rc == 2 and _error_line(err) == (f"moequant: error: --out {q}: already exists (choose another --out "
                                            "or pass --overwrite)")
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(q), "--overwrite", *RTN)
    assert rc == 0, err
    assert (q / "config.json").read_bytes() == first
    assert json.loads((q / "report.json").read_text())["command"].startswith("moequant ")
    (outs / "empty").mkdir()
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(outs / "empty"), "--overwrite", *RTN)
    assert rc == 0, err
    assert sorted(p.name for p in outs.iterdir()) == ["empty", "q"]  # no temp name left beside them


# ------------------------------------------------------------------------------- writable before any work

def test_out_under_a_regular_file(env, capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(f / "sub"), *RTN)
    assert rc == 2
    assert _error_line(err) == f"moequant: error: --out {f / 'sub'}: {f} is not a directory"
    assert f.read_text() == "x"


def test_json_checked_before_any_work(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    bad = f / "r.json"
    # the model does not exist: the --json error comes first, so it was checked before loading anything
    for argv in (["eval", "ppl", "no/such-model", "--json", str(bad)],
                 ["inspect", str(tmp_path / "nope"), "--json", str(bad)],
                 ["eval", "tasks", "no/such-model", "--tasks", "piqa", "--json", str(bad)]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        assert _error_line(err) == f"moequant: error: --json {bad}: {f} is not a directory", argv
    d = tmp_path / "adir"
    d.mkdir()
    rc, _, err = _run(capsys, "eval", "ppl", "no/such-model", "--json", str(d))
    assert rc == 2 and _error_line(err) == f"moequant: error: --json {d}: is a directory, expected a file name"


def test_json_never_replaces_a_foreign_file(capsys, tmp_path):
    notes = tmp_path / "config.json"
    notes.write_text('{"model_type": "llama"}')
    rc, _, err = _run(capsys, "eval", "ppl", "no/such-model", "--json", str(notes))
    assert rc == 2
    assert _error_line(err) == (f"moequant: error: --json {notes}: exists and is not a moequant result JSON; "
                                "choose another file or remove it yourself")
    assert notes.read_text() == '{"model_type": "llama"}'


def test_inspect_json_can_be_rewritten(env, capsys, tmp_path):
    q = tmp_path / "q"
    assert _run(capsys, "quantize", str(env["model"]), "--out", str(q), *RTN)[0] == 0
    res = tmp_path / "inspect.json"
    for _ in range(2):  # the second run replaces the result the first one wrote
        rc, _, err = _run(capsys, "inspect", str(q), "--json", str(res))
        assert rc == 0, err
    assert json.loads(res.read_text())["command"].startswith("moequant ")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent(env, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = _run(capsys, "quantize", str(env["model"]), "--out", str(ro / "q"), *RTN)
        assert rc == 2 and _error_line(err) == f"moequant: error: --out {ro / 'q'}: directory {ro} is not writable"
    finally:
        ro.chmod(0o755)


# -------------------------------------------------------------------------------------- zoo build, demo

def test_zoo_build_overwrite_replaces_only_a_previous_build(env, capsys, tmp_path):
    from moequant.zoo.tiny_olmoe import replaceable_build

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "sentinel.txt").write_text("keep me")
    rc, _, err = _run(capsys, "zoo", "build", "tiny-olmoe", "--out", str(foreign), "--overwrite")
    assert rc == 2
    assert _error_line(err) == (f"moequant: error: --out {foreign}: exists and is not a previous build of tiny-olmoe "
                                "(its training.json) or an empty directory, so it is not replaced; remove it "
                                "yourself or choose another --out")
    assert (foreign / "sentinel.txt").read_text() == "keep me"
    build = tmp_path / "build"
    build.mkdir()
    (build / "training.json").write_text(json.dumps(
        {"variant": "tiny-olmoe", "call": f"moequant.zoo.tiny_olmoe.build_tiny_olmoe({str(build)!r}, 'tiny-olmoe')"}))
    check_output(build, True, is_ours=replaceable_build("tiny-olmoe"))  # accepted
    with pytest.raises(MoequantError, match="is not a previous build of tiny-olmoe-collapsed"):
        check_output(build, True, is_ours=replaceable_build("tiny-olmoe-collapsed"),
                     kind="a previous build of tiny-olmoe-collapsed")
    # the default --out is in the cache: an unrelated directory there is refused too
    cached = env["cache"] / "models" / "tiny-olmoe"
    cached.mkdir(parents=True)
    (cached / "sentinel.txt").write_text("keep me")
    rc, _, err = _run(capsys, "zoo", "build", "tiny-olmoe", "--overwrite")
    assert rc == 2 and f"--out {cached}: exists and is not a previous build of tiny-olmoe" in _error_line(err)
    assert (cached / "sentinel.txt").read_text() == "keep me"


def test_demo_out_refused_before_loading(env, capsys, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "sentinel.txt").write_text("keep me")
    rc, _, err = _run(capsys, "demo", "--model", "no/such-model", "--out", str(foreign), "--overwrite")
    assert rc == 2 and _error_line(err) == f"moequant: error: --out {foreign}: {NOT_OURS}"
    assert (foreign / "sentinel.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ atomic writes

def test_atomic_json_sorted_exact_bytes_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"b": [1, 2], "a": {"d": 1, "c": 2}})
    assert p.read_text() == '{\n "a": {\n  "c": 2,\n  "d": 1\n },\n "b": [\n  1,\n  2\n ]\n}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_atomic_file_failure_keeps_the_old_content(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(p, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_atomic_dir_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "moequant"}}))
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with AtomicDir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == before
    with AtomicDir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "moequant"}, "n": 2}))
    assert json.loads((out / "config.json").read_text())["n"] == 2
    assert [x.name for x in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------- stale leftovers

def test_clean_stale_removes_dead_leftovers_only(tmp_path, caplog):
    dead = _dead_pid()
    h = host_tag()
    stale_dir = tmp_path / f".q.moequant-tmp-{dead}-{h}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 10)
    stale_file = tmp_path / f".r.json.moequant-tmp-{dead}-{h}-89abcdef"
    stale_file.write_text("{")
    act = tmp_path / f"moequant-act-{dead}-{h}-00000000"
    act.mkdir()
    keep = {
        f".q.moequant-tmp-1-{h}-0123abcd",  # pid 1 is alive
        f".q.moequant-tmp-{dead}-ffffff-0123abcd" if h != "ffffff" else f".q.moequant-tmp-{dead}-000000-0123abcd",
        temp_name("tmp", "mine"),  # this process
        ".q.tmp-12345",  # not a moequant name
        "q",
    }
    for name in keep:
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.INFO, logger="moequant.fsutil"):
        removed = clean_stale(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file, act])
    assert {p.name for p in tmp_path.iterdir()} == keep
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"removed {p}, left behind by process {dead} that no longer runs" for p in (stale_dir, stale_file, act))


def test_an_output_set_aside_by_a_killed_swap_is_restored(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".q.moequant-old-{dead}-{host_tag()}-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert clean_stale(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert (tmp_path / "q" / "config.json").read_text() == "{}"
