"""The model writes its own chain of thought: chat template, greedy or seeded sampling, a token limit.

`generate_reasoning` asks `problem` as a user turn of the model's chat template and lets the model
answer (greedy by default; `temperature > 0` samples, seeded). With `follow_up` and `min_tokens`
it keeps asking `follow_up` after every reply until the transcript reaches `min_tokens` tokens
(how `benchmarks/texts/make_cot.py` writes a long CoT with a small model). A tqdm bar counts the
new tokens. The result is the transcript text (template included, as it is traced) and the char
spans of the model's replies. Greedy decoding is `models.greedy_decode`; sampling and repetition
penalties go through transformers' `generate` (`models.sample_decode`), so a seed draws what it drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import InputError
from .models import eos_token_ids, greedy_decode, sample_decode


@dataclass
class Generation:
    """A transcript: `text` (chat template applied), `reply_spans` [(start, end)] chars of each model reply."""

    text: str
    reply_spans: list[tuple[int, int]]
    new_tokens: int
    settings: dict


def generate_reasoning(
    model,
    tokenizer,
    problem: str,
    *,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    follow_up: str | None = None,
    min_tokens: int | None = None,
    progress: bool = True,
) -> Generation:
    """Let the model answer `problem` (see the module docstring). Returns a `Generation`."""
    if not problem or not problem.strip():
        raise InputError("the problem is empty; give the question the model should reason about")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}; use a positive number of tokens")
    if temperature < 0:
        raise InputError(f"temperature={temperature}; use 0 (greedy) or a positive sampling temperature")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the tokenizer has no chat template; give the reasoning text as INPUT instead of --generate")
    torch.manual_seed(seed)
    messages = [{"role": "user", "content": problem}]
    replies, total_new = [], 0
    with tqdm(total=max_new_tokens if min_tokens is None else min_tokens, desc="generating", unit="token",
              disable=not progress) as bar:
        while True:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            needed = max_new_tokens if min_tokens is None else min_tokens - ids.shape[1]
            if replies and needed < 64:  # too little left for another useful reply
                break
            room = max(min(max_new_tokens, needed), 1)
            if temperature == 0 and repetition_penalty == 1:
                new, _ = greedy_decode(model, ids[0], room, stop=eos_token_ids(model), on_token=lambda _: bar.update())
            else:  # sampling, or a repetition penalty: transformers' generate
                new = sample_decode(model, ids[0], room, temperature=temperature, top_p=top_p,
                                    repetition_penalty=repetition_penalty, pad_token_id=tokenizer.eos_token_id,
                                    on_token=lambda _: bar.update())
            total_new += len(new)
            reply = tokenizer.decode(new, skip_special_tokens=True).strip()
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
            if follow_up is None or min_tokens is None:
                break
            messages.append({"role": "user", "content": follow_up})
        if messages[-1]["role"] == "user":
            messages.pop()
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, position = [], 0
    for reply in replies:
        start = text.find(reply, position) if reply else -1
        if start >= 0:
            spans.append((start, start + len(reply)))
            position = start + len(reply)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "repetition_penalty": repetition_penalty, "seed": seed, "follow_up": follow_up,
                "min_tokens": min_tokens, "greedy": temperature == 0}
    return Generation(text, spans, total_new, settings)
