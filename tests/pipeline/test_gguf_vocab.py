"""The tokenizer metadata a GGUF file gets from a Hugging Face folder, against the default
model's GGUF (written by llama.cpp's converter from SmolLM2's own folder) and the converter's
rules worked by hand on a small BPE tokenizer."""

from __future__ import annotations

import json
from hashlib import sha256

import gguf
import pytest

from latticequant.pipeline.gguf_vocab import (
    CHECK_TEXT,
    TokenizerError,
    add_tokenizer_metadata,
    check_tokenizer_folder,
    vocab_tokens,
)

#: The keys ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2`` writes for SmolLM2.
CONVERTER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
)


def tokenizer_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def test_smollm2_folder_gives_the_converters_metadata(
    tmp_path, smollm2_tokenizer_fields, smollm2_tokenizer_dir
):
    """SmolLM2's tokenizer, read from the default GGUF and saved as a folder, is written back
    to the metadata llama.cpp's converter wrote into that GGUF: the check-text hash gives
    ``smollm``, and tokens, types, merges, special ids and chat template are equal."""
    assert check_tokenizer_folder(smollm2_tokenizer_dir) == "smollm"
    out = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(out), "llama")
    add_tokenizer_metadata(writer, smollm2_tokenizer_dir, 49152, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = tokenizer_fields(out), smollm2_tokenizer_fields
    for key in CONVERTER_KEYS:
        assert ours[key] == theirs[key], key
    assert len(ours["tokenizer.ggml.tokens"]) == 49152
    # the default GGUF also says add_bos_token = add_space_prefix = False, which SmolLM2's own
    # tokenizer_config.json held and transformers does not save; a "smollm" BPE vocabulary
    # without those keys is read by llama.cpp with both False (llama-vocab.cpp)
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        assert ours.get(key, False) is theirs[key] is False


def small_bpe_folder(folder, vocab_size_gap: int = 2):
    """A byte-level BPE of 256 byte symbols and one merge, with added tokens: one special,
    one plain, one plain that looks special (``<|...|>``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["\u0120t"] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=[("\u0120", "t")])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<think>", normalized=False), AddedToken("<|tool|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast, len(vocab) + 3 + vocab_size_gap


def test_token_types_follow_the_converters_rules(tmp_path):
    """``get_vocab_base`` worked by hand: base tokens NORMAL, a special added token CONTROL, a
    plain added token USER_DEFINED unless it looks special (``<|...|>``: CONTROL), ids the
    tokenizer lacks ``[PADi]`` UNUSED."""
    tok, vocab_size = small_bpe_folder(tmp_path)
    tokens, types = vocab_tokens(tok, vocab_size)
    n = 257  # 256 byte symbols and one merge
    assert tokens[:n] == sorted(gguf_alphabet()) + ["\u0120t"]
    assert types[:n] == [1] * n
    assert tokens[n:] == ["<|endoftext|>", "<think>", "<|tool|>", f"[PAD{n + 3}]", f"[PAD{n + 4}]"]
    assert types[n:] == [3, 4, 3, 5, 5]
    with pytest.raises(TokenizerError, match="beyond the model's vocab_size"):
        vocab_tokens(tok, n)


def gguf_alphabet():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def test_unknown_pre_tokenizer_refused_naming_its_hash(tmp_path):
    tok, _ = small_bpe_folder(tmp_path)
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    with pytest.raises(TokenizerError) as err:
        check_tokenizer_folder(tmp_path)
    assert digest in str(err.value) and "\n" not in str(err.value)


def test_sentencepiece_and_other_tokenizers_refused_in_one_line(tmp_path):
    small_bpe_folder(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="SentencePiece") as err:
        check_tokenizer_folder(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer.model").unlink()
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True  # a SentencePiece vocabulary converted to BPE
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="byte fallback.*SentencePiece"):
        check_tokenizer_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        check_tokenizer_folder(tmp_path)
