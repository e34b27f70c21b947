"""A synthetic benign fine-tuning task with an exact-match answer, generated from a fixed seed.

The protect experiment fine-tunes a safety-aligned model on a benign task and checks how much safety it
loses; that needs a task whose success is measured without a judge. Each item here is an arithmetic word
problem, a unit conversion or a string transformation, with a short worked response that ends in
``"The answer is X."`` and the exact-match target ``X``. Items are generated, not stored: the same seed
gives the same items on every platform (``random.Random`` with integer arguments only), and an item's
*content* (the operation and its operands, commuted ones included, or the words it is about, not its
wording) is never repeated, so a test item never appears in the training split under another phrasing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: Seed of the built-in ``task_train`` / ``task_test`` splits.
TASK_SEED = 1234
TASK_TRAIN_SIZE = 2000
TASK_TEST_SIZE = 250

Item = dict[str, str]
Maker = Callable[[random.Random], tuple[tuple, Item]]

NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yusuf",
    "Zoe",
)
OBJECTS = (
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "stamps",
    "shells",
    "balloons",
    "cards",
    "oranges",
    "buttons",
    "candles",
    "beads",
    "postcards",
    "muffins",
)
WORDS = (
    "amber",
    "anchor",
    "apple",
    "arrow",
    "badge",
    "basket",
    "beach",
    "bicycle",
    "blanket",
    "bridge",
    "bucket",
    "butter",
    "button",
    "cabin",
    "camera",
    "candle",
    "canyon",
    "carpet",
    "castle",
    "cherry",
    "circle",
    "cloud",
    "clover",
    "coffee",
    "copper",
    "cotton",
    "crystal",
    "desert",
    "dolphin",
    "dragon",
    "eagle",
    "engine",
    "feather",
    "fiddle",
    "forest",
    "fountain",
    "galaxy",
    "garden",
    "ginger",
    "glacier",
    "guitar",
    "hammer",
    "harbor",
    "hazel",
    "helmet",
    "island",
    "jacket",
    "jungle",
    "kettle",
    "kitten",
    "ladder",
    "lantern",
    "lemon",
    "library",
    "lizard",
    "magnet",
    "maple",
    "marble",
    "meadow",
    "mirror",
    "monkey",
    "mountain",
    "napkin",
    "needle",
    "noodle",
    "ocean",
    "orange",
    "orchid",
    "paddle",
    "palace",
    "pepper",
    "pickle",
    "pillow",
    "planet",
    "pocket",
    "puzzle",
    "rabbit",
    "rainbow",
    "river",
    "rocket",
    "saddle",
    "salmon",
    "sandal",
    "silver",
    "spider",
    "spoon",
    "squirrel",
    "station",
    "stone",
    "summer",
    "sunset",
    "tablet",
    "teapot",
    "thunder",
    "ticket",
    "tiger",
    "tomato",
    "tunnel",
    "turtle",
    "valley",
    "velvet",
    "violin",
    "wagon",
    "walnut",
    "window",
    "winter",
    "wizard",
    "yellow",
    "zebra",
)
#: (singular unit, plural unit, target unit plural, factor).
CONVERSIONS = (
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("centimeter", "centimeters", "millimeters", 10),
    ("kilogram", "kilograms", "grams", 1000),
    ("liter", "liters", "milliliters", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("year", "years", "months", 12),
    ("foot", "feet", "inches", 12),
    ("yard", "yards", "feet", 3),
    ("gallon", "gallons", "quarts", 4),
    ("dozen", "dozen", "items", 12),
)


def _item(prompt: str, working: str, answer: object, category: str) -> Item:
    answer = str(answer)
    return {"prompt": prompt, "response": f"{working}The answer is {answer}.", "answer": answer, "category": category}


def _addition(rng: random.Random) -> tuple[tuple, Item]:
    name, obj, a, b = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(3, 99), rng.randint(2, 99)
    prompt = rng.choice(
        (
            f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
            f"There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?",
        )
    )
    return ("add", min(a, b), max(a, b)), _item(prompt, f"{a} + {b} = {a + b}. ", a + b, "arithmetic")


def _subtraction(rng: random.Random) -> tuple[tuple, Item]:
    name, obj, b = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(2, 60)
    a = b + rng.randint(1, 80)
    prompt = rng.choice(
        (
            f"{name} had {a} {obj} and gave {b} to a friend. How many {obj} does {name} have left?",
            f"A shop had {a} {obj} and sold {b} of them. How many {obj} are left?",
        )
    )
    return ("sub", a, b), _item(prompt, f"{a} - {b} = {a - b}. ", a - b, "arithmetic")


def _multiplication(rng: random.Random) -> tuple[tuple, Item]:
    name, obj, a, b = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(2, 15), rng.randint(2, 25)
    prompt = rng.choice(
        (
            f"{name} buys {a} bags with {b} {obj} in each bag. How many {obj} is that in total?",
            f"There are {a} rows of {obj} with {b} in each row. How many {obj} are there?",
        )
    )
    return ("mul", min(a, b), max(a, b)), _item(prompt, f"{a} × {b} = {a * b}. ", a * b, "arithmetic")


def _division(rng: random.Random) -> tuple[tuple, Item]:
    name, obj, share, friends = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(2, 20), rng.randint(2, 12)
    total = share * friends
    prompt = f"{name} shares {total} {obj} equally among {friends} friends. How many {obj} does each friend get?"
    return ("div", total, friends), _item(prompt, f"{total} ÷ {friends} = {share}. ", share, "arithmetic")


def _conversion(rng: random.Random) -> tuple[tuple, Item]:
    singular, plural, target, factor = rng.choice(CONVERSIONS)
    value = rng.randint(2, 99)
    prompt = rng.choice(
        (
            f"Convert {value} {plural} to {target}.",
            f"How many {target} are in {value} {plural}?",
            f"{value} {plural} is how many {target}?",
        )
    )
    product = value * factor
    working = f"1 {singular} is {factor} {target}, so {value} {plural} is {value} × {factor} = {product} {target}. "
    return ("convert", plural, value), _item(prompt, working, product, "unit_conversion")


def _uppercase(rng: random.Random) -> tuple[tuple, Item]:
    phrase = " ".join(rng.sample(WORDS, 2))
    prompt = rng.choice((f"Write '{phrase}' in capital letters.", f"Convert '{phrase}' to uppercase."))
    return ("upper", phrase), _item(prompt, "", phrase.upper(), "string")


def _reverse_order(rng: random.Random) -> tuple[tuple, Item]:
    words = rng.sample(WORDS, 3)
    prompt = f"Reverse the order of these words: {' '.join(words)}"
    return ("reverse", *words), _item(prompt, "", " ".join(reversed(words)), "string")


def _alphabetical(rng: random.Random) -> tuple[tuple, Item]:
    words = rng.sample(WORDS, 4)
    prompt = f"Sort these words alphabetically: {', '.join(words)}"
    return ("sort", *sorted(words)), _item(prompt, "", ", ".join(sorted(words)), "string")


#: Item makers by category; a category is drawn uniformly, then one of its makers.
MAKERS: dict[str, tuple[Maker, ...]] = {
    "arithmetic": (_addition, _subtraction, _multiplication, _division),
    "unit_conversion": (_conversion,),
    "string": (_uppercase, _reverse_order, _alphabetical),
}


def generate_task(count: int, seed: int = TASK_SEED) -> list[Item]:
    """``count`` distinct task items (fields prompt, response, answer, category) from ``seed``.

    Categories are drawn uniformly (see :data:`MAKERS`); an item whose content repeats an earlier one is skipped.
    """
    rng = random.Random(seed)
    categories = sorted(MAKERS)
    seen: set[tuple] = set()
    items: list[Item] = []
    while len(items) < count:
        key, item = rng.choice(MAKERS[rng.choice(categories)])(rng)
        if key not in seen:
            seen.add(key)
            items.append(item)
    return items


def task_splits(
    train_size: int = TASK_TRAIN_SIZE, test_size: int = TASK_TEST_SIZE, seed: int = TASK_SEED
) -> tuple[list[Item], list[Item]]:
    """Train and test splits cut from one generated stream (test first), hence disjoint in content.

    The test split does not depend on ``train_size``, so a smaller training set never changes the test.
    """
    items = generate_task(test_size + train_size, seed)
    return items[test_size:], items[:test_size]
