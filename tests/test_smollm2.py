"""On the real built-in model: int8 RTN costs < 1% PPL on a PTB slice; the loaded checkpoint is native."""

import pytest
import torch

from moequant import api
from moequant.alloc.recipe import Recipe
from moequant.codecs.config import UniformConfig
from moequant.models.loader import load_model
from moequant.nn.quant_linear import QuantLinear
from moequant.runs import PplJob, model_sizes, run_ppl


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2-135m")


def test_int8_rtn_within_one_percent(smollm2, tmp_path):
    model, tok, _ = smollm2
    job = PplJob("smollm2-135m", max_tokens=2048, progress=False)
    base = run_ppl(job, model=model, tokenizer=tok)
    assert 20 < base["ppl"] < 300  # a real model, not noise (vocab 49152)
    api.quantize(model, Recipe.uniform(UniformConfig(bits=8, group_size=64, clip_search=False)), progress=False)
    api.save(model, tmp_path / "int8", tokenizer=tok)
    q = api.load(tmp_path / "int8")
    assert isinstance(q.model.layers[29].mlp.down_proj, QuantLinear)
    res = run_ppl(job, model=q, tokenizer=tok)
    assert res["tokens"] == base["tokens"] == 2048
    assert abs(res["ppl"] / base["ppl"] - 1) < 0.01
    sizes = model_sizes(q)
    assert sizes["resident_over_ideal"] <= 1.05
