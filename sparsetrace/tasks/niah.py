"""RULER's single-needle prompts (niah_single_1) of an exact length in tokens, and users' RULER prompts.

`niah_prompt` follows NVIDIA/RULER at commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a
(`scripts/data/synthetic/niah.py`, `synthetic/constants.py`, `synthetic.yaml` niah_single_1,
`template.py`, `eval/synthetic/constants.py`), so that our prompts are RULER's:

- RULER's niah template made singular as RULER does for one needle and one query ("A special magic
  number is hidden ... about the number afterwards", "What is ...", the answer prefix "... is");
- the noise haystack: units of RULER's five noise sentences joined, with the needle "One of the
  special magic numbers for {key} is: {value}.", by "\\n" (a `haystack` text is joined by spaces, as
  RULER's essay haystack);
- keys: wonderwords' adjective-noun pairs (6.2 million, uniform, as RULER's `random.choice` over all
  pairs), values 7-digit numbers;
- length: the most noise units whose prompt (counted without special tokens, as RULER's
  `tokenizer.tokenize`) plus RULER's generation budget of 128 tokens fits: "4096" is a prompt of
  about 3,960 tokens.

On purpose unlike RULER: the needle sits at `depth` (RULER draws its position), `seed` draws key and
value from its own stream (RULER's draws depend on its search, so RULER's own samples come from its
jsonl: `ruler_prompts`), and the tokenizer's chat template stands in for RULER's model templates.
`form="legacy"` builds sparsetrace's earlier prompt (plural intro, space joins, 400 keys of 20 words,
no generation budget) to reproduce earlier results. The needle's exact character and token spans are
recorded, so that a trace can be read at the needle.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, SparsetraceError
from ..models import eos_token_ids, greedy_decode
from ..text import token_span

FORMS = ("ruler", "legacy")
RULER_TOKENS_TO_GENERATE = 128  # RULER's niah generation budget, part of its length
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
TEMPLATE = (  # the legacy form's
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
# greedy answers (dense and sparse) stop here, or where the expected value is complete: RULER allows 128
# tokens, but a 7-digit value and its spacing come first, and more text cannot lower string_match_all
ANSWER_TOKENS = 12
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
        key, answer: the needle's key ("" if the needle names none) and its value (the expected answer).
        depth: where the needle sits in the haystack, 0 (start) .. 1 (end); for a prompt from text,
            the share of its tokens before the needle.
        needle_chars: [start, end) of the needle sentence in `text`.
        needle_tokens: [start, end) of the tokens that overlap it.
        haystack_sentences: how many haystack units the prompt holds (None for a prompt from text).
        form: "ruler" or "legacy" (`niah_prompt`), or "text" (`from_text`, `ruler_prompts`).
    """

    text: str
    token_ids: Tensor
    key: str
    answer: str
    depth: float
    needle_chars: tuple[int, int]
    needle_tokens: tuple[int, int]
    haystack_sentences: int | None
    form: str = "ruler"

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    def to_dict(self) -> dict[str, Any]:
        facts = asdict(self)
        del facts["token_ids"], facts["text"]
        return facts | {"tokens": self.num_tokens}

    @classmethod
    def from_text(cls, tokenizer, text: str, *, needle: str | None = None, answer: str | None = None) -> NiahPrompt:
        """A prompt from any text that ends where the answer begins (RULER's `input` + `answer_prefix`).

        The needle's spans are found here: `needle` (a sentence of `text`) where given, else the
        sentence holding `answer`. `answer` defaults to the value the needle states ("... is: {value}."),
        and without a needle to the value of the key RULER's question asks for.

        >>> NiahPrompt.from_text(tokenizer, text, needle="The key is under the mat.", answer="mat")  # doctest: +SKIP
        """
        if not text.strip():
            raise InputError("the prompt text is empty; give the whole prompt, ending where the answer begins")
        if needle is not None and needle not in text:
            raise InputError(f"the needle {needle[:60]!r} is not in the prompt text; give the needle sentence "
                             "exactly as the text holds it")
        if answer is None:
            answer = needle_value(needle if needle is not None else text)
            if answer is None:
                raise InputError("no answer to look for: give answer= (the value the needle holds), or a RULER "
                                 "needle ('One of the special magic numbers for KEY is: VALUE.')")
        if needle is not None:
            start = text.find(needle)
            end = start + len(needle)
        else:
            at = text.find(answer)
            if at < 0:
                raise InputError(f"the answer {answer[:60]!r} is not in the prompt text, so its needle cannot be "
                                 "found; give the value exactly as the needle states it, or the needle (needle=)")
            start, end = _sentence_around(text, at, at + len(answer))
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
        span = token_span(tokenizer, text, start, end)
        named = re.search(r" for (.+?) is: ", text[start:end])
        return cls(text=text, token_ids=ids, key=named.group(1) if named else "", answer=answer,
                   depth=round(span[0] / len(ids), 3), needle_chars=(start, end), needle_tokens=span,
                   haystack_sentences=None, form="text")


