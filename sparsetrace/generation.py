"""The model writes its own chain of thought: chat template, greedy or seeded sampling, a token limit.

`generate_reasoning` asks `problem` as a user turn of the model's chat template and lets the model
answer (greedy by default; `temperature > 0` samples, seeded). With `follow_up` and `min_tokens`
it keeps asking `follow_up` after every reply until the transcript reaches `min_tokens` tokens
(how `benchmarks/texts/make_cot.py` writes a long CoT with a small model). A tqdm bar counts the
new tokens. The result is the transcript text (template included, as it is traced) and the char
spans of the model's replies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from .errors import InputError
from .models import input_device


@dataclass
class Generation:
    """A transcript: `text` (chat template applied), `reply_spans` [(start, end)] chars of each model reply."""

    text: str
    reply_spans: list[tuple[int, int]]
    new_tokens: int
    settings: dict


class _TokenBar(BaseStreamer):
    """Counts generated tokens on a tqdm bar (`generate` first passes the prompt, which is skipped)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.prompt_seen = bar, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False


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
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    messages = [{"role": "user", "content": problem}]
    replies, total_new = [], 0
    device = input_device(model)
    with tqdm(total=max_new_tokens if min_tokens is None else min_tokens, desc="generating", unit="token",
              disable=not progress) as bar:
        while True:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            needed = max_new_tokens if min_tokens is None else min_tokens - ids.shape[1]
            if replies and needed < 64:  # too little left for another useful reply
                break
            room = min(max_new_tokens, needed)
            with torch.inference_mode():
                out = model.generate(ids.to(device), max_new_tokens=max(room, 1), repetition_penalty=repetition_penalty,
                                     pad_token_id=tokenizer.eos_token_id, streamer=_TokenBar(bar), **sampling)
            total_new += out.shape[1] - ids.shape[1]
            reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
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
