"""``moequant finetune``'s flags: the temperature schedule and the --layers / --tau parsers, one-line refusals of
bad combinations (exit 2, nothing written)."""

import math

import pytest

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.finetune.cli import parse_layers
from moequant.finetune.schedule import cosine_tau, parse_tau

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_tau_anneals_from_start_to_end():
    taus = [cosine_tau(i, 11, 0.3, 0.05) for i in range(11)]
    assert taus[0] == 0.3 and taus[-1] == pytest.approx(0.05, abs=1e-15)
    assert taus[5] == pytest.approx(0.175)  # halfway in steps: halfway in tau
    assert all(a > b for a, b in zip(taus, taus[1:]))  # strictly falling
    assert taus[0] - taus[1] < taus[4] - taus[5]  # slow at the ends, fastest in the middle
    assert taus[1] == pytest.approx(0.05 + 0.25 * (1 + math.cos(math.pi / 10)) / 2)
    assert cosine_tau(0, 1, 0.3, 0.05) == 0.3
    with pytest.raises(ValueError):
        cosine_tau(11, 11, 0.3, 0.05)


def test_parsers():
    assert parse_tau("0.3:0.05") == (0.3, 0.05)
    assert parse_layers("0") == (0,) and parse_layers("1,0") == (0, 1) and parse_layers("0-3") == (0, 1, 2, 3)
    assert parse_layers("5, 0-1,1") == (0, 1, 5)
    for bad in ("0.3", "a:b", "0.3:0", "-1:0.1", "inf:0.1"):
        with pytest.raises(ValueError, match="--tau"):
            parse_tau(bad)
    for bad in ("", "a", "3-1", "-1", "0-", "1,,2"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftcli")
    src, text = save_toy_olmoe(tmp, "olmoe", 3000)
    run = tmp / "nf4"
    rc = main(["-q", "quantize", str(src), "--method", "nf4", "--block-size", "32", "--calib", str(text),
               "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(run)])
    assert rc == 0
    return run


@pytest.mark.parametrize("argv,message", [
    (["--method", "kd", "--tau", "0.3:0.05"], "--tau applies to --method bcjr only, not kd"),
    (["--method", "kd", "--max-change", "0.1"], "--max-change applies to --method pv only, not kd"),
    (["--method", "kd", "--code-lr", "0.1"], "--code-lr applies to --method pv only, not kd"),
    (["--method", "ste", "--v-every", "2"], "--v-every applies to --method pv only, not ste"),
    (["--method", "pv", "--tau", "0.3:0.05"], "--tau applies to --method bcjr only, not pv"),
    (["--method", "bcjr", "--tau", "0.3"], "--tau '0.3' is not START:END"),
    (["--method", "kd", "--layers", "1-0"], "--layers '1-0'"),
    (["--method", "kd", "--layers", "2"], "--layers 2: the model has 2 decoder layers (0-1)"),
    (["--method", "kd", "--data-samples", "4"], "--data-samples/--data-seqlen need --data"),
    (["--method", "kd", "--lr", "0"], "--lr must be > 0"),
    (["--method", "kd", "--save-minutes", "-1"], "--save-minutes must be >= 0, got -1.0"),
    (["--method", "kd", "--soft-bits", "4"], "--soft-bits applies to --method bcjr only, not kd"),
    (["--method", "bcjr", "--ste-every", "4"], "--ste-every applies to --method ste only, not bcjr"),
    (["--method", "ste", "--ste-every", "0"], "--ste-every must be >= 1"),
    (["--method", "pv"], r"model\.layers\.0\.\S+ is stored as lut4-packed: --method pv trains additive-packed"),
    (["--method", "bcjr"], r"model\.layers\.0\.\S+ is stored as lut4-packed: --method bcjr trains trellis-packed"),
    (["--method", "ste", "--layers", "1"],
     r"model\.layers\.1\.\S+ is stored as lut4-packed: --method ste trains trellis-packed"),
])
def test_bad_combinations_are_one_line_errors(capsys, nf4_run, tmp_path, argv, message):
    import re

    out = tmp_path / "o"
    rc = main(["-q", "finetune", str(nf4_run), "--steps", "2", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("moequant: error: "), err
    assert re.search(message if message.startswith("model") else re.escape(message), err), err
    assert not out.exists() and not (tmp_path / ".o.moequant-finetune").exists()



def test_trellis_options_reach_the_trellis_classes():
    """--soft-bits / --ste-every become the TrellisTrainOptions of every trellis tensor opened (inside rht too)."""
    from moequant.finetune.loop import FinetuneSettings, FinetuneState
    from moequant.finetune.trellis_trainable import TrellisBCJR, TrellisSTE

    model = _trellis_model()
    state = FinetuneState(model, FinetuneSettings(steps=1, method="bcjr", soft_bits=5))
    inner = [getattr(t, "inner", t) for t in state.tensors.values()]
    assert inner and all(isinstance(t, TrellisBCJR) and t.opts.soft_bits == 5 for t in inner)
    state = FinetuneState(_trellis_model(), FinetuneSettings(steps=1, method="ste", ste_every=3))
    inner = [getattr(t, "inner", t) for t in state.tensors.values()]
    assert inner and all(isinstance(t, TrellisSTE) and t.opts.ste_every == 3 for t in inner)
    assert FinetuneSettings(steps=1, method="bcjr").soft_bits == 8 and FinetuneSettings(steps=1, method="kd").soft_bits is None


def _trellis_model():
    from conftest import tiny_model
    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.codecs.config import TrellisConfig

    model = tiny_model("llama")
    api.quantize(model, Recipe.uniform(TrellisConfig(bits=2, L=8, tile=4)), progress=False)
    return model
