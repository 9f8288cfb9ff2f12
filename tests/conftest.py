"""Shared fixtures: tiny random-init configs of every supported architecture."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. Triton reads the switch when it is
# first imported (torch.compile may import it too), so it is set before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text", "olmoe", "qwen3_moe", "qwen2_moe", "mixtral")
MOE_ARCHS = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral")


def tiny_config(arch: str):
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=128, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, head_dim=16, **common)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(intermediate_size=128, head_dim=16, sliding_window=32, **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, **common)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2, **common)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session", autouse=True)
def transformers_logs_propagate():
    """transformers binds its own log handler to the ``sys.stderr`` of the moment it is first used; under
    pytest that is one test's captured stream, closed when the test ends, and a later test's CLI run would
    print a logging error into its stderr. Let its records propagate to the root logger instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    yield


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP stalls when the 2 shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def close_fp32_products(got: torch.Tensor, want: torch.Tensor) -> None:
    """Hessian sums are fp32 partial products added in float64: equal to a float64 reference to ~1e-7
    of the matrix's scale (a wrong token, routing or scaling is off by far more)."""
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=2e-6 * scale)


# --- tiny models with a real (tiny) BPE tokenizer, for tests that tokenize text -------------------------
def toy_words(n: int) -> str:
    """``n`` space-separated pseudo-words ``w0 … w96`` in a fixed order."""
    return " ".join(f"w{(i * 7919) % 97}" for i in range(n))


def toy_lines(words: str) -> str:
    """``words`` cut into lines of 80 characters."""
    return "\n".join(words[i:i + 80] for i in range(0, len(words), 80))


def toy_tok_model(arch: str, tok_text: str):
    """(tokenizer trained on ``tok_text``, vocab 320; seeded random-init ``arch`` model, "llama" or "olmoe")."""
    import transformers as tf

    from moequant.zoo.tiny_olmoe import train_tokenizer

    tok = train_tokenizer([tok_text], 320)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=320, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=128, **common))
    elif arch == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                                   **common))
    else:
        raise ValueError(arch)
    return tok, model


def save_toy_olmoe(tmp_path, name: str, n_words: int):
    """A tiny OLMoE with its tokenizer saved in ``tmp_path/name``, and ``tmp_path/text.txt`` (the
    tokenizer's training text) to calibrate and score on -> (model dir, text file)."""
    text = toy_lines(toy_words(n_words))
    (tmp_path / "text.txt").write_text(text)
    tok, model = toy_tok_model("olmoe", text)
    d = tmp_path / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tmp_path / "text.txt"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(script: Path, name: str):
    """A benchmark script imported as module ``name`` (registered in ``sys.modules``, which dataclasses need),
    its own folder on ``sys.path`` while it loads (the scripts import their siblings, e.g. ``_cli_runs``)."""
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(script.parent))


def require_extension(load, name: str):
    """A C++ extension (``load()`` -> module or None): skipped where no compiler exists or the extensions
    are disabled on purpose, a failure where it should build and does not."""
    import os
    import shutil

    from moequant.kernels import cpp_build

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here: only the reference path exists")
    if os.environ.get(cpp_build.DISABLE_ENV, "").strip() not in ("", "0"):
        pytest.skip(f"{cpp_build.DISABLE_ENV} is set")
    mod = load()
    assert mod is not None, f"the {name} extension failed to build (see the warning)"
    assert mod.has_avx2() == bool(cpp_build.simd_flags())  # the vector path is what the tests exercise
    return mod


# The qgemv extension as a fixture. It lives here, not in tests/kernels/conftest.py: a second module named
# `conftest` shadows this one for the tests that `from conftest import ...`.
@pytest.fixture(scope="module")
def qgemv_ext():
    from moequant.kernels import uniform as ku

    return require_extension(ku.extension, "qgemv")


@contextlib.contextmanager
def cpp_extensions_disabled(monkeypatch):
    """Inside the block no C++ extension loads (``MOEQUANT_NO_EXT``, load cache cleared); restored after."""
    from moequant.kernels import cpp_build

    monkeypatch.setenv(cpp_build.DISABLE_ENV, "1")
    cpp_build._load.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv(cpp_build.DISABLE_ENV)
        cpp_build._load.cache_clear()


def packed_uniform(n: int, k: int, bits: int, gs: int, symmetric: bool, scale_dtype: str = "float16", seed: int = 0):
    """A packed uniform tensor of a seeded ``[N, K]`` weight whose rows vary in scale (kernel tests)."""
    from moequant.codecs.config import UniformConfig
    from moequant.formats.registry import tensor_class_for

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))  # [N, K], rows of varied scale
    cfg = UniformConfig(bits=bits, group_size=gs, symmetric=symmetric, scale_dtype=scale_dtype, clip_search=False)
    return tensor_class_for(cfg).encode(w, cfg)


def kernel_x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """Seeded activations ``[M, K]`` with a non-zero mean (kernel tests)."""
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) + 0.5


class OnTestDevice:
    """A Triton kernel module whose functions the tests call with CPU tensors. Under the interpreter (no GPU) the
    calls pass through; on a GPU every tensor argument goes to CUDA and a tensor result comes back to the CPU,
    so the same test compares the compiled kernel with the CPU reference."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if not callable(attr) or not torch.cuda.is_available():
            return attr

        def on_cuda(*args, **kwargs):
            move = (lambda v: v.cuda() if isinstance(v, torch.Tensor) else v)  # noqa: E731
            out = attr(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
            return out.cpu() if isinstance(out, torch.Tensor) else out

        return on_cuda


def additive_problem(n: int, k: int, m: int, c: int, g: int, seed: int, samples: int):
    """A random additive-codes problem: (w ``[n, k]``, h ``[k, k]`` from ``samples`` correlated inputs + 0.1 I,
    codebooks ``[m, c, g]``, row scales ``[n]`` in [0.5, 1.5), start codes ``[n, k/g, m]``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(samples, k, generator=gen) @ torch.randn(k, k, generator=gen)  # correlated inputs
    h = x.T @ x / samples + 0.1 * torch.eye(k)
    cb = torch.randn(m, c, g, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.5
    codes = torch.randint(c, (n, k // g, m), generator=gen)
    return w, h, cb, scale, codes


def additive_row_errors(w, h, cb, scale, codes) -> torch.Tensor:
    """Each row's output error ``[n]`` of the codes (``codecs.additive.output_error``)."""
    from moequant.codecs.additive import output_error, reconstruct

    return output_error(w[None], reconstruct(codes[None], cb, scale[None]), h[None])[0]
