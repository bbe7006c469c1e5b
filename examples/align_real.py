"""Alignment on real weights: teach SmolLM2-135M-Instruct to answer short factual questions briefly, on this CPU.

    .venv/bin/python examples/align_real.py questions  # (re)write examples/align/questions.jsonl (deterministic)
    .venv/bin/python examples/align_real.py base       # the base model's greedy answers: lengths, key-fact rate
    .venv/bin/python examples/align_real.py pairs      # runs/align/pairs.jsonl and ppo_prompts.jsonl from them
    .venv/bin/python examples/align_real.py dpo    [-- extra `lmforge align dpo` options]
    .venv/bin/python examples/align_real.py reward [-- extra `lmforge align reward` options]
    .venv/bin/python examples/align_real.py ppo    [-- extra `lmforge align ppo` options]
    .venv/bin/python examples/align_real.py --chosen sampled|own|answer dpo ...   # which chosen side (see below)

questions: 240 short factual questions (capitals, arithmetic, colours, animals, opposites, space, days and months,
chemistry, authors, general knowledge), each with a short correct answer and the key facts (lowercase strings) an
answer must contain to count as correct. Every 4th question is held out (60, a quarter of each topic); the
other 180 are for training. base: greedy answers (96 new tokens) through the same chat rendering as
`lmforge generate --chat`; they go to examples/align/base_answers.jsonl and are the rejected side of the pairs.
The chosen side (--chosen): `sampled` (default), the shortest first sentence holding the key fact among the model's
own greedy and 3 sampled answers (`lmforge align sample`, cached in runs/align/samples.jsonl); `own`, the greedy
answer's first sentence when it holds the key, else the short answer; `answer`, the short answer.
dpo / ppo: held-out answers of the base model and of the tuned one (its merged folder), each scored by mean words,
key-fact rate, loops (a word 4-gram 3+ times) and the rule-based reward of examples/align_reward.py, plus the
answers to 5 unrelated prompts, printed for a look at coherence. reward: the reward model's pairwise accuracy from
its result.json. Results go to runs/align/ and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from align_reward import has_key, has_key_substring, reward

ROOT = Path("runs/align")
HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "align" / "questions.jsonl"
BASE_ANSWERS = HERE / "align" / "base_answers.jsonl"
LMFORGE = Path(sys.executable).parent / "lmforge"
MODEL = "smollm2-135m-instruct"
MAX_NEW = 96
HELD_OUT_EVERY = 4  # question i is held out when i % 4 == 3: 60 of 240, a quarter of each topic
UNRELATED = [
    "Write a short poem about autumn leaves.",
    "Explain to a child what a computer does.",
    "Give me three tips for sleeping better.",
    "Tell me a short story about a dog who finds a hat.",
    "What should I pack for a weekend at the beach?",
]

# ---------------------------------------------------------------------------------------------- the questions

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi|delhi"), ("Brazil", "Brasília|brasilia"),
    ("Mexico", "Mexico City|mexico city"), ("Argentina", "Buenos Aires"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Vietnam", "Hanoi"), ("the United States", "Washington, D.C.|washington"),
]

COLOURS = [  # (question, answer, keys)
    ("What colour is the sky on a clear day?", "Blue.", "blue"),
    ("What colour is fresh grass?", "Green.", "green"),
    ("What colour is fresh snow?", "White.", "white"),
    ("What colour is a ripe banana?", "Yellow.", "yellow"),
    ("What colour is coal?", "Black.", "black"),
    ("What colour is blood?", "Red.", "red"),
    ("What colour is milk?", "White.", "white"),
    ("What colour is a ripe lemon?", "Yellow.", "yellow"),
    ("What colour is milk chocolate?", "Brown.", "brown"),
    ("What colour is an emerald?", "Green.", "green"),
    ("What colour is a polar bear's fur?", "White.", "white"),
    ("What colour is a crow?", "Black.", "black"),
    ("What colour is a flamingo?", "Pink.", "pink"),
    ("What colour is a carrot?", "Orange.", "orange"),
    ("What colour is a ripe strawberry?", "Red.", "red"),
    ("What colour is a ripe pumpkin?", "Orange.", "orange"),
    ("What colour is the skin of an aubergine?", "Purple.", "purple"),
    ("What colour is a sapphire?", "Blue.", "blue"),
    ("What colour are the leaves of most trees in summer?", "Green.", "green"),
    ("What colour do you get by mixing blue and yellow paint?", "Green.", "green"),
    ("What colour do you get by mixing red and white paint?", "Pink.", "pink"),
    ("What colour do you get by mixing red and blue paint?", "Purple.", "purple|violet"),
    ("What colour do you get by mixing red and yellow paint?", "Orange.", "orange"),
    ("What colour do you get by mixing black and white paint?", "Grey.", "grey|gray"),
    ("What colour is a ruby?", "Red.", "red"),
]

ANIMALS = [
    ("How many legs does a spider have?", "Eight.", "eight|8"),
    ("How many legs does an insect have?", "Six.", "six|6"),
    ("How many legs does a dog have?", "Four.", "four|4"),
    ("How many legs does a chicken have?", "Two.", "two|2"),
    ("How many arms does an octopus have?", "Eight.", "eight|8"),
    ("What sound does a cow make?", "Moo.", "moo"),
    ("What sound does a duck make?", "Quack.", "quack"),
    ("What sound does a dog make?", "Woof.", "woof|bark"),
    ("What sound does a cat make?", "Meow.", "meow|miaow"),
    ("What sound does a sheep make?", "Baa.", "baa|bleat"),
    ("What sound does a lion make?", "A roar.", "roar"),
    ("What sound does a pig make?", "Oink.", "oink"),
    ("What sound does a horse make?", "Neigh.", "neigh|whinn"),
    ("What is a baby cat called?", "A kitten.", "kitten"),
    ("What is a baby dog called?", "A puppy.", "puppy|pup"),
    ("What is a baby cow called?", "A calf.", "calf"),
    ("What is a baby sheep called?", "A lamb.", "lamb"),
    ("What is a baby kangaroo called?", "A joey.", "joey"),
    ("What is the largest land animal?", "The African elephant.", "elephant"),
    ("What is the tallest animal?", "The giraffe.", "giraffe"),
    ("What is the fastest land animal?", "The cheetah.", "cheetah"),
    ("What is the largest animal that has ever lived?", "The blue whale.", "blue whale"),
    ("What do bees make?", "Honey.", "honey"),
    ("What do pandas mainly eat?", "Bamboo.", "bamboo"),
    ("What does a caterpillar turn into?", "A butterfly or moth.", "butterfl|moth"),
]

OPPOSITES = [
    ("hot", "Cold.", "cold"), ("up", "Down.", "down"), ("big", "Small.", "small|little"), ("fast", "Slow.", "slow"),
    ("day", "Night.", "night"), ("happy", "Sad.", "sad|unhappy"), ("open", "Closed.", "close|shut"),
    ("left", "Right.", "right"), ("black", "White.", "white"), ("wet", "Dry.", "dry"), ("tall", "Short.", "short"),
    ("full", "Empty.", "empty"), ("early", "Late.", "late"), ("push", "Pull.", "pull"), ("true", "False.", "false"),
    ("rich", "Poor.", "poor"), ("north", "South.", "south"), ("east", "West.", "west"), ("love", "Hate.", "hate"),
    ("buy", "Sell.", "sell"), ("inside", "Outside.", "outside"), ("above", "Below.", "below|beneath|under"),
    ("heavy", "Light.", "light"), ("asleep", "Awake.", "awake"), ("clean", "Dirty.", "dirty"),
]

SPACE = [
    ("Which planet is closest to the Sun?", "Mercury.", "mercury"),
    ("What is the largest planet in our solar system?", "Jupiter.", "jupiter"),
    ("Which planet is known as the Red Planet?", "Mars.", "mars"),
    ("Which planet is famous for its large rings?", "Saturn.", "saturn"),
    ("Which planet do humans live on?", "Earth.", "earth"),
    ("How many planets are in our solar system?", "Eight.", "eight|8"),
    ("What is the name of Earth's natural satellite?", "The Moon.", "moon"),
    ("What star is at the centre of our solar system?", "The Sun.", "sun"),
    ("What is the hottest planet in our solar system?", "Venus.", "venus"),
    ("Which planet is farthest from the Sun?", "Neptune.", "neptune"),
    ("What is the name of our galaxy?", "The Milky Way.", "milky way"),
    ("Which planet is second from the Sun?", "Venus.", "venus"),
    ("Which planet is fourth from the Sun?", "Mars.", "mars"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong.", "armstrong"),
    ("Which planet is third from the Sun?", "Earth.", "earth"),
]

CALENDAR = [
    ("What day comes after Monday?", "Tuesday.", "tuesday"),
    ("What day comes after Wednesday?", "Thursday.", "thursday"),
    ("What day comes after Thursday?", "Friday.", "friday"),
    ("What day comes after Saturday?", "Sunday.", "sunday"),
    ("What day comes before Friday?", "Thursday.", "thursday"),
    ("What day comes before Tuesday?", "Monday.", "monday"),
    ("What day comes before Sunday?", "Saturday.", "saturday"),
    ("What is the first month of the year?", "January.", "january"),
    ("What is the last month of the year?", "December.", "december"),
    ("Which month comes after March?", "April.", "april"),
    ("Which month comes after July?", "August.", "august"),
    ("Which month comes after September?", "October.", "october"),
    ("Which month comes after October?", "November.", "november"),
    ("Which month comes before March?", "February.", "february"),
    ("Which month comes before August?", "July.", "july"),
    ("How many days are in a week?", "Seven.", "seven|7"),
    ("How many months are in a year?", "Twelve.", "twelve|12"),
    ("How many days are in a year that is not a leap year?", "365.", "365"),
    ("How many hours are in a day?", "24.", "24|twenty-four|twenty four"),
    ("How many minutes are in an hour?", "60.", "60|sixty"),
    ("How many seconds are in a minute?", "60.", "60|sixty"),
    ("How many days does February have in a leap year?", "29.", "29|twenty-nine|twenty nine"),
    ("In which month is Christmas Day?", "December.", "december"),
    ("How many weeks are in a year?", "52.", "52|fifty-two|fifty two"),
    ("How many days are in September?", "30.", "30|thirty"),
]

CHEMISTRY = [  # symbols asked backwards: a symbol such as "au" or "fe" is a substring of common words
    ("Which chemical element has the symbol Au?", "Gold.", "gold"),
    ("Which chemical element has the symbol Ag?", "Silver.", "silver"),
    ("Which chemical element has the symbol Fe?", "Iron.", "iron"),
    ("Which chemical element has the symbol Cu?", "Copper.", "copper"),
    ("Which chemical element has the symbol Na?", "Sodium.", "sodium"),
    ("Which chemical element has the symbol K?", "Potassium.", "potassium"),
    ("Which chemical element has the symbol H?", "Hydrogen.", "hydrogen"),
    ("Which chemical element has the symbol O?", "Oxygen.", "oxygen"),
    ("Which chemical element has the symbol C?", "Carbon.", "carbon"),
    ("Which chemical element has the symbol He?", "Helium.", "helium"),
    ("Which chemical element has the symbol Hg?", "Mercury.", "mercury"),
    ("Which chemical element has the symbol Ca?", "Calcium.", "calcium"),
    ("What is the chemical formula of water?", "H2O.", "h2o|h₂o"),
    ("What gas do plants take in from the air to make food?", "Carbon dioxide.", "carbon dioxide|co2"),
    ("Which gas do humans need to breathe in to live?", "Oxygen.", "oxygen"),
]

AUTHORS = [
    ("Romeo and Juliet", "William Shakespeare.", "shakespeare"), ("Hamlet", "William Shakespeare.", "shakespeare"),
    ("Macbeth", "William Shakespeare.", "shakespeare"), ("Pride and Prejudice", "Jane Austen.", "austen"),
    ("Nineteen Eighty-Four", "George Orwell.", "orwell"), ("Animal Farm", "George Orwell.", "orwell"),
    ("Harry Potter and the Philosopher's Stone", "J. K. Rowling.", "rowling"),
    ("War and Peace", "Leo Tolstoy.", "tolstoy"), ("Don Quixote", "Miguel de Cervantes.", "cervantes"),
    ("Moby-Dick", "Herman Melville.", "melville"), ("Oliver Twist", "Charles Dickens.", "dickens"),
    ("A Christmas Carol", "Charles Dickens.", "dickens"),
    ("The Adventures of Tom Sawyer", "Mark Twain.", "twain|clemens"),
    ("Frankenstein", "Mary Shelley.", "shelley"), ("Dracula", "Bram Stoker.", "stoker"),
    ("The Hobbit", "J. R. R. Tolkien.", "tolkien"), ("The Lord of the Rings", "J. R. R. Tolkien.", "tolkien"),
    ("The Odyssey", "Homer.", "homer"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll.", "carroll|dodgson"),
    ("The Great Gatsby", "F. Scott Fitzgerald.", "fitzgerald"),
    ("Crime and Punishment", "Fyodor Dostoevsky.", "dostoevsky|dostoyevsky"),
    ("The Old Man and the Sea", "Ernest Hemingway.", "hemingway"),
    ("Charlie and the Chocolate Factory", "Roald Dahl.", "dahl"),
    ("Robinson Crusoe", "Daniel Defoe.", "defoe"), ("Treasure Island", "Robert Louis Stevenson.", "stevenson"),
]

GENERAL = [
    ("At what temperature in degrees Celsius does water boil at sea level?", "100 °C.", "100|one hundred"),
    ("How many sides does a triangle have?", "Three.", "three|3"),
    ("How many sides does a hexagon have?", "Six.", "six|6"),
    ("How many sides does an octagon have?", "Eight.", "eight|8"),
    ("How many sides does a pentagon have?", "Five.", "five|5"),
    ("Which musical instrument has 88 keys?", "The piano.", "piano"),
    ("What is the tallest mountain in the world?", "Mount Everest.", "everest"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean.", "pacific"),
    ("What language is mainly spoken in Brazil?", "Portuguese.", "portuguese"),
    ("What is the currency of Japan?", "The yen.", "yen"),
    ("How many continents are there?", "Seven.", "seven|7"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci.", "leonardo|da vinci"),
    ("Who developed the theory of relativity?", "Albert Einstein.", "einstein"),
    ("Which organ pumps blood around the body?", "The heart.", "heart"),
    ("How many letters are in the English alphabet?", "26.", "26|twenty-six|twenty six"),
    ("In which country is the Eiffel Tower?", "France.", "france"),
    ("In which country are the pyramids of Giza?", "Egypt.", "egypt"),
    ("What is the largest continent?", "Asia.", "asia"),
    ("Which organs do humans breathe with?", "The lungs.", "lung"),
    ("How many fingers are on one human hand?", "Five.", "five|5"),
]

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_keys(n: int) -> list[str]:
    """'21' -> ['21', 'twenty-one', 'twenty one'] (0..99)."""
    if n < 20:
        return [str(n), ONES[n]]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return [str(n), TENS[tens]]
    return [str(n), f"{TENS[tens]}-{ONES[ones]}", f"{TENS[tens]} {ONES[ones]}"]


def arithmetic(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """`n` sums, differences and products with results 10..99, none whose result is written in the question."""
    out: list[tuple[str, str, str]] = []
    seen = set()
    while len(out) < n:
        op = ("plus", "minus", "times")[len(out) % 3]
        if op == "plus":
            a, b = rng.randint(2, 19), rng.randint(2, 19)
            value = a + b
        elif op == "minus":
            a, b = rng.randint(12, 40), rng.randint(2, 15)
            value = a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            value = a * b
        question = f"What is {a} {op} {b}?"
        if not 10 <= value <= 99 or question in seen or str(value) in question:
            continue
        seen.add(question)
        out.append((question, f"{value}.", "|".join(number_keys(value))))
    return out


def row(prompt: str, answer: str, keys: str) -> dict:
    return {"prompt": prompt, "answer": answer, "key": list(dict.fromkeys(k.lower() for k in keys.split("|")))}


def topic_rows() -> dict[str, list[dict]]:
    """Every question, by topic (the order of questions.jsonl is these, interleaved)."""
    rng = random.Random(0)
    return {
        "capital": [row(f"What is the capital of {c}?", a.split("|")[0].removesuffix(".") + ".", a)
                    for c, a in CAPITALS],
        "arithmetic": [row(*t) for t in arithmetic(30, rng)],
        "colour": [row(*t) for t in COLOURS],
        "animal": [row(*t) for t in ANIMALS],
        "opposite": [row(f"What is the opposite of {w}?", a, k) for w, a, k in OPPOSITES],
        "space": [row(*t) for t in SPACE],
        "calendar": [row(*t) for t in CALENDAR],
        "chemistry": [row(*t) for t in CHEMISTRY],
        "author": [row(f"Who wrote {b}?", a, k) for b, a, k in AUTHORS],
        "general": [row(*t) for t in GENERAL],
    }


def build_questions() -> list[dict]:
    """The topics one after another, so that every 4th row (the held-out ones) is a quarter of each topic."""
    rows = [r for rs in topic_rows().values() for r in rs]
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate question"
    for r in rows:  # an echo of the question must not count as knowing the answer
        assert not any(k in r["prompt"].lower() for k in r["key"]), r
        assert any(k in r["answer"].lower() for k in r["key"]), r
        assert 1 <= len(r["answer"].split()) <= 6, r
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def questions() -> list[dict]:
    if not QUESTIONS.exists():
        write_jsonl(QUESTIONS, build_questions())
    return read_jsonl(QUESTIONS)


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [r for i, r in enumerate(rows) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [r for i, r in enumerate(rows) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


# ---------------------------------------------------------------------------------------------- measuring

def answer(model, tok, prompts: list[str]) -> list[tuple[str, str]]:
    """(text, finish reason) of greedy chat answers, as `lmforge generate --chat` would give them."""
    from lmforge.generate import SamplingParams, complete, encode_prompt

    ids = [encode_prompt(tok, p, chat=True) for p in prompts]
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0)
    return [(c.text.strip(), str(c.finish_reason)) for c in complete(model, tok, ids, params, max_batch=32)]


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """Does some word n-gram occur `times` times or more?"""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]


def metrics(rows: list[dict], answers: list[str]) -> dict[str, float]:
    words = [len(a.split()) for a in answers]
    n = len(rows)
    return {
        "n": n,
        "mean_words": statistics.mean(words),
        "median_words": statistics.median(words),
        "key_rate": sum(has_key(a, r["key"]) for a, r in zip(answers, rows, strict=True)) / n,
        "key_rate_substring": sum(has_key_substring(a, r["key"]) for a, r in zip(answers, rows, strict=True)) / n,
        "key_rate_first_sentence": sum(has_key(first_sentence(a), r["key"])
                                       for a, r in zip(answers, rows, strict=True)) / n,
        "loop_rate": sum(map(loops, answers)) / n,
        "mean_reward": statistics.mean(reward(a, r["key"]) for a, r in zip(answers, rows, strict=True)),
    }


COLUMNS = [("n", "{:.0f}"), ("mean_words", "{:.1f}"), ("median_words", "{:.0f}"), ("key_rate", "{:.0%}"),
           ("key_rate_substring", "{:.0%}"), ("key_rate_first_sentence", "{:.0%}"), ("loop_rate", "{:.0%}"),
           ("mean_reward", "{:+.2f}")]
HEADERS = {"n": "n", "mean_words": "mean words", "median_words": "median", "key_rate": "key fact",
           "key_rate_substring": "as substring", "key_rate_first_sentence": "key in 1st sentence",
           "loop_rate": "loops", "mean_reward": "reward"}


def table(lines: list[tuple[str, dict[str, float]]]) -> str:
    width = max(len(name) for name, _ in lines) + 2
    head = " " * width + "  ".join(f"{HEADERS[c]:>{max(len(HEADERS[c]), 6)}}" for c, _ in COLUMNS)
    body = [f"{name:<{width}}" + "  ".join(f"{fmt.format(m[c]):>{max(len(HEADERS[c]), 6)}}" for c, fmt in COLUMNS)
            for name, m in lines]
    return "\n".join([head, *body])


def length_histogram(answers: list[str]) -> str:
    bins = [(1, 5), (6, 10), (11, 20), (21, 40), (41, 60), (61, 80), (81, 999)]
    words = [len(a.split()) for a in answers]
    out = []
    for lo, hi in bins:
        k = sum(lo <= w <= hi for w in words)
        label = f"{lo}-{hi}" if hi < 999 else f"{lo}+"
        out.append(f"  {label:>6} words {k:4d} {k / len(words):5.0%} {'#' * round(50 * k / len(words))}")
    q = statistics.quantiles(words, n=10)
    out.append(f"  min {min(words)}, p10 {q[0]:.0f}, p25 {statistics.quantiles(words, n=4)[0]:.0f}, median "
               f"{statistics.median(words):.0f}, p75 {statistics.quantiles(words, n=4)[2]:.0f}, p90 {q[8]:.0f}, "
               f"max {max(words)}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- subcommands

def run_questions(args: argparse.Namespace) -> None:
    rows = build_questions()
    write_jsonl(QUESTIONS, rows)
    train, held = split(rows)
    print(f"{QUESTIONS}: {len(rows)} questions ({len(train)} train, {len(held)} held out)")


def base_answers(model=None, tok=None) -> dict[str, str]:
    """The base model's greedy answer to every question: from examples/align/base_answers.jsonl, else generated."""
    rows = questions()
    if BASE_ANSWERS.exists():
        have = {r["prompt"]: r["response"] for r in read_jsonl(BASE_ANSWERS)}
        if all(r["prompt"] in have for r in rows):
            return have
    if model is None:
        from lmforge.weights.load import load

        model, tok = load(MODEL)
    texts = answer(model, tok, [r["prompt"] for r in rows])
    write_jsonl(BASE_ANSWERS, [{"prompt": r["prompt"], "response": t} for r, (t, _) in zip(rows, texts, strict=True)])
    return {r["prompt"]: t for r, (t, _) in zip(rows, texts, strict=True)}


