"""RULER-style single-needle prompts (niah_single_1) of an exact length in tokens.

The templates are RULER's (NVIDIA/RULER, synthetic task config): a haystack of noise sentences,
one needle "One of the special magic numbers for {key} is: {value}." at a relative depth, the
question, the model's chat template when it has one, and the answer prefix, so that the model's
next tokens are the 7-digit value. The number of haystack sentences is the largest whose prompt
fits the target length (binary search), and the needle's exact character and token spans are
recorded, so that a trace can be read at the needle.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..models import input_device

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
ANSWER_TOKENS = 12  # the dense answer's greedy decoding stops here: a 7-digit number and its spacing
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
_KEY_WORDS = (
    "amber", "silent", "northern", "granite", "quiet", "hollow", "crimson", "distant", "gentle", "rapid",
    "harbor", "lantern", "tide", "step", "signal", "meadow", "river", "beacon", "canyon", "orchard",
)


@dataclass(frozen=True)
class NiahPrompt:
    """One needle-in-a-haystack prompt.

    Attributes:
        text: the whole prompt, ending with the answer prefix.
        token_ids: int64 [T], `tokenizer(text)`.
        key, answer: the needle's key and its 7-digit value (the expected answer).
        depth: where the needle sits in the haystack, 0 (start) .. 1 (end).
        needle_chars: [start, end) of the needle sentence in `text`.
        needle_tokens: [start, end) of the tokens that overlap it.
        haystack_sentences: how many haystack sentences the prompt holds.
    """

    text: str
    token_ids: Tensor
    key: str
    answer: str
    depth: float
    needle_chars: tuple[int, int]
    needle_tokens: tuple[int, int]
    haystack_sentences: int

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    def to_dict(self) -> dict[str, Any]:
        facts = asdict(self)
        del facts["token_ids"], facts["text"]
        return facts | {"tokens": self.num_tokens}


def niah_prompt(
    tokenizer,
    length: int = 4096,
    depth: float = 0.5,
    *,
    seed: int = 0,
    haystack: str | None = None,
    chat_template: bool | None = None,
) -> NiahPrompt:
    """Build the longest prompt of at most `length` tokens with its needle at `depth`.

    Args:
        tokenizer: the model's tokenizer (a fast tokenizer gives exact token spans).
        length: target length in tokens.
        depth: needle position in the haystack, 0 = first sentence, 1 = last.
        seed: chooses the key and the 7-digit value.
        haystack: text whose sentences replace RULER's noise (repeated if too short).
        chat_template: wrap the question in the tokenizer's chat template (default: when it has one).
    """
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth={depth} is outside [0, 1]; 0 puts the needle first, 1 last, 0.5 in the middle")
    rng = random.Random(seed)
    key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
    answer = str(rng.randint(1_000_000, 9_999_999))
    sentences = _haystack_sentences(haystack)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise InputError("this tokenizer has no chat template; use chat_template=False (--no-chat-template)")

    def build(count: int) -> str:
        context = [sentences[i % len(sentences)] for i in range(count)]
        context.insert(round(depth * count), NEEDLE.format(key=key, value=answer))
        user = TEMPLATE.format(context=" ".join(context), key=key)
        if use_chat:
            user = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                 tokenize=False)
        return user + ANSWER_PREFIX.format(key=key)

    def tokens(count: int) -> int:
        return len(tokenizer(build(count))["input_ids"])

    shortest = tokens(0)
    if shortest > length:
        raise InputError(f"length={length} tokens cannot hold the template and needle alone ({shortest} tokens "
                         f"with this tokenizer); use a length of at least {shortest}")
    low, high = 0, 1
    while tokens(high) <= length:  # grow an upper bound, then search the largest count that fits
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tokens(middle) <= length else (low, middle)
    text = build(low)
    needle = NEEDLE.format(key=key, value=answer)
    start = text.index(needle)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return NiahPrompt(
        text=text, token_ids=ids, key=key, answer=answer, depth=depth,
        needle_chars=(start, start + len(needle)),
        needle_tokens=token_span(tokenizer, text, start, start + len(needle)),
        haystack_sentences=low,
    )


def token_span(tokenizer, text: str, start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens of `tokenizer(text)` that overlap characters [start, end)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        return hits[0], hits[-1] + 1
    # slow tokenizers have no offsets: count the tokens of the prefixes (exact up to a merge at the edge)
    return len(tokenizer(text[:start])["input_ids"]), len(tokenizer(text[:end])["input_ids"])


def _haystack_sentences(haystack: str | None) -> list[str]:
    if haystack is None:
        return [NOISE]
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", haystack) if s.strip()]
    if not sentences:
        raise InputError("the haystack text is empty; give a file with some sentences, or leave it out for "
                         "RULER's noise")
    return sentences


@dataclass(frozen=True)
class DenseAnswer:
    """The dense model's greedy answer to a needle prompt.

    Attributes:
        tokens: int64 [n] the answer tokens, cut where the expected value is complete when the model
            gives it (so that keeping these tokens means keeping the answer).
        text: their text; correct: whether it contains the expected value.
    """

    tokens: Tensor
    text: str
    correct: bool


def dense_answer(model, tokenizer, prompt: NiahPrompt, max_new_tokens: int = ANSWER_TOKENS) -> DenseAnswer:
    """Greedy decoding on the model's own (dense) attention, `max_new_tokens` at most."""
    device = input_device(model)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    ids = prompt.token_ids[None].to(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    generated = out[0, prompt.num_tokens:].cpu()
    for n in range(1, len(generated) + 1):
        if prompt.answer in tokenizer.decode(generated[:n]):
            return DenseAnswer(generated[:n], tokenizer.decode(generated[:n]), True)
    return DenseAnswer(generated, tokenizer.decode(generated), False)
