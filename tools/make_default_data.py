"""Generate the bundled tiny corpus and train its tokenizer (deterministic, no downloads).

Writes ``examples/data/corpus.jsonl`` (about 1.5 MB of English-like documents from a seeded
template grammar: stories, dialogues, arithmetic, weather reports, animal facts, recipes,
letters; all text is written in this file, so the corpus may be redistributed with the project)
and ``examples/data/tokenizer/`` (a byte-level BPE ``tokenizer.json`` trained here with the
``tokenizers`` library, ``<|endoftext|>`` = id 0 as EOD, plus ``tokenizer_config.json``)::

    python tools/make_default_data.py                 # regenerate examples/data (committed)
    python tools/make_default_data.py --check         # verify the committed files are reproduced
    python tools/make_default_data.py --out-dir /tmp/d --num-docs 200   # a smaller copy elsewhere

The animal facts are fixed per animal (same seed), so a model can learn them; arithmetic is
always correct. Both make the training loss on this corpus fall well below the unigram entropy.
"""

import argparse
import filecmp
import json
import os
import random
import sys
import tempfile

DEFAULT_SEED = 1234
DEFAULT_NUM_DOCS = 2600
DEFAULT_VOCAB_SIZE = 2048
EOD_TOKEN = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------
# Vocabulary of the grammar (all written for this project).

NAMES = [
    "Mara", "Tom", "Ines", "Oskar", "Lena", "Ravi", "Zoë", "José", "Åsa", "Chloé", "Kofi", "Yuki",
    "Nadia", "Pablo", "Greta", "Idris", "Mei", "Anton", "Leila", "Bruno", "Sofia", "Emeka", "Hanna",
    "Tariq", "Olga", "Felix", "Amara", "Björn", "Priya", "Dmitri", "Noor", "Ellis",
]
PLACES = [
    "the harbour", "the old mill", "the village square", "the library", "the orchard", "the hill",
    "the river bank", "the market", "the lighthouse", "the bakery", "the train station", "the forest",
    "the school garden", "the bridge", "the workshop", "the meadow", "the museum", "the quiet lane",
]
TOWNS = [
    "Northwick", "Ashford Vale", "Pellmoor", "Caldera Bay", "Rivenholm", "Saltcross", "Elmstead",
    "Kestrel Point", "Marrowgate", "Oakhurst", "Little Brenn", "São Colm", "Fjällby", "Lowmere",
]
OBJECTS = [
    "lamp", "map", "key", "kite", "basket", "violin", "compass", "notebook", "bicycle", "umbrella",
    "lantern", "clock", "letter", "hat", "ladder", "bell", "boat", "jar of honey", "red scarf",
    "wooden box", "telescope", "garden hose", "paintbrush", "loaf of bread",
]
ADJECTIVES = [
    "small", "old", "bright", "quiet", "heavy", "strange", "shiny", "broken", "tiny", "green",
    "warm", "careful", "curious", "sleepy", "brave", "patient", "cheerful", "dusty", "gentle",
]
FEELINGS = ["happy", "surprised", "tired", "worried", "proud", "calm", "excited", "puzzled", "glad"]
VERBS_PAST = [
    "found", "carried", "fixed", "painted", "lost", "borrowed", "cleaned", "opened", "dropped",
    "hid", "returned", "measured", "polished", "wrapped", "counted", "lifted",
]
TIMES = [
    "In the morning", "Before breakfast", "After lunch", "Late in the afternoon", "At dusk",
    "On Monday", "On a rainy Tuesday", "Early on Saturday", "One windy evening", "Just after noon",
]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "clear", "mild"]
DIRECTIONS = ["north", "south", "east", "west", "north-east", "south-west"]

ANIMALS = [
    "fox", "otter", "heron", "badger", "owl", "hedgehog", "beaver", "lynx", "puffin", "tortoise",
    "squirrel", "salmon", "wolf", "deer", "mole", "swan", "crab", "bee", "frog", "hare",
]
COLOURS = ["red", "brown", "grey", "white", "black", "golden", "spotted", "striped", "silver"]
HABITATS = [
    "forests", "rivers", "marshes", "mountains", "meadows", "coasts", "deserts", "lakes", "hedges",
]
FOODS = ["berries", "fish", "insects", "seeds", "grass", "worms", "roots", "nuts", "leaves", "nectar"]

