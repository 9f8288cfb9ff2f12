"""The Triton kernels on a GPU: correctness against the reference decode, time, achieved bandwidth, and speed-up
over bf16 (issue #10's GPU figures). Needs CUDA; ``--smoke`` runs tiny shapes on the CPU under Triton's
interpreter (checks this script, times nothing meaningful).

Shapes: 4096-wide linears (``[4096, 4096]`` and ``[14336, 4096]``, Llama-like), and an OLMoE-shaped expert stack
(64 experts of ``[1024, 2048]``, top-8) at batch 1 (8 routed rows, one per expert) and batch 8 (64 rows).
Methods: bf16 dense (cuBLAS through ``F.linear``; for experts a loop over the routed experts and, where torch has
it, ``torch._grouped_mm``), uniform int4/int3/int2 group 128 (``triton_uniform``), trellis 2-bit hyb L=16
(``triton_trellis``, random words: every word sequence is a valid stream). Activations bf16.

Time: ``triton.testing.do_bench`` (median; it clears the L2 before each call, so weights come from HBM).
Bandwidth: the bytes of the stored weights the call reads (codes, scales, zeros, LUT; routed experts only) over
the time, and as a fraction of the device-to-device copy bandwidth measured in the same run (bytes read +
written). ``--sweep`` also times each kernel at batch 1 over the tiles of ``launch_for``'s keywords (split-K too). Each packed
linear is also timed the other way: decode the whole matrix (torch ops; the trellis ``dequant`` kernel), then
cuBLAS — the candidate for prefill.

    python benchmarks/gpu_kernels.py --sweep --json benchmarks/results/gpu_kernels_h200.json
"""

# ruff: noqa: B023 - every closure below is timed inside the iteration that made it
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moequant.codecs.config import TrellisConfig, UniformConfig  # noqa: E402
from moequant.codecs.trellis import words_per_tile  # noqa: E402
from moequant.formats.registry import tensor_class_for  # noqa: E402
from moequant.formats.trellis import TrellisTensor  # noqa: E402
from moequant.kernels import trellis as kt  # noqa: E402
from moequant.kernels import uniform as ku  # noqa: E402
from moequant.kernels.triton_load import triton_module  # noqa: E402

TU = triton_module("triton_uniform")
TT = triton_module("triton_trellis")

UNIFORM = {"int4-g128": (4, False), "int4-g128-sym": (4, True), "int3-g128": (3, False), "int2-g128": (2, False)}
TRELLIS = TrellisConfig(bits=2, L=16, V=2, tile=16, code="hyb", Q=9, tail_biting=True)
# bf16 activations; float16 under the interpreter (numpy has no bfloat16: its bf16 dots are wrong)
ACT = torch.float16 if SMOKE else torch.bfloat16
SWEEP = ([dict(gemv=True, block_n=bn, block_k=bk) for bn in (16, 32, 64) for bk in (64, 128, 256)]
         + [dict(gemv=False, block_n=bn, block_k=64) for bn in (32, 64)]
         + [dict(gemv=True, block_n=bn, block_k=128, split_k=sk) for bn in (16, 32) for sk in (2, 4, 8)])
SWEPT = ("int4-g128", "trellis-2b-hyb")  # the methods whose batch-1 time is swept


def bench_ms(fn) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))


def tile_key(tile: dict) -> str:
    split = f"-split{tile['split_k']}" if tile.get("split_k", 1) > 1 else ""
    return ("gemv" if tile["gemv"] else "dot") + f"-bn{tile['block_n']}-bk{tile['block_k']}" + split


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def copy_bandwidth(dev: torch.device, gib: float) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3)


def uniform_weight(shape: tuple[int, ...], bits: int, sym: bool, dev: torch.device):
    """A packed uniform tensor of a random weight (encoded on ``dev``; RTN, no clip search)."""
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(*shape, generator=g, device=dev) * 0.02
    cfg = UniformConfig(bits=bits, group_size=128, symmetric=sym, clip_search=False, scale_dtype="bfloat16")
    try:
        return tensor_class_for(cfg).encode(w, cfg)
    except Exception as exc:  # noqa: BLE001 - an encoder step without a CUDA kernel: encode on the CPU
        print(f"encode on {dev} failed ({type(exc).__name__}: {exc}); encoding on the CPU", flush=True)
        qt = tensor_class_for(cfg).encode(w.cpu(), cfg)
        return type(qt)(qt.shape, {n: t.to(dev) for n, t in qt.data.items()}, qt.attrs)


