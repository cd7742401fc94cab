"""Write needle_{length}.txt: RULER-style single-needle prompts (niah_single_1: noise haystack).

Templates as in RULER's synthetic task config (the library's, `sparsetrace.tasks.niah`): a
haystack of the noise sentences, one needle "One of the special magic numbers for {key} is:
{value}." at the given depth, the question, the default model's chat template, and the answer
prefix; the number of noise sentences is searched so that the prompt has the target length in
tokens (default model's tokenizer).

    python benchmarks/texts/make_needle.py --lengths 1024 2048 4096 8192 --depth 0.5 --seed 0
"""

import argparse
import random
from pathlib import Path

from sparsetrace import load_model
from sparsetrace.tasks.niah import ANSWER_PREFIX, NEEDLE, NOISE, TEMPLATE

KEYS = ["silent-harbor", "amber-lantern", "northern-tide", "granite-step", "quiet-signal"]


def prompt(tokenizer, repeats: int, depth: float, key: str, value: str) -> str:
    sentences = [NOISE] * repeats
    sentences.insert(round(depth * repeats), NEEDLE.format(key=key, value=value))
    user = TEMPLATE.format(context=" ".join(sentences), key=key)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    return chat + ANSWER_PREFIX.format(key=key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_model()
    rng = random.Random(args.seed)
    here = Path(__file__).parent
    answers = ["length\ttokens\tdepth\tkey\tanswer"]
    for length in args.lengths:
        key, value = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))

        def count(repeats: int, key: str = key, value: str = value) -> int:
            return len(tokenizer(prompt(tokenizer, repeats, args.depth, key, value))["input_ids"])

        low, high = 0, length
        while low < high:  # the most noise sentences that fit the target length
            middle = (low + high + 1) // 2
            low, high = (middle, high) if count(middle) <= length else (low, middle - 1)
        (here / f"needle_{length}.txt").write_text(prompt(tokenizer, low, args.depth, key, value))
        answers.append(f"{length}\t{count(low)}\t{args.depth}\t{key}\t{value}")
        print(f"needle_{length}.txt: {count(low)} tokens, {key} = {value}")
    (here / "needle_answers.tsv").write_text("\n".join(answers) + "\n")


if __name__ == "__main__":
    main()