CHOSEN = "sampled"  # set by --chosen


def chosen_answer(r: dict, base: str, sampled: dict[str, str]) -> str | None:
    """The chosen side of a question's pair, or None for no pair.
    sampled (the default): the shortest first sentence holding the key fact among the model's own answers (greedy
    and 3 sampled, `lmforge align sample`): on-policy, the model keeps its own way of saying it ("The capital of
    Greece is Athens.") and learns to stop there; no pair when no answer of its holds the fact, or when the
    greedy answer is that sentence already.
    own: the greedy answer's first sentence when it holds the key, else the reference short answer.
    answer: always the reference short answer ("Athens.")."""
    first = first_sentence(base)
    if CHOSEN == "sampled":
        best = sampled.get(r["prompt"])
        return best if best is not None and best.strip() != base.strip() else None
    if CHOSEN == "own" and has_key(first, r["key"]):
        return first if len(first.split()) < len(base.split()) else None
    return r["answer"] if base.strip() != r["answer"] else None


def sampled_sentences(train: list[dict]) -> dict[str, str]:
    """Question -> the shortest correct first sentence among the model's own answers (sampled once, cached)."""
    prompts = write_jsonl(ROOT / "train_prompts.jsonl", [{"prompt": r["prompt"]} for r in train])
    path = ROOT / "samples.jsonl"
    if not path.exists():
        lmforge(["align", "sample", "--model", MODEL, "--prompts", str(prompts), "--n", "4", "--out", str(path),
                 "--max-new-tokens", "48", "--temperature", "0.8"])
    keys = {r["prompt"]: r["key"] for r in train}
    best: dict[str, str] = {}
    for row in read_jsonl(path):
        first = first_sentence(row["response"])
        if row["prompt"] in keys and has_key(first, keys[row["prompt"]]):
            if row["prompt"] not in best or len(first.split()) < len(best[row["prompt"]].split()):
                best[row["prompt"]] = first
    return best