def trellis_weight(shape: tuple[int, ...], dev: torch.device) -> TrellisTensor:
    *lead, n, k = shape
    cfg = TRELLIS
    g = torch.Generator(device=dev).manual_seed(0)
    words = torch.randint(0, 1 << 16, (*lead, n // cfg.tile, k // cfg.tile, words_per_tile(cfg)), generator=g,
                          device=dev, dtype=torch.int32).to(torch.uint16)
    parts = {"words": words, "scale": (torch.rand(*lead, n, generator=g, device=dev) * 0.02 + 0.01).half()}
    parts["lut"] = torch.randn(*lead, 1 << cfg.Q, 2, generator=g, device=dev).half()
    return TrellisTensor.from_parts(tuple(shape), parts, cfg)


def uniform_call(qt, x, **tile):
    codes, scale, zero, bits, gs, k, grid = ku.op_args(qt)
    zc = 0.0 if zero is not None else ku.zero_point(bits, grid)
    return lambda: TU.linear(x, codes, scale, zero, None, bits, gs, k, zc, **tile)


def uniform_ref(qt, x):
    return ku.reference(x, *ku.op_args_with_bias(qt, None))


def trellis_args(qt):
    c = qt.config
    return (qt.data["words"], qt.data["scale"], qt.data.get("lut"), c.bits, c.L, c.V, c.tile, c.code, c.Q,
            c.tail_biting)


def linear_rows(shapes, ms, dev, sweep: bool, peak: float) -> list[dict]:
    rows = []
    for n, k in shapes:
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(ACT)
        methods = {}
        for name, (bits, sym) in UNIFORM.items():
            qt = uniform_weight((n, k), bits, sym, dev)
            methods[name] = ("uniform", qt, nbytes(*qt.data.values()))
        tq = trellis_weight((n, k), dev)
        methods["trellis-2b-hyb"] = ("trellis", tq, nbytes(*tq.data.values()))
        for m in ms:
            x = torch.randn(m, k, device=dev).to(ACT)
            t_bf16 = bench_ms(lambda: F.linear(x, w16))
            rows.append(dict(shape=[n, k], m=m, method="bf16", ms=t_bf16, weight_bytes=n * k * 2,
                             gbps=n * k * 2 / t_bf16 / 1e6, frac_peak=n * k * 2 / (t_bf16 * 1e-3) / peak))
            for name, (kind, qt, wb) in methods.items():
                x32 = x.float()
                if kind == "uniform":
                    fn = uniform_call(qt, x)
                    err = rel_err(fn(), uniform_ref(qt, x))
                    err32 = rel_err(uniform_call(qt, x32)(), uniform_ref(qt, x32))
                    variants = {tile_key(t): uniform_call(qt, x, **t) for t in SWEEP}
                else:
                    args = trellis_args(qt)
                    fn = lambda: TT.linear(x, args[0], args[1], args[2], None, *args[3:])  # noqa: E731
                    want = F.linear(x, kt.reference(args[0], args[1], args[2], qt.config).to(x.dtype))
                    err = rel_err(fn(), want)
                    w32 = kt.reference(args[0], args[1], args[2], qt.config)
                    err32 = rel_err(TT.linear(x32, args[0], args[1], args[2], None, *args[3:]), F.linear(x32, w32))
                    variants = {tile_key(t): (lambda t=t: TT.linear(x, args[0], args[1], args[2], None,
                                                                    *args[3:], **t))
                                for t in SWEEP}
                ms_ = bench_ms(fn)
                row = dict(shape=[n, k], m=m, method=name, ms=ms_, weight_bytes=wb, gbps=wb / ms_ / 1e6,
                           frac_peak=wb / (ms_ * 1e-3) / peak, speedup_vs_bf16=t_bf16 / ms_, rel_err_vs_reference=err,
                           rel_err_fp32_vs_reference=err32)
                if sweep and m == 1 and name in SWEPT:
                    row["sweep_ms"] = {key: bench_ms(v) for key, v in variants.items()}
                # the other way to run it: decode the whole matrix with torch ops, then cuBLAS (the reference path)
                if kind == "uniform":
                    row["decode_then_cublas_ms"] = bench_ms(lambda: uniform_ref(qt, x))
                else:
                    row["decode_then_cublas_ms"] = bench_ms(
                        lambda: F.linear(x, TT.dequant(*args[:3], *args[3:]).to(x.dtype)))
                rows.append(row)
                print(json.dumps({k_: v for k_, v in row.items() if k_ != "sweep_ms"}), flush=True)
    return rows


def expert_rows(e_all, n, k, top, batches, dev, sweep: bool, peak: float) -> list[dict]:
    rows = []
    w16 = (torch.randn(e_all, n, k, device=dev) * 0.02).to(ACT)  # [E, N, K]
    qu = uniform_weight((e_all, n, k), 4, False, dev)
    qtr = trellis_weight((e_all, n, k), dev)
    per_expert_u = nbytes(*qu.data.values()) // e_all
    per_expert_t = nbytes(*qtr.data.values()) // e_all
    g = torch.Generator().manual_seed(1)
    for b in batches:
        idx = torch.stack([torch.randperm(e_all, generator=g)[:top] for _ in range(b)])  # [B, top]
        counts = tuple(int(c) for c in torch.bincount(idx.flatten(), minlength=e_all))
        routed = [e for e in range(e_all) if counts[e]]
        s = b * top
        x = torch.randn(s, k, device=dev).to(ACT)  # [S, K] sorted by expert
        offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)

        def loop():
            out, start = [], 0
            for e in routed:
                out.append(F.linear(x[start:start + counts[e]], w16[e]))
                start += counts[e]
            return torch.cat(out)

        t_loop = bench_ms(loop)
        base = dict(experts=e_all, shape=[n, k], top_k=top, batch=b, rows=s, routed_experts=len(routed))
        wb16 = len(routed) * n * k * 2
        rows.append(dict(base, method="bf16-loop", ms=t_loop, weight_bytes=wb16, gbps=wb16 / t_loop / 1e6,
                         frac_peak=wb16 / (t_loop * 1e-3) / peak))
        t_gmm = None
        if hasattr(torch, "_grouped_mm") and not SMOKE:
            wt = w16.transpose(1, 2)  # [E, K, N]
            try:
                got = torch._grouped_mm(x, wt, offs=offs)
                assert rel_err(got, loop()) < 1e-2
                t_gmm = bench_ms(lambda: torch._grouped_mm(x, wt, offs=offs))
                rows.append(dict(base, method="bf16-grouped_mm", ms=t_gmm, weight_bytes=wb16,
                                 gbps=wb16 / t_gmm / 1e6, frac_peak=wb16 / (t_gmm * 1e-3) / peak))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                rows.append(dict(base, method="bf16-grouped_mm", error=f"{type(exc).__name__}: {exc}"[:300]))
        t_best = min(t for t in (t_loop, t_gmm) if t is not None)
        codes, scale, zero, bits, gs, kk, grid = ku.op_args(qu)
        ta = trellis_args(qtr)
        cases = {
            "int4-g128": (per_expert_u, lambda **t: TU.grouped(x, counts, codes, scale, zero, bits, gs, kk, 0.0, **t)),
            "trellis-2b-hyb": (per_expert_t, lambda **t: TT.grouped(x, counts, *ta, **t)),
        }
        for name, (per_e, call) in cases.items():
            # correctness: each routed expert's rows against the reference decode + F.linear
            got, start, worst = call(), 0, 0.0
            for e in routed:
                xe = x[start:start + counts[e]]
                if name.startswith("int4"):
                    want = ku.reference(xe, *ku.op_args_with_bias(qu.select(e), None))
                else:
                    want = F.linear(xe, kt.reference(ta[0][e], ta[1][e], ta[2][e], TRELLIS).to(x.dtype))
                worst = max(worst, rel_err(got[start:start + counts[e]], want))
                start += counts[e]
            ms_ = bench_ms(call)
            wb = len(routed) * per_e
            row = dict(base, method=name, ms=ms_, weight_bytes=wb, gbps=wb / ms_ / 1e6,
                       frac_peak=wb / (ms_ * 1e-3) / peak, speedup_vs_best_bf16=t_best / ms_,
                       rel_err_vs_reference=worst)
            if sweep and b == 1:
                row["sweep_ms"] = {tile_key(t): bench_ms(lambda t=t: call(**t)) for t in SWEEP}
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "sweep_ms"}), flush=True)
    return rows


