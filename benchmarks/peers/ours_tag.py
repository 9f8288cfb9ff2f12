"""Give one of our runs the peer keys: reads RUN/ppl.json.tmp (``moequant eval ppl`` output) and
RUN/report.json (``moequant quantize``), writes RUN/ppl.json with ``peer="moequant"``, ``config``,
``config_detail`` (recipe + solver), ``bits_per_weight`` and ``checkpoint_bytes`` added.

    python benchmarks/peers/ours_tag.py runs/peers/ours-int4-g64 int4-g64     # called by ours.sh
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402


def main() -> int:
    run, name = Path(sys.argv[1]), sys.argv[2]
    ppl = json.loads((run / "ppl.json.tmp").read_text())
    rep = json.loads((run / "report.json").read_text())
    ppl.update({"peer": "moequant", "peer_version": rep.get("versions", {}).get("moequant"), "config": name,
                "config_detail": {"recipe": rep.get("config"), "solver": rep.get("solver"),
                                  "quantize_command": rep.get("command"), "git": rep.get("git")},
                "bits_per_weight": rep["bits_per_weight"], "checkpoint_bytes": rep["checkpoint_bytes"],
                "quantize_seconds": rep.get("seconds", {}).get("quantize")})
    pc.write_json_atomic(run / "ppl.json", ppl)
    (run / "ppl.json.tmp").unlink()
    print(pc.summary_line(ppl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
