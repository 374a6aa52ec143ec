"""Text sources, calibration windows and perplexity, against hand-written references."""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch
from tiny import VOCAB, id_stream

from latticequant.pipeline.data import (
    TextError,
    calibration_windows,
    load_text,
    perplexity,
    protocol_text,
    split_ids,
    tokenize,
)


def test_protocol_text_is_every_topic_in_sorted_order():
    from pydoc_data.topics import topics

    text = protocol_text()
    assert len(text) > 400_000
    keys = sorted(topics)
    first, last = topics[keys[0]], topics[keys[-1]]
    assert text.startswith(first) and text.endswith(last)
    positions = [text.index(topics[k]) for k in keys[:20]]
    assert positions == sorted(positions)


def test_split_is_80_20():
    ids = torch.arange(1001)
    calib, held = split_ids(ids)
    assert len(calib) == 800 and torch.equal(torch.cat([calib, held]), ids)


def test_calibration_windows_follow_the_protocol():
    ids = id_stream(3000)
    windows = calibration_windows(ids, nsamples=10, seqlen=64, seed=3)
    rng = random.Random(3)
    for w in windows:
        i = rng.randint(0, 3000 - 65)
        assert torch.equal(w, ids[i : i + 64])
    assert torch.equal(windows, calibration_windows(ids, 10, 64, seed=3))
    assert not torch.equal(windows, calibration_windows(ids, 10, 64, seed=4))


def test_too_short_or_empty_text():
    with pytest.raises(TextError, match="too short: 64 tokens"):
        calibration_windows(torch.arange(64), 4, 64)
    calibration_windows(torch.arange(65), 4, 64)  # exactly enough
    with pytest.raises(TextError, match="too short"):
        perplexity(torch.nn.Identity(), torch.arange(10), seqlen=16)
    with pytest.raises(TextError, match="empty"):
        tokenize(object(), "  \n")


def test_load_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("second file")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert load_text(str(tmp_path / "a.txt")) == "first file"
    assert load_text(str(tmp_path)) == "first file\n\nsecond file"
    assert load_text(None) == protocol_text()
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(TextError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(TextError, match="neither a file"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(TextError, match="no text files"):
        load_text(str(tmp_path / "nothing"))


def test_hub_dataset_unreachable_gives_clear_message(monkeypatch):
    class Unreachable:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", Unreachable)
    with pytest.raises(TextError, match="not reachable"):
        load_text("wikitext2")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TextError, match="datasets"):
        load_text("c4")


def test_tokenize_character_tokenizer(char_tokenizer):
    ids = tokenize(char_tokenizer, "hello world")
    assert ids.dtype == torch.long and len(ids) == 11
    assert ids[2] == ids[3] == char_tokenizer.convert_tokens_to_ids("l")
    with pytest.raises(TextError, match="no tokenizer"):
        tokenize(None, "text")


class _Output:
    def __init__(self, logits):
        self.logits = logits


class _ZeroModel(torch.nn.Module):
    """Uniform prediction over the vocabulary: perplexity is exactly the vocabulary size."""

    def forward(self, input_ids, use_cache=False):
        return _Output(torch.zeros(*input_ids.shape, VOCAB))


def test_uniform_model_has_perplexity_vocab_size():
    assert perplexity(_ZeroModel(), id_stream(1000), seqlen=100, progress=False) == pytest.approx(
        VOCAB, rel=1e-6
    )


def test_perplexity_matches_a_token_by_token_reference(tiny_llama):
    ids = id_stream(250)  # 3 windows of 64 and a dropped tail of 58
    got = perplexity(tiny_llama, ids, seqlen=64, batch_size=2, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 64 : (w + 1) * 64]
            logp = torch.log_softmax(tiny_llama(window[None]).logits[0].double(), dim=-1)
            for t in range(63):
                nll -= float(logp[t, window[t + 1]])
                count += 1
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    # The tail does not matter; a different window length does.
    assert perplexity(tiny_llama, ids[:192], seqlen=64, progress=False) == pytest.approx(got)
    assert perplexity(tiny_llama, ids, seqlen=32, progress=False) != pytest.approx(got)


def test_bos_policies():
    from tiny import make_char_tokenizer

    from latticequant.pipeline.data import window_bos

    plain, adds = make_char_tokenizer(), make_char_tokenizer(add_bos=True)
    assert window_bos(plain, "auto") is None and window_bos(adds, "auto") == 1
    assert window_bos(plain, "always") == 1 and window_bos(adds, "never") is None
    with pytest.raises(ValueError, match="--bos must be one of"):
        window_bos(plain, "sometimes")
    plain.bos_token = None
    with pytest.raises(ValueError, match="no BOS token; use --bos never"):
        window_bos(plain, "always")


def test_windows_with_a_bos_keep_their_length():
    from latticequant.pipeline.data import calibration_windows

    ids = id_stream(3000, seed=5)
    plain = calibration_windows(ids, 6, 40, seed=2)
    with_bos = calibration_windows(ids, 6, 40, seed=2, bos=1)
    assert with_bos.shape == plain.shape == (6, 40)
    assert (with_bos[:, 0] == 1).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])  # the same draws, shifted by the BOS


@torch.no_grad()
def test_perplexity_with_a_bos_per_window_against_a_direct_loop():
    from tiny import make_tiny_llama

    model = make_tiny_llama()
    ids = id_stream(1000, seed=6)
    seqlen, nll, count = 64, 0.0, 0
    for start in range(0, len(ids) - (seqlen - 1) + 1, seqlen - 1):
        window = torch.cat([torch.tensor([1]), ids[start : start + seqlen - 1]])[None]
        logp = torch.log_softmax(model(window).logits[0].double(), -1)
        nll -= logp[:-1].gather(1, window[0, 1:, None]).sum().item()
        count += seqlen - 1
    ours = perplexity(model, ids, seqlen, progress=False, bos=1)
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert ours != pytest.approx(perplexity(model, ids, seqlen, progress=False), rel=1e-6)


def _full_logits_perplexity(model, ids, seqlen):
    """exp of the mean cross-entropy from whole-window logits in float64."""
    n = len(ids) // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.double()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    return math.exp(float(ce))


def test_the_loss_is_taken_chunk_by_chunk_and_matches_whole_logits(monkeypatch):
    """Declared families: the head's inputs are captured and their logits made 7 positions at
    a time (never a batch's whole logits); other models go through their own forward."""
    import transformers
    from tiny import _SHAPE, make_tiny_llama, make_tiny_opt

    from latticequant.pipeline import data

    monkeypatch.setattr(data, "LOSS_TOKENS", 7)
    ids = id_stream(700)
    for model in (make_tiny_llama(), make_tiny_opt()):
        assert data._plain_head(model) is not None
        made = []
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda m, a, out, made=made: made.append(out.shape[-2]))
        got = perplexity(model, ids, seqlen=64, batch_size=3, progress=False)
        handle.remove()
        assert max(made) == 7
        assert got == pytest.approx(_full_logits_perplexity(model, ids, 64), rel=1e-5)
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        **{**_SHAPE, "head_dim": 16}, intermediate_size=64, final_logit_softcapping=2.0
    )
    gemma = transformers.Gemma2ForCausalLM(cfg).eval()  # soft-caps after its head
    assert data._plain_head(gemma) is None
    got = perplexity(gemma, ids, seqlen=64, progress=False)
    assert got == pytest.approx(_full_logits_perplexity(gemma, ids, 64), rel=1e-5)
