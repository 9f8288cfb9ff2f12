"""``runinfo``: the code digest every result records, and the runs a resumable job keeps."""

import hashlib
import logging
import shutil

from moequant import runinfo
from moequant.runinfo import add_job_run, code_sha256, job_runs


def _tree(root):
    (root / "kernels" / "csrc").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "__init__.py").write_text("x = 1\n")
    (root / "kernels" / "csrc" / "k.cpp").write_text("int f() { return 2; }\n")
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0\1")
    (root / "notes.md").write_text("not source\n")
    (root / "kernels.py").write_text("")  # sorts before kernels/... as a string, after it as path parts
    return root


def test_code_sha256_is_the_tree_not_its_place(tmp_path):
    a = _tree(tmp_path / "a" / "moequant")
    expect = hashlib.sha256(b"__init__.py\x006\x00x = 1\nkernels.py\x000\x00"
                            b"kernels/csrc/k.cpp\x0022\x00int f() { return 2; }\n")
    assert code_sha256(a) == expect.hexdigest()  # relative path, size, bytes, in path order; .md and .pyc skipped
    b = shutil.copytree(a, tmp_path / "b" / "elsewhere")
    assert code_sha256(b) == code_sha256(a)
    c = shutil.copytree(a, tmp_path / "c")
    (c / "__pycache__" / "b.pyc").write_bytes(b"\2")
    (c / "notes.md").write_text("edited\n")
    assert code_sha256(c) == code_sha256(a)  # neither is source
    d = shutil.copytree(a, tmp_path / "d")
    (d / "__init__.py").write_text("x = 2\n")  # one byte
    e = shutil.copytree(a, tmp_path / "e")
    (e / "kernels" / "csrc" / "k.cpp").rename(e / "kernels" / "csrc" / "j.cpp")
    f = shutil.copytree(a, tmp_path / "f")
    (f / "extra.py").write_text("")
    assert len({code_sha256(p) for p in (a, d, e, f)}) == 4
    assert len(code_sha256()) == 64 and "code_sha256" in runinfo.run_info([])


def test_job_runs_name_each_process_and_warn_when_the_code_changed(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="moequant.runinfo")
    now = code_sha256()
    first = add_job_run(None, False, "w")
    assert [r["code_sha256"] for r in first] == [now] and first[0]["started"].endswith("+00:00")
    assert job_runs({"runs": first}) == {} and not caplog.text  # one process: nothing to say
    again = add_job_run(first, True, "w")
    assert [r["code_sha256"] for r in again] == [now, now] and job_runs({"runs": again}) == {"job_runs": again}
    assert not caplog.text  # resumed by the same code
    monkeypatch.setattr(runinfo, "code_sha256", lambda root=None: "c" * 64)
    changed = add_job_run(again, True, "the/work")
    assert [r["code_sha256"] for r in changed] == [now, now, "c" * 64]
    assert f"the/work was left by other moequant code (code_sha256 {now[:12]}, now cccccccccccc)" in caplog.text
    caplog.clear()
    old = add_job_run(None, True, "w")  # progress kept before processes were recorded
    assert [r["code_sha256"] for r in old] == [None, "c" * 64] and "code_sha256 unknown" in caplog.text


def test_code_commit_finds_the_commit_of_a_digest(tmp_path):
    """``benchmarks/code_commit.py`` computes, from a commit's blobs, the digest a checkout of it records."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from code_commit import commit_digest
    finally:
        sys.path.pop(0)
    repo = tmp_path / "repo"
    pkg = _tree(repo / "src" / "moequant")
    (repo / "README.md").write_text("outside the package\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    one = code_sha256(pkg)
    (pkg / "kernels" / "csrc" / "k.cpp").write_text("int f() { return 3; }\n")
    (repo / "README.md").write_text("changed\n")
    git("commit", "-qam", "two")
    assert commit_digest(repo, "HEAD") == code_sha256(pkg) != one
    assert commit_digest(repo, "HEAD~1") == one
