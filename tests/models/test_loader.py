import pytest

from moequant.errors import MoequantError
from moequant.models.loader import load_model, resolve_model_spec


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no network retries
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(MoequantError, match="could not load 'someorg/some-model' from the Hugging Face hub"):
        load_model("someorg/some-model")


def test_specs_are_classified(tmp_path):
    assert resolve_model_spec("someorg/some-model").kind == "hub"
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(MoequantError, match="no config.json"):
        resolve_model_spec(str(d))
    (d / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_model_spec(str(d)).kind == "dir"
    (d / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "moequant"}}')
    assert resolve_model_spec(str(d)).kind == "moequant"
    with pytest.raises(MoequantError, match="no such directory or .gguf"):
        resolve_model_spec(str(tmp_path / "x.gguf"))
    with pytest.raises(MoequantError, match="unknown model 'nosuch'"):
        resolve_model_spec("nosuch")