def niah_prompt(
    tokenizer,
    length: int = 4096,
    depth: float = 0.5,
    *,
    seed: int = 0,
    haystack: str | None = None,
    chat_template: bool | None = None,
    form: str = "ruler",
) -> NiahPrompt:
    """Build the longest prompt of at most `length` tokens with its needle at `depth`.

    Args:
        tokenizer: the model's tokenizer (a fast tokenizer gives exact token spans).
        length: target length in tokens; form "ruler" counts RULER's 128-token generation budget in it.
        depth: needle position in the haystack, 0 = first sentence, 1 = last.
        seed: chooses the key and the 7-digit value.
        haystack: text whose sentences replace RULER's noise (repeated if too short).
        chat_template: wrap the question in the tokenizer's chat template (default: when it has one).
        form: "ruler" (default, RULER's niah_single_1, see the module docstring) or "legacy".
    """
    if form not in FORMS:
        raise InputError(f"form={form!r}; use 'ruler' (RULER's niah_single_1 prompt) or 'legacy' (sparsetrace's "
                         "earlier prompt)")
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth={depth} is outside [0, 1]; 0 puts the needle first, 1 last, 0.5 in the middle")
    ruler = form == "ruler"
    rng = random.Random(seed)
    words = ruler_words() if ruler else (_KEY_WORDS, _KEY_WORDS)
    key = f"{rng.choice(words[0])}-{rng.choice(words[1])}"
    answer = str(rng.randint(1_000_000, 9_999_999))
    template, budget = (RULER_TEMPLATE, RULER_TOKENS_TO_GENERATE) if ruler else (TEMPLATE, 0)
    join = "\n" if ruler and haystack is None else " "
    sentences = _haystack_sentences(haystack)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise InputError("this tokenizer has no chat template; use chat_template=False (--no-chat-template)")

    def build(count: int) -> str:
        context = [sentences[i % len(sentences)] for i in range(count)]
        context.insert(round(depth * count), NEEDLE.format(key=key, value=answer))
        user = template.format(context=join.join(context), key=key)
        if use_chat:
            user = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                 tokenize=False)
        return user + ANSWER_PREFIX.format(key=key)

    def tokens(count: int) -> int:
        return len(tokenizer(build(count), add_special_tokens=not ruler)["input_ids"]) + budget

    shortest = tokens(0)
    if shortest > length:
        budget_note = f", RULER's {budget}-token generation budget included" if ruler else ""
        raise InputError(f"length={length} tokens cannot hold the template and needle alone ({shortest} tokens "
                         f"with this tokenizer{budget_note}); use a length of at least {shortest}")
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
        haystack_sentences=low, form=form,
    )


def _haystack_sentences(haystack: str | None) -> list[str]:
    if haystack is None:
        return [NOISE]
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", haystack) if s.strip()]
    if not sentences:
        raise InputError("the haystack text is empty; give a file with some sentences, or leave it out for "
                         "RULER's noise")
    return sentences


