"""A made-up factual question set: single-hop questions over generated passages with distractors.

Each case is one *kind* of entity (a company, a painter, a ship, ...). Between 4 and 6 entities of
that kind get one passage each, built from the same sentence templates with different made-up
names and values, so every passage is a distractor of the same shape as the one that holds the
answer. The question asks one attribute of one entity; its answer appears in exactly that
entity's passage (the generator checks it appears in no other). Names are made of random
syllables, so no model knows them from pretraining: the answer has to be read from the passage.

The set is deterministic (``random.Random(seed)``) and split by seed: ``dev`` (seed 0) is for
development, ``heldout`` (seed 1) is only measured. ``filter`` keeps the cases a model's full
prefill answers (the answer string contained in its greedy answer, case-insensitive), which is
what answer accuracy is measured on: a case full prefill gets wrong says nothing about fusion.

What it does not know: fusion or policies. The output has the MuSiQue layout that
``chunkcache.bench.quality`` reads (``question``, ``answers``, ``ctxs`` of ``title``/``text``),
plus ``id``, ``split`` and ``gold`` (the index of the passage with the answer).

    python -m chunkcache.bench.factual --per-split 150 --out chunkcache/bench/data/factual.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "factual.json"
SPLIT_SEEDS = {"dev": 0, "heldout": 1}

_ONSET = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "v",
    "z",
]
_VOWEL = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODA = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]
_GIVEN = [
    "Anika",
    "Boris",
    "Celia",
    "Dorian",
    "Edda",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Lorenz",
    "Mira",
    "Niels",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Stellan",
    "Tilde",
    "Ulrich",
    "Vera",
    "Wendel",
    "Xenia",
    "Yannick",
    "Zora",
    "Aurel",
    "Bettina",
    "Casimir",
    "Delphine",
]
_COLOURS = ["crimson", "teal", "amber", "violet", "ochre", "silver", "emerald", "indigo", "scarlet", "ivory"]
_ANIMALS = ["heron", "lynx", "otter", "falcon", "badger", "stag", "raven", "salmon", "wolf", "hare"]
_PRODUCTS = [
    "ceramic tiles",
    "bicycle frames",
    "glass lenses",
    "copper wire",
    "wool blankets",
    "paper lanterns",
    "clock springs",
    "leather boots",
    "rope",
    "pipe organs",
]
_FISH = ["salmon", "trout", "pike", "carp", "eel", "perch", "sturgeon", "catfish"]
_INSTRUMENTS = ["cello", "oboe", "harp", "trumpet", "accordion", "viola", "clarinet", "mandolin"]


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSET) + rng.choice(_VOWEL) for _ in range(syllables)) + rng.choice(_CODA)
    return w.capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_GIVEN)} {_word(rng, 2)}"


def _place(rng: random.Random) -> str:
    return _word(rng, rng.choice([2, 3]))


def _year(rng: random.Random) -> str:
    return str(rng.randint(1720, 1990))


# Each kind: a name maker, attribute makers, the passage's sentences (templates over the name and
# the attributes) and one question template per attribute.
KINDS: dict[str, dict] = {
    "company": {
        "name": lambda r: f"{_word(r, 2)} {r.choice(['Works', 'Industries', 'Company', 'Manufacturing'])}",
        "attrs": {
            "founder": _person,
            "town": _place,
            "year": _year,
            "product": lambda r: r.choice(_PRODUCTS),
        },
        "text": [
            "{name} is a firm that makes {product}.",
            "It was founded in {year} by {founder} in the town of {town}.",
            "For most of its history the firm employed a few hundred workers.",
        ],
        "q": {
            "founder": "Who founded {name}?",
            "town": "In which town was {name} founded?",
            "year": "In which year was {name} founded?",
            "product": "What does {name} make?",
        },
    },
    "painter": {
        "name": _person,
        "attrs": {
            "city": _place,
            "teacher": _person,
            "painting": lambda r: f"The {r.choice(_COLOURS).capitalize()} {r.choice(_ANIMALS).capitalize()}",
            "year": _year,
        },
        "text": [
            "{name} was a painter born in the city of {city} in {year}.",
            "{name} studied under {teacher} and is best known for the painting {painting}.",
            "Many of the works now hang in small regional museums.",
        ],
        "q": {
            "city": "In which city was the painter {name} born?",
            "teacher": "Under whom did the painter {name} study?",
            "painting": "Which painting is {name} best known for?",
            "year": "In which year was the painter {name} born?",
        },
    },
    "ship": {
        "name": lambda r: _word(r, 2),
        "attrs": {
            "captain": _person,
            "port": _place,
            "year": _year,
            "builder": lambda r: f"{_word(r, 2)} Yard",
        },
        "text": [
            "The ship {name} was launched in {year} at {builder}.",
            "Her first captain was {captain}, and her home port was {port}.",
            "She carried cargo and passengers along the coast for decades.",
        ],
        "q": {
            "captain": "Who was the first captain of the ship {name}?",
            "port": "What was the home port of the ship {name}?",
            "year": "In which year was the ship {name} launched?",
            "builder": "Which shipyard built the ship {name}?",
        },
    },
    "river": {
        "name": lambda r: f"the {_word(r, 2)} River",
        "attrs": {
            "source": lambda r: f"Mount {_word(r, 2)}",
            "mouth": lambda r: f"Lake {_word(r, 2)}",
            "fish": lambda r: r.choice(_FISH),
            "town": _place,
        },
        "text": [
            "{name} rises on {source} and flows into {mouth}.",
            "The largest town on its banks is {town}.",
            "The river is known for its {fish}, which local fishermen catch in spring.",
        ],
        "q": {
            "source": "Where does {name} rise?",
            "mouth": "Into which lake does {name} flow?",
            "fish": "Which fish is {name} known for?",
            "town": "What is the largest town on {name}?",
        },
    },
    "composer": {
        "name": _person,
        "attrs": {
            "instrument": lambda r: r.choice(_INSTRUMENTS),
            "opera": lambda r: f"{_word(r, 3)}",
            "town": _place,
            "patron": _person,
        },
        "text": [
            "{name} was a composer from {town} who played the {instrument}.",
            "The opera {opera} is the composer's most performed work.",
            "Early in life {name} was supported by the patron {patron}.",
        ],
        "q": {
            "instrument": "Which instrument did the composer {name} play?",
            "opera": "What is the most performed opera by {name}?",
            "town": "Which town was the composer {name} from?",
            "patron": "Which patron supported {name}?",
        },
    },
    "university": {
        "name": lambda r: f"the University of {_word(r, 2)}",
        "attrs": {
            "founder": _person,
            "year": _year,
            "mascot": lambda r: r.choice(_ANIMALS),
            "colour": lambda r: r.choice(_COLOURS),
        },
        "text": [
            "{name} was established in {year} by {founder}.",
            "Its mascot is the {mascot}, and its official colour is {colour}.",
            "The university is known for its library and its botanical garden.",
        ],
        "q": {
            "founder": "Who established {name}?",
            "year": "In which year was {name} established?",
            "mascot": "What is the mascot of {name}?",
            "colour": "What is the official colour of {name}?",
        },
    },
}


def _entity(rng: random.Random, kind: dict, taken: dict[str, set]) -> dict:
    """One entity whose name and attribute values no earlier entity of the case used."""
    out = {}
    for field, make in [("name", kind["name"])] + list(kind["attrs"].items()):
        for _ in range(100):
            v = make(rng)
            if v.lower() not in taken.setdefault(field, set()):
                break
        else:  # pragma: no cover - the value spaces are far larger than a case
            raise RuntimeError(f"cannot draw a distinct {field}")
        taken[field].add(v.lower())
        out[field] = v
    return out


def _passage(kind: dict, ent: dict) -> dict:
    text = " ".join(s.format(**ent) for s in kind["text"])
    title = ent["name"][4:] if ent["name"].startswith("the ") else ent["name"]
    return {"title": title[0].upper() + title[1:], "text": text[0].upper() + text[1:]}


def generate(split: str, n: int) -> list[dict]:
    """``n`` cases of one split, deterministic in (split, n): case i is the same for every n > i."""
    rng = random.Random(SPLIT_SEEDS[split])
    cases = []
    kinds = sorted(KINDS)
    while len(cases) < n:
        name = rng.choice(kinds)
        kind = KINDS[name]
        k = rng.randint(4, 6)
        taken: dict[str, set] = {}
        ents = [_entity(rng, kind, taken) for _ in range(k)]
        gold = rng.randrange(k)
        attr = rng.choice(sorted(kind["attrs"]))
        ctxs = [_passage(kind, e) for e in ents]
        answer = ents[gold][attr]
        # the answer must be read from exactly one passage, and the question must not give it away
        question = kind["q"][attr].format(**ents[gold])
        question = question[0].upper() + question[1:]
        hits = [i for i, c in enumerate(ctxs) if answer.lower() in (c["title"] + " " + c["text"]).lower()]
        if hits != [gold] or answer.lower() in question.lower():
            continue
        cases.append(
            {
                "id": f"{split}-{len(cases)}",
                "split": split,
                "kind": name,
                "attribute": attr,
                "question": question,
                "answers": [answer],
                "gold": gold,
                "ctxs": ctxs,
            }
        )
    return cases


def correct(answer_text: str, answers: list[str]) -> bool:
    """The answer-accuracy criterion: some gold answer is contained in the generated text
    (case-insensitive)."""
    low = answer_text.lower()
    return any(a.lower() in low for a in answers)


def filter_answerable(
    engine, cases: list[dict], max_new_tokens: int = 32, batch: int = 8, log=print
) -> list[dict]:
    """The cases whose full prefill greedy answer (``max_new_tokens``) contains the answer; each
    kept case records that answer under ``full_answer``. Prompts run ``batch`` at a time, left-padded
    (the benchmark rescores every case unbatched; ``full_accuracy`` there shows any case a padded
    batch answered differently)."""
    import torch

    kept = []
    tok = engine.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(cases), batch):
        part = cases[s : s + batch]
        prompts = [
            engine.prompt_ids([f"{x['title']}\n{x['text']}" for x in c["ctxs"]], c["question"])[0]
            for c in part
        ]
        width = max(p.numel() for p in prompts)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - p.numel() :] = p
            mask[i, width - p.numel() :] = 1
        with torch.no_grad():
            out = engine.model.generate(
                input_ids=ids.to(engine.lm.device),
                attention_mask=mask.to(engine.lm.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for c, row in zip(part, out[:, width:], strict=True):
            text = tok.decode(row, skip_special_tokens=True).strip()
            if correct(text, c["answers"]):
                kept.append({**c, "full_answer": text})
            elif log:
                log(
                    f"  dropped {c['id']}: {c['question']!r} -> {text!r} (answer {c['answers'][0]!r})",
                    flush=True,
                )
        if log:
            log(f"[{s + len(part)}/{len(cases)}] kept {len(kept)}", flush=True)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m chunkcache.bench.factual", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--per-split", type=int, default=150, help="cases generated per split before filtering")
    p.add_argument("--model", default="smollm2-135m", help="model whose full prefill filters the cases")
    p.add_argument("--no-filter", action="store_true", help="write every generated case (no model)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    cases = [c for split in SPLIT_SEEDS for c in generate(split, args.per_split)]
    generated = len(cases)
    if not args.no_filter:
        from chunkcache.engine import ChunkCache

        engine = ChunkCache(model=args.model, store=None, dtype="float32", device="cpu")
        cases = filter_answerable(engine, cases)
    out = {
        "command": " ".join(
            ["python -m chunkcache.bench.factual"] + (argv if argv is not None else sys.argv[1:])
        ),
        "generated": generated,
        "kept": {s: sum(c["split"] == s for c in cases) for s in SPLIT_SEEDS},
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{generated} generated, kept {out['kept']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
