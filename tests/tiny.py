"""Tiny randomly initialised causal LMs and a character tokenizer: pipeline tests in seconds."""

from __future__ import annotations

import string

import torch

VOCAB = 128
HIDDEN = 64
GROUP = 32


_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama_config(**changes):
    from transformers import LlamaConfig

    kwargs = dict(_SHAPE, intermediate_size=128, tie_word_embeddings=True)
    kwargs.update(changes)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **changes):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**changes)).float().eval()
    # Random init gives near-uniform attention; larger weights make layers actually interact.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


DENSE_FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def make_tiny_dense(family: str, seed: int = 0, **changes):
    """A tiny Llama, Qwen2 (q/k/v biases) or Qwen3 (q/k norms, head_dim 32 on a 64 stream) of
    the tiny Llama's shape, its matrices scaled as :func:`make_tiny_llama` scales them."""
    import transformers

    extra = {"qwen3": dict(head_dim=32)}.get(family, {})
    kwargs = dict(_SHAPE, intermediate_size=128, tie_word_embeddings=True, **extra)
    config = getattr(transformers, DENSE_FAMILIES[family])(**{**kwargs, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


def make_tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=HIDDEN,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return OPTForCausalLM(cfg).float().eval()


def make_char_tokenizer(add_bos: bool = False):
    """A character-level fast tokenizer with fewer than VOCAB ids (printable ASCII); with
    ``add_bos`` it starts every text with ``[BOS]``, as Llama-3's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + list(string.printable)
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def id_stream(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """A token stream with some structure (a noisy periodic walk), no tokenizer needed."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % (VOCAB - 4) + 4
    noise = torch.randint(0, 5, (n,), generator=g)
    return ((base + noise - 4) % (VOCAB - 4) + 4).long()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def make_tiny_moe(family: str, seed: int = 0, experts: int = 6, **changes):
    """A tiny random mixture-of-experts model as the installed transformers builds it (fused
    expert tensors in transformers 5). Qwen3-MoE gets one dense block (``mlp_only_layers``),
    Qwen2-MoE its shared expert."""
    import transformers

    common = dict(_SHAPE, num_experts_per_tok=2)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=experts, intermediate_size=48, **common)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            num_experts=experts,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            intermediate_size=96,
            decoder_sparse_step=1,
            **common,
        )
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            num_experts=experts,
            moe_intermediate_size=32,
            intermediate_size=96,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            **common,
        )
    else:
        raise ValueError(f"no tiny {family}")
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(3.0)
    return model
