"""llama.cpp's own quantizer on smollm2-135m, scored through llama-cpp-python on our PTB-test windows.

    bash benchmarks/peers/build_llamacpp.sh          # llama.cpp tools + libllama from the llama-cpp-python sdist
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/peers/llamacpp_peer.py \\
        --types F16 Q4_K_M Q3_K_M Q2_K IQ3_XXS IQ2_XS --max-tokens 16384

Steps (each skipped when its output exists; everything under ``runs/peers/llamacpp/``):

1. ``convert_hf_to_gguf.py <HF dir of smollm2-135m in moequant's cache> --outtype f16`` (the vendored
   converter with its own gguf-py): ``smollm2-135m-F16.gguf``.
2. ``llama-imatrix`` on the first ``--imatrix-chunks`` 512-token chunks of PTB **train** (never test):
   ``imatrix.gguf``. Used by every quantized type (``--imatrix-all``, default) or only the IQ types.
3. ``llama-quantize [--imatrix imatrix.gguf] --token-embedding-type f16 F16.gguf <TYPE>.gguf TYPE``:
   the tied embedding/output stays f16 like our recipes keep it (``--default-embeddings`` to let llama.cpp
   choose, as a user running plain ``llama-quantize`` would get).
4. Score: ``llama_cpp.Llama(gguf, n_ctx=n_batch=n_ubatch=1024, logits_all=True, n_threads=1)``; each window
   of ``make_windows`` (the same token ids as our harness: BOS + 512 PTB-test ids from the HF tokenizer) goes
   through ``eval`` after ``reset``; logits of every position -> fp32 log-softmax -> ``window_nll``.

Bits/weight are read from the GGUF file (``gguf.GGUFReader``): bytes of every decoder-linear tensor
(``blk.*.attn_q/k/v/output``, ``blk.*.ffn_gate/up/down``) × 8 / their elements, with the type each tensor
really got (SmolLM2's 576-wide rows are not multiples of 256, so llama.cpp falls back from K/I-quants).
``checkpoint_bytes`` = the GGUF file size (its embedding is f16, ours is fp32: compare bits/weight).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

log = logging.getLogger("peers.llamacpp")

SDIST = pc.RUNS / "build" / "llama_cpp_python-0.3.36"
LLAMA_DIR = SDIST / "vendor" / "llama.cpp"
BIN = LLAMA_DIR / "build" / "bin"
WORK = pc.RUNS / "llamacpp"
LINEAR_GGUF = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
IQ_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")


def run(cmd: list[str], log_file: Path, env: dict | None = None) -> None:
    log.info("$ %s", " ".join(map(str, cmd)))
    with open(log_file, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{cmd[0]} failed (exit {r.returncode}), see {log_file}:\n" + "\n".join(tail))


def convert_f16(hf_dir: Path) -> Path:
    out = WORK / "smollm2-135m-F16.gguf"
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(LLAMA_DIR / "gguf-py")}
        tmp = out.with_suffix(".gguf.tmp")
        run([sys.executable, LLAMA_DIR / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f16", "--outfile", tmp],
            WORK / "convert.log", env)
        tmp.replace(out)
    return out


def make_imatrix(f16: Path, chunks: int) -> Path:
    out = WORK / f"imatrix-ptb-train-{chunks}x512.gguf"
    if not out.exists():
        from moequant.zoo.corpora import load_text

        train = WORK / "ptb_train.txt"
        train.write_text(load_text("ptb", "train"))
        tmp = out.with_name(out.stem + ".tmp.gguf")
        run([BIN / "llama-imatrix", "-m", f16, "-f", train, "-o", tmp, "--chunks", str(chunks), "-c", "512",
             "-b", "512", "-t", "2"], WORK / "imatrix.log")
        tmp.replace(out)
    return out


def quantize(f16: Path, qtype: str, imatrix: Path | None, f16_embeddings: bool) -> Path:
    tag = qtype + ("-imat" if imatrix else "") + ("" if f16_embeddings else "-defemb")
    out = WORK / f"smollm2-135m-{tag}.gguf"
    if not out.exists():
        tmp = out.with_name(out.stem + ".tmp.gguf")
        cmd = [BIN / "llama-quantize"]
        if imatrix:
            cmd += ["--imatrix", imatrix]
        if f16_embeddings:
            cmd += ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
        run(cmd + [f16, tmp, qtype, "2"], WORK / f"quantize-{tag}.log")
        tmp.replace(out)
    return out


def gguf_bits(path: Path) -> dict:
    """Bytes × 8 / elements over the decoder linears of a GGUF file, with the types they got."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    q_bytes = q_elems = 0
    types: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    other: dict[str, str] = {}
    for t in reader.tensors:
        kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        if t.name.startswith("blk.") and kind in LINEAR_GGUF:
            q_bytes += int(t.n_bytes)
            q_elems += int(t.n_elements)
            types[t.tensor_type.name] += 1
            by_kind[kind.removesuffix(".weight")][t.tensor_type.name] += 1
        elif not t.name.startswith("blk."):
            other[t.name] = t.tensor_type.name
    return {"quantized_bytes": q_bytes, "quantized_elements": q_elems,
            "bits_per_weight": 8.0 * q_bytes / q_elems if q_elems else None,
            "tensor_types": dict(types), "tensor_types_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "non_block_tensors": other}


def llama_logits_fn(gguf: Path, threads: int = 1):
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def logits_of(tokens: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))  # [L, V]

    return logits_of


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["F16", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_XXS", "IQ2_XS"])
    p.add_argument("--max-tokens", type=int, default=16384, help="0 = whole PTB test split")
    p.add_argument("--imatrix-chunks", type=int, default=32)
    p.add_argument("--imatrix-iq-only", action="store_true", help="imatrix for IQ types only (default: all types)")
    p.add_argument("--default-embeddings", action="store_true",
                   help="let llama-quantize choose the token-embedding type (default: keep it f16)")
    args = p.parse_args()
    pc.setup_logging()
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(BIN))
    from moequant.models.loader import load_tokenizer, resolve_model_spec

    resolved = resolve_model_spec(pc.MODEL)
    hf_dir = Path(resolved.path)
    tok = load_tokenizer(resolved)
    ids = pc.ptb_test_ids(tok)
    f16 = convert_f16(hf_dir)
    imatrix = None
    for qtype in args.types:
        t0 = time.time()
        if qtype == "F16":
            path, im = f16, None
        else:
            use_im = qtype in IQ_TYPES or not args.imatrix_iq_only
            im = make_imatrix(f16, args.imatrix_chunks) if use_im else None
            imatrix = im or imatrix
            path = quantize(f16, qtype, im, not args.default_embeddings)
        t_q = time.time() - t0
        acct = gguf_bits(path)
        t1 = time.time()
        res = pc.score_logits_fn(llama_logits_fn(path), ids, tok.bos_token_id, args.max_tokens)
        name = path.stem.removeprefix("smollm2-135m-")
        d = pc.peer_result(
            res, peer="llama.cpp", peer_version=md.version("llama_cpp_python") + " (vendored llama.cpp)",
            config=name,
            config_detail={"type": qtype, "imatrix": str(im.relative_to(pc.ROOT)) if im else None,
                    "imatrix_data": f"ptb train, first {args.imatrix_chunks} chunks of 512" if im else None,
                    "token_embedding_type": "default" if args.default_embeddings or qtype == "F16" else "f16",
                    "gguf": str(path.relative_to(pc.ROOT))},
            bits_per_weight=acct["bits_per_weight"], checkpoint_bytes=path.stat().st_size,
            seconds=time.time() - t1, bits_accounting=acct, quantize_seconds=round(t_q, 2),
            scoring="llama-cpp-python logits_all, fp32 log-softmax on our windows")
        pc.write_json_atomic(pc.run_name("llamacpp", name) / "ppl.json", d)
        print(pc.summary_line(d), acct["tensor_types"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
