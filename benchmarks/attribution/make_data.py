"""Write data.jsonl: the attribution benchmark's examples (deterministic; no model weights needed).

Two kinds of context, each at 1k, 2k, 4k and 8k tokens, 3 examples per (kind, length), 24 in all:

- natural: a window of this project's two essays on Hallin Skerry (`sparsetrace/data/sample.txt`
  followed by `benchmarks/texts/natural_part2.txt`), starting at a paragraph and ending at a
  sentence; the three windows of a length start near the beginning, the middle and the end of
  what the text allows. The query is a factual question, written by hand (QUESTIONS below), whose
  answer is stated in exactly one sentence of the two essays (checked: the quoted phrase occurs
  once); that sentence is the known support. Each example takes the unused question whose support
  lies nearest to depth 0.25 / 0.5 / 0.75 of its window.
- haystack: RULER's multi-key needle task (niah_multikey_1): the noise sentences of
  `sparsetrace.tasks.niah.NOISE`, cycled, with 4 needles "One of the special magic numbers for
  {key} is: {value}." (4 different keys, 7-digit values) at depths 0.125, 0.375, 0.625 and 0.875;
  the query asks RULER's question for one key (the three examples of a length ask three different
  needles); the needle is the known support.

Length is counted in tokens of the whole chat prompt ContextCite builds ("Context: {context}\\n\\n
Query: {query}" as the user message, the default model's chat template with the generation prompt,
encoded without special tokens): each context is the longest (natural: most sentences; haystack:
most noise sentences) whose prompt has at most LENGTH - 32 tokens, so that prompt plus a 32-token
response fit in LENGTH (8,192 is the default model's training context).

    python benchmarks/attribution/make_data.py     # writes benchmarks/attribution/data.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LENGTHS = (1024, 2048, 4096, 8192)
PER_CELL = 3
RESPONSE_ROOM = 32
SEED = 0

# (phrase that occurs once in the two essays, question, expected answer)
QUESTIONS = [
    ("Fraser visited the skerry in the summer of 1845", "How many days did Fraser spend camped on the rock in 1845?",
     "eleven"),
    ("sixty feet up any structure", "How high up a structure did Fraser expect green water to reach in the worst "
     "winter storms?", "sixty feet"),
    ("then thirty-eight years old", "How old was Hugh Morrison Fraser when he was chosen to design the tower?",
     "thirty-eight"),
    ("pressed from rapeseed", "From which plant was the colza oil burned in the lamp pressed?", "rapeseed"),
    ("He was forty-one when", "How old was Alasdair Moray when he became principal keeper?", "forty-one"),
    ("two weeks ashore", "How many weeks did a keeper spend ashore after each spell on the rock?", "two"),
    ("about five hours under sail", "How long did the relief boat's crossing take under sail?", "five hours"),
    ("For four days the wind blew", "For how many days did the wind blow during the worst storm in the logbooks?",
     "four"),
    ("within forty minutes", "How quickly did the keepers relight the lamp after the wave broke the lantern "
     "glazing?", "forty minutes"),
    ("about twenty-one nautical miles", "To what range did the paraffin lamp increase the light?",
     "twenty-one nautical miles"),
    ("every ninety seconds", "How often did the fog horn give its two long blasts?", "ninety seconds"),
    ("four times as bright", "How much brighter than the old wick lamp was the incandescent mantle burner?",
     "four times"),
    ("dropped two bombs", "How many bombs did the aircraft drop when it attacked the tower in March 1941?", "two"),
    ("twenty-four nautical miles", "What did the range of the light rise to when the station was converted to "
     "electric light?", "twenty-four nautical miles"),
    ("shortened to four weeks", "To how many weeks was the spell on the rock shortened once reliefs were made "
     "by air?", "four"),
    ("at the age of twenty-three", "At what age did Margaret Ure join the service?", "twenty-three"),
    ("reduced to eighteen nautical miles", "What is the range of the light today?", "eighteen nautical miles"),
    ("switched off for good in 2005", "In which year was the fog horn switched off for good?", "2005"),
    ("chaired the Trust for eleven years", "For how many years did Catriona Bain chair the Trust?", "eleven"),
    ("in February 1992", "When was the committee registered as the Hallin Skerry Trust?", "February 1992"),
    ("came onto the market in 1993", "In which year did the four keepers' cottages come onto the market?", "1993"),
    ("took from 1996 to 1999", "Which years did the restoration of the two cottages take?", "1996 to 1999"),
    ("summer of 1995", "When did the museum in the old signal station open?", "1995"),
    ("winds it every Sunday", "How often does a volunteer wind the Solvind clock in the museum?", "every Sunday"),
    ("added in 2008", "In which year was the museum's fourth room added?", "2008"),
    ("Port Carrach schoolboy in 1988", "Who made the only known recording of the Hallin Cow?",
     "a Port Carrach schoolboy"),
    ("dark green cloth", "In what colour of cloth are the logbook volumes bound?", "dark green"),
    ("twenty-seven at its busiest", "How many volunteers did the transcription group have at its busiest?",
     "twenty-seven"),
    ("two hundred thousand watch entries", "How many watch entries did the transcribers copy out altogether?",
     "two hundred thousand"),
    ("a team of three", "How many people made the first careful bird count in June 1991?", "three"),
    ("about two weeks each summer", "How long do the bird counters stay on the rock each summer?", "two weeks"),
    ("more than four hundred pairs", "To how many pairs did the tern colony grow in the late 1990s?",
     "four hundred"),
    ("eighty-seven knots", "What gust did the automatic weather station record in the storm of January 2015?",
     "eighty-seven knots"),
    ("some thirty feet of dressed stone", "How long was the outer section of the landing stage that the 2015 storm "
     "destroyed?", "thirty feet"),
    ("party of nine Norwegians", "How many Norwegians came to Port Carrach in 2004?", "nine"),
    ("descended from Robert Calder", "From whom did the woman who wrote in 2019 say she was descended?",
     "Robert Calder"),
    ("every five years", "How often does the Trust hold a Keepers' Gathering?", "every five years"),
    ("around ninety people", "About how many people came to the first Keepers' Gathering?", "ninety"),
]

HAYSTACK_DEPTHS = (0.125, 0.375, 0.625, 0.875)
RULER_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"


def prompt_ids(tokenizer, context: str, query: str) -> list[int]:
    """The prompt ContextCite builds (the package's `attribution_prompt` when it exists)."""
    try:
        from sparsetrace.attribution import attribution_prompt
    except ImportError:
        try:
            from sparsetrace.tasks.attribution_runs import attribution_prompt
        except ImportError:
            attribution_prompt = None
    if attribution_prompt is None:  # the package's API is not there: ContextCite's recipe, as documented
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Context: {context}\n\nQuery: {query}"}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text, _ = attribution_prompt(tokenizer, context, query)
    return tokenizer.encode(text, add_special_tokens=False)


def natural_text() -> str:
    first = (ROOT / "sparsetrace" / "data" / "sample.txt").read_text().strip()
    second = (ROOT / "benchmarks" / "texts" / "natural_part2.txt").read_text().strip()
    return first + "\n\n" + second


def natural_examples(tokenizer, length: int, used: set[int]) -> list[dict]:
    from sparsetrace.analysis.segments import sentence_spans

    text = natural_text()
    sentences = sentence_spans(text)
    ends = [e for _, e in sentences]
    paragraph_starts = [0] + [i + 2 for i in range(len(text) - 1) if text[i:i + 2] == "\n\n" and text[i + 2:i + 3]
                              and not text[i + 2].isspace()]
    supports = []
    for phrase, question, answer in QUESTIONS:
        position = text.find(phrase)
        assert position >= 0 and text.count(phrase) == 1, phrase
        span = next(s for s in sentences if s[0] <= position < s[1])
        supports.append((span, question, answer))
    limit = length - RESPONSE_ROOM
    probe = QUESTIONS[0][1]  # for the token count only: every question is as long within a few tokens

    def window(start: int) -> tuple[int, int]:
        """The window from `start` with the most whole sentences whose prompt fits (the longest question's)."""
        candidates = [e for e in ends if e > start]
        low, high = 0, len(candidates) - 1
        while low < high:
            middle = (low + high + 1) // 2
            context = text[start:candidates[middle]].strip()
            fits = max(len(prompt_ids(tokenizer, context, q)) for q in (probe, LONGEST_QUESTION)) <= limit
            low, high = (middle, high) if fits else (low, middle - 1)
        return start, candidates[low]

    # the latest paragraph start from which the rest of the text still fills the length (within 64 tokens)
    filling = [p for p in paragraph_starts if len(prompt_ids(tokenizer, text[p:].strip(), probe)) >= limit - 64]
    latest = max(filling) if filling else 0
    examples = []
    for j in range(PER_CELL):
        target = latest * j / (PER_CELL - 1)
        start = min(paragraph_starts, key=lambda p: (abs(p - target), p))
        start, end = window(start)
        context = text[start:end].strip()
        offset = text.index(context, start)
        inside = [i for i, ((a, b), _, _) in enumerate(supports) if offset <= a and b <= offset + len(context)]
        depth = (j + 1) / (PER_CELL + 1)
        fresh = [i for i in inside if i not in used] or inside
        pick = min(fresh, key=lambda i: (abs((supports[i][0][0] - offset) / len(context) - depth), i))
        used.add(pick)
        (a, b), question, answer = supports[pick]
        ids = prompt_ids(tokenizer, context, question)
        assert len(ids) <= limit, (length, j, len(ids))
        examples.append({
            "id": f"natural_{length}_{j}", "kind": "natural", "length": length, "prompt_tokens": len(ids),
            "context": context, "query": question, "answer": answer,
            "support": text[a:b], "support_chars": [a - offset, b - offset],
            "source": f"essays, chars {start}-{end} of sample.txt + natural_part2.txt",
        })
    return examples


def haystack_examples(tokenizer, length: int, rng: random.Random) -> list[dict]:
    from sparsetrace.tasks.niah import _KEY_WORDS, NEEDLE, NOISE

    noise = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    asked = rng.sample(range(len(HAYSTACK_DEPTHS)), PER_CELL)
    limit = length - RESPONSE_ROOM
    examples = []
    for j in range(PER_CELL):
        keys: list[str] = []
        while len(keys) < len(HAYSTACK_DEPTHS):
            key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
            if key not in keys and key.split("-")[0] != key.split("-")[1]:
                keys.append(key)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        question = RULER_QUESTION.format(key=keys[asked[j]])

        def build(count: int, needles: list[str] = needles) -> str:
            sentences = [noise[i % len(noise)] for i in range(count)]
            for needle, depth in reversed(list(zip(needles, HAYSTACK_DEPTHS, strict=True))):
                sentences.insert(round(depth * count), needle)
            return " ".join(sentences)

        low, high = 0, 4 * length
        while low < high:
            middle = (low + high + 1) // 2
            fits = len(prompt_ids(tokenizer, build(middle), question)) <= limit
            low, high = (middle, high) if fits else (low, middle - 1)
        context = build(low)
        support = needles[asked[j]]
        a = context.index(support)
        examples.append({
            "id": f"haystack_{length}_{j}", "kind": "haystack", "length": length,
            "prompt_tokens": len(prompt_ids(tokenizer, context, question)),
            "context": context, "query": question, "answer": values[asked[j]],
            "support": support, "support_chars": [a, a + len(support)],
            "source": f"RULER niah_multikey_1 noise, {low} noise sentences, "
                      f"needles {dict(zip(keys, values, strict=True))}",
        })
    return examples


LONGEST_QUESTION = max((q for _, q, _ in QUESTIONS), key=len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    from sparsetrace import load_tokenizer

    tokenizer = load_tokenizer()
    rng = random.Random(SEED)
    used: set[int] = set()
    rows = []
    for length in args.lengths:
        rows += natural_examples(tokenizer, length, used)
    for length in args.lengths:
        rows += haystack_examples(tokenizer, length, rng)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for row in rows:
        print(f"{row['id']:>16}: {row['prompt_tokens']:>5} prompt tokens, {len(row['context']):>6} chars; "
              f"{row['query'][:60]!r} -> {row['answer']!r}")
    print(f"wrote {args.out} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
