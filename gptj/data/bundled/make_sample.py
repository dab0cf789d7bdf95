"""Write the bundled MNLI-style sample and the tiny tokenizer trained on it.

The sentences are synthetic and follow simple rules a small model can learn from a few
thousand rows: a hypothesis that drops a detail of the premise is entailed; one that flips
the action, moves the scene or denies the subject contradicts it; one that adds a new fact
is neutral. Train and validation_matched use the "home" and "work" vocabularies,
validation_mismatched the unseen "town" vocabulary with the same rules.

Run `python -m gptj.data.bundled.make_sample` to regenerate; output is deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"train": 4000, "validation_matched": 400, "validation_mismatched": 400}
LABELS = ("entailment", "neutral", "contradiction")

DOMAINS = {
    "home": {
        "nouns": ["cat", "dog", "rabbit", "parrot", "hamster", "puppy", "kitten", "goat",
                  "duck", "horse", "mouse", "pony"],
        "adjectives": ["red", "small", "old", "young", "brown", "white", "black", "fat",
                       "tiny", "grey", "fluffy", "spotted"],
        "places": ["in the kitchen", "in the garden", "on the sofa", "under the table",
                   "near the door", "in the barn", "by the window", "on the bed",
                   "in the yard", "on the porch"],
        "someone": "An animal",
    },
    "work": {
        "nouns": ["teacher", "doctor", "baker", "pilot", "farmer", "nurse", "painter",
                  "driver", "singer", "lawyer", "cook", "clerk"],
        "adjectives": ["tall", "tired", "cheerful", "busy", "young", "old", "quiet",
                       "friendly", "new", "careful", "clever", "polite"],
        "places": ["in the office", "at the station", "in the school", "at the market",
                   "in the hospital", "near the bridge", "in the shop", "at the airport",
                   "in the factory", "at the bank"],
        "someone": "A worker",
    },
    "town": {
        "nouns": ["boy", "girl", "sailor", "student", "soldier", "king", "tourist", "child",
                  "poet", "queen", "guard", "miner"],
        "adjectives": ["brave", "shy", "proud", "lonely", "rich", "poor", "kind", "strong",
                       "calm", "curious", "famous", "silly"],
        "places": ["in the park", "on the beach", "at the library", "in the castle",
                   "near the river", "on the hill", "in the church", "at the harbour",
                   "in the museum", "on the bus"],
        "someone": "Someone",
    },
}
# (action, a state that contradicts it)
ACTIONS = [
    ("sleeps", "is awake"), ("sits", "is standing"), ("eats", "is not eating"),
    ("sings", "is silent"), ("runs", "is standing still"), ("rests", "is working hard"),
    ("waits", "has already left"), ("plays", "is bored"), ("laughs", "is crying"),
    ("hides", "is in plain sight"),
]
EXTRA_FACTS = ["is hungry", "is very happy", "is three years old", "is waiting for a friend",
               "likes the rain", "has a long name", "was born in spring", "is feeling lucky"]
OPENERS = ["", "", "", "In the morning, ", "Today ", "At night, "]
# Everyday words added to the tokenizer's training text so that text outside the sample
# (other tasks, the unseen "town" domain) is not split into single bytes.
COMMON_TEXT = """the of and to in is that it was for on are as with his they at be this from
have or by one had not but what all were when we there can an your which their said if do
will each about how up out them then she many some so these would other into has more her
two like him see time could no make than first been its who now people my made over did down
only way find use may water long little very after words called just where most know get
through back much go good new write our me man too any day same right look think also around
another came come work three word must because does part even place well such here take why
things help put years different away again off went old number great tell men say small every
found still between name should home big give air line set own under read last never us left
end along while might next sound below saw something thought both few those always looked
show large often together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above
kind began almost live page got earth need far hand high year mother light country father
question answer context sentence positive negative film movie story city river music family
"""


def premise_parts(rng: random.Random, d: dict) -> dict:
    return {"adj": rng.choice(d["adjectives"]), "noun": rng.choice(d["nouns"]),
            "act": rng.choice(ACTIONS), "place": rng.choice(d["places"]),
            "opener": rng.choice(OPENERS)}


def premise(p: dict) -> str:
    the = "the" if p["opener"] else "The"
    return f"{p['opener']}{the} {p['adj']} {p['noun']} {p['act'][0]} {p['place']}."


def hypothesis(rng: random.Random, d: dict, p: dict, label: str) -> str:
    noun, adj, (act, opposite), place = p["noun"], p["adj"], p["act"], p["place"]
    if label == "entailment":
        forms = [f"A {noun} {act} {place}.", f"The {noun} {act}.",
                 f"There is a {adj} {noun} {place}.", f"{d['someone']} {act} {place}.",
                 f"The {adj} {noun} {act}."]
    elif label == "contradiction":
        other_place = rng.choice([x for x in d["places"] if x != place])
        forms = [f"The {noun} {opposite}.", f"The {adj} {noun} {act} {other_place}.",
                 f"There is no {noun} {place}.", f"The {adj} {noun} {opposite} {place}."]
    else:
        other_noun = rng.choice([x for x in d["nouns"] if x != noun])
        forms = [f"The {noun} {rng.choice(EXTRA_FACTS)}.", f"The {adj} {noun} {act} every day.",
                 f"The {noun} {act} because it is tired.", f"A {other_noun} {act} {place}.",
                 f"The {adj} {noun} {rng.choice(EXTRA_FACTS)}."]
    return rng.choice(forms)


def make_split(rng: random.Random, domains: list[str], n: int, seen: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        label_id = len(rows) % 3  # balanced classes, shuffled below
        d = DOMAINS[rng.choice(domains)]
        p = premise_parts(rng, d)
        row = {"premise": premise(p), "hypothesis": hypothesis(rng, d, p, LABELS[label_id])}
        key = (row["premise"], row["hypothesis"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({**row, "label": label_id})
    rng.shuffle(rows)
    return [{**r, "idx": i} for i, r in enumerate(rows)]


def make_sample() -> dict[str, list[dict]]:
    rng = random.Random(20240611)
    seen: set = set()
    return {
        "train": make_split(rng, ["home", "work"], SIZES["train"], seen),
        "validation_matched": make_split(rng, ["home", "work"], SIZES["validation_matched"], seen),
        "validation_mismatched": make_split(rng, ["town"], SIZES["validation_mismatched"], seen),
    }


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import ByteLevelBPETokenizer

    from ..tokenizer import EOS, Tokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS, "<|pad|>"], show_progress=False)
    return Tokenizer(bpe._tokenizer, EOS, "<|pad|>", "bundled:tiny")


def main() -> None:
    from ..tasks import load_task
    splits = make_sample()
    out = HERE / "mnli_sample"
    out.mkdir(exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(rows, out / f"{name}.jsonl")
    task = load_task("mnli")
    texts = [task.render_train({**r, "label": LABELS[r["label"]]}) for r in splits["train"]]
    # A few words of the other built-in templates so their prompts stay short too.
    texts += ["sst2 sentence: a good film target: positive", "question: who context: answer:"] * 3
    vocabulary = COMMON_TEXT.split() + [w for d in DOMAINS.values() for key in ("nouns", "adjectives",
                                                                         "places") for w in d[key]]
    texts += [" ".join(vocabulary[i:i + 12]) for i in range(0, len(vocabulary), 12)] * 2
    tok = train_tokenizer(texts)
    tok.save(HERE / "tokenizer")
    print(f"wrote {out} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}) and "
          f"{HERE / 'tokenizer'} (vocab {tok.vocab_size})")


if __name__ == "__main__":
    main()