@functools.cache
def ruler_words() -> tuple[list[str], list[str]]:
    """RULER's key vocabulary: wonderwords' adjectives and nouns, each deduplicated and sorted.

    RULER draws `random.choice` from the sorted set of all "adjective-noun" pairs; no two pairs spell
    the same key, so an adjective and a noun drawn apart give the same distribution without building
    its 6.2 million strings. wonderwords 3.x has 4 nouns fewer than 2.x.
    """
    try:
        from wonderwords import random_word
    except ImportError as error:
        raise SparsetraceError("RULER's needle keys come from wonderwords: pip install 'wonderwords>=2.2' "
                               "(or use form='legacy' / --form legacy)") from error
    return tuple(sorted(set(random_word._get_words_from_text_file(name)))  # RULER reads the lists this way
                 for name in ("adjectivelist.txt", "nounlist.txt"))


_ASKED = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text")
_STATED = re.compile(r"One of the special magic \w+ for (.+?) is: (\S+?)\.(?=\s|$)")


def needle_value(text: str) -> str | None:
    """The value a RULER needle prompt asks for (the needle of the key in its question), or the value
    of the first needle if the text asks nothing; None when the text holds no RULER needle."""
    stated = _STATED.findall(text)
    asked = _ASKED.findall(text)
    for key, value in stated:
        if not asked or key == asked[-1]:
            return value
    return None


def _sentence_around(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) of the sentence (or line) of `text` that holds characters [start, end)."""
    breaks = [m.end() for m in re.finditer(r"\n|[.!?]\s+", text[:start])]
    first = breaks[-1] if breaks else 0
    stop = re.search(r"[.!?](?=\s|$)|\n", text[end:])
    last = len(text) if stop is None else end + (stop.start() if stop.group() == "\n" else stop.end())
    while first < start and text[first].isspace():
        first += 1
    return first, last


def ruler_prompts(tokenizer, path: str | Path) -> list[NiahPrompt]:
    """Every row of a RULER jsonl (as RULER's `prepare.py` writes it) as a `NiahPrompt`.

    A row's prompt is `input` + `answer_prefix` (RULER's `call_api.py` joins them so; a row without an
    answer prefix is its input alone), its answer the one string of `outputs`, its needle the sentence
    of the input that holds it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give the jsonl RULER's prepare.py wrote (e.g. "
                         "niah_single_1/validation.jsonl)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where} is not JSON ({error.msg}); give RULER's jsonl, one object a line") from error
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("outputs"),
                                                                                               list):
            raise InputError(f"{where} lacks the fields input (text) and outputs (list); give RULER's prepared jsonl "
                             "(fields input, answer_prefix, outputs)")
        if len(row["outputs"]) != 1 or not isinstance(row["outputs"][0], str):
            raise InputError(f"{where} has {len(row['outputs'])} outputs; a needle run follows one needle, so use "
                             "single-answer tasks (niah_single_*, niah_multikey_*)")
        try:
            prompts.append(NiahPrompt.from_text(tokenizer, row["input"] + str(row.get("answer_prefix", "")),
                                                answer=row["outputs"][0]))
        except InputError as error:
            raise InputError(f"{where}: {error}") from error
    if not prompts:
        raise InputError(f"{path} holds no prompts; give the jsonl RULER's prepare.py wrote")
    return prompts


def answer_end(tokenizer, tokens: Tensor, value: str, stop: Collection[int] = ()) -> int:
    """How many of the greedy `tokens` make the answer: up to where `value` is complete (case-insensitive,
    as RULER scores) or a `stop` token (end of text), else all of them."""
    for n in range(1, len(tokens) + 1):
        if int(tokens[n - 1]) in stop or value.lower() in tokenizer.decode(tokens[:n]).lower():
            return n
    return len(tokens)


@dataclass(frozen=True)
class DenseAnswer:
    """A greedy answer to a needle prompt: the dense model's (`dense_answer`), or the sparse model's own
    (`needle_runs.sparse_answer`).

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
    generated, _ = greedy_decode(model, prompt.token_ids, max_new_tokens, stop=eos_token_ids(model))
    for n in range(1, len(generated) + 1):
        if prompt.answer in tokenizer.decode(generated[:n]):
            return DenseAnswer(generated[:n], tokenizer.decode(generated[:n]), True)
    return DenseAnswer(generated, tokenizer.decode(generated), False)
