"""GGUF exports in real llama.cpp (issue #12): perplexity parity with moequant, and our Hessian-rounded k-quants
against llama.cpp's own quantizer with its imatrix.

    bash benchmarks/peers/build_llamacpp.sh      # llama-quantize, llama-imatrix, libllama + llama-cpp-python
    # 1. parity: export, load in llama.cpp, generate, score PTB test there and with `moequant eval ppl`
    OMP_NUM_THREADS=1 python benchmarks/export/gguf_llamacpp.py parity smollm2-135m qwen2.5-coder-1.5b \\
        tiny-olmoe runs/q4k --max-tokens 0 --json benchmarks/results/gguf_parity.json
    # 2. vs-llamacpp: ours = `moequant quantize M --method qK` (LDLQ, PTB train 128x512) + `moequant export gguf`;
    #    theirs = `moequant export gguf M --types f16` + llama-imatrix (the same windows, as text)
    #    + `llama-quantize --pure --imatrix`; both scored in llama.cpp on the same windows, paired bootstrap;
    #    --parity q2_k: that run scored with `moequant eval ppl` too (the parity check on this model)
    OMP_NUM_THREADS=1 python benchmarks/export/gguf_llamacpp.py vs-llamacpp --model qwen2.5-coder-1.5b \\
        --types q2_k q3_k q4_k --max-tokens 0 --json benchmarks/results/gguf_vs_llamacpp.json

Every artifact (GGUF files, runs, imatrix, calibration text, per-window scores) lands under ``--work``
(default ``runs/gguf_llamacpp/``) and is skipped when it exists, so an interrupted job resumes. ``--dry-run``
runs the moequant steps (export, quantize, eval ppl, calibration text) and prints the llama.cpp commands
instead of running them. Scoring in llama.cpp is ``llamacpp_peer.llama_logits_fn`` on the windows of
``peer_common`` (the same token ids as ``moequant eval ppl``: BOS + 512 PTB test tokens from the HF tokenizer).

Same size in ``vs-llamacpp``: ``llama-quantize --pure`` (no Q*_K_M mixture: every quantizable tensor gets the
asked type, rows that are not whole 256-blocks get llama.cpp's fallback, which our methods use too) with
``--token-embedding-type`` and ``--output-tensor-type`` set to the types our file stores ``token_embd.weight`` and
``output.weight`` in (a k-quant run of ours quantizes both by default, e.g. Q4_K and Q6_K beside Q2_K, each tool
then rounding them its own way), our export's ``--kept-type`` (f16) for one it lacks. The job refuses to score
when any tensor's type differs between the two files.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
import llamacpp_peer as lp  # noqa: E402
import peer_common as pc  # noqa: E402

from moequant.calib.data import CalibData, calibration_tokens  # noqa: E402
from moequant.eval.bootstrap import paired_delta_ci  # noqa: E402
from moequant.zoo.corpora import tokenize_corpus  # noqa: E402
from moequant.runinfo import run_info  # noqa: E402

log = logging.getLogger("bench.gguf_llamacpp")

WORK = pc.ROOT / "runs" / "gguf_llamacpp"
LLAMA_TYPES = {"q2_k": "Q2_K", "q3_k": "Q3_K", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
PROMPT = "The capital of France is"


# ---------------------------------------------------------------- steps (resumable, logged, recorded)


class Steps:
    """Runs each command whose output is missing (outputs are written to a temp name and renamed by the tool or
    here), logs it to ``<work>/logs``, and records what ran or was skipped for the JSON."""

    def __init__(self, work: Path, dry_run: bool, threads: int) -> None:
        self.work, self.dry_run, self.threads = work, dry_run, threads
        self.logs = work / "logs"
        self.record: list[dict[str, Any]] = []
        self.calib_text: dict[str, Any] | None = None  # what write_calib_text reported (vs-llamacpp)

    def moequant(self, args: list[Any], done: Path, name: str) -> None:
        self._run([sys.executable, "-m", "moequant.cli", "-q", *args], "moequant -q", done, name, tool=False)

    def llama(self, tool: str, args: list[Any], done: Path, name: str) -> None:
        self._run([lp.BIN / tool, *args], tool, done, name, tool=True)

    def _run(self, cmd: list[Any], shown: str, done: Path, name: str, tool: bool) -> None:
        n_prog = 1 if tool else 4
        line = " ".join([shown] + [shlex.quote(os.path.relpath(c, pc.ROOT) if isinstance(c, Path) else str(c))
                                   for c in cmd[n_prog:]])
        if done.exists():
            self.record.append({"step": name, "command": line, "skipped": "output exists"})
            return
        if tool and self.dry_run:
            print(f"[dry-run] {line}", flush=True)
            self.record.append({"step": name, "command": line, "skipped": "dry run"})
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        lp.run(cmd, self.logs / f"{name}.log", env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        self.record.append({"step": name, "command": line, "seconds": round(time.time() - t0, 1)})


def spec_tag(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name if os.sep in spec else spec).strip("_")


def is_checkpoint(spec: str) -> bool:
    from moequant.models.loader import resolve_model_spec

    return resolve_model_spec(spec).kind == "moequant"


def tokenizer_of(spec: str):
    from moequant.models.loader import load_tokenizer, resolve_model_spec

    tok = load_tokenizer(resolve_model_spec(spec))
    if tok is None or tok.bos_token_id is None:
        raise SystemExit(f"{spec}: needs a tokenizer with a BOS token (the windows prepend BOS)")
    return tok


def tokens_tag(max_tokens: int) -> str:
    return f"t{max_tokens}" if max_tokens else "tall"


# ---------------------------------------------------------------- GGUF contents


def gguf_tensor_types(path: Path) -> dict[str, tuple[str, int]]:
    """tensor name -> (ggml type name, data bytes), read with gguf-py."""
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(str(path)).tensors}


def type_summary(types: dict[str, tuple[str, int]]) -> dict[str, Any]:
    counts = collections.Counter(t for t, _ in types.values())
    return {"tensor_types": dict(counts), "tensor_bytes": sum(b for _, b in types.values())}


def embedding_and_output_types(ours: dict[str, tuple[str, int]], kept: str) -> tuple[str, str]:
    """``(--token-embedding-type, --output-tensor-type)`` for llama-quantize: the types of our file's
    ``token_embd.weight`` and ``output.weight``, ``kept`` (upper-cased) for one our file lacks."""
    emb, out = (ours.get(name, (kept.upper(), 0))[0] for name in ("token_embd.weight", "output.weight"))
    return emb, out


def type_mismatches(ours: dict[str, tuple[str, int]], theirs: dict[str, tuple[str, int]]) -> list[str]:
    """One line per tensor whose presence or type differs between two GGUF files."""
    out = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, ("absent", 0))[0], theirs.get(name, ("absent", 0))[0]
        if a != b:
            out.append(f"{name}: ours {a}, llama.cpp {b}")
    return out


# ---------------------------------------------------------------- llama.cpp side


def score_in_llamacpp(gguf: Path, ids: torch.Tensor, bos: int, max_tokens: int, out: Path, threads: int = 1
                      ) -> dict | None:
    """Per-window NLLs of ``gguf`` in llama.cpp (``threads`` threads) on our windows, cached in ``out`` and,
    while it runs, every few windows in ``<out>.partial`` (an interrupted scoring continues where it stopped,
    for the same file: its size and mtime are in the key); None in a dry run."""
    if out.exists():
        return json.loads(out.read_text())
    if not gguf.exists():
        return None
    t0 = time.time()
    st = gguf.stat()
    partial = out.with_name(out.name + ".partial")
    d = pc.score_logits_fn(lp.llama_logits_fn(gguf, threads), ids, bos, max_tokens, partial=partial,
                           model_key=f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}").to_dict()
    d.update(gguf=os.path.relpath(gguf, pc.ROOT), seconds=round(time.time() - t0, 1), threads=threads,
             scoring="llama-cpp-python logits_all, fp32 log-softmax on peer_common's windows")
    pc.write_json_atomic(out, d)
    partial.unlink(missing_ok=True)
    return d


def llamacpp_generate(gguf: Path, tok, n_tokens: int) -> dict[str, Any]:
    """Greedy continuation of ``PROMPT`` in llama.cpp, and whether llama.cpp's tokenizer gives the HF ids on
    the first 4,000 characters of PTB test."""
    import llama_cpp

    from moequant.zoo.corpora import load_text

    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=1, verbose=False)
    out = llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, top_k=1)
    sample = load_text(pc.DATA, pc.SPLIT)[:4000]
    ids_llama = llm.tokenize(sample.encode(), add_bos=False, special=False)
    ids_hf = tok(sample, add_special_tokens=False)["input_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(ids_llama, ids_hf)) if a != b), None)
    return {"prompt": PROMPT, "greedy_text": out["choices"][0]["text"], "greedy_tokens": n_tokens,
            "tokenizer_same_ids": ids_llama == ids_hf, "tokenizer_ids": [len(ids_llama), len(ids_hf)],
            "tokenizer_first_difference": first_diff}


def llamacpp_versions() -> dict[str, str | None]:
    import gguf

    try:
        lcp = md.version("llama_cpp_python")
    except md.PackageNotFoundError:
        lcp = None
    return {"llama_cpp_python": lcp, "llama_cpp": f"vendored in llama_cpp_python sdist {lp.SDIST.name}",
            "gguf": getattr(gguf, "__version__", None) or md.version("gguf")}


# ---------------------------------------------------------------- calibration text for llama-imatrix


def calib_bodies(windows: torch.Tensor, bos_id: int | None) -> list[torch.Tensor]:
    """The text tokens of each calibration window ``[S, L]``: L - 1 of them, so that with one separator token
    after each body the text re-tokenizes into chunks of exactly L tokens (llama-imatrix turns the first token of
    each chunk into BOS when the model adds one: chunk 0 = BOS + body 0, chunk i = BOS (was the separator) +
    body i). Windows with BOS drop it; windows without drop their last token."""
    if bos_id is not None and bool((windows[:, 0] == bos_id).all()):
        return list(windows[:, 1:])  # S x [L - 1]
    return list(windows[:, :-1])  # S x [L - 1]


SEPARATORS = ("\n", " \n", "\n\n", " ", ". ", "0", " 0")  # a digit: for a window that starts with a newline


def pick_separator(tok, body: list[int], text: str, next_body: list[int] | None, next_text: str | None) -> str:
    """A separator that is one token after ``text`` and before ``next_text`` (so neither window's tokens merge
    with it): the first of ``SEPARATORS`` that tokenizes that way, else a newline. After the last window
    (``next_text`` None) none that ends in a newline: llama.cpp's ``-f`` drops a prompt file's final newline, which
    left llama-imatrix one token short of the last chunk (127 of 128 on qwen2.5-coder-1.5b)."""
    def ids(t: str) -> list[int]:
        return tok(t, add_special_tokens=False)["input_ids"]

    for sep in SEPARATORS if next_text is not None else [s for s in SEPARATORS if not s.endswith("\n")]:
        after = ids(text + sep)
        if len(after) != len(body) + 1 or after[:-1] != body:
            continue
        if next_text is not None:
            before = ids(sep + next_text)
            if len(before) != len(next_body) + 1 or before[1:] != next_body:
                continue
        return sep
    return "\n"


def write_calib_text(tok, calib: CalibData, path: Path) -> dict[str, Any]:
    """Write our calibration windows (``calibration_tokens``: the ones ``moequant quantize`` uses) as text, each
    followed by a one-token separator (``pick_separator``); report how many windows re-tokenize, in place, to the
    same ids (a merge across a boundary shifts every later chunk)."""
    windows = calibration_tokens(tok, calib)  # [S, L]
    bodies = [b.tolist() for b in calib_bodies(windows, tok.bos_token_id)]
    texts = [tok.decode(b, skip_special_tokens=False, clean_up_tokenization_spaces=False) for b in bodies]
    if not path.exists():
        parts = []
        for i, (b, t) in enumerate(zip(bodies, texts)):
            nxt = i + 1 < len(bodies)
            parts += [t, pick_separator(tok, b, t, bodies[i + 1] if nxt else None, texts[i + 1] if nxt else None)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(parts))
        tmp.replace(path)
    written = path.read_text()
    retok = tokenize_corpus(tok, written)  # [n]
    L = calib.seqlen
    in_place = sum(int(retok[i * L:i * L + L - 1].tolist() == b) for i, b in enumerate(bodies))
    # llama.cpp reads the file for -f without its final newline (one token fewer when the text ends in one)
    dropped = int(written.endswith("\n"))
    return {"file": os.path.relpath(path, pc.ROOT), **calib.to_dict(), "retokenized_tokens": int(retok.numel()),
            "expected_tokens": calib.samples * L, "windows_in_place": in_place,
            "chunks_llama_imatrix": (int(retok.numel()) - dropped) // L,
            "layout": "each window's text tokens (its BOS, or its last token, dropped) + a one-token separator"}


# ---------------------------------------------------------------- job 1: parity


def moequant_ppl(steps: Steps, spec: str | Path, out: Path, max_tokens: int) -> dict[str, Any]:
    """``moequant eval ppl SPEC`` on the PTB test windows into ``out`` (skipped when it exists; an interrupted
    scoring continues from its progress file beside the temporary JSON) -> its result."""
    mt = ["--max-tokens", str(max_tokens)] if max_tokens else []
    tmp = out.with_name(out.name + ".tmp")
    steps.moequant(["eval", "ppl", spec, "--data", pc.DATA, "--split", pc.SPLIT, *mt, "--json", tmp, "--resume"],
                   out, f"ppl-moequant-{spec_tag(str(spec))}")
    if tmp.exists():
        tmp.replace(out)
    return json.loads(out.read_text())


def parity(args: argparse.Namespace, steps: Steps) -> list[dict[str, Any]]:
    rows = []
    for spec in args.models:
        ckpt = is_checkpoint(spec)
        types = "auto" if ckpt else args.float_type
        tag = f"{spec_tag(spec)}-{types}"
        d = steps.work / "parity"
        gguf = d / f"{tag}.gguf"
        steps.moequant(["export", "gguf", spec, "--types", types, "--out", gguf], gguf, f"export-{tag}")
        ours = moequant_ppl(steps, spec, d / f"{spec_tag(spec)}-moequant-{tokens_tag(args.max_tokens)}.json",
                            args.max_tokens)
        row: dict[str, Any] = {"model": spec, "checkpoint": ckpt, "export_types": types,
                               "same_weights": ckpt or types == "f32", "gguf": os.path.relpath(gguf, pc.ROOT),
                               "moequant": ours}
        if gguf.exists():
            row["gguf_contents"] = type_summary(gguf_tensor_types(gguf))
            row["gguf_file_bytes"] = gguf.stat().st_size
        tok = tokenizer_of(spec)
        ids = pc.ptb_test_ids(tok)
        theirs = None if steps.dry_run else score_in_llamacpp(
            gguf, ids, tok.bos_token_id, args.max_tokens, d / f"{tag}-llamacpp-{tokens_tag(args.max_tokens)}.json",
            args.threads)
        if theirs is not None:
            row["llamacpp"] = theirs
            row["generation"] = llamacpp_generate(gguf, tok, args.gen_tokens)
            delta = paired_delta_ci(ours["nll_per_window"], ours["tokens_per_window"], theirs["nll_per_window"],
                                    theirs["tokens_per_window"])
            row["llamacpp_over_moequant"] = delta.to_dict()
            row["within_1pct"] = abs(delta.ratio - 1) <= 0.01
        rows.append(row)
    return rows


def parity_table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | GGUF types | same weights | PPL moequant | PPL llama.cpp | llama.cpp / moequant [95% CI] | within 1% | "
           "tokens | llama.cpp greedy continuation |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in r.get("gguf_contents", {}).get("tensor_types", {}).items())
        lc, d = r.get("llamacpp"), r.get("llamacpp_over_moequant")
        ratio = f"{d['ratio']:.4f} [{d['ratio_ci'][0]:.4f}, {d['ratio_ci'][1]:.4f}]" if d else "not run"
        gen = repr(r["generation"]["greedy_text"]) if "generation" in r else ""
        ppl_lc = f"{lc['ppl']:.3f}" if lc else "not run"
        out.append(f"| {r['model']} | {types} | {r['same_weights']} | {r['moequant']['ppl']:.3f} | {ppl_lc} | {ratio} | "
                   f"{r.get('within_1pct', '')} | {r['moequant']['tokens']} | {gen} |")
    return "\n".join(out)


# ---------------------------------------------------------------- job 2: ours vs llama.cpp's quantizer


def calib_flags(calib: CalibData) -> list[str]:
    return ["--calib", calib.data, "--calib-samples", str(calib.samples), "--calib-seqlen", str(calib.seqlen),
            "--calib-seed", str(calib.seed)]


def imatrix_file(args: argparse.Namespace, steps: Steps, d: Path, f16: Path, tok, calib: CalibData) -> Path:
    """llama.cpp's importance matrix over our calibration windows: ``llama-imatrix`` on them written as text, or
    (``--imatrix-source moequant``) ours from ``moequant export gguf --imatrix-out``."""
    if args.imatrix_source == "moequant":
        out = d / "imatrix-moequant.gguf"
        scratch = d / "f16-for-imatrix.gguf"
        steps.moequant(["export", "gguf", args.model, "--types", "f16", "--out", scratch, "--imatrix-out", out,
                        *calib_flags(calib), "--overwrite"], out, "imatrix-moequant")
        scratch.unlink(missing_ok=True)
        return out
    text = d / f"calib-{calib.data}-{calib.samples}x{calib.seqlen}-seed{calib.seed}.txt"
    steps.calib_text = write_calib_text(tok, calib, text)
    if f16.exists():  # whether llama-imatrix turns each chunk's first token into BOS (absent: the vocab's default)
        field = GGUFReader(str(f16)).fields.get("tokenizer.ggml.add_bos_token")
        steps.calib_text["gguf_add_bos_token"] = None if field is None else bool(field.contents())
    out = d / "imatrix-llama.gguf"
    tmp = d / "imatrix-llama.tmp.gguf"
    L = str(calib.seqlen)
    steps.llama("llama-imatrix", ["-m", f16, "-f", text, "-o", tmp, "--chunks", str(calib.samples), "-c", L, "-b", L,
                                  "-t", str(args.threads)], out, "imatrix-llama")
    if tmp.exists():
        tmp.replace(out)
    return out


def vs_llamacpp(args: argparse.Namespace, steps: Steps) -> list[dict[str, Any]]:
    calib = CalibData(data="ptb", split="train", samples=args.calib_samples, seqlen=args.calib_seqlen,
                      seed=args.calib_seed)
    d = steps.work / "vs" / f"{spec_tag(args.model)}-calib{calib.samples}x{calib.seqlen}s{calib.seed}"
    tok = tokenizer_of(args.model)
    ids = pc.ptb_test_ids(tok)
    tt = tokens_tag(args.max_tokens)
    f16 = d / "f16.gguf"
    steps.moequant(["export", "gguf", args.model, "--types", "f16", "--out", f16], f16, "export-f16")
    imatrix = imatrix_file(args, steps, d, f16, tok, calib)

    def score(gguf: Path, name: str) -> dict | None:
        return None if steps.dry_run else score_in_llamacpp(gguf, ids, tok.bos_token_id, args.max_tokens,
                                                            d / f"score-{name}-{tt}.json", args.threads)

    rows = []
    if not args.no_f16_score:
        ref = score(f16, "f16")
        rows.append({"name": "f16", "gguf": os.path.relpath(f16, pc.ROOT), "score": ref})
    for method in args.types:
        run = d / f"ours-{method}"
        progress = run.with_name(f".{run.name}.moequant-run")
        resume = ["--resume"] if progress.exists() else []
        steps.moequant(["quantize", args.model, "--method", method, *calib_flags(calib), "--out", run, *resume],
                       run / "report.json", f"quantize-{method}")
        ours = d / f"ours-{method}.gguf"
        steps.moequant(["export", "gguf", run, "--kept-type", args.kept_type, "--out", ours], ours, f"export-{method}")
        theirs = d / f"llamacpp-{method}-imat-{args.imatrix_source}.gguf"
        tmp = theirs.with_name(theirs.stem + ".tmp.gguf")
        t_ours = gguf_tensor_types(ours) if ours.exists() else {}
        emb, out = embedding_and_output_types(t_ours, args.kept_type)
        steps.llama("llama-quantize", ["--pure", "--imatrix", imatrix, "--token-embedding-type", emb,
                                       "--output-tensor-type", out, f16, tmp, LLAMA_TYPES[method], str(args.threads)],
                    theirs, f"quantize-llamacpp-{method}")
        if tmp.exists():
            tmp.replace(theirs)
        row: dict[str, Any] = {"name": method, "ours_gguf": os.path.relpath(ours, pc.ROOT),
                               "llamacpp_gguf": os.path.relpath(theirs, pc.ROOT)}
        if ours.exists():
            row["ours_contents"], row["ours_file_bytes"] = type_summary(t_ours), ours.stat().st_size
        if theirs.exists():
            t_theirs = gguf_tensor_types(theirs)
            row["llamacpp_contents"], row["llamacpp_file_bytes"] = type_summary(t_theirs), theirs.stat().st_size
            bad = type_mismatches(t_ours, t_theirs)
            if bad:
                raise SystemExit(f"{ours.name} and {theirs.name} differ in {len(bad)} tensor types, not the same size "
                                 f"(first: {bad[0]}); not scoring")
        a, b = score(theirs, f"llamacpp-{method}-imat-{args.imatrix_source}"), score(ours, f"ours-{method}")
        row["llamacpp_score"], row["ours_score"] = a, b
        if a is not None and b is not None:
            row["ours_over_llamacpp"] = paired_delta_ci(a["nll_per_window"], a["tokens_per_window"],
                                                        b["nll_per_window"], b["tokens_per_window"]).to_dict()
        if method in args.parity and b is not None:  # the same weights in moequant: the parity check on this model
            m = moequant_ppl(steps, run, d / f"moequant-ours-{method}-{tt}.json", args.max_tokens)
            row["ours_moequant_score"] = m
            row["ours_llamacpp_over_moequant"] = paired_delta_ci(m["nll_per_window"], m["tokens_per_window"],
                                                                 b["nll_per_window"], b["tokens_per_window"]).to_dict()
            row["ours_generation"] = llamacpp_generate(ours, tok, args.gen_tokens)
        rows.append(row)
    return rows


def vs_table(rows: list[dict[str, Any]], imatrix_source: str) -> str:
    out = [f"| type | tensor bytes ours / llama.cpp | PPL llama.cpp (imatrix: {imatrix_source}) | PPL ours (LDLQ) | "
           "ours / llama.cpp [95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["name"] == "f16":
            s = r["score"]
            out.append(f"| f16 | | {s['ppl']:.3f} | | | reference |" if s else "| f16 | | not run | | | |")
            continue
        sizes = " / ".join(str(r.get(k, {}).get("tensor_bytes", "-")) for k in ("ours_contents", "llamacpp_contents"))
        a, b, d = r["llamacpp_score"], r["ours_score"], r.get("ours_over_llamacpp")
        ppl = [f"{s['ppl']:.3f}" if s else "not run" for s in (a, b)]
        ratio = f"{d['ratio']:.4f} [{d['ratio_ci'][0]:.4f}, {d['ratio_ci'][1]:.4f}]" if d else ""
        out.append(f"| {LLAMA_TYPES[r['name']]} | {sizes} | {ppl[0]} | {ppl[1]} | {ratio} | "
                   f"{d['verdict'] if d else ''} |")
    par = [r for r in rows if "ours_llamacpp_over_moequant" in r]
    if par:
        out += ["", "| our run | PPL moequant | PPL llama.cpp (our GGUF) | llama.cpp / moequant [95% CI] | within 1% | "
                "llama.cpp greedy continuation |", "|---|---|---|---|---|---|"]
        for r in par:
            d = r["ours_llamacpp_over_moequant"]
            out.append(f"| {LLAMA_TYPES[r['name']]} | {r['ours_moequant_score']['ppl']:.3f} | "
                       f"{r['ours_score']['ppl']:.3f} | {d['ratio']:.4f} [{d['ratio_ci'][0]:.4f}, {d['ratio_ci'][1]:.4f}] "
                       f"| {abs(d['ratio'] - 1) <= 0.01} | {r['ours_generation']['greedy_text']!r} |")
    return "\n".join(out)


# ---------------------------------------------------------------- CLI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    pp = sub.add_parser("parity", help="export, load in llama.cpp, generate, PPL there vs `moequant eval ppl`")
    pp.add_argument("models", nargs="+", help="zoo aliases, HF directories or moequant run directories")
    pp.add_argument("--float-type", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                    help="export type of float models (default f32: the weights moequant scores)")
    pv = sub.add_parser("vs-llamacpp", help="our LDLQ k-quants vs llama-quantize with its imatrix, same size")
    pv.add_argument("--model", default="qwen2.5-coder-1.5b")
    pv.add_argument("--types", nargs="+", default=["q2_k", "q3_k", "q4_k"], choices=sorted(LLAMA_TYPES))
    pv.add_argument("--calib-samples", type=int, default=128)
    pv.add_argument("--calib-seqlen", type=int, default=512)
    pv.add_argument("--calib-seed", type=int, default=0)
    pv.add_argument("--kept-type", default="f16", choices=["f16", "f32", "bf16"],
                    help="type of the tensors our export keeps in float (default f16); llama-quantize gives the "
                         "token embedding and the output our file's types")
    pv.add_argument("--imatrix-source", default="llama-imatrix", choices=["llama-imatrix", "moequant"],
                    help="llama.cpp's imatrix: llama-imatrix on our calibration windows as text (default), or ours "
                         "(moequant export gguf --imatrix-out, the same windows)")
    pv.add_argument("--no-f16-score", action="store_true", help="do not score the f16 reference file")
    pv.add_argument("--parity", nargs="+", default=[], choices=sorted(LLAMA_TYPES), metavar="TYPE",
                    help="also score our run of these types with `moequant eval ppl` (the weights of our GGUF) and "
                         "generate from our GGUF in llama.cpp: the parity check on this model")
    for q in (pp, pv):
        q.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens generated in llama.cpp")
        q.add_argument("--max-tokens", type=int, default=16384, help="PTB test tokens scored (0 = the whole split)")
        q.add_argument("--work", type=Path, default=WORK, help="artifacts, reused when present (default %(default)s)")
        q.add_argument("--json", type=Path, help="result JSON (default <work>/<job>-<tokens>.json)")
        q.add_argument("--threads", type=int, default=1, help="threads of llama-imatrix, llama-quantize and the "
                       "scoring in llama-cpp-python, and OMP threads of the moequant steps")
        q.add_argument("--dry-run", action="store_true",
                       help="run the moequant steps only; print the llama.cpp commands instead of running them")
    args = p.parse_args()
    pc.setup_logging()
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lp.BIN))
    steps = Steps(args.work, args.dry_run, args.threads)
    t0 = time.time()
    if args.job == "parity":
        rows = parity(args, steps)
        table = parity_table(rows)
    else:
        rows = vs_llamacpp(args, steps)
        table = vs_table(rows, args.imatrix_source)
    info = run_info(sys.argv[1:])
    info["command"] = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], pc.ROOT),
                                                                    *sys.argv[1:]])
    result = {"job": args.job, "dry_run": args.dry_run, "max_tokens": args.max_tokens, "data": pc.DATA,
              "split": pc.SPLIT, "protocol": "seqlen 512, stride 512, BOS prepended (peer_common.ppl_config)",
              "rows": rows, "steps": steps.record, "calib_text": steps.calib_text, "table": table,
              "seconds": round(time.time() - t0, 1), **info, "llamacpp_versions": llamacpp_versions()}
    variant = f"-{args.imatrix_source}" if args.job == "vs-llamacpp" else ""
    out = args.json or args.work / f"{args.job}{variant}-{tokens_tag(args.max_tokens)}.json"
    pc.write_json_atomic(out, result)
    print(table)
    print(f"\n{out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
