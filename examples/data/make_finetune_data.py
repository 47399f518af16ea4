"""Write the shipped fine-tuning and eval JSONL files, deterministically.

``finetune.jsonl``: prompt/completion records of a kind the shipped checkpoint
(``examples/data/pretrained``, trained on the stories and notes of
``corpus.txt``) never saw: counting pears or stones after none, one or two gifts, e.g.

    {"prompt": "At the market Ada had three pears and Gus gave Ada two more, so Ada had",
     "completion": " five pears."}

Every word is one its tokenizer knows as a whole token. ``eval.jsonl``: the same
kind of sentence, none of them in ``finetune.jsonl``: multiple-choice records
``{"prompt", "choices", "answer"}`` (the right count and two wrong ones, each
appended to the prompt as given) and held-out prompt/completion records (for
the loss on their completions). Public domain (CC0), like the corpus. Run it
to regenerate both files:

    python examples/data/make_finetune_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
NAMES = ["Ada", "Basil", "Clara", "Dmitri", "Edith", "Farah", "Gus", "Hana", "Ivo", "June",
         "Kofi", "Lena", "Milo", "Nora", "Otto", "Pia", "Quinn", "Rosa", "Sami", "Tove"]
PLACES = ["the market", "the harbour", "the bakery", "the library", "the orchard",
          "the old mill", "the railway station", "the lighthouse"]
THINGS = ["pears", "stones"]
N_TRAIN, N_CHOICE, N_HELD_OUT = 240, 48, 24


def situation(rng: random.Random) -> tuple:
    """``(prompt, count after, count before, thing)``: no gift, or one or two
    gifts to or from someone (every count from two to twelve, so the thing is
    always plural)."""
    a, b, c = rng.sample(NAMES, 3)
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    kind = rng.random()
    if kind < 0.2:
        x = rng.randint(2, 12)
        return f"At {place} {a} had {NUMBERS[x]} {thing}, so {a} had", x, x, thing
    if kind < 0.5:
        x = rng.randint(2, 11)
        y = rng.randint(1, 12 - x)
        text, after = f"{b} gave {a} {NUMBERS[y]} more", x + y
    elif kind < 0.8:
        x = rng.randint(3, 12)
        y = rng.randint(1, x - 2)
        text, after = f"gave {b} {NUMBERS[y]}", x - y
    else:
        x = rng.randint(3, 12)
        y = rng.randint(1, x - 2)
        z = rng.randint(1, 12 - (x - y))
        text = f"gave {b} {NUMBERS[y]}, and {c} gave {a} {NUMBERS[z]} more"
        after = x - y + z
    return f"At {place} {a} had {NUMBERS[x]} {thing} and {text}, so {a} had", after, x, thing


def distinct_situations(rng: random.Random, n: int) -> list:
    seen, out = set(), []
    while len(out) < n:
        s = situation(rng)
        if s[0] not in seen:
            seen.add(s[0])
            out.append(s)
    return out


def choice_record(rng: random.Random, prompt, answer, start, thing) -> dict:
    """The right count and two wrong ones (the count before the gift, if it
    differs, and another), in a random order."""
    wrong = {start} - {answer}
    while len(wrong) < 2:
        wrong.add(rng.randint(2, 12))
        wrong.discard(answer)
    counts = [answer, *sorted(wrong)]
    rng.shuffle(counts)
    return {"prompt": prompt, "choices": [f" {NUMBERS[c]} {thing}." for c in counts],
            "answer": counts.index(answer)}


def build(seed: int = 0) -> tuple:
    """``(finetune_records, eval_records)``."""
    rng = random.Random(seed)
    every = distinct_situations(rng, N_TRAIN + N_CHOICE + N_HELD_OUT)
    train = [{"prompt": p, "completion": f" {NUMBERS[n]} {t}."}
             for p, n, _, t in every[:N_TRAIN]]
    choices = [choice_record(rng, p, n, x, t) for p, n, x, t in every[N_TRAIN:N_TRAIN + N_CHOICE]]
    held = [{"prompt": p, "completion": f" {NUMBERS[n]} {t}."}
            for p, n, _, t in every[N_TRAIN + N_CHOICE:]]
    return train, choices + held


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    here = Path(__file__).parent
    train, evaluation = build()
    write_jsonl(here / "finetune.jsonl", train)
    write_jsonl(here / "eval.jsonl", evaluation)
    print(f"wrote {here / 'finetune.jsonl'} ({len(train)} records) and "
          f"{here / 'eval.jsonl'} ({len(evaluation)} records)")
