"""Shared fixtures; ``tests/`` is put on the import path so that test modules in every folder
can import the helpers ``tiny`` (tiny models, a character tokenizer) and ``cases`` (tensors)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
