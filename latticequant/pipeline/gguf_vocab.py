"""The tokenizer metadata of a GGUF file, built from a Hugging Face folder as llama.cpp's
``convert_hf_to_gguf.py`` builds it.

A BPE tokenizer (``tokenizer.json`` whose model is ``BPE``: SmolLM2, Llama 3, Qwen2/3, Mistral
Nemo) is written as the converter's ``_set_vocab_gpt2`` writes it: ``tokenizer.ggml.model =
"gpt2"``, one token per id up to the config's ``vocab_size`` (``[PADi]`` where the tokenizer has
none), their types (an added token is ``CONTROL`` when special or when it looks special,
``USER_DEFINED`` otherwise; every other token ``NORMAL``), the merges, the special token ids,
whether BOS/EOS are added and the chat template (the ``gguf`` package's
:class:`gguf.SpecialVocab`, which the converter calls), and ``tokenizer.ggml.pre``: the name
llama.cpp gives the tokenizer's pre-tokenizer, found by hashing the ids the tokenizer gives
llama.cpp's check text (:data:`CHECK_TEXT`, :data:`PRE_TOKENIZERS`). A hash that is not in the
table is refused, as the converter refuses it: llama.cpp would not know how to split the text.

SentencePiece tokenizers (``tokenizer.model``: Llama 2, Mistral 7B, Gemma; or a
``tokenizer.json`` converted from one, with byte fallback) are refused in one line.
"""

from __future__ import annotations

import json
import os
from hashlib import sha256
from pathlib import Path

__all__ = [
    "CHECK_TEXT",
    "PRE_TOKENIZERS",
    "TokenizerError",
    "check_tokenizer_folder",
    "pre_tokenizer_name",
    "vocab_tokens",
    "add_tokenizer_metadata",
]

#: The text llama.cpp's converter encodes to tell pre-tokenizers apart (``get_vocab_base_pre``'s
#: ``chktxt``): runs of spaces, tabs and newlines, emoji (one joined by U+200D), digit runs,
#: Khmer, Chinese, Cyrillic, runs of punctuation and English contractions in odd cases.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) "
    "\u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: sha256 of ``str(tokenizer.encode(CHECK_TEXT))`` -> llama.cpp's pre-tokenizer name, for the
#: families written here (entries of the converter's table).
PRE_TOKENIZERS = {
    # HuggingFaceTB/SmolLM-135M (SmolLM, SmolLM2)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # meta-llama/Meta-Llama-3-8B (Llama 3, 3.1, 3.2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # Qwen/Qwen1.5-7B (Qwen1.5, Qwen2, Qwen2.5, Qwen3)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # Qwen/Qwen3-Embedding-0.6B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    # mistralai/Mistral-Nemo-Base-2407
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}

# gguf.TokenType
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class TokenizerError(ValueError):
    """A Hugging Face folder whose tokenizer cannot be written as llama.cpp reads it."""


def _tokenizer_json(folder: Path) -> dict | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _check_kind(folder: Path) -> None:
    """Refuse, in one line, a tokenizer that is not a byte-level BPE."""
    spm = (
        "SentencePiece tokenizers (Llama 2, Mistral 7B, Gemma) are not written from a Hugging "
        "Face folder yet; quantize a .gguf of the model, whose tokenizer the file copies"
    )
    if (folder / "tokenizer.model").is_file():
        raise TokenizerError(f"{folder} has a tokenizer.model: {spm}")
    data = _tokenizer_json(folder)
    if data is None:
        raise TokenizerError(
            f"{folder} has no tokenizer.json: a GGUF file needs the model's tokenizer"
        )
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{folder}: a {model.get('type')!r} tokenizer.json cannot be written to GGUF here "
            "(byte-level BPE only)"
        )
    if model.get("byte_fallback"):
        raise TokenizerError(f"{folder}: its tokenizer.json is a BPE with byte fallback: {spm}")


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for ``tokenizer``'s pre-tokenizer: the sha256 of the ids it gives
    :data:`CHECK_TEXT` looked up in :data:`PRE_TOKENIZERS`; an unknown hash is refused."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise TokenizerError(
            f"BPE pre-tokenizer not recognized (check-text hash {digest}), as llama.cpp's "
            f"converter would not recognize it; known here: {known}"
        )
    return name


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``: added tokens some models do not mark
    special that llama.cpp must treat as control tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids ``0 .. vocab_size - 1`` (the converter's
    ``get_vocab_base``)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise TokenizerError(
            f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size "
            f"{vocab_size}"
        )
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects control and user-defined tokens already normalized
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined spaces, pre-normalized
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types


def _load(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenizerError(f"cannot read the tokenizer of {folder}: {first}") from exc


def check_tokenizer_folder(folder: str | os.PathLike) -> str:
    """The pre-tokenizer name of ``folder``'s tokenizer; one line refusing a tokenizer that is
    not written here (before any slow work)."""
    folder = Path(folder)
    _check_kind(folder)
    return pre_tokenizer_name(_load(folder))


def add_tokenizer_metadata(
    writer, folder: str | os.PathLike, vocab_size: int, arch: str = "llama"
) -> None:
    """Write ``folder``'s tokenizer to ``writer`` (a :class:`gguf.GGUFWriter`) as
    ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2`` does, for a model of ``vocab_size`` ids;
    for a ``llama`` architecture also the tokenizer config's ``add_prefix_space``, as the
    converter's ``LlamaModel`` does."""
    import gguf

    folder = Path(folder)
    _check_kind(folder)
    config = folder / "tokenizer_config.json"
    if arch == "llama" and config.is_file():
        with open(config, encoding="utf-8") as fh:
            prefix = json.load(fh).get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(bool(prefix))
    tokenizer = _load(folder)
    pre = pre_tokenizer_name(tokenizer)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
