"""bitsandbytes 4-bit (NF4 / FP4) on smollm2-135m, the way users load it, scored on our PTB-test windows.

    pip install -c constraints.txt bitsandbytes==0.50.2
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/peers/bnb_peer.py --quant-type nf4 fp4 --max-tokens 16384

``AutoModelForCausalLM.from_pretrained(<the HF directory moequant's loader reads for smollm2-135m>,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=T, bnb_4bit_compute_dtype=float32,
bnb_4bit_use_double_quant=DQ), device_map="cpu")``: transformers replaces every ``nn.Linear`` but ``lm_head``
(tied to the embeddings) with ``bnb.nn.Linear4bit`` (blocksize 64), i.e. exactly the decoder linears our
recipes quantize. The model runs with bitsandbytes' own CPU forward.

Bits/weight: every tensor bitsandbytes serializes for a quantized weight — the packed codes (uint8, two per
byte), ``QuantState.as_dict(packed=True)``'s ``absmax`` (fp32 per block of 64; with double quant uint8 codes
plus ``nested_absmax`` fp32 per 256 blocks), ``quant_map`` (16 fp32), nested tables and the packed JSON
blob — over the quantized weights' element count. ``checkpoint_bytes``: size of ``save_pretrained``'s
safetensors files in ``runs/peers/bnb-<type>/``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

log = logging.getLogger("peers.bnb")


def count_bnb_bits(model: torch.nn.Module) -> dict:
    """Stored bytes of every ``Linear4bit`` (codes + packed quant state) and their weights' element count."""
    import bitsandbytes as bnb

    q_bytes = q_elems = 0
    examples: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        w = m.weight
        qs = w.quant_state
        parts = {"weight": w.data, **{k: v for k, v in qs.as_dict(packed=True).items() if torch.is_tensor(v)}}
        q_bytes += sum(t.numel() * t.element_size() for t in parts.values())
        q_elems += int(torch.Size(qs.shape).numel())
        examples.setdefault(" ".join(f"{k}:{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for k, t in parts.items())
                            + f" for {list(qs.shape)}", name)
    return {"quantized_bytes": q_bytes, "quantized_elements": q_elems, "stored_tensor_examples": examples}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant-type", nargs="+", default=["nf4", "fp4"], choices=["nf4", "fp4"])
    p.add_argument("--double-quant", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16384, help="0 = whole PTB test split")
    args = p.parse_args()
    pc.setup_logging()
    import bitsandbytes  # noqa: F401  (fail early, with its own message, if it is missing or broken)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, tok, hf_dir = pc.load_fp_model()
    ids = pc.ptb_test_ids(tok)
    for qt in args.quant_type:
        name = qt + ("-dq" if args.double_quant else "")
        t0 = time.time()
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_use_double_quant=args.double_quant)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32)
        model.eval()
        t_q = time.time() - t0
        acct = count_bnb_bits(model)
        if not acct["quantized_elements"]:
            raise SystemExit(f"bitsandbytes {qt}: no Linear4bit module in the loaded model")
        bpw = 8.0 * acct["quantized_bytes"] / acct["quantized_elements"]
        out_dir = pc.run_name("bnb", name)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        ckpt_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
        log.info("bnb %s: %.4f bits/weight over %d weights; checkpoint %d B", name, bpw, acct["quantized_elements"],
                 ckpt_bytes)
        t1 = time.time()
        res = pc.score_torch(model, ids, tok.bos_token_id, args.max_tokens)
        d = pc.peer_result(res, peer="bitsandbytes", peer_version=md.version("bitsandbytes"),
                           config=name, config_detail={"quant_type": qt, "blocksize": 64, "double_quant": args.double_quant,
                                   "compute_dtype": "float32", "loader": "transformers BitsAndBytesConfig(load_in_4bit)"},
                           bits_per_weight=bpw, checkpoint_bytes=ckpt_bytes, seconds=time.time() - t1,
                           bits_accounting=acct, quantize_seconds=round(t_q, 2),
                           scoring="bitsandbytes Linear4bit CPU forward, fp32 compute, run by evaluate_perplexity")
        pc.write_json_atomic(out_dir / "ppl.json", d)
        print(pc.summary_line(d), flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
