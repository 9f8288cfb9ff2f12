"""Which commit a result JSON's ``code_sha256`` was made by (benchmarks run from a copy of the tree, where
``git`` is null): computes ``runinfo.code_sha256``'s digest of ``src/moequant`` at each of the last commits.

    python benchmarks/code_commit.py 3f2b5d07          # a prefix is enough
    python benchmarks/code_commit.py --json benchmarks/results/carve_curve_smollm2-135m.json

Prints the matching commits (several when only files outside the package changed between them); exit 1 when none
of the last ``--max`` commits matches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moequant.runinfo import CODE_SUFFIXES, code_digest

PACKAGE = "src/moequant/"


def _git(repo: Path, *args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True, check=True).stdout


def commit_digest(repo: Path, commit: str) -> str:
    """``code_sha256`` of the package as ``commit`` holds it."""
    rows = [line.split(b"\t", 1) for line in _git(repo, "ls-tree", "-r", commit, "--", PACKAGE).splitlines()]
    blobs = {}
    for meta, path in rows:
        name = path.decode()[len(PACKAGE):]
        if Path(name).suffix in CODE_SUFFIXES and "__pycache__" not in name.split("/"):
            blobs[name] = meta.split()[2].decode()
    names = sorted(blobs)
    out = _git(repo, "cat-file", "--batch", data="".join(blobs[n] + "\n" for n in names).encode())
    contents, pos = [], 0
    for _ in names:  # "<sha> blob <size>\n<bytes>\n" per object
        end = out.index(b"\n", pos)
        size = int(out[pos:end].split()[2])
        contents.append(out[end + 1:end + 1 + size])
        pos = end + 1 + size + 1
    return code_digest(zip(names, contents))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("digest", nargs="?", help="code_sha256 or a prefix of it")
    p.add_argument("--json", help="read code_sha256 from this result JSON instead")
    p.add_argument("--max", type=int, default=200, help="commits to look through, newest first (default 200)")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args()
    want = args.digest
    if args.json:
        want = json.loads(Path(args.json).read_text()).get("code_sha256")
        if not want:
            print(f"{args.json}: no code_sha256 (written before results recorded it)", file=sys.stderr)
            return 2
    if not want:
        p.error("give a digest or --json FILE")
    repo = Path(args.repo)
    found = []
    for line in _git(repo, "log", f"-{args.max}", "--format=%H %s").decode().splitlines():
        commit, subject = line.split(" ", 1)
        if commit_digest(repo, commit).startswith(want.lower()):
            found.append(f"{commit[:10]} {subject[:100]}")
    print("\n".join(found) if found else f"no commit of the last {args.max} has code_sha256 {want[:16]}...")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
