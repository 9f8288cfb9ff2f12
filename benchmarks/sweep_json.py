"""The shared tail of the sweep benchmarks: run a ``SweepJob``, record the exact command in its result,
write the JSON, print the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moequant.sweep import SweepJob, run_sweep


def run_to_json(job: SweepJob, script: str, json_path: str) -> int:
    argv = [script, *sys.argv[1:]]
    result = run_sweep(job, argv)
    result["command"] = "python " + " ".join(argv)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))
    print(result["table"])
    return 0