def build_pairs() -> tuple[Path, Path]:
    """runs/align/pairs.jsonl (train questions: a short correct answer chosen (see chosen_answer), the base
    model's own answer rejected), the same for the held-out questions (pairs_heldout.jsonl, never trained on) and
    ppo_prompts.jsonl (train questions)."""
    rows = questions()
    have = base_answers()
    train, held = split(rows)

    sampled = sampled_sentences(train) if CHOSEN == "sampled" else {}

    def pairs(rs: list[dict], reference: bool = False) -> list[dict]:
        out = []
        for r in rs:
            base = have[r["prompt"]]
            if reference:  # held out, never sampled: the reference short answer is the chosen side
                chosen = r["answer"] if base.strip() != r["answer"] else None
            else:
                chosen = chosen_answer(r, base, sampled)
            if chosen is not None:
                out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": base})
        return out

    data = write_jsonl(ROOT / "pairs.jsonl", pairs(train))
    write_jsonl(ROOT / "pairs_heldout.jsonl", pairs(held, reference=CHOSEN == "sampled"))
    prompts = write_jsonl(ROOT / "ppo_prompts.jsonl", [{"prompt": r["prompt"]} for r in train])
    return data, prompts


def run_base(args: argparse.Namespace) -> None:
    from lmforge.weights.load import load

    rows = questions()
    train, held = split(rows)
    model, tok = load(MODEL)
    start = time.time()
    texts = answer(model, tok, [r["prompt"] for r in rows])
    minutes = (time.time() - start) / 60
    write_jsonl(BASE_ANSWERS, [{"prompt": r["prompt"], "response": t} for r, (t, _) in zip(rows, texts, strict=True)])
    unrelated = answer(model, tok, UNRELATED)
    write_jsonl(ROOT / "base_unrelated.jsonl", [{"prompt": p, "response": t}
                                                for p, (t, _) in zip(UNRELATED, unrelated, strict=True)])
    by_prompt = {r["prompt"]: t for r, (t, _) in zip(rows, texts, strict=True)}
    held_prompts = {r["prompt"] for r in held}
    answers = [t for t, _ in texts]
    truncated = sum(f == "length" for _, f in texts) / len(texts)
    topics = {t: [r["prompt"] for r in rs] for t, rs in topic_rows().items()}
    lines = [("all", metrics(rows, answers)), ("train", metrics(train, [by_prompt[r["prompt"]] for r in train])),
             ("held out", metrics(held, [by_prompt[r["prompt"]] for r in held]))]
    by_topic = []
    for name, prompts in topics.items():
        rs = [r for r in rows if r["prompt"] in prompts]
        by_topic.append((name, metrics(rs, [by_prompt[r["prompt"]] for r in rs])))
    data, _ = build_pairs()
    report = {"model": MODEL, "max_new_tokens": MAX_NEW, "minutes": minutes, "truncated": truncated,
              **{name: m for name, m in lines}, "by_topic": dict(by_topic),
              "answers": [{"prompt": r["prompt"], "held_out": r["prompt"] in held_prompts, "response": t,
                           "finish_reason": f, "words": len(t.split()), "key": has_key(t, r["key"]),
                           "loops": loops(t)} for r, (t, f) in zip(rows, texts, strict=True)]}
    (ROOT / "base.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"{MODEL}, greedy, {MAX_NEW} new tokens, chat-rendered; {len(rows)} questions in {minutes:.1f} min; "
          f"{truncated:.0%} of answers stopped by the token limit\n")
    print(table(lines))
    print("\nby topic (all questions):")
    print(table(by_topic))
    print("\nanswer length, all questions:")
    print(length_histogram(answers))
    print("answer length, held out:")
    print(length_histogram([by_prompt[r["prompt"]] for r in held]))
    print(f"\n{len(read_jsonl(data))} training pairs in {data}; base answers in {BASE_ANSWERS}")
    for r in held[:6]:
        print(f"  {r['prompt']!r} (key {r['key']})\n    {by_prompt[r['prompt']]!r}")