def table(path: Path) -> str:
    """Markdown tables of a JSON this script wrote: times in µs, achieved GB/s, fraction of the copy bandwidth,
    ratio to bf16, fp32 error, and the fastest swept tile at batch 1."""
    d = json.loads(path.read_text())
    us = lambda ms: f"{ms * 1e3:.1f}"  # noqa: E731
    out = [f"copy bandwidth {d['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (read + written); {d['env']}", "",
           "| [N, K] | rows | method | µs | GB/s | of copy bw | vs bf16 | max rel err fp32 | fastest tile (µs) | "
           "decode, then cuBLAS (µs) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["linears"]:
        best = min(r.get("sweep_ms", {}).items(), key=lambda kv: kv[1], default=None)
        out.append(f"| {r['shape']} | {r['m']} | {r['method']} | {us(r['ms'])} | {r['gbps']:.0f} | "
                   f"{100 * r['frac_peak']:.1f}% | {r.get('speedup_vs_bf16', 1.0):.3f}× | "
                   f"{'-' if 'rel_err_fp32_vs_reference' not in r else format(r['rel_err_fp32_vs_reference'], '.1e')} | "
                   f"{'' if best is None else f'{best[0]} ({us(best[1])})'} | "
                   f"{us(r['decode_then_cublas_ms']) if 'decode_then_cublas_ms' in r else ''} |")
    out += ["", "| experts × [N, K], top-k | batch (rows, experts routed) | method | µs | GB/s | of copy bw | "
            "vs best bf16 | fastest tile (µs) |", "|---|---|---|---|---|---|---|---|"]
    for r in d["experts"]:
        if "error" in r:
            out.append(f"| {r['experts']} × {r['shape']}, {r['top_k']} | {r['batch']} | {r['method']} | "
                       f"{r['error']} | | | | |")
            continue
        best = min(r.get("sweep_ms", {}).items(), key=lambda kv: kv[1], default=None)
        out.append(f"| {r['experts']} × {r['shape']}, {r['top_k']} | {r['batch']} ({r['rows']}, "
                   f"{r['routed_experts']}) | {r['method']} | {us(r['ms'])} | {r['gbps']:.0f} | "
                   f"{100 * r['frac_peak']:.1f}% | "
                   f"{'-' if 'speedup_vs_best_bf16' not in r else format(r['speedup_vs_best_bf16'], '.3f') + '×'} | "
                   f"{'' if best is None else f'{best[0]} ({us(best[1])})'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--table", type=Path, help="print the markdown tables of a JSON this script wrote, and exit")
    ap.add_argument("--sweep", action="store_true", help="time each kernel at batch 1 over the tile sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("gpu_kernels: needs a CUDA device (or --smoke for a CPU check of this script)")
    dev = torch.device("cpu" if SMOKE else "cuda")
    torch.manual_seed(0)
    if SMOKE:
        global SWEEP
        SWEEP = SWEEP[:1] + SWEEP[-1:]  # one plain tile, one split-K
        shapes, ms, ex = [(64, 256)], [1, 3], (4, 32, 256, 2, (1, 2))
    else:
        shapes, ms, ex = [(4096, 4096), (14336, 4096)], [1, 8, 512], (64, 1024, 2048, 8, (1, 8))
    peak = copy_bandwidth(dev, 0.01 if SMOKE else 4.0)
    print(f"copy bandwidth {peak / 1e9:.0f} GB/s", flush=True)
    out = dict(
        env=dict(torch=torch.__version__, triton=__import__("triton").__version__, python=platform.python_version(),
                 device=torch.cuda.get_device_name() if not SMOKE else "cpu (interpreter)",
                 capability=list(torch.cuda.get_device_capability()) if not SMOKE else None),
        copy_bandwidth_bytes_per_s=peak,
        linears=linear_rows(shapes, ms, dev, args.sweep, peak),
        experts=expert_rows(*ex[:4], ex[4], dev, args.sweep, peak),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
