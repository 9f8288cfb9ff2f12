"""Sanity check: the unquantized model scored by the peers' pipeline must equal our harness.

    OMP_NUM_THREADS=1 nice -n 5 moequant eval ppl smollm2-135m --data ptb --max-tokens 16384 \\
        --json runs/peers/fp32-cli/ppl.json
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/peers/fp_check.py --max-tokens 16384 \\
        --cli-json runs/peers/fp32-cli/ppl.json

Writes ``runs/peers/fp32/ppl.json`` (peer "none", 32 bits/weight) and, with ``--cli-json``, fails unless the
two PPLs and every window's NLL agree to 1e-6 relative.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

log = logging.getLogger("peers.fp")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=16384, help="0 = whole PTB test split")
    p.add_argument("--cli-json", help="ppl.json of `moequant eval ppl` on the same windows, to compare with")
    args = p.parse_args()
    pc.setup_logging()
    model, tok, hf_dir = pc.load_fp_model()
    ids = pc.ptb_test_ids(tok)
    t0 = time.time()
    res = pc.score_torch(model, ids, tok.bos_token_id, args.max_tokens)
    d = pc.peer_result(res, peer="none", peer_version=None, config="fp32", config_detail={"source": str(hf_dir)},
                       bits_per_weight=32.0, checkpoint_bytes=None, seconds=time.time() - t0)
    pc.write_json_atomic(pc.RUNS / "fp32" / "ppl.json", d)
    print(pc.summary_line(d), flush=True)
    if args.cli_json:
        ref = json.loads(Path(args.cli_json).read_text())
        same = (ref["tokens_per_window"] == d["tokens_per_window"]
                and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ref["nll_per_window"], d["nll_per_window"]))
                and math.isclose(ref["ppl"], d["ppl"], rel_tol=1e-6))
        print(f"CLI PPL {ref['ppl']:.6f} vs peers pipeline {d['ppl']:.6f}: {'SAME' if same else 'DIFFERENT'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
