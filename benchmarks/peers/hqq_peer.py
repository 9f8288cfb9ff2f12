"""HQQ (PyPI ``hqq``) on smollm2-135m, scored on our PTB-test windows.

    DISABLE_CUDA=1 pip install -c constraints.txt --no-build-isolation hqq==0.2.8.post1
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/peers/hqq_peer.py --bits 4 3 2 --group-size 64 --max-tokens 16384

(``DISABLE_CUDA=1``: hqq's setup.py otherwise tries to compile its CUDA kernels.)

Every decoder linear (q/k/v/o/gate/up/down) becomes ``hqq.core.quantize.HQQLinear`` with
``BaseQuantizeConfig(nbits, group_size)`` (HQQ's defaults: axis 1, half-quadratic optimisation of scale and
zero, zero rounded at 4 bits), ``compute_dtype=float16`` (what HQQ stores its scale/zero in on a GPU),
``device="cpu"``. Embeddings/lm_head (tied) and norms stay fp32 as loaded, as in our recipes.

Bits/weight are counted from the tensors HQQLinear really holds: ``W_q`` (uint8 for 4/2-bit, int32 with ten
3-bit codes per word and rows padded to a multiple of 10 for 3-bit) + ``scale`` + ``zero`` (fp16, one each
per group of 64), over the element count of the quantized weights. Those tensors (plus the kept ones)
are written to ``runs/peers/hqq-int{b}/model.safetensors`` and its size is ``checkpoint_bytes``.

Scoring: each quantized weight is replaced by ``HQQLinear.dequantize()`` (HQQ's own fp16 decode) cast to
fp32, and the model runs through ``moequant.eval.perplexity.evaluate_perplexity`` — the weights HQQ's
fp16 forward would use, with our fp32 activations.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

log = logging.getLogger("peers.hqq")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantize_hqq(model: torch.nn.Module, bits: int, group_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize every decoder linear of ``model`` in place (weights := HQQ's decode, fp32).

    Returns (stored HQQ tensors by name, accounting: bytes and element counts, per-tensor dtypes)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    stored: dict[str, torch.Tensor] = {}
    q_bytes = q_elems = 0
    kinds: dict[str, str] = {}
    for name in pc.decoder_linear_names(model):
        lin = model.get_submodule(name)
        w = lin.weight.data  # [out, in] fp32
        tmp = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        tmp.weight.data = w.clone()
        hq = HQQLinear(tmp, cfg, compute_dtype=torch.float16, device="cpu")
        parts = {"W_q": hq.W_q.data, "scale": hq.meta["scale"], "zero": hq.meta["zero"]}
        for k, t in parts.items():
            stored[f"{name}.{k}"] = t.contiguous()
            q_bytes += tensor_bytes(t)
        q_elems += w.numel()
        kinds.setdefault(" ".join(f"{k}:{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for k, t in parts.items())
                         + f" for {list(w.shape)}", name)
        lin.weight.data = hq.dequantize().float().reshape(w.shape)  # [out, in]
    acct = {"quantized_bytes": q_bytes, "quantized_elements": q_elems, "stored_tensor_examples": kinds,
            "quant_config": {k: v for k, v in cfg["weight_quant_params"].items()}}
    return stored, acct


def kept_tensors(model: torch.nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        mod = n.rsplit(".", 1)[0]
        if mod in quantized and n.endswith(".weight"):
            continue
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen:  # tied lm_head
            continue
        seen.add(ptr)
        out[n] = p.detach().contiguous()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16384, help="0 = whole PTB test split")
    args = p.parse_args()
    pc.setup_logging()
    from safetensors.torch import save_file

    for bits in args.bits:
        t0 = time.time()
        model, tok, _ = pc.load_fp_model()
        names = pc.decoder_linear_names(model)
        stored, acct = quantize_hqq(model, bits, args.group_size)
        t_q = time.time() - t0
        out_dir = pc.run_name("hqq", f"int{bits}-g{args.group_size}")
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = out_dir / "model.safetensors"
        save_file({**stored, **kept_tensors(model, set(names))}, str(ckpt) + ".tmp")
        Path(str(ckpt) + ".tmp").replace(ckpt)
        bpw = 8.0 * acct["quantized_bytes"] / acct["quantized_elements"]
        log.info("hqq int%d g%d: %.4f bits/weight over %d weights, quantized in %.0f s", bits, args.group_size, bpw,
                 acct["quantized_elements"], t_q)
        ids = pc.ptb_test_ids(tok)
        t1 = time.time()
        res = pc.score_torch(model, ids, tok.bos_token_id, args.max_tokens)
        d = pc.peer_result(res, peer="hqq", peer_version=md.version("hqq"),
                           config=f"int{bits}-g{args.group_size}",
                           config_detail={"nbits": bits, "group_size": args.group_size,
                                   "compute_dtype": "float16", **acct["quant_config"]},
                           bits_per_weight=bpw, checkpoint_bytes=ckpt.stat().st_size, seconds=time.time() - t1,
                           bits_accounting=acct, quantize_seconds=round(t_q, 2),
                           scoring="HQQLinear.dequantize() (fp16) cast to fp32, run by evaluate_perplexity")
        pc.write_json_atomic(out_dir / "ppl.json", d)
        print(pc.summary_line(d), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
