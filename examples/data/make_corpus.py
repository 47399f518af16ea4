"""Write the small self-authored training corpus, ``corpus.txt``, deterministically.

The main job fine-tunes on text that ships with the project and needs nothing
from the network. This script is that text's source: short stories, plain
arithmetic and a few paragraphs on how LOMO works, all written for this
project (public domain, CC0), expanded from templates with a fixed seed so the
file is the same on every machine. Run it to regenerate the file:

    python examples/data/make_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
           "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()

NAMES = ["Ada", "Basil", "Clara", "Dmitri", "Edith", "Farah", "Gus", "Hana", "Ivo", "June",
         "Kofi", "Lena", "Milo", "Nora", "Otto", "Pia", "Quinn", "Rosa", "Sami", "Tove"]
PLACES = ["the harbour", "the old mill", "the market", "the hill above the town",
          "the library", "the river bank", "the orchard", "the railway station",
          "the lighthouse", "the bakery", "the school yard", "the forest path"]
THINGS = ["a red kite", "a brass key", "a loaf of rye bread", "a map of the coast",
          "a small wooden boat", "a jar of honey", "a lantern", "a letter with no stamp",
          "a basket of pears", "a compass", "a book of tide tables", "a wool scarf"]
WEATHER = ["The wind came from the west", "Rain fell softly all morning",
           "The sky was clear and cold", "A grey fog sat on the water",
           "The sun was warm on the stones", "Snow had covered the roofs overnight"]
FEELINGS = ["glad", "puzzled", "tired but happy", "curious", "a little worried", "proud"]
ENDINGS = ["walked home before dark", "shared it with a neighbour",
           "wrote the whole day down in a notebook", "laughed and went back for more",
           "put it on the kitchen shelf", "decided to return the next morning"]

LOMO_NOTES = """\
A language model learns by nudging every one of its weights a little after each batch of text.
To know which way to nudge, the computer first works out the gradient, one number for every weight.
Most optimizers keep all of those gradients in memory at once, and often two more numbers per weight beside them.
LOMO takes another path. It walks backwards through the layers, and as soon as the gradient of one layer is known it updates that layer and forgets the gradient.
At any moment only one layer's gradient is alive, so the memory needed for training comes close to the memory needed to run the model.
AdaLomo keeps a little history for each weight matrix: the average square of the gradient along each row and along each column.
From those two short lists it rebuilds a good guess of the whole table of averages, and it divides each step by that guess.
The step is then scaled by the size of the weights themselves, so large weights move more and small weights move less.
When numbers are stored in half precision they can overflow. A loss scaler multiplies the loss by a large power of two and checks every gradient.
If any gradient is not finite, the whole step is skipped, nothing is changed, and the scale is halved before the next try.
"""


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    n = rng.randint(2, 12)
    return (f"{rng.choice(WEATHER)} when {a} went to {place}. "
            f"There {a} met {b}, who was carrying {thing}. "
            f"They talked for {NUMBERS[n]} minutes about the {rng.choice(['tide', 'harvest', 'train', 'festival', 'storm', 'lessons'])}. "
            f"{b} gave {a} {thing}, and {a} felt {rng.choice(FEELINGS)}. "
            f"In the end {a} {rng.choice(ENDINGS)}.\n")


def arithmetic(rng: random.Random) -> str:
    x, y = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        return f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is {NUMBERS[x + y]}.\n"
    x, y = max(x, y), min(x, y)
    return f"{NUMBERS[x].capitalize()} minus {NUMBERS[y]} is {NUMBERS[x - y]}.\n"


def build(target_bytes: int = 300_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < target_bytes:
        r = rng.random()
        if r < 0.6:
            piece = story(rng)
        elif r < 0.95:
            piece = "".join(arithmetic(rng) for _ in range(3))
        else:
            piece = LOMO_NOTES
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


if __name__ == "__main__":
    out = Path(__file__).with_name("corpus.txt")
    out.write_text(build())
    print(f"wrote {out} ({out.stat().st_size} bytes)")
