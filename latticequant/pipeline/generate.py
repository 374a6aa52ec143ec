"""Text generation from a float model or a quantized checkpoint, to try the model one just made.

A plain decoding loop over the model's own KV cache: the prompt in one forward (prefill), then
one token per forward (decode), greedy or sampled (temperature, nucleus ``top_p``, a seeded
generator), stopping at the tokenizer's end-of-sequence token. Prefill and decode are timed
apart, since they stress different things (a matrix product against a matrix-vector one), and
the weight memory the model holds is counted: the stored tensors, and apart from them any dense
copies a quantized layer keeps to run faster.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["GenerationConfig", "Generation", "generate", "weight_memory", "prompt_ids"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``temperature`` 0 is greedy; ``top_p`` < 1 samples from the smallest
    set of tokens whose probabilities reach it; ``chat`` wraps the prompt in the tokenizer's chat
    template when it has one."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """What one call produced, and how fast."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    stopped_at_eos: bool

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (each after the first new token)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        return out


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of weights the model holds: ``stored`` (parameters and buffers, each counted once)
    and ``cache`` (dense copies quantized layers keep between calls)."""
    seen: set[int] = set()
    stored = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        stored += t.numel() * t.element_size()
    cache = sum(int(getattr(m, "cache_bytes", 0) or 0) for m in model.modules())
    return {"stored": stored, "cache": cache}


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids ``(1, n)``, through the chat template when asked and available."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("the prompt has no tokens")
    return ids


def _next_token(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> int:
    logits = logits.float()
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < cfg.top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _cache_argument(model: nn.Module) -> str:
    """The name the model's forward gives its KV cache (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    config: GenerationConfig | None = None,
    device: str | torch.device = "cpu",
) -> Generation:
    """Generate up to ``config.max_new_tokens`` tokens after ``prompt``."""
    cfg = config or GenerationConfig()
    ids = prompt_ids(tokenizer, prompt, cfg.chat).to(device)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and ids.shape[1] + cfg.max_new_tokens > limit:
        raise ValueError(
            f"{ids.shape[1]} prompt tokens + --max-new-tokens {cfg.max_new_tokens} exceed the "
            f"model's {limit} positions; lower --max-new-tokens or shorten the prompt"
        )
    eos = tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    gen = torch.Generator(device=ids.device).manual_seed(int(cfg.seed))
    model.eval()

    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = _next_token(out.logits[0, -1], cfg, gen)
    prefill_s = time.perf_counter() - t0
    new = [token]
    cache_arg = _cache_argument(model)
    past = getattr(out, cache_arg)
    t1 = time.perf_counter()
    while token not in eos and len(new) < cfg.max_new_tokens:
        step = torch.tensor([[token]], dtype=torch.long, device=ids.device)
        out = model(input_ids=step, use_cache=True, **{cache_arg: past})
        past = getattr(out, cache_arg)
        token = _next_token(out.logits[0, -1], cfg, gen)
        new.append(token)
    decode_s = time.perf_counter() - t1
    stopped = token in eos
    text_ids = new[:-1] if stopped else new
    return Generation(
        text=tokenizer.decode(text_ids, skip_special_tokens=True),
        token_ids=new,
        prompt_tokens=int(ids.shape[1]),
        new_tokens=len(new),
        prefill_s=prefill_s,
        decode_s=decode_s,
        stopped_at_eos=stopped,
    )
