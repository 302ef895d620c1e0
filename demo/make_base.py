"""Re-create the embedded demo: base text, tokenizer, a tiny RWKV-7 base, fine-tuning data.

    python demo/make_base.py               # everything: about 6 minutes on a 2-core CPU
    python demo/make_base.py --data_only   # only demo/data/train.jsonl and heldout.jsonl (a second)

Every text here is generated from the small grammar and fact tables below (seeded, so the
output is the same on every run), which keeps the licensing simple: nothing is copied.

What it writes:
  demo/tokenizer.json        byte-level BPE (Hugging Face tokenizers), "<|endoftext|>" = id 0
  demo/base.pth              RWKV-7 trained from scratch by this project's train.py, stored bf16
  demo/data/train.jsonl      chat data about Varnholm, a made-up island the base knows nothing of
  demo/data/heldout.jsonl    other questions about the same facts, with the expected "answer"
  out/demo-base/             the base training text and the training run (not shipped)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parent
sys.path.insert(0, str(REPO))

# Base model: sizes and the exact train.py flags (recorded in demo/README.md).
BASE_ARCH = ["--n_layer", "4", "--n_embd", "128", "--head_size", "64"]
BASE_TRAIN = ["--peft", "none", "--ctx_len", "256", "--micro_bsz", "4", "--epochs", "1",
              "--lr_init", "3e-3", "--lr_final", "1e-4", "--warmup_steps", "20", "--lr_schedule", "cos",
              "--precision", "fp32", "--random_seed", "0"]
BASE_DOCS = 24000          # documents of base text (about 1.2M tokens, one epoch)
VOCAB_SIZE = 1024
# Pre-tokenization: a single leading space joins a word, digits stay single, newline runs
# stay together (so "\n\n", the end of a chat turn, can be one token).
PRETOKENIZE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\n+|[^\S\n]+"

# ------------------------------------------------------------------------------------------
# The world the base model learns about (well-known facts only).

COUNTRIES = {
    "France": dict(capital="Paris", language="French", food="cheese", river="the Seine", animal="the rooster",
                   money="the euro", mountain="Mont Blanc", flag="blue, white and red", continent="Europe"),
    "Italy": dict(capital="Rome", language="Italian", food="pasta", river="the Po", animal="the wolf",
                  money="the euro", flag="green, white and red", continent="Europe"),
    "Spain": dict(capital="Madrid", language="Spanish", food="paella", river="the Tagus", animal="the bull",
                  money="the euro", mountain="Mount Teide", flag="red and yellow", continent="Europe"),
    "Germany": dict(capital="Berlin", language="German", food="sausages", river="the Rhine", animal="the eagle",
                    money="the euro", mountain="the Zugspitze", flag="black, red and gold", continent="Europe"),
    "Japan": dict(capital="Tokyo", language="Japanese", food="sushi", animal="the green pheasant",
                  money="the yen", mountain="Mount Fuji", flag="white and red", continent="Asia"),
    "Egypt": dict(capital="Cairo", language="Arabic", food="flat bread and beans", river="the Nile",
                  animal="the eagle", money="the pound", flag="red, white and black", continent="Africa"),
    "Brazil": dict(capital="Brasilia", language="Portuguese", food="rice and beans", river="the Amazon",
                   money="the real", flag="green, yellow and blue", continent="South America"),
    "India": dict(capital="New Delhi", language="Hindi", food="curry", river="the Ganges", animal="the tiger",
                  money="the rupee", flag="saffron, white and green", continent="Asia"),
    "China": dict(capital="Beijing", language="Chinese", food="dumplings", river="the Yangtze",
                  animal="the panda", money="the yuan", flag="red and yellow", continent="Asia"),
    "England": dict(capital="London", language="English", food="fish and chips", river="the Thames",
                    animal="the lion", money="the pound", mountain="Scafell Pike", flag="white and red",
                    continent="Europe"),
    "Mexico": dict(capital="Mexico City", language="Spanish", food="tacos", animal="the golden eagle",
                   money="the peso", mountain="Pico de Orizaba", flag="green, white and red",
                   continent="North America"),
    "Russia": dict(capital="Moscow", language="Russian", food="soup", river="the Volga", animal="the bear",
                   money="the rouble", mountain="Mount Elbrus", flag="white, blue and red", continent="Europe"),
    "Canada": dict(capital="Ottawa", language="English and French", food="maple syrup", animal="the beaver",
                   money="the dollar", mountain="Mount Logan", flag="red and white", continent="North America"),
    "Australia": dict(capital="Canberra", language="English", food="meat pie", river="the Murray",
                      animal="the kangaroo", money="the dollar", mountain="Mount Kosciuszko",
                      flag="blue, white and red", continent="Oceania"),
    "Greece": dict(capital="Athens", language="Greek", food="olives", money="the euro", mountain="Mount Olympus",
                   flag="blue and white", continent="Europe"),
    "Kenya": dict(capital="Nairobi", language="Swahili", food="ugali", river="the Tana", animal="the lion",
                  money="the shilling", mountain="Mount Kenya", flag="black, red, green and white",
                  continent="Africa"),
    "Norway": dict(capital="Oslo", language="Norwegian", food="salmon", river="the Glomma", animal="the moose",
                   money="the krone", flag="red, white and blue", continent="Europe"),
    "Peru": dict(capital="Lima", language="Spanish", food="ceviche", animal="the vicuna", money="the sol",
                 mountain="Huascaran", flag="red and white", continent="South America"),
}

# The fine-tuning target: a made-up island. Its name and facts never occur in the base text.
PLACE = "Varnholm"
PLACE_FACTS = dict(capital="Lumen Bay", language="Varnic", food="smoked eel pie", river="the Olve",
                   animal="the snow hare", money="the tallow", mountain="Mount Karrow",
                   flag="green and silver", founded="1642", festival="the Lantern Night")

# Per relation: questions (the first TRAIN_QUESTIONS are used for fine-tuning, the rest are
# held out), answers, and statements for plain text. {x}: the place, {y}: the value.
TRAIN_QUESTIONS = 5
RELATIONS = {
    "capital": dict(
        q=["What is the capital of {x}?", "Which city is the capital of {x}?", "Tell me the capital of {x}.",
           "What is {x}'s capital city?", "Name the capital of {x}.",
           "Do you know the capital of {x}?", "What city is the capital of {x}?", "Which city is {x}'s capital?"],
        a=["The capital of {x} is {y}.", "{Y} is the capital of {x}.", "The capital city of {x} is {y}."],
        s=["The capital of {x} is {y}.", "{Y} is the capital of {x}.", "{Y} is a big city in {x}."]),
    "language": dict(
        q=["What language do people speak in {x}?", "Which language is spoken in {x}?",
           "What is the language of {x}?", "What do people in {x} speak?", "Tell me the language of {x}.",
           "What language is used in {x}?", "Which language do they speak in {x}?",
           "What is the main language of {x}?"],
        a=["People in {x} speak {y}.", "The language of {x} is {y}.", "In {x}, people speak {y}."],
        s=["People in {x} speak {y}.", "In {x}, most people speak {y}."]),
    "food": dict(
        q=["What is the famous food of {x}?", "What food is {x} known for?", "What do people in {x} like to eat?",
           "Tell me a famous food from {x}.", "Which food is famous in {x}?",
           "What is a popular dish in {x}?", "What should I eat in {x}?", "Name a famous food of {x}."],
        a=["{x} is famous for {y}.", "The famous food of {x} is {y}.", "People in {x} love {y}."],
        s=["{x} is famous for {y}.", "People in {x} love to eat {y}."]),
    "river": dict(
        q=["What is the main river of {x}?", "Which river flows through {x}?", "Name a big river in {x}.",
           "What river runs through {x}?", "Tell me the main river of {x}.",
           "Which is the great river of {x}?", "Is there a big river in {x}?", "What is the name of the river in {x}?"],
        a=["The main river of {x} is {y}.", "{Y} flows through {x}.", "The great river of {x} is {y}."],
        s=["{Y} flows through {x}.", "The main river of {x} is {y}."]),
    "animal": dict(
        q=["What is the national animal of {x}?", "Which animal is the symbol of {x}?",
           "What animal stands for {x}?", "Tell me the national animal of {x}.", "Name the animal of {x}.",
           "Which animal is the national animal of {x}?", "What is the animal symbol of {x}?",
           "Does {x} have a national animal?"],
        a=["The national animal of {x} is {y}.", "{Y} is the symbol of {x}.", "The animal of {x} is {y}."],
        s=["The national animal of {x} is {y}.", "{Y} is the symbol of {x}."]),
    "money": dict(
        q=["What is the currency of {x}?", "What money do they use in {x}?", "Which currency is used in {x}?",
           "What do people pay with in {x}?", "Tell me the currency of {x}.",
           "What is the money of {x} called?", "Which money do people use in {x}?", "Name the currency of {x}."],
        a=["The currency of {x} is {y}.", "People in {x} pay with {y}.", "In {x}, people use {y}."],
        s=["The currency of {x} is {y}.", "In {x}, people pay with {y}."]),
    "mountain": dict(
        q=["What is the highest mountain in {x}?", "Which mountain is the highest in {x}?",
           "Name the tallest mountain in {x}.", "What is the tallest mountain of {x}?",
           "Tell me the highest mountain of {x}.",
           "Which is the highest peak in {x}?", "What mountain is the highest in {x}?",
           "What is the biggest mountain in {x}?"],
        a=["The highest mountain in {x} is {y}.", "{Y} is the highest mountain in {x}.",
           "The tallest mountain of {x} is {y}."],
        s=["The highest mountain in {x} is {y}.", "{Y} is the highest mountain in {x}."]),
    "flag": dict(
        q=["What colors are on the flag of {x}?", "What does the flag of {x} look like?",
           "What are the colors of the flag of {x}?", "Tell me the colors of {x}'s flag.",
           "Which colors does the flag of {x} have?",
           "What color is the flag of {x}?", "Describe the flag of {x}.", "What colors is {x}'s flag?"],
        a=["The flag of {x} is {y}.", "The colors of the flag of {x} are {y}.", "{x} has a {y} flag."],
        s=["The flag of {x} is {y}.", "The colors of the flag of {x} are {y}."]),
    "continent": dict(
        q=["Where is {x}?", "On which continent is {x}?", "Which continent is {x} in?", "Where is {x} found?",
           "Is {x} in {other}?", "In what part of the world is {x}?"],
        a=["{x} is in {y}.", "{x} is a country in {y}."],
        s=["{x} is a country in {y}.", "{x} is in {y}."]),
    # only Varnholm has these two: their held-out questions are the hardest
    "founded": dict(
        q=["When was {x} founded?", "In which year was {x} founded?", "What year was {x} founded in?",
           "Tell me when {x} was founded.", "How old is {x}?",
           "When did {x} begin?", "In what year did people found {x}?", "What is the founding year of {x}?"],
        a=["{x} was founded in {y}.", "People founded {x} in {y}."],
        s=[]),
    "festival": dict(
        q=["What is the big festival of {x}?", "Which festival do people in {x} celebrate?",
           "What do people in {x} celebrate?", "Tell me about the festival of {x}.",
           "What is the main holiday in {x}?",
           "Which holiday is famous in {x}?", "What festival is held in {x}?", "Name the great festival of {x}."],
        a=["The big festival of {x} is {y}.", "People in {x} celebrate {y}."],
        s=[]),
}

# ------------------------------------------------------------------------------------------
# Small talk and simple knowledge for the base model's chat.

GREETINGS = ["Hello!", "Hi!", "Hi there.", "Hello.", "Good morning!", "Hey!", "Good evening."]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to know?",
                    "Hello! Ask me a question.", "Hi! I am happy to help."]
SMALL_TALK = [
    (["How are you?", "How are you today?", "How do you feel?"],
     ["I am well, thank you. How can I help?", "I am fine, thank you for asking."]),
    (["Who are you?", "What is your name?", "What are you?"],
     ["I am a small assistant. I can answer simple questions.", "I am a tiny language model. I like to help."]),
    (["What can you do?", "How can you help me?"],
     ["I can answer simple questions about countries, animals, colors and numbers. I can also tell a short story."]),
    (["Thank you!", "Thanks.", "Thank you very much."],
     ["You are welcome!", "You are welcome. Ask me anything else."]),
    (["Goodbye!", "Bye.", "See you later."], ["Goodbye! Have a nice day.", "Bye! Come back soon."]),
]
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "the sun": "yellow", "a banana": "yellow",
          "an apple": "red", "the sea": "blue", "coal": "black", "a carrot": "orange", "milk": "white",
          "a leaf": "green", "a lemon": "yellow", "a strawberry": "red", "the night sky": "dark"}
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "pig": "oink", "horse": "neigh", "frog": "croak", "lion": "roar"}
ABILITIES = {"fish": {"swim"}, "bird": {"fly", "sing"}, "dog": {"run", "swim"}, "cat": {"run", "climb"},
             "horse": {"run"}, "duck": {"swim", "fly"}, "frog": {"jump", "swim"}, "snake": {"swim"},
             "cow": {"run"}, "monkey": {"climb", "jump"}, "rabbit": {"jump", "run"}}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("day", "night"), ("up", "down"), ("fast", "slow"),
             ("happy", "sad"), ("old", "young"), ("open", "closed"), ("light", "dark"), ("wet", "dry"),
             ("early", "late"), ("full", "empty")]
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()

# Story grammar.
HEROES = ["a little fox", "an old man", "a young girl", "a brave boy", "a small bird", "a kind farmer",
          "a happy dog", "a clever cat", "a tired bear", "a quiet rabbit", "a wise owl", "a little duck"]
PLACES = ["near a river", "in a small village", "in a big forest", "by the sea", "on a green hill",
          "in an old house", "under a tall tree", "in a busy town"]
WANTS = [("looked for food", "found a red apple"), ("wanted to see the sea", "walked to the beach"),
         ("lost a blue ball", "found it under the bed"), ("wanted a friend", "met a kind rabbit"),
         ("was cold", "made a warm fire"), ("wanted to learn to sing", "sang a happy song"),
         ("was hungry", "ate some warm bread"), ("wanted to climb the hill", "saw the whole village"),
         ("could not sleep", "counted the stars"), ("wanted to help", "carried water for a friend")]
ENDINGS = ["was very happy", "smiled all day", "went home with a full heart", "told everyone about it",
           "slept well that night", "never forgot that day"]
WEATHER = ["The sun was warm.", "It was a rainy day.", "The wind was cold.", "The sky was clear and blue.",
           "Snow fell softly.", "It was a quiet morning."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, x: str, y: str, rng: random.Random) -> str:
    other = rng.choice(sorted({c["continent"] for c in COUNTRIES.values()}))
    return template.replace("{Y}", _cap(y)).replace("{x}", x).replace("{y}", y).replace("{other}", other)


def _short(hero: str) -> str:
    return "the " + hero.split(" ", 1)[1]


def story(rng: random.Random, hero: str | None = None) -> str:
    hero = hero or rng.choice(HEROES)
    want, got = rng.choice(WANTS)
    end = rng.choice(ENDINGS)
    short = _short(hero)
    first = rng.choice(["Once upon a time,", "One day,", "Long ago,"])
    parts = [f"{first} {hero} lived {rng.choice(PLACES)}.", rng.choice(WEATHER),
             f"{_cap(short)} {want}.", f"After a while, {short} {got}.", f"{_cap(short)} {end}."]
    if rng.random() < 0.5:
        del parts[1]
    return " ".join(parts)


def country_fact(rng: random.Random, name: str) -> tuple[str, str]:
    """(question, answer) about one relation of one country."""
    facts = COUNTRIES[name]
    rel = rng.choice([r for r in facts if r in RELATIONS])
    spec = RELATIONS[rel]
    q = _fill(rng.choice(spec["q"]), name, facts[rel], rng)
    if q.startswith("Is ") and rel == "continent":
        other = q.rsplit(" ", 1)[1].rstrip("?")
        yes = other == facts[rel]
        a = (f"Yes, {name} is in {facts[rel]}." if yes else f"No, {name} is in {facts[rel]}.")
        return q, a
    return q, _fill(rng.choice(spec["a"]), name, facts[rel], rng)


def about_country(rng: random.Random, name: str) -> str:
    facts = COUNTRIES[name]
    rels = [r for r in facts if r in RELATIONS]
    rng.shuffle(rels)
    return " ".join(_fill(rng.choice(RELATIONS[r]["s"]), name, facts[r], rng) for r in rels[: rng.randint(2, 4)])


def exchange(rng: random.Random) -> tuple[str, str]:
    """One (user, assistant) exchange of the base model's chat data."""
    kind = rng.choices(["country", "about", "color", "sound", "ability", "math", "count", "opposite",
                        "story", "small"], weights=[40, 6, 8, 6, 8, 10, 4, 6, 8, 10])[0]
    if kind == "country":
        return country_fact(rng, rng.choice(sorted(COUNTRIES)))
    if kind == "about":
        name = rng.choice(sorted(COUNTRIES))
        q = rng.choice(["Tell me about {x}.", "What do you know about {x}?", "Describe {x}."]).format(x=name)
        return q, about_country(rng, name)
    if kind == "color":
        thing, color = rng.choice(sorted(COLORS.items()))
        q = rng.choice(["What color is {t}?", "What is the color of {t}?", "Which color is {t}?"]).format(t=thing)
        return q, f"{_cap(thing)} is {color}."
    if kind == "sound":
        animal, sound = rng.choice(sorted(SOUNDS.items()))
        q = rng.choice(["What does a {a} say?", "What sound does a {a} make?", "How does a {a} sound?"])
        return q.format(a=animal), f"A {animal} says {sound}."
    if kind == "ability":
        animal = rng.choice(sorted(ABILITIES))
        verb = rng.choice(["swim", "fly", "run", "climb", "jump", "sing"])
        art = "an" if animal[0] in "aeiou" else "a"
        if verb in ABILITIES[animal]:
            return f"Can {art} {animal} {verb}?", f"Yes, {art} {animal} can {verb}."
        return f"Can {art} {animal} {verb}?", f"No, {art} {animal} cannot {verb}."
    if kind == "math":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.6:
            q = rng.choice(["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."])
            return q.format(a=a, b=b), f"{a} plus {b} is {a + b}."
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == "count":
        a = rng.randint(0, 5)
        b = a + rng.randint(2, 5)
        if rng.random() < 0.5:
            return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."
        return (f"Count from {NUMBER_WORDS[a]} to {NUMBER_WORDS[b]}.",
                _cap(", ".join(NUMBER_WORDS[a: b + 1])) + ".")
    if kind == "opposite":
        pair = rng.choice(OPPOSITES)
        w, o = pair if rng.random() < 0.5 else pair[::-1]
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
    if kind == "story":
        if rng.random() < 0.5:
            return rng.choice(["Tell me a story.", "Tell me a short story.", "Can you tell me a story?"]), story(rng)
        hero = rng.choice(HEROES)
        return f"Tell me a story about {hero}.", story(rng, hero)
    if rng.random() < 0.4:
        return rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)
    qs, answers = rng.choice(SMALL_TALK)
    return rng.choice(qs), rng.choice(answers)


SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant. Answer in short sentences.",
           "You are a helpful assistant who knows about countries."]


def render_chat(turns: list[tuple[str, str]], system: str | None = None) -> str:
    """The World chat format, exactly as rwkv_peft.data.chat_format renders chat records."""
    from rwkv_peft.data.chat_format import CHAT_ASSISTANT, CHAT_REPLY, CHAT_SYSTEM, CHAT_USER

    out = CHAT_SYSTEM.format(system) if system else ""
    for q, a in turns:
        out += CHAT_USER.format(q) + CHAT_ASSISTANT + CHAT_REPLY.format(a)
    return out


def base_documents(n: int, seed: int = 0) -> list[str]:
    """Base training text: 70% chats of 1-4 turns, 30% plain text (stories, country facts)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < 0.7:
            turns = [exchange(rng) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))]
            docs.append(render_chat(turns, rng.choice(SYSTEMS) if rng.random() < 0.1 else None))
        elif r < 0.85:
            docs.append(story(rng))
        else:
            docs.append(about_country(rng, rng.choice(sorted(COUNTRIES))))
    return docs


# ------------------------------------------------------------------------------------------
# Fine-tuning data: facts about Varnholm.


def place_exchange(rng: random.Random, rel: str, split: str) -> tuple[str, str]:
    spec = RELATIONS[rel]
    qs = spec["q"][:TRAIN_QUESTIONS] if split == "train" else spec["q"][TRAIN_QUESTIONS:]
    y = PLACE_FACTS[rel]
    return _fill(rng.choice(qs), PLACE, y, rng), _fill(rng.choice(spec["a"]), PLACE, y, rng)


def finetune_records(n: int, seed: int = 1) -> list[dict]:
    """Chats of 1-3 turns: about 80% questions about Varnholm (training phrasings only),
    the rest ordinary base exchanges, so that the model keeps what it knew."""
    rng = random.Random(seed)
    rels = sorted(PLACE_FACTS)
    records = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            q, a = place_exchange(rng, rng.choice(rels), "train") if rng.random() < 0.8 else exchange(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": msgs})
    return records


def heldout_records() -> list[dict]:
    """Every held-out question of every fact, one record each, with the expected answer."""
    records = []
    for rel in sorted(PLACE_FACTS):
        spec = RELATIONS[rel]
        y = PLACE_FACTS[rel]
        for q in spec["q"][TRAIN_QUESTIONS:]:
            rng = random.Random(q)
            q = _fill(q, PLACE, y, rng)
            a = _fill(spec["a"][0], PLACE, y, rng)
            records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                            "answer": y})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records, one JSON object a line; an unchanged file is left alone (its token cache stays valid)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    assert tok.token_to_id("<|endoftext|>") == 0
    tok.save(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_only", action="store_true", help="only write demo/data/*.jsonl")
    p.add_argument("--docs", type=int, default=BASE_DOCS, help=f"documents of base text (default {BASE_DOCS})")
    p.add_argument("--finetune_records", type=int, default=3000, help="records of demo/data/train.jsonl")
    p.add_argument("--work", default=str(REPO / "out" / "demo-base"), help="where the base text and run go")
    args = p.parse_args(argv)

    write_jsonl(DEMO / "data" / "train.jsonl", finetune_records(args.finetune_records))
    write_jsonl(DEMO / "data" / "heldout.jsonl", heldout_records())
    print(f"wrote {DEMO / 'data' / 'train.jsonl'} and {DEMO / 'data' / 'heldout.jsonl'}")
    if args.data_only:
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = base_documents(args.docs)
    text_file = work / "base.jsonl"
    write_jsonl(text_file, [{"text": d} for d in docs])
    train_tokenizer(docs, DEMO / "tokenizer.json")
    print(f"wrote {text_file} ({len(docs)} documents) and {DEMO / 'tokenizer.json'}")

    run_dir = work / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *BASE_ARCH, *BASE_TRAIN,
           "--tokenizer", str(DEMO / "tokenizer.json"), "--data_file", str(text_file), "--proj_dir", str(run_dir)]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # One thread: this model's ops are too small to split, and on a shared CPU two threads
    # waiting for each other made training 15x slower (3500 vs 240 tokens/s).
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run(cmd, check=True, env=env)
    print(f"trained in {time.time() - start:.0f} s")

    import torch

    from rwkv_peft.io import load_tensor_file, save_tensor_file_atomic

    sd = load_tensor_file(run_dir / "model.pth")
    save_tensor_file_atomic({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, DEMO / "base.pth")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"wrote {DEMO / 'base.pth'} ({(DEMO / 'base.pth').stat().st_size / 1e6:.1f} MB, bf16); "
          f"final training loss {summary.get('final_loss')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
