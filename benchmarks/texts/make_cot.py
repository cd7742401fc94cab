"""Write cot.txt: a long chain of thought by the default model itself (SmolLM2-135M-Instruct).

The model is asked to solve a multi-step problem step by step; when it stops, it is asked to check
its work again in more detail, until the transcript (chat template included) reaches the target
length (`sparsetrace.generation.generate_reasoning`, the code of `sparsetrace anchors --generate`).
Sampled with a fixed seed; even so, two runs here gave different texts (multi-threaded
float sums can flip near-ties in sampling), so the committed cot.txt is the reference text.

    python benchmarks/texts/make_cot.py --tokens 8400 --seed 0
"""

import argparse
from pathlib import Path

from sparsetrace import load_model
from sparsetrace.generation import generate_reasoning

PROBLEM = (
    "A lighthouse keeper must carry oil up a tower of 148 steps. Each trip up and down takes 6 minutes, "
    "he carries 4 litres per trip, and the lamp burns 1.5 litres per hour from dusk to dawn. In winter the "
    "night lasts 16 hours; in summer 7 hours. He also needs 20 minutes each evening to clean the lens. "
    "How many minutes per day does he spend on oil and lens in winter and in summer, and how many litres "
    "does he carry in a 90-day winter? Think step by step and show every calculation."
)
FOLLOW_UP = "Check your work again, step by step, in more detail. Recompute every number and explain each step."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_model()
    generation = generate_reasoning(model, tokenizer, PROBLEM, max_new_tokens=1500, temperature=0.7, top_p=0.9,
                                    repetition_penalty=1.1, seed=args.seed, follow_up=FOLLOW_UP,
                                    min_tokens=args.tokens)
    (Path(__file__).parent / "cot.txt").write_text(generation.text)
    print(f"wrote cot.txt: {len(tokenizer(generation.text)['input_ids']):,} tokens")


if __name__ == "__main__":
    main()
