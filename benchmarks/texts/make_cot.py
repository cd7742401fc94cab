"""Write cot.txt: a long chain of thought by the default model itself (SmolLM2-135M-Instruct).

The model is asked to solve a multi-step problem step by step; when it stops, it is asked to check
its work again in more detail, until the transcript (chat template included) reaches the target
length. Sampled with a fixed seed; even so, two runs here gave different texts (multi-threaded
float sums can flip near-ties in sampling), so the committed cot.txt is the reference text.

    python benchmarks/texts/make_cot.py --tokens 8400 --seed 0
"""

import argparse
from pathlib import Path

import torch

from sparsetrace import load_model

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
    torch.manual_seed(args.seed)
    messages = [{"role": "user", "content": PROBLEM}]
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        room = args.tokens - ids.shape[1]
        if room < 64:
            break
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=min(room, 1500), do_sample=True, temperature=0.7, top_p=0.9,
                                 repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
        print(f"{ids.shape[1] + out.shape[1] - ids.shape[1]:,} tokens so far", flush=True)
    text = tokenizer.apply_chat_template(messages[:-1], tokenize=False)
    (Path(__file__).parent / "cot.txt").write_text(text)
    print(f"wrote cot.txt: {len(tokenizer(text)['input_ids']):,} tokens")


if __name__ == "__main__":
    main()