INGREDIENTS = [
    "flour", "butter", "sugar", "eggs", "milk", "oats", "apples", "carrots", "onions", "rice",
    "lentils", "tomatoes", "cheese", "honey", "salt", "pepper", "lemon juice", "potatoes",
]
DISHES = ["soup", "pie", "bread", "porridge", "stew", "cake", "salad", "pancakes", "crumble"]
STEPS = [
    "Wash the {a} and cut them into small pieces.",
    "Mix the {a} with the {b} in a large bowl.",
    "Heat a pan and melt a little butter.",
    "Add the {a} and stir for {n} minutes.",
    "Pour in the {b} slowly while stirring.",
    "Bake for {n} minutes until golden.",
    "Let it rest for {m} minutes before serving.",
    "Season with salt and pepper to taste.",
    "Cover the pot and simmer on low heat for {n} minutes.",
    "Serve warm with a slice of bread.",
]

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
TENS_WORDS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1000 (``342`` -> ``three hundred and forty-two``)."""
    if n < 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return TENS_WORDS[tens] + ("-" + NUMBER_WORDS[unit] if unit else "")
    hundreds, rest = divmod(n, 100)
    head = NUMBER_WORDS[hundreds] + " hundred"
    return head + (" and " + number_to_words(rest) if rest else "")


# ----------------------------------------------------------------------------------------------
# Document generators. Each takes a random.Random and returns one document's text.


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence_story(rng: random.Random, hero: str, friend: str) -> str:
    obj, adj, place = rng.choice(OBJECTS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    templates = [
        f"{rng.choice(TIMES)}, {hero} {rng.choice(VERBS_PAST)} {_a(adj + ' ' + obj)} near {place}.",
        f"{hero} walked to {place} with {friend}, and they talked about the {obj}.",
        f"\"Have you seen my {obj}?\" asked {hero}. \"It was by {place},\" said {friend}.",
        f"The {obj} was {adj}, so {hero} {rng.choice(VERBS_PAST)} it again.",
        f"{friend} felt {rng.choice(FEELINGS)} when {hero} came back from {place}.",
        f"Nobody knew why the {obj} had been left at {place}.",
        f"{hero} counted {number_to_words(rng.randint(2, 19))} birds on the roof of {place}.",
        f"It was {rng.choice(WEATHER)}, and the road to {place} was "
        f"{rng.choice(['long', 'short', 'muddy', 'busy', 'empty'])}.",
        f"{hero} wrote in a notebook: \u201c{rng.choice(FEELINGS).capitalize()} today \u2014 the {obj} is safe.\u201d",
        f"At last {hero} and {friend} went home, tired but {rng.choice(['happy', 'proud', 'calm', 'glad'])}.",
    ]
    return rng.choice(templates)


def gen_story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    title = f"{hero} and the {rng.choice(ADJECTIVES).capitalize()} {rng.choice(OBJECTS).title()}"
    paragraphs = []
    for _ in range(rng.randint(2, 5)):
        paragraphs.append(" ".join(_sentence_story(rng, hero, friend) for _ in range(rng.randint(3, 7))))
    return title + "\n\n" + "\n\n".join(paragraphs)


def gen_dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    lines = []
    for _ in range(rng.randint(4, 10)):
        speaker, other = (a, b) if rng.random() < 0.5 else (b, a)
        obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
        lines.append(rng.choice([
            f"{speaker}: Where did you put the {obj}?",
            f"{speaker}: I left it at {place}, I think.",
            f"{speaker}: Shall we go to {place} after {rng.choice(['lunch', 'school', 'work', 'dinner'])}?",
            f"{speaker}: {other}, the weather looks {rng.choice(WEATHER)} today.",
            f"{speaker}: Yes, that sounds good.",
            f"{speaker}: No, not yet. Maybe tomorrow.",
            f"{speaker}: How many {rng.choice(['apples', 'books', 'chairs', 'boats'])} are there? "
            f"I count {rng.randint(2, 40)}.",
            f"{speaker}: Thank you, {other}!",
        ]))
    return "\n".join(lines)


def gen_arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 16)):
        kind = rng.randrange(5)
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        if kind == 0:
            lines.append(f"{x} + {y} = {x + y}")
        elif kind == 1:
            hi, lo = max(x, y), min(x, y)
            lines.append(f"{hi} - {lo} = {hi - lo}")
        elif kind == 2:
            x, y = rng.randint(0, 12), rng.randint(0, 12)
            lines.append(f"{x} \u00d7 {y} = {x * y}")
        elif kind == 3:
            x, y = rng.randint(0, 20), rng.randint(0, 20)
            lines.append(f"{number_to_words(x).capitalize()} plus {number_to_words(y)} is {number_to_words(x + y)}.")
        else:
            start, step = rng.randint(0, 30), rng.randint(1, 9)
            seq = [start + step * i for i in range(rng.randint(4, 8))]
            lines.append("Count by " + number_to_words(step) + ": " + ", ".join(map(str, seq)) + ".")
    return "Practice sums\n" + "\n".join(lines)


def gen_weather(rng: random.Random) -> str:
    town = rng.choice(TOWNS)
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    start = rng.randrange(7)
    parts = [f"Weather for {town}"]
    for i in range(rng.randint(3, 7)):
        day = days[(start + i) % 7]
        lo = rng.randint(-8, 18)
        hi = lo + rng.randint(2, 12)
        wind = rng.randint(0, 60)
        parts.append(
            f"{day}: {rng.choice(WEATHER)}, {lo} to {hi} \u00b0C, wind {wind} km/h from the "
            f"{rng.choice(DIRECTIONS)}."
            + (f" Chance of rain {rng.randint(1, 9) * 10}%." if rng.random() < 0.5 else "")
        )
    return "\n".join(parts)


def _animal_facts(animal: str):
    # Fixed per animal (independent of the document stream) so that the facts are learnable.
    r = random.Random("facts:" + animal)
    return r.choice(COLOURS), r.choice(HABITATS), r.sample(FOODS, 2), r.randint(2, 25), r.randint(1, 40)


def gen_animal(rng: random.Random) -> str:
    animal = rng.choice(ANIMALS)
    colour, habitat, (food1, food2), years, kg = _animal_facts(animal)
    facts = [
        f"The {animal} is often {colour}.",
        f"It lives in {habitat}.",
        f"It eats {food1} and {food2}.",
        f"A {animal} can live for {years} years.",
        f"An adult {animal} weighs about {kg} kg.",
        f"Many people have seen a {animal} near {rng.choice(PLACES)}.",
    ]
    rng.shuffle(facts)
    return f"About the {animal}\n" + " ".join(facts[: rng.randint(3, len(facts))])


def gen_recipe(rng: random.Random) -> str:
    dish = rng.choice(DISHES)
    main, other = rng.sample(INGREDIENTS, 2)
    ingredients = rng.sample(INGREDIENTS, rng.randint(3, 7))
    lines = [f"{main.capitalize()} {dish}", "", "You will need:"]
    for ing in ingredients:
        lines.append(f"- {rng.randint(1, 500)} g of {ing}")
    lines += ["", "Method:"]
    for i, step in enumerate(rng.sample(STEPS, rng.randint(3, 6)), 1):
        a, b = rng.sample(ingredients, 2)
        lines.append(f"{i}. " + step.format(a=a, b=b, n=rng.randint(2, 45), m=rng.randint(1, 15)))
    lines.append(f"Serves {number_to_words(rng.randint(2, 8))}.")
    return "\n".join(lines)


def gen_letter(rng: random.Random) -> str:
    writer, reader = rng.sample(NAMES, 2)
    town = rng.choice(TOWNS)
    body = " ".join(
        rng.choice([
            f"The weather in {town} has been {rng.choice(WEATHER)} all week.",
            f"I {rng.choice(VERBS_PAST)} your {rng.choice(OBJECTS)} and will bring it soon.",
            f"We visited {rng.choice(PLACES)} and saw {number_to_words(rng.randint(2, 30))} boats.",
            f"Everyone here is {rng.choice(FEELINGS)} and sends greetings.",
            f"Please write back before {rng.choice(['spring', 'summer', 'autumn', 'winter'])}.",
            f"The {rng.choice(ANIMALS)} in our garden is back again \u2014 it likes the {rng.choice(FOODS)}.",
        ])
        for _ in range(rng.randint(3, 8))
    )
    date = f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)}"
    return f"Dear {reader},\n\n{body}\n\nWith love,\n{writer}\n{town}, {date}"


GENERATORS = [
    (gen_story, 5), (gen_dialogue, 2), (gen_arithmetic, 2), (gen_weather, 1), (gen_animal, 2),
    (gen_recipe, 1), (gen_letter, 2),
]


def generate_corpus(num_docs: int, seed: int):
    """Yield ``num_docs`` document texts, deterministically from ``seed``."""
    rng = random.Random(seed)
    funcs = [f for f, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    for _ in range(num_docs):
        yield rng.choices(funcs, weights)[0](rng)


def write_corpus(path: str, num_docs: int, seed: int) -> None:
    """Write the corpus as jsonl: ``{"id": i, "text": ...}`` per line, UTF-8."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, text in enumerate(generate_corpus(num_docs, seed)):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")


