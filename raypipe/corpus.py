"""The embedded corpus: seeded short stories, a byte-level BPE trained on them, and the token memmaps.

Nothing is downloaded. The stories follow TinyStories' register (a child, an animal or a toy, a
small problem, a friend, an ending) from templates, so a small model has real structure to learn:
names and objects introduced early come back later in the story.
"""

from __future__ import annotations

import random
from pathlib import Path
from .config import DataConfig
from .data import DataError, dtype_for_vocab, read_meta, write_dataset
from .tokenizer import encode_documents, hf_spec, train_bpe

NAMES = ["Lily", "Ben", "Tom", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Lucy", "Jack", "Zoe",
         "Leo", "Emma", "Finn", "Rosa", "Kai", "Nora", "Ollie", "Ruby"]
CREATURES = ["cat", "dog", "bunny", "bird", "frog", "bear", "duck", "fox", "mouse", "lion", "puppy", "owl"]
ADJECTIVES = ["little", "happy", "brave", "shy", "kind", "silly", "curious", "tiny", "big", "gentle"]
COLORS = ["red", "blue", "green", "yellow", "purple", "pink", "orange", "white", "shiny", "soft"]
THINGS = ["ball", "kite", "box", "hat", "boat", "book", "cup", "drum", "key", "flower", "cake", "shell"]
PLACES = ["the park", "the garden", "the forest", "the beach", "the farm", "the big house", "the hill",
          "the lake", "the town", "the school"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "surprised", "angry"]
PROBLEMS = ["was stuck in a tree", "fell into the water", "was lost", "was broken", "rolled away",
            "was too high to reach", "got very dirty", "was hidden under a rock"]
ACTIONS = ["played", "ran", "danced", "sang", "jumped", "laughed", "walked", "looked around"]


def story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    creature, adj, color = rng.choice(CREATURES), rng.choice(ADJECTIVES), rng.choice(COLORS)
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    kind = rng.choice(["girl", "boy"]) if rng.random() < 0.5 else f"{adj} {creature}"
    they = "she" if hero in ("Lily", "Mia", "Anna", "Sue", "Lucy", "Zoe", "Emma", "Rosa", "Nora", "Ruby") else "he"
    lines = [
        rng.choice([f"Once upon a time, there was a {kind} named {hero}.",
                    f"One day, a {kind} named {hero} went to {place}.",
                    f"There once was a {kind} called {hero}."]),
        f"{hero} had a {color} {thing}. {they.capitalize()} loved the {color} {thing} very much.",
    ]
    for _ in range(rng.randint(1, 3)):
        lines.append(f"{hero} {rng.choice(ACTIONS)} in {place} with the {thing}.")
    problem = rng.choice(PROBLEMS)
    feeling = rng.choice(FEELINGS)
    lines += [
        f"But then the {thing} {problem}. {hero} felt {feeling}.",
        f"{hero} said, \"Oh no! My {thing}!\"",
        f"{friend} came to help. {friend} said, \"Do not worry, {hero}. I will help you.\"",
        rng.choice([f"Together they got the {color} {thing} back.",
                    f"{friend} was very smart and found the {thing}.",
                    f"They worked hard and fixed the {thing}."]),
        rng.choice([f"{hero} was {rng.choice(['happy', 'proud', 'glad'])} again. {hero} and {friend} became best friends.",
                    f"From that day on, {hero} always shared the {thing} with {friend}.",
                    f"{hero} learned that friends help each other. The end."]),
    ]
    return " ".join(lines)


def stories(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(num)]


def embedded_source(cfg: DataConfig) -> dict:
    """What identifies the embedded corpus: a data dir built from other settings is not reused."""
    return {"kind": "embedded", "num_stories": cfg.num_stories, "seed": cfg.seed,
            "tokenizer_vocab": cfg.tokenizer_vocab, "val_fraction": cfg.val_fraction}


def ensure_embedded_corpus(cfg: DataConfig, log=print) -> dict:
    """Generate, tokenize and write the embedded corpus into cfg.dir; reuse it when already there."""
    out = Path(cfg.dir)
    source = embedded_source(cfg)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = read_meta(out)
        if meta.get("source") != source:
            raise DataError(f"{out} holds data built from {meta.get('source')}, not from the configured "
                            f"{source}; point data.dir elsewhere or remove {out}")
        return meta
    docs = stories(cfg.num_stories, cfg.seed)
    n_val = max(1, int(len(docs) * cfg.val_fraction))
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    # The same tokenizer pieces as `python -m raypipe.prepare --tokenizer bpe:N`; the split stays the first
    # stories to val (not prepare's keyed hash), so the embedded data keeps its bytes.
    spec = hf_spec(train_bpe(train_docs, cfg.tokenizer_vocab), "bpe")
    vocab, dtype = spec.vocab_size, dtype_for_vocab(spec.vocab_size)
    meta = {"vocab_size": vocab, "dtype": dtype, "eot_id": spec.eot_id, "source": source,
            "documents": {"train": len(train_docs), "val": len(val_docs)}, "tokenizer": spec.meta()}
    splits = {"train": [encode_documents(spec, train_docs, dtype)], "val": [encode_documents(spec, val_docs, dtype)]}
    meta = write_dataset(out, splits, meta, extra_files={"tokenizer.json": spec.json}, log=log)
    log(f"[raypipe] embedded corpus: {cfg.num_stories} stories, vocab {vocab}, "
        f"{meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens -> {out}")
    return meta
