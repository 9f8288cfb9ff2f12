"""A kept head dequantized from Q8_0 is found on its grid bit for bit and multiplied from it at decode
(``nn.exact_head``); anything off the grid, any gradient, prefill and the reference mode use ``F.linear``."""

import gguf
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import UniformConfig
from moequant.codecs.uniform import exact_symmetric_parts
from moequant.kernels.select import reference_kernels
from moequant.nn.exact_head import EXACT_HEAD_ENV, ExactGridLinear, attach_exact_head, exact_packed_view

pytestmark = pytest.mark.usefixtures("one_thread")


def q8_0_table(n: int, k: int, seed: int = 0, qtype: str = "Q8_0") -> torch.Tensor:
    """``[n, k]`` float32 as llama.cpp's own ``qtype`` quantize + dequantize leaves it (gguf-py, same arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero block: scale 0
    t = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(w.numpy(), t)
    return torch.from_numpy(gguf.quants.dequantize(q, t).copy()).reshape(n, k)


def test_q8_0_table_is_found_exactly_and_decodes_bit_for_bit():
    w = q8_0_table(300, 96)
    parts = exact_symmetric_parts(w, 8, 32, torch.float16, chunk_rows=128)  # three chunks, the last partial
    assert parts is not None
    codes, scale = parts
    assert codes.shape == (300, 96) and scale.shape == (300, 3) and scale.dtype == torch.float16
    assert int(codes.min()) >= 1 and int(codes.max()) <= 255  # q - 128 in [-127, 127]
    view = exact_packed_view(w)
    assert view.attrs["bits"] == 8 and view.attrs["group_size"] == 32
    assert torch.equal(view.dequantize(), w)
    assert view.bits_per_weight() == pytest.approx(8.5)


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q5_0", 5)])
def test_q4_0_and_q5_0_tables_are_found_on_their_own_grid(qtype, bits):
    """Their scale is the signed extreme / -2^(b-1): negative where the extreme is positive; the narrowest grid
    that holds a table is chosen (a Q4_0 table also fits the Q5_0 grid, at twice the codes)."""
    w = q8_0_table(300, 96, seed=5, qtype=qtype)
    parts = exact_symmetric_parts(w, bits, 32, torch.float16, chunk_rows=128, signed_max=True)
    assert parts is not None
    codes, scale = parts
    assert bool((scale < 0).any()) and bool((scale > 0).any())  # both signs of the extreme occur
    assert int(codes.max()) <= (1 << bits) - 1 and int(codes.min()) == 0  # the extreme is code 0
    view = exact_packed_view(w)
    assert view.attrs["bits"] == bits and torch.equal(view.dequantize(), w)
    assert view.bits_per_weight() == pytest.approx(bits + 0.5)
    assert exact_symmetric_parts(w, bits, 32, torch.float16) is None  # the Q8_0 rule (absmax / qmax) misses it
    if bits == 5:
        assert exact_symmetric_parts(w, 4, 32, torch.float16, signed_max=True) is None  # not a Q4_0 table


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q8_0"])
def test_exact_tables_repack_to_their_gguf_type_bit_for_bit(qtype, caplog):
    w = q8_0_table(64, 96, seed=7, qtype=qtype)
    view = exact_packed_view(w)
    tid, blocks = view.gguf_blocks()
    assert gguf.GGMLQuantizationType(tid).name == qtype
    back = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(tid))
    assert torch.equal(torch.from_numpy(back.copy()).reshape(w.shape), w)
    assert "normal range" not in caplog.text  # negative and zero scales are not "tiny weights"


@pytest.mark.parametrize("edit", ["one_ulp", "bf16_table", "k_not_multiple", "inf"])
def test_tables_off_the_grid_are_refused(edit):
    w = q8_0_table(64, 96)
    if edit == "one_ulp":
        w[40, 70] = torch.nextafter(w[40, 70], torch.tensor(1.0))  # one value one ulp off, in the last chunk
    elif edit == "bf16_table":
        w = (torch.randn(64, 96) * 0.05).to(torch.bfloat16).float()  # a real bf16 checkpoint's head
    elif edit == "k_not_multiple":
        w = w[:, :80]
    else:
        w[5, 5] = float("inf")
    assert exact_symmetric_parts(w, 8, 32, torch.float16, chunk_rows=16) is None
    assert exact_packed_view(w) is None


def _head(n: int = 256, k: int = 64) -> tuple[ExactGridLinear, nn.Linear]:
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q8_0_table(n, k, seed=2))
    return ExactGridLinear(lin, exact_packed_view(lin.weight.detach())), lin


def test_decode_rows_take_the_packed_gemv_within_fp32_summation_error():
    head, lin = _head()
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = head(x)
        assert torch.equal(got, head.packed.linear(x))  # the packed path ran
        want = F.linear(x, lin.weight)
    bound = 1e-5 * (x.abs() @ lin.weight.abs().T)
    assert bool(((got - want).abs() <= bound).all())
    assert head.weight is lin.weight and set(head.state_dict()) == {"weight"}


def test_prefill_gradients_reference_mode_and_the_switch_use_f_linear(monkeypatch):
    head, lin = _head()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        big = torch.randn(9, 64)  # more rows than GEMV_MAX_ROWS: prefill, BLAS on the float weight
        assert torch.equal(head(big), F.linear(big, lin.weight))
        with reference_kernels():
            assert torch.equal(head(x[0, :1]), F.linear(x[0, :1], lin.weight))
        monkeypatch.setenv(EXACT_HEAD_ENV, "0")
        assert torch.equal(head(x[0, :1]), F.linear(x[0, :1], lin.weight))
        monkeypatch.delenv(EXACT_HEAD_ENV)
    xg = x[0, :1].clone().requires_grad_(True)
    y = head(xg)
    assert torch.equal(y, F.linear(xg, lin.weight))
    y.sum().backward()
    assert torch.allclose(xg.grad, lin.weight.sum(0, keepdim=True))


def _save_q8_headed(tmp_path, tie: bool):
    model = tiny_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():
        model.lm_head.weight.copy_(q8_0_table(*model.lm_head.weight.shape, seed=3))
    # rules naming the tables keep them in float32 (no rule: quantize would store them packed, exactly)
    keep = Recipe((Rule("kind:embedding", None), Rule("kind:head", None)))
    recipe = Recipe(keep.rules + Recipe.uniform(UniformConfig(bits=4, group_size=32, symmetric=False)).rules)
    api.quantize(model, recipe, progress=False)
    api.save(model, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("tie", [True, False])
def test_load_attaches_it_to_a_q8_0_head_and_nothing_else(tmp_path, monkeypatch, tie):
    run = _save_q8_headed(tmp_path, tie)
    m = api.load(run)
    assert isinstance(m.lm_head, ExactGridLinear)
    assert torch.equal(m.lm_head.packed.dequantize(), m.lm_head.weight)
    if tie:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 256, (1, 6))
    monkeypatch.setenv(EXACT_HEAD_ENV, "0")
    plain = api.load(run)
    assert type(plain.lm_head) is nn.Linear
    with torch.no_grad():
        h = plain.model(ids).last_hidden_state[:, -1:]  # one decode row
        got, want = m.lm_head(h), plain.lm_head(h)  # the switch is read per call: 0 here, so F.linear
        assert torch.equal(got, want)
        monkeypatch.delenv(EXACT_HEAD_ENV)
        got = m.lm_head(h)
    bound = 1e-5 * (h.abs() @ plain.lm_head.weight.abs().T)
    assert bool(((got - want).abs() <= bound).all()) and not torch.equal(got, torch.zeros_like(got))
    assert attach_exact_head(m) is False  # already attached


def test_a_random_head_is_left_alone(tmp_path):
    model = tiny_model("llama")
    api.quantize(model, Recipe.uniform(UniformConfig(bits=4, group_size=32, symmetric=False)), progress=False)
    api.save(model, tmp_path / "run")
    assert type(api.load(tmp_path / "run").lm_head) is nn.Linear