def train_tokenizer(corpus_path: str, out_dir: str, vocab_size: int) -> None:
    """Train a byte-level BPE on the corpus and save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    def texts():
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": EOD_TOKEN,
                "eos_token": EOD_TOKEN,
                "clean_up_tokenization_spaces": False,
            },
            f,
            indent=2,
        )
        f.write("\n")


def make(out_dir: str, num_docs: int, seed: int, vocab_size: int) -> None:
    """Write ``out_dir/corpus.jsonl`` and ``out_dir/tokenizer/``."""
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.jsonl")
    write_corpus(corpus, num_docs, seed)
    train_tokenizer(corpus, os.path.join(out_dir, "tokenizer"), vocab_size)


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(repo, "examples", "data"))
    parser.add_argument("--num-docs", type=int, default=DEFAULT_NUM_DOCS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare with --out-dir")
    args = parser.parse_args()
    if not args.check:
        make(args.out_dir, args.num_docs, args.seed, args.vocab_size)
        print(f"wrote {args.out_dir}/corpus.jsonl and {args.out_dir}/tokenizer/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make(tmp, args.num_docs, args.seed, args.vocab_size)
        differ = [
            name
            for name in ("corpus.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
            if not filecmp.cmp(os.path.join(tmp, name), os.path.join(args.out_dir, name), shallow=False)
        ]
    if differ:
        print(f"differ from a fresh generation: {', '.join(differ)}", file=sys.stderr)
        return 1
    print("reproduced exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