def run_pairs(args: argparse.Namespace) -> None:
    data, prompts = build_pairs()
    print(f"{data}: {len(read_jsonl(data))} pairs; {ROOT / 'pairs_heldout.jsonl'}: "
          f"{len(read_jsonl(ROOT / 'pairs_heldout.jsonl'))}; {prompts}: {len(read_jsonl(prompts))} prompts")


def lmforge(args: list[str]) -> float:
    """Run `lmforge ...` from the repository root (so that `examples.align_reward` imports); minutes taken."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    print("$ lmforge " + " ".join(args), flush=True)
    start = time.time()
    subprocess.run([str(LMFORGE), *args], check=True, env=env)
    return (time.time() - start) / 60


def before_after(tuned_dir: Path, minutes: float, what: str) -> None:
    """Held-out and unrelated-prompt answers of the base model vs the tuned one; table and answers printed."""
    from lmforge.weights.load import load

    rows = questions()
    _, held = split(rows)
    base = base_answers()
    before = [base[r["prompt"]] for r in held]
    cached = ROOT / "base_unrelated.jsonl"
    if cached.exists() and [r["prompt"] for r in read_jsonl(cached)] == UNRELATED:
        before_unrelated = [r["response"] for r in read_jsonl(cached)]
    else:
        model, tok = load(MODEL)
        before_unrelated = [t for t, _ in answer(model, tok, UNRELATED)]
        del model
    tuned, tok = load(tuned_dir)
    after_all = [t for t, _ in answer(tuned, tok, [r["prompt"] for r in held] + UNRELATED)]
    after, after_unrelated = after_all[:len(held)], after_all[len(held):]
    result = {"before": metrics(held, before), "after": metrics(held, after), "minutes": minutes,
              "answers": [{"prompt": r["prompt"], "before": b, "after": a}
                          for r, b, a in zip(held, before, after, strict=True)],
              "unrelated": [{"prompt": p, "before": b, "after": a}
                            for p, b, a in zip(UNRELATED, before_unrelated, after_unrelated, strict=True)]}
    (ROOT / f"{what}_eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"\n{what}: held-out {len(held)} questions, greedy, {MAX_NEW} new tokens, chat-rendered; "
          f"training took {minutes:.1f} min")
    print(table([("base", result["before"]), (what, result["after"])]))
    print("\nheld-out examples:")
    for r, b, a in list(zip(held, before, after, strict=True))[:6]:
        print(f"  {r['prompt']!r} (key {r['key']})\n    before: {b!r}\n    after:  {a!r}")
    print("\nunrelated prompts (coherence):")
    for p, b, a in zip(UNRELATED, before_unrelated, after_unrelated, strict=True):
        print(f"  {p!r}\n    before ({len(b.split())} words{', LOOPS' if loops(b) else ''}): {b!r}\n"
              f"    after  ({len(a.split())} words{', LOOPS' if loops(a) else ''}): {a!r}")


def run_dpo(args: argparse.Namespace) -> None:
    data, _ = build_pairs()
    out = ROOT / f"dpo-{CHOSEN}"
    minutes = lmforge(["align", "dpo", "--model", MODEL, "--data", str(data), "--val-data",
                       str(ROOT / "pairs_heldout.jsonl"), "--out", str(out), "--merge", *args.extra])
    before_after(out / "merged", minutes, f"dpo-{CHOSEN}")


def run_reward(args: argparse.Namespace) -> None:
    data, _ = build_pairs()
    out = ROOT / f"rm-{CHOSEN}"
    minutes = lmforge(["align", "reward", "--model", MODEL, "--data", str(data), "--val-data",
                       str(ROOT / "pairs_heldout.jsonl"), "--out", str(out), *args.extra])
    result = json.loads((out / "result.json").read_text())
    print(f"\nreward model on {MODEL}, {len(read_jsonl(data))} training pairs; training took {minutes:.1f} min")
    print(f"held-out pairwise accuracy (chosen scored above rejected): {result['accuracy']:.1%} (chance 50%)")
    rest = {k: v for k, v in result.items() if k != "accuracy" and isinstance(v, int | float | str)}
    if rest:
        print("result.json also says: " + ", ".join(f"{k}={v}" for k, v in rest.items()))


def run_ppo(args: argparse.Namespace) -> None:
    _, prompts = build_pairs()
    out = ROOT / "ppo"
    minutes = lmforge(["align", "ppo", "--model", MODEL, "--reward", "examples.align_reward:short_and_correct",
                       "--prompts", str(prompts), "--out", str(out), "--merge", *args.extra])
    before_after(out / "merged", minutes, "ppo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chosen", choices=["sampled", "own", "answer"], default="sampled",
                    help="the chosen side of a pair: the model's own shortest correct first sentence (sampled), the "
                    "greedy answer's first sentence when right (own), or the reference short answer (answer)")
    ap.add_argument("task", choices=["questions", "base", "pairs", "dpo", "reward", "ppo"])
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: passed on to `lmforge align <task>`")
    args = ap.parse_args()
    global CHOSEN
    CHOSEN = args.chosen
    if args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    ROOT.mkdir(parents=True, exist_ok=True)
    {"questions": run_questions, "base": run_base, "pairs": run_pairs, "dpo": run_dpo, "reward": run_reward,
     "ppo": run_ppo}[args.task](args)


if __name__ == "__main__":
    main()
