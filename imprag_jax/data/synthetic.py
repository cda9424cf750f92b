"""A seeded synthetic knowledge world: invented people, companies, cities and countries, a Wikipedia-like corpus
about them, KILT-format tasks (seen and unseen formats), retrieval-free format-teaching data, BM25 pseudo-labels,
a word-level tokenizer, and counterfactual re-rendering of training passages.

It is the small-scale mirror of the ImpRAG setup: nothing in it can be known without reading the corpus (names are
built from random syllables), first names and surnames are shared between people (so retrieval must combine the two
name tokens), and the corpus has distractors (letters and events that mention the same people, cities and years).
``docs/synthetic_world.md`` has the statistics and the reasons behind the choices.

Layout written by `write_world` (the same as `imprag_jax.data.prepare` writes for real data)::

    DIR/passages.jsonl                       {"id", "title", "text"}
    DIR/tasks/{task}.{split}.jsonl           KILT: {"id", "input", "output": [{"answer", "provenance"}], "meta"}
    DIR/pseudo_labels/{task}.{split}.jsonl   {"id", "ranked": [passage id x 50], "scores": [...]}  (BM25)
    DIR/stats.json  DIR/tokenizer.json  DIR/world.json

Tasks (splits by PERSON: ``dev`` people never appear in a training prompt):
  * seen formats, ``train`` and ``dev``: ``qa`` (one attribute of one person), ``two_hop_qa`` (needs the bio and
    a company or city passage; provenance lists both);
  * unseen formats, ``dev`` only: ``slot_filling``, ``fact_verification`` (balanced True/False),
    ``entity_linking`` (``[START] mention [END]`` -> the person's page title);
  * retrieval-free, ``train`` only (training people): ``format`` (the evidence passage(s) inside the prompt, with
    the reading-comprehension template and the unseen formats' templates) and ``lm`` (plain passage text: input
    ``"{title}:"``, answer the text; read as one sequence).

Public API
  * ``WorldConfig`` -- sizes and seed (defaults: a ~10-minute CPU run of a ~1M-parameter model).
  * ``World.generate(cfg) -> World``; ``World.load(dir_or_world_json)``; ``world.to_json()``.
  * ``world.passages -> list[formats.Passage]``; ``world.examples[task][split] -> list[formats.Example]``;
    ``world.passage_index -> {passage_id: row}``; ``world.people_in_split(split)``.
  * ``world.counterfactual(task, meta, seed) -> Counterfactual(input, answer, gold, texts, overrides)`` -- the
    example re-rendered with other random attribute values; the answer follows the new passages.
  * ``world.counterfactual_passages(passage_ids, seed, cf=None) -> {passage_id: text}`` -- negatives re-rendered
    with random values (entities already changed by ``cf`` keep ``cf``'s values).
  * ``build_tokenizer(world) -> tokenizers.Tokenizer`` (WordLevel; specials ``<pad>``=0 ``<bos>`` ``<eos>`` ``<eop>``
    ``[SEP]`` ``[START]`` ``[END]`` ``<unk>``); ``load_tokenizer(dir) -> imprag_jax.data.tokenizer.Tokenizer``.
  * ``write_world(world, out_dir, bm25=True) -> stats dict``; CLI:
    ``python -m imprag_jax.data.synthetic --out DIR [--seed N] [--people N] ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from imprag_jax.data import templates as T
from imprag_jax.data.chunking import TITLE_FORMAT, format_passage
from imprag_jax.data.formats import Example, Output, Passage, write_examples, write_passages

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<eop>", "[SEP]", "[START]", "[END]", "<unk>")
SKIPPED_SPECIALS = ("<pad>", "<bos>", "<eos>", "<eop>", "<unk>")  # dropped by decode(skip_special=True)
EOP = "<eop>"

ATTRS = ("birth_city", "birth_year", "employer", "occupation")
CHAINS = ("employer_hq", "birth_country", "employer_founder")
FORMATS = ("rc", "rc2", "sf", "fv", "el")
SEEN_TASKS = ("qa", "two_hop_qa")
UNSEEN_TASKS = ("slot_filling", "fact_verification", "entity_linking")
FREE_TASKS = ("format", "lm")

OCCUPATIONS = ("printer", "baker", "weaver", "tailor", "mason", "carpenter", "painter", "potter", "sailor", "miner",
               "farmer", "clerk", "teacher", "doctor", "lawyer", "banker", "brewer", "cooper", "surveyor", "jeweller",
               "glassblower", "bookbinder", "chemist", "navigator", "saddler", "tanner", "dyer", "gardener")
ORG_SUFFIXES = ("Mills", "Works", "Company", "Trading", "Foundry", "Press", "Bank", "Brewery", "Shipping", "Textiles")

# Passage templates. {name} is "First Last".
BIO_TEMPLATES = (
    "{name} was born in {city} in {year} and works for {org} as a {occ}.",
    "{name} (born {year} in {city}) is a {occ} employed by {org}.",
    "Born in {city} in {year}, {name} worked for {org} as a {occ}.",
    "A {occ} at {org}, {name} was born in {year} in {city}.",
)
ORG_TEMPLATES = (
    "{org} is a company headquartered in {city}. It was founded in {year} by {founder}.",
    "Founded by {founder} in {year}, {org} has its headquarters in {city}.",
)
CITY_TEMPLATES = ("{city} is a city in {country}.", "The city of {city} lies in {country}.")
COUNTRY_TEMPLATES = ("{country} is a country whose capital is {city}.",)
LETTER_TEMPLATES = (
    "In {year}, {a} wrote a letter to {b} from {city}.",
    "{a} received a letter from {b}, sent from {city} in {year}.",
    "A letter dated {year} from {city} tells how {a} met {b}.",
)
EVENT_TEMPLATES = (
    "In {year} a great fire in {city} destroyed the workshop of {a}.",
    "{a} and {b} opened a school in {city} in {year}.",
    "The flood of {year} in {city} was described by {a}.",
)
# Task phrasings.
# The third phrasing (WorldConfig.qa_templates = 3) names the person first and asks ~15 tokens later, so that the
# query state at the last token cannot find the name at a fixed short distance (the other phrasings end 3-7 tokens
# after it) and has to look for it by content -- which is what prompts of unseen formats need.
_LONG = "{name} is named in the old town records and in the letters kept by the family. "
QA_QUESTIONS = {
    "birth_city": ("Where was {name} born?", "In which city was {name} born?",
                   _LONG + "In which city was this person born?"),
    "birth_year": ("When was {name} born?", "In what year was {name} born?",
                   _LONG + "In what year was this person born?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?",
                 _LONG + "Which company does this person work for?"),
    "occupation": ("What is the occupation of {name}?", "What does {name} do for a living?",
                   _LONG + "What does this person do for a living?"),
}
TWO_HOP_QUESTIONS = {
    "employer_hq": "In which city is the employer of {name} headquartered?",
    "birth_country": "In which country was {name} born?",
    "employer_founder": "Who founded the company that employs {name}?",
}
RELATIONS = {"birth_city": "place of birth", "birth_year": "date of birth", "employer": "employer",
             "occupation": "occupation"}
STATEMENTS = {"birth_city": "{name} was born in {value}.", "birth_year": "{name} was born in {value}.",
              "employer": "{name} works for {value}.", "occupation": "{name} is a {value}."}
# Entity linking contexts, keyed by the two attributes that disambiguate the mention.
EL_CONTEXTS = {
    ("occupation", "birth_city"): "The {occupation} [START] {mention} [END] came from {birth_city}.",
    ("occupation", "birth_year"): "The {occupation} [START] {mention} [END] was born in {birth_year}.",
    ("occupation", "employer"): "[START] {mention} [END], a {occupation}, joined {employer}.",
    ("birth_city", "birth_year"): "Born in {birth_city} in {birth_year}, [START] {mention} [END] later moved away.",
    ("birth_city", "employer"): "[START] {mention} [END] left {birth_city} to work for {employer}.",
    ("birth_year", "employer"): "[START] {mention} [END], born in {birth_year}, worked at {employer}.",
}
TRUE, FALSE = "True", "False"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st", "gr", "pl",
           "dr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei", "au")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "x")
_WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' Whitespace pre-tokenizer splits on


@dataclass
class WorldConfig:
    """Sizes of the world. The defaults give about 1,560 passages, ~900 word types, 6,400 + 1,600 QA examples."""
    seed: int = 0
    n_people: int = 1000
    n_first_names: int = 60
    n_surnames: int = 300          # each surname is shared by ~n_people / n_surnames people
    n_cities: int = 50
    n_countries: int = 8
    n_orgs: int = 50
    n_occupations: int = 20
    year_min: int = 1800
    year_max: int = 1899           # inclusive
    n_letters: int = 300
    n_events: int = 150
    heldout_fraction: float = 0.2  # people in the dev split
    qa_templates: int = 2          # question phrasings per attribute (1, 2, or 3 = also the long one)
    el_per_person: int = 2         # entity-linking examples per dev person (surname / first-name mention)
    max_hard_negatives: int = 12   # generator-known hard negatives stored per example

    def __post_init__(self):
        if not 1 <= self.qa_templates <= 3:
            raise ValueError("qa_templates must be 1, 2 or 3")
        if self.n_first_names * self.n_surnames < 2 * self.n_people:
            raise ValueError("too few first names x surnames for unique full names")
        if self.n_occupations > len(OCCUPATIONS):
            raise ValueError(f"at most {len(OCCUPATIONS)} occupations")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in (0, 1)")
        if min(self.n_people, self.n_cities, self.n_countries, self.n_orgs, self.n_occupations) < 2:
            raise ValueError("every entity type needs at least 2 members")
        if self.year_max <= self.year_min:
            raise ValueError("year_max must exceed year_min")


@dataclass
class Counterfactual:
    """An example re-rendered with other attribute values (`World.counterfactual`)."""
    prompt: str                # the templated prompt (unchanged for retrieval tasks; re-rendered when it holds passages)
    answer: str                # follows the re-rendered passages
    gold: list                 # gold passage ids (may differ from the real ones for two-hop questions)
    texts: dict                # passage id -> re-rendered text, for every gold passage
    overrides: dict = field(default_factory=dict)  # (kind, index) -> record; used by counterfactual_passages


@dataclass
class Built:
    """One rendered example: the KILT ``input``, the answer, the gold passage ids, and how to template it."""
    input: str
    answer: str
    gold: list
    task_type: Optional[str] = None  # None: ``input`` is already the whole prompt
    fields: Optional[dict] = None

    @property
    def prompt(self) -> str:
        return T.render(self.task_type, self.fields) if self.task_type else self.input


def prompt_of(example: Example) -> str:
    """The templated prompt of an example (``meta.task_type`` + ``meta.fields``; else ``input`` is the prompt)."""
    return T.render_example(example) if example.task_type else example.input


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _other(rng, n: int, avoid: int) -> int:
    """A uniform draw from range(n) other than ``avoid``."""
    v = int(rng.integers(n - 1))
    return v + 1 if v >= avoid else v


def words(text: str) -> list:
    """The word tokens of ``text`` as the synthetic tokenizer splits them."""
    return _WORD_RE.findall(text)


class _View:
    """Read access to the world's records, with some records replaced (counterfactuals)."""

    def __init__(self, world: "World", overrides: Optional[Mapping] = None):
        self.w, self.over = world, dict(overrides or {})

    def rec(self, kind: str, i: int) -> dict:
        return self.over.get((kind, i)) or self.w.records(kind)[i]

    # values
    def name(self, p: int) -> str:
        r = self.rec("person", p)
        return f"{r['first']} {r['last']}"

    def org_name(self, o: int) -> str:
        r = self.w.orgs[o]
        return f"{r['stem']} {r['suffix']}"

    def value(self, p: int, attr: str) -> str:
        r = self.rec("person", p)
        if attr == "birth_city":
            return self.w.cities[r["city"]]["name"]
        if attr == "birth_year":
            return str(r["year"])
        if attr == "employer":
            return self.org_name(r["org"])
        if attr == "occupation":
            return self.w.occupations[r["occ"]]
        raise KeyError(attr)


class World:
    """The facts, the corpus and the tasks. Build with `World.generate`, reload with `World.load`."""

    def __init__(self, cfg: WorldConfig, names: dict, people: list, orgs: list, cities: list, countries: list,
                 items: list, passage_specs: list, dev_people: list):
        self.cfg = cfg
        self.first_names, self.surnames = names["first"], names["last"]
        self.occupations = names["occupations"]
        self.country_names = [c["name"] for c in countries]
        self.people, self.orgs, self.cities, self.countries, self.items = people, orgs, cities, countries, items
        self.passage_specs = passage_specs  # [(id, kind, index)]
        self.dev_people = sorted(dev_people)
        dev = set(self.dev_people)
        self.train_people = [p for p in range(len(people)) if p not in dev]
        self.split_of = ["dev" if p in dev else "train" for p in range(len(people))]
        self.passage_index = {pid: row for row, (pid, _, _) in enumerate(passage_specs)}
        self._pid = {(kind, i): pid for pid, kind, i in passage_specs}
        view = _View(self)
        self.passages = [self._render_passage(kind, i, view) for _, kind, i in passage_specs]
        self.passages = [Passage(pid, t, x) for (pid, _, _), (t, x) in zip(passage_specs, self.passages)]
        self._mentions = self._index_mentions()
        self.examples = self._make_examples()

    # ------------------------------------------------------------------------------------------------ records
    def records(self, kind: str) -> list:
        return {"person": self.people, "org": self.orgs, "city": self.cities, "country": self.countries,
                "item": self.items}[kind]

    def people_in_split(self, split: str) -> list:
        return list(self.dev_people if split == "dev" else self.train_people)

    def pid(self, kind: str, i: int) -> str:
        return self._pid[(kind, i)]

    def full_name(self, p: int) -> str:
        return f"{self.people[p]['first']} {self.people[p]['last']}"

    # ------------------------------------------------------------------------------------------------ generation
    @classmethod
    def generate(cls, cfg: Optional[WorldConfig] = None) -> "World":
        cfg = cfg or WorldConfig()
        rng = np.random.default_rng(cfg.seed)
        used: set = set(w for t in _all_template_strings() for w in words(t))

        def make_words(n, syllables, suffix=""):
            out = []
            while len(out) < n:
                w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                            for _ in range(syllables)) + _CODAS[rng.integers(len(_CODAS))] + suffix
                w = w.capitalize()
                if w not in used:
                    used.add(w)
                    out.append(w)
            return out

        first, last = make_words(cfg.n_first_names, 2), make_words(cfg.n_surnames, 2)
        city_names, stems = make_words(cfg.n_cities, 2), make_words(cfg.n_orgs, 2)
        country_names = make_words(cfg.n_countries, 3, "ia")
        occupations = list(OCCUPATIONS[:cfg.n_occupations])
        n_years = cfg.year_max - cfg.year_min + 1

        # people: surnames dealt round-robin (each shared by ~n/n_surnames people), first names at random
        surname_of = rng.permutation(np.arange(cfg.n_people) % cfg.n_surnames)
        taken, people = set(), []
        for p in range(cfg.n_people):
            s = int(surname_of[p])
            f = int(rng.integers(cfg.n_first_names))
            while (f, s) in taken:
                f = int(rng.integers(cfg.n_first_names))
            taken.add((f, s))
            people.append({"first": first[f], "last": last[s], "city": int(rng.integers(cfg.n_cities)),
                           "year": cfg.year_min + int(rng.integers(n_years)), "org": int(rng.integers(cfg.n_orgs)),
                           "occ": int(rng.integers(cfg.n_occupations)), "tpl": int(rng.integers(len(BIO_TEMPLATES)))})
        n_dev = max(1, int(round(cfg.n_people * cfg.heldout_fraction)))
        dev_people = sorted(int(x) for x in rng.choice(cfg.n_people, n_dev, replace=False))
        dev = set(dev_people)
        train_people = [p for p in range(cfg.n_people) if p not in dev]
        # countries own cities (every country gets at least one), capitals among their cities
        country_of = rng.permutation(np.arange(cfg.n_cities) % cfg.n_countries)
        cities = [{"name": city_names[c], "country": int(country_of[c]), "tpl": int(rng.integers(len(CITY_TEMPLATES)))}
                  for c in range(cfg.n_cities)]
        countries = []
        for n in range(cfg.n_countries):
            own = [c for c in range(cfg.n_cities) if cities[c]["country"] == n]
            countries.append({"name": country_names[n], "capital": int(own[rng.integers(len(own))]), "tpl": 0})
        # organisations: founders are TRAINING people (a founder's name is an answer of training questions)
        orgs = [{"stem": stems[o], "suffix": ORG_SUFFIXES[int(rng.integers(len(ORG_SUFFIXES)))],
                 "city": int(rng.integers(cfg.n_cities)), "year": cfg.year_min + int(rng.integers(n_years)),
                 "founder": int(train_people[rng.integers(len(train_people))]),
                 "tpl": int(rng.integers(len(ORG_TEMPLATES)))} for o in range(cfg.n_orgs)]
        # distractors: letters and events that mention people, cities and years
        items = []
        for kind, n, tpls in (("letter", cfg.n_letters, LETTER_TEMPLATES), ("event", cfg.n_events, EVENT_TEMPLATES)):
            for _ in range(n):
                a, b = (int(x) for x in rng.choice(cfg.n_people, 2, replace=False))
                items.append({"kind": kind, "tpl": int(rng.integers(len(tpls))), "a": a, "b": b,
                              "city": int(rng.integers(cfg.n_cities)),
                              "year": cfg.year_min + int(rng.integers(n_years))})
        specs = ([(f"bio-{p:05d}", "person", p) for p in range(cfg.n_people)]
                 + [(f"org-{o:03d}", "org", o) for o in range(cfg.n_orgs)]
                 + [(f"city-{c:03d}", "city", c) for c in range(cfg.n_cities)]
                 + [(f"country-{n:02d}", "country", n) for n in range(cfg.n_countries)]
                 + [(f"{it['kind']}-{i:04d}", "item", i) for i, it in enumerate(items)])
        names = {"first": first, "last": last, "occupations": occupations}
        return cls(cfg, names, people, orgs, cities, countries, items, specs, dev_people)

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg),
                "names": {"first": self.first_names, "last": self.surnames, "occupations": self.occupations},
                "people": self.people, "orgs": self.orgs, "cities": self.cities, "countries": self.countries,
                "items": self.items, "passages": [list(s) for s in self.passage_specs],
                "dev_people": self.dev_people}

    @classmethod
    def from_json(cls, d: Mapping) -> "World":
        return cls(WorldConfig(**d["config"]), d["names"], d["people"], d["orgs"], d["cities"], d["countries"],
                   d["items"], [tuple(s) for s in d["passages"]], d["dev_people"])

    @classmethod
    def load(cls, path: str) -> "World":
        """From a directory written by `write_world` (its ``world.json``) or a ``world.json`` path (local or a
        bucket path, `imprag_jax.data.paths`)."""
        from imprag_jax.data import paths

        if paths.isdir(path):
            path = paths.join(path, "world.json")
        with paths.open(path) as f:
            return cls.from_json(json.load(f))

    # ------------------------------------------------------------------------------------------------ rendering
    def _render_passage(self, kind: str, i: int, view: _View) -> tuple:
        """(title, text) of one passage under ``view``."""
        r = view.rec(kind, i)
        if kind == "person":
            return view.name(i), BIO_TEMPLATES[r["tpl"]].format(
                name=view.name(i), city=self.cities[r["city"]]["name"], year=r["year"], org=view.org_name(r["org"]),
                occ=self.occupations[r["occ"]])
        if kind == "org":
            name = view.org_name(i)
            return name, ORG_TEMPLATES[r["tpl"]].format(org=name, city=self.cities[r["city"]]["name"],
                                                        year=r["year"], founder=view.name(r["founder"]))
        if kind == "city":
            return r["name"], CITY_TEMPLATES[r["tpl"]].format(city=r["name"],
                                                              country=self.countries[r["country"]]["name"])
        if kind == "country":
            return r["name"], COUNTRY_TEMPLATES[r["tpl"]].format(country=r["name"],
                                                                 city=self.cities[r["capital"]]["name"])
        if kind == "item":
            tpls = LETTER_TEMPLATES if r["kind"] == "letter" else EVENT_TEMPLATES
            text = tpls[r["tpl"]].format(a=view.name(r["a"]), b=view.name(r["b"]), city=self.cities[r["city"]]["name"],
                                         year=r["year"])
            # titles depend on names only, so a counterfactual re-rendering never changes a title
            title = f"{'Correspondence' if r['kind'] == 'letter' else 'Chronicle'} of {view.name(r['a'])}"
            return title, text
        raise KeyError(kind)

    def passage_text(self, pid: str, view: Optional[_View] = None) -> str:
        _, kind, i = self.passage_specs[self.passage_index[pid]]
        return self._render_passage(kind, i, view or _View(self))[1]

    def _block(self, pid: str, view: _View) -> str:
        """A passage as it appears inside a retrieval-free prompt: title prefix, text, end-of-passage marker."""
        _, kind, i = self.passage_specs[self.passage_index[pid]]
        title, text = self._render_passage(kind, i, view)
        return f"{format_passage(title, text, TITLE_FORMAT)} {EOP}"

    # ------------------------------------------------------------------------------------------------ examples
    def _gold(self, p: int, chain: Optional[str], view: _View) -> list:
        gold = [self.pid("person", p)]
        r = view.rec("person", p)
        if chain in ("employer_hq", "employer_founder"):
            gold.append(self.pid("org", r["org"]))
        elif chain == "birth_country":
            gold.append(self.pid("city", r["city"]))
        return gold

    def _chain_answer(self, p: int, chain: str, view: _View) -> str:
        r = view.rec("person", p)
        if chain == "employer_hq":
            return self.cities[view.rec("org", r["org"])["city"]]["name"]
        if chain == "birth_country":
            return self.countries[view.rec("city", r["city"])["country"]]["name"]
        if chain == "employer_founder":
            return view.name(view.rec("org", r["org"])["founder"])
        raise KeyError(chain)

    def _claim(self, p: int, attr: str, label: bool, meta: Mapping, view: _View, rng) -> str:
        """Statement value for fact verification: the true value, or a wrong one (kept from meta unless it is no
        longer wrong under a counterfactual, then redrawn with ``rng``)."""
        true_v = view.value(p, attr)
        if label:
            return true_v
        v = meta.get("claim_value")
        if v is None or v == true_v:
            v = self._random_value(attr, rng, avoid=true_v)
        return v

    def _random_value(self, attr: str, rng, avoid: Optional[str] = None) -> str:
        pool = self._value_pool(attr)
        while True:
            v = pool[int(rng.integers(len(pool)))]
            if v != avoid:
                return v

    def _value_pool(self, attr: str) -> list:
        if attr == "birth_city":
            return [c["name"] for c in self.cities]
        if attr == "birth_year":
            return [str(y) for y in range(self.cfg.year_min, self.cfg.year_max + 1)]
        if attr == "employer":
            return [f"{o['stem']} {o['suffix']}" for o in self.orgs]
        return list(self.occupations)

    def _el_context(self, p: int, meta: Mapping, view: _View) -> str:
        vals = {a: view.value(p, a) for a in meta["ctx"]}
        mention = view.rec("person", p)["last" if meta["mention"] == "surname" else "first"]
        return EL_CONTEXTS[tuple(meta["ctx"])].format(mention=mention, **vals)

    def build(self, task: str, meta: Mapping, view: Optional[_View] = None, rng=None) -> "Built":
        """The example described by ``meta`` rendered under ``view`` (the real world by default)."""
        view = view or _View(self)
        rng = _rng(rng if rng is not None else 0)
        if task == "lm":
            pid = meta["passage"]
            _, kind, i = self.passage_specs[self.passage_index[pid]]
            title, text = self._render_passage(kind, i, view)
            return Built(f"{title}:", text, [])
        p = meta["person"]
        name = view.name(p)
        if task in ("qa", "two_hop_qa"):
            if task == "qa":
                q = QA_QUESTIONS[meta["attr"]][meta["tpl"]].format(name=name)
                ans, gold = view.value(p, meta["attr"]), self._gold(p, None, view)
            else:
                q = TWO_HOP_QUESTIONS[meta["chain"]].format(name=name)
                ans, gold = self._chain_answer(p, meta["chain"], view), self._gold(p, meta["chain"], view)
            return Built(q, ans, gold, "qa", {"question": q})
        if task == "slot_filling":
            f = {"entity": name, "relation": RELATIONS[meta["attr"]]}
            return Built(f"{name} [SEP] {f['relation']}", view.value(p, meta["attr"]), self._gold(p, None, view),
                         task, f)
        if task == "fact_verification":
            v = self._claim(p, meta["attr"], meta["label"], meta, view, rng)
            st = STATEMENTS[meta["attr"]].format(name=name, value=v)
            return Built(st, TRUE if meta["label"] else FALSE, self._gold(p, None, view), task, {"statement": st})
        if task == "entity_linking":
            ctx = self._el_context(p, meta, view)
            return Built(ctx, name, self._gold(p, None, view), task, {"context": ctx})
        if task == "format":
            fmt, sub = meta["format"], meta["sub"]
            inner_task = {"rc": "qa", "rc2": "two_hop_qa", "sf": "slot_filling", "fv": "fact_verification",
                          "el": "entity_linking"}[fmt]
            inner = self.build(inner_task, {**sub, "person": p}, view, rng)
            ctx_ids = [inner.gold[j] for j in meta.get("order", range(len(inner.gold)))]
            ctx = " ".join(self._block(pid, view) for pid in ctx_ids)
            if fmt in ("rc", "rc2"):  # the paper's reading-comprehension template
                prompt = T.render("reading_comprehension", {"context": ctx, "question": inner.fields["question"]})
            else:
                prompt = f"{ctx} {inner.prompt}"
            return Built(prompt, inner.answer, [])
        raise KeyError(f"unknown synthetic task {task!r}")

    def _make_examples(self) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1])
        out = {t: {} for t in SEEN_TASKS + UNSEEN_TASKS + FREE_TASKS}
        metas = {(t, s): [] for t in out for s in ("train", "dev")}
        for split in ("train", "dev"):
            for p in self.people_in_split(split):
                hn = self._hard_negatives(p, rng)
                for attr in ATTRS:
                    for tpl in range(cfg.qa_templates):
                        metas["qa", split].append({"person": p, "attr": attr, "tpl": tpl, "hard_negatives": hn})
                for chain in CHAINS:
                    metas["two_hop_qa", split].append(
                        {"person": p, "chain": chain, "hard_negatives": hn + self._chain_negatives(p, chain, rng)})
        for p in self.dev_people:
            hn = self._hard_negatives(p, rng)
            for attr in ATTRS:
                metas["slot_filling", "dev"].append({"person": p, "attr": attr, "hard_negatives": hn})
            labels = [True, True, False, False]
            rng.shuffle(labels)
            for attr, label in zip(ATTRS, labels):
                m = {"person": p, "attr": attr, "label": bool(label), "hard_negatives": hn}
                if not label:
                    m["claim_value"] = self._random_value(attr, rng, avoid=_View(self).value(p, attr))
                metas["fact_verification", "dev"].append(m)
            for mention in ("surname", "first")[:cfg.el_per_person]:
                ctx = self._el_pair(p, mention, rng)
                if ctx is not None:
                    metas["entity_linking", "dev"].append(
                        {"person": p, "mention": mention, "ctx": list(ctx), "hard_negatives": hn})
        # retrieval-free format teaching on training people: one example of each format per person
        for p in self.train_people:
            for fmt in FORMATS:
                attr = ATTRS[int(rng.integers(len(ATTRS)))]
                if fmt == "rc":
                    sub = {"attr": attr, "tpl": int(rng.integers(cfg.qa_templates))}
                elif fmt == "rc2":
                    sub = {"chain": CHAINS[int(rng.integers(len(CHAINS)))]}
                elif fmt == "sf":
                    sub = {"attr": attr}
                elif fmt == "fv":
                    label = bool(rng.integers(2))
                    sub = {"attr": attr, "label": label}
                    if not label:
                        sub["claim_value"] = self._random_value(attr, rng, avoid=_View(self).value(p, attr))
                else:
                    pair = list(EL_CONTEXTS)[int(rng.integers(len(EL_CONTEXTS)))]
                    sub = {"mention": ("surname", "first")[int(rng.integers(2))], "ctx": list(pair)}
                m = {"person": p, "format": fmt, "sub": sub}
                if fmt == "rc2":
                    m["order"] = [int(x) for x in rng.permutation(2)]
                metas["format", "train"].append(m)
        # plain text for an LM loss: passages that mention no dev person
        dev = set(self.dev_people)
        for pid, kind, i in self.passage_specs:
            if not (self._mentions[pid] & dev):
                metas["lm", "train"].append({"passage": pid})

        for (task, split), ms in metas.items():
            if not ms:
                continue
            exs = []
            for n, m in enumerate(ms):
                b = self.build(task, m)
                meta = dict(m)
                meta["kind"] = "lm" if task == "lm" else ("free" if task in FREE_TASKS else "retrieval")
                if b.task_type:
                    meta["task_type"], meta["fields"] = b.task_type, b.fields
                prov = [{"passage_id": g, "title": self.passages[self.passage_index[g]].title} for g in b.gold]
                exs.append(Example(f"{task}-{split}-{n:05d}", b.input, [Output(b.answer, prov)], meta))
            out[task][split] = exs
        return out

    def _index_mentions(self) -> dict:
        """passage id -> set of people whose full name it contains."""
        out = {}
        for pid, kind, i in self.passage_specs:
            if kind == "person":
                out[pid] = {i}
            elif kind == "org":
                out[pid] = {self.orgs[i]["founder"]}
            elif kind == "item":
                it = self.items[i]
                tpl = (LETTER_TEMPLATES if it["kind"] == "letter" else EVENT_TEMPLATES)[it["tpl"]]
                out[pid] = {it["a"], it["b"]} if "{b}" in tpl else {it["a"]}
            else:
                out[pid] = set()
        return out

    def _hard_negatives(self, p: int, rng) -> list:
        """Generator-known hard negatives: bios sharing the surname, distractors that mention the person (letters,
        events, organisations founded), then bios sharing the first name."""
        if not hasattr(self, "_by_name"):
            self._by_name, self._mentioned_in = {}, {}
            for q, r in enumerate(self.people):
                self._by_name.setdefault(("last", r["last"]), []).append(q)
                self._by_name.setdefault(("first", r["first"]), []).append(q)
            for pid, who in self._mentions.items():
                for q in sorted(who):
                    self._mentioned_in.setdefault(q, []).append(pid)
        cap = self.cfg.max_hard_negatives
        r = self.people[p]
        same_last = [q for q in self._by_name["last", r["last"]] if q != p]
        same_first = [q for q in self._by_name["first", r["first"]] if q != p]
        rng.shuffle(same_first)
        mentions = [pid for pid in self._mentioned_in.get(p, []) if pid != self.pid("person", p)]
        out = [self.pid("person", q) for q in same_last] + mentions
        out += [self.pid("person", q) for q in same_first[:max(0, cap - len(out))]]
        return out[:cap]

    def _chain_negatives(self, p: int, chain: str, rng) -> list:
        r = self.people[p]
        if chain == "birth_country":
            others = [c for c in range(len(self.cities)) if c != r["city"]]
            return [self.pid("city", int(c)) for c in rng.choice(others, 2, replace=False)]
        others = [o for o in range(len(self.orgs)) if o != r["org"]]
        return [self.pid("org", int(o)) for o in rng.choice(others, 2, replace=False)]

    def _el_pair(self, p: int, mention: str, rng) -> Optional[tuple]:
        """Two attributes whose values single out ``p`` among the people who share the mention token."""
        key = "last" if mention == "surname" else "first"
        group = [q for q in range(len(self.people)) if q != p and self.people[q][key] == self.people[p][key]]
        view = _View(self)
        pairs = list(EL_CONTEXTS)
        for j in rng.permutation(len(pairs)):
            a, b = pairs[int(j)]
            mine = (view.value(p, a), view.value(p, b))
            if all((view.value(q, a), view.value(q, b)) != mine for q in group):
                return a, b
        return None

    # ------------------------------------------------------------------------------------------------ counterfactuals
    def _cf_record(self, kind: str, i: int, rng, base: Optional[dict] = None) -> dict:
        """Record ``i`` of ``kind`` with every attribute value replaced by a different random one."""
        cfg = self.cfg
        r = dict(base or self.records(kind)[i])
        n_years = cfg.year_max - cfg.year_min + 1
        new_year = lambda y: cfg.year_min + _other(rng, n_years, y - cfg.year_min)  # noqa: E731
        if kind == "person":
            r.update(city=_other(rng, len(self.cities), r["city"]), year=new_year(r["year"]),
                     org=_other(rng, len(self.orgs), r["org"]), occ=_other(rng, len(self.occupations), r["occ"]))
        elif kind == "org":
            tp = self.train_people
            f = int(tp[rng.integers(len(tp))])
            while f == r["founder"] and len(tp) > 1:
                f = int(tp[rng.integers(len(tp))])
            r.update(city=_other(rng, len(self.cities), r["city"]), year=new_year(r["year"]), founder=f)
        elif kind == "city":
            r.update(country=_other(rng, len(self.countries), r["country"]))
        elif kind == "country":
            r.update(capital=_other(rng, len(self.cities), r["capital"]))
        elif kind == "item":
            r.update(city=_other(rng, len(self.cities), r["city"]), year=new_year(r["year"]))
        return r

    def counterfactual(self, task: str, meta: Mapping, seed) -> Counterfactual:
        """Re-render a (training) example with other random attribute values; the answer follows the passages.

        The asked person's bio gets a different value for every attribute; for two-hop questions the second gold
        passage (the new employer's or birth city's page) gets different values too. ``seed`` (an int, a sequence
        of ints, or a ``np.random.Generator``) makes it deterministic: the pipeline seeds it per (seed, epoch,
        example). For ``lm`` examples the passage itself is re-rendered.
        """
        rng = _rng(seed)
        over: dict = {}
        if task == "lm":
            _, kind, i = self.passage_specs[self.passage_index[meta["passage"]]]
            over[(kind, i)] = self._cf_record(kind, i, rng)
        else:
            p = meta["person"]
            over[("person", p)] = self._cf_record("person", p, rng)
            chain = meta.get("chain") or (meta.get("sub", {}).get("chain") if meta.get("format") == "rc2" else None)
            rp = over[("person", p)]
            if chain in ("employer_hq", "employer_founder"):
                over[("org", rp["org"])] = self._cf_record("org", rp["org"], rng)
            elif chain == "birth_country":
                over[("city", rp["city"])] = self._cf_record("city", rp["city"], rng)
        view = _View(self, over)
        b = self.build(task, meta, view, rng)
        return Counterfactual(b.prompt, b.answer, b.gold, {g: self.passage_text(g, view) for g in b.gold}, over)

    def counterfactual_passages(self, passage_ids: Sequence[str], seed, cf: Optional[Counterfactual] = None) -> dict:
        """``{passage id: text}``: each passage re-rendered with random values (negatives for training).

        Each passage draws from its own stream (``seed`` + its row), so the result for one id does not depend on
        the others. Records already changed by ``cf`` are rendered with ``cf``'s values, so a negative that shares
        an entity with the counterfactual gold passages does not contradict them.
        """
        base = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        over = dict(cf.overrides) if cf is not None else {}
        out = {}
        for pid in passage_ids:
            row = self.passage_index[pid]
            _, kind, i = self.passage_specs[row]
            o = dict(over)
            if (kind, i) not in o:
                o[(kind, i)] = self._cf_record(kind, i, np.random.default_rng(base + [row]))
            out[pid] = self._render_passage(kind, i, _View(self, o))[1]
        return out


def _all_template_strings(qa_templates: int = 3) -> list:
    """Every template text; only the QA phrasings the world uses (a world's vocabulary holds what it can say)."""
    out = list(BIO_TEMPLATES + ORG_TEMPLATES + CITY_TEMPLATES + COUNTRY_TEMPLATES + LETTER_TEMPLATES
               + EVENT_TEMPLATES)
    out += [q for qs in QA_QUESTIONS.values() for q in qs[:qa_templates]] + list(TWO_HOP_QUESTIONS.values())
    out += list(RELATIONS.values()) + list(STATEMENTS.values()) + list(EL_CONTEXTS.values())
    out += list(T.TEMPLATES.values()) + ["Correspondence of", "Chronicle of", TRUE, FALSE, TITLE_FORMAT]
    out += list(OCCUPATIONS) + list(ORG_SUFFIXES)
    return [re.sub(r"\{\w+\}", " ", s) for s in out]


# ---------------------------------------------------------------------------------------------------- tokenizer
def world_vocabulary(world: World) -> list:
    """Every word token the world can produce (counterfactuals included), sorted; specials excluded."""
    vocab = set()
    for s in _all_template_strings(world.cfg.qa_templates):
        vocab.update(words(s))
    vocab.update(world.first_names + world.surnames + world.occupations + world.country_names)
    vocab.update(c["name"] for c in world.cities)
    vocab.update(w for o in world.orgs for w in (o["stem"], o["suffix"]))
    vocab.update(str(y) for y in range(world.cfg.year_min, world.cfg.year_max + 1))
    for p in world.passages:
        vocab.update(words(p.title) + words(p.text))
    for splits in world.examples.values():
        for exs in splits.values():
            for e in exs:
                vocab.update(words(prompt_of(e)))
                for a in e.answers:
                    vocab.update(words(a))
    return sorted(vocab - set(SPECIAL_TOKENS))


def non_entity_words(world: World) -> list:
    """The world's vocabulary less every word of an entity or an attribute value (first names, surnames, cities,
    countries, company stems and suffixes, occupations, years): the words of its templates, questions, relation
    names and statements, punctuation, and the markers [SEP] / [START] / [END]. Sorted. The filler pool
    `query_filler_pool = "vocab"` (data/pipeline.py): words a query may meet that never name what it looks for."""
    entity = set(world.first_names + world.surnames + world.occupations + world.country_names)
    entity |= set(OCCUPATIONS) | set(ORG_SUFFIXES) | {c["name"] for c in world.cities}
    entity |= {w for o in world.orgs for w in (o["stem"], o["suffix"])}
    entity |= {str(y) for y in range(world.cfg.year_min, world.cfg.year_max + 1)}
    return sorted((set(world_vocabulary(world)) - entity) | {"[SEP]", "[START]", "[END]"})


def build_tokenizer(world: World):
    """A ``tokenizers`` WordLevel tokenizer over the world's vocabulary.

    Pre-tokenization is ``Whitespace`` (``\\w+|[^\\w\\s]+``), so "born?" is two tokens. Ids 0..7 are
    ``<pad> <bos> <eos> <eop> [SEP] [START] [END] <unk>``; ``[SEP]``, ``[START]``, ``[END]`` survive decoding.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in world_vocabulary(world):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SKIPPED_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS
                    if t not in SKIPPED_SPECIALS])
    return tok


def load_tokenizer(path: str):
    """The world's tokenizer (``DIR/tokenizer.json``) as an `imprag_jax.data.tokenizer.Tokenizer`."""
    from imprag_jax.data.tokenizer import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path, bos="<bos>", eos="<eos>", pad="<pad>")


# ---------------------------------------------------------------------------------------------------- writing
def _length_stats(tok, texts: Sequence[str]) -> dict:
    if not texts:
        return {}
    n = np.array([len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)])
    return {"max": int(n.max()), "mean": round(float(n.mean()), 2), "p99": int(np.percentile(n, 99))}


def write_world(world: World, out_dir: str, bm25: bool = True, show_progress: bool = False) -> dict:
    """Write the world in the prepared-data layout; returns the stats (also written to ``stats.json``)."""
    os.makedirs(os.path.join(out_dir, "tasks"), exist_ok=True)
    write_passages(os.path.join(out_dir, "passages.jsonl"), world.passages)
    tok = build_tokenizer(world)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok.save(tok_path + ".tmp")
    os.replace(tok_path + ".tmp", tok_path)
    with open(os.path.join(out_dir, "world.json.tmp"), "w") as f:
        json.dump(world.to_json(), f, separators=(",", ":"))
    os.replace(os.path.join(out_dir, "world.json.tmp"), os.path.join(out_dir, "world.json"))

    passage_lens = _length_stats(tok, [format_passage(p.title, p.text, TITLE_FORMAT) + f" {EOP}"
                                       for p in world.passages])
    stats: dict = {"name": "synthetic", "seed": world.cfg.seed, "config": dataclasses.asdict(world.cfg),
                   "title_format": TITLE_FORMAT, "passage_end": EOP,
                   "corpus": {"passages": len(world.passages),
                              "by_kind": _count_kinds(world), "tokens_with_title_and_eop": passage_lens},
                   "people": {"train": len(world.train_people), "dev": len(world.dev_people)},
                   "vocab_size": tok.get_vocab_size(), "tasks": {},
                   "retrieval_tasks": list(SEEN_TASKS + UNSEEN_TASKS), "free_tasks": ["format"],
                   "lm_tasks": ["lm"]}
    for task, splits in world.examples.items():
        for split, exs in splits.items():
            write_examples(os.path.join(out_dir, "tasks", f"{task}.{split}.jsonl"), exs)
            ent = {"examples": len(exs), "prompt_tokens": _length_stats(tok, [prompt_of(e) for e in exs]),
                   "answer_tokens": _length_stats(tok, [e.answers[0] for e in exs])}
            if task == "fact_verification":
                ent["true_fraction"] = round(sum(e.answers[0] == TRUE for e in exs) / len(exs), 4)
            stats["tasks"].setdefault(task, {})[split] = ent
    if bm25:
        stats["bm25"] = write_pseudo_labels_for_world(world, out_dir, show_progress=show_progress)
    stats = json.loads(json.dumps(stats))  # the dict as stats.json holds it (string keys)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
        f.write("\n")
    return stats


def _count_kinds(world: World) -> dict:
    out: dict = {}
    for pid, kind, i in world.passage_specs:
        k = world.items[i]["kind"] if kind == "item" else ("bio" if kind == "person" else kind)
        out[k] = out.get(k, 0) + 1
    return out


def write_pseudo_labels_for_world(world: World, out_dir: str, k: int = 50, show_progress: bool = False) -> dict:
    """BM25 rankings (the whole templated prompt as the query) for every retrieval task; returns recall@1/5/10."""
    from imprag_jax.data import pseudo_labels as PL

    index = PL.BM25Index(world.passages)
    by_id = {p.id: p for p in world.passages}
    recall = {}
    for task in SEEN_TASKS + UNSEEN_TASKS:
        for split, exs in world.examples[task].items():
            labels = PL.label_examples(index, exs, k=k, queries=[prompt_of(e) for e in exs], show_progress=show_progress)
            PL.write_pseudo_labels(os.path.join(out_dir, "pseudo_labels", f"{task}.{split}.jsonl"), labels)
            r = PL.recall_at_k(exs, {lb.id: lb for lb in labels}, by_id, ks=(1, 5, 10))
            recall[f"{task}.{split}"] = {"n": r["n"], "provenance": r["provenance"],
                                         "provenance_all": r["provenance_all"], "answer": r["answer"]}
    return recall


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description="Write the imprag_jax synthetic knowledge world.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--people", type=int, default=WorldConfig.n_people)
    ap.add_argument("--first-names", type=int, default=WorldConfig.n_first_names)
    ap.add_argument("--surnames", type=int, default=WorldConfig.n_surnames)
    ap.add_argument("--cities", type=int, default=WorldConfig.n_cities)
    ap.add_argument("--countries", type=int, default=WorldConfig.n_countries)
    ap.add_argument("--orgs", type=int, default=WorldConfig.n_orgs)
    ap.add_argument("--occupations", type=int, default=WorldConfig.n_occupations)
    ap.add_argument("--letters", type=int, default=WorldConfig.n_letters)
    ap.add_argument("--events", type=int, default=WorldConfig.n_events)
    ap.add_argument("--heldout", type=float, default=WorldConfig.heldout_fraction)
    ap.add_argument("--no-bm25", action="store_true", help="skip the BM25 pseudo-labels")
    a = ap.parse_args(argv)
    cfg = WorldConfig(seed=a.seed, n_people=a.people, n_first_names=a.first_names, n_surnames=a.surnames,
                      n_cities=a.cities, n_countries=a.countries, n_orgs=a.orgs, n_occupations=a.occupations,
                      n_letters=a.letters, n_events=a.events, heldout_fraction=a.heldout)
    stats = write_world(World.generate(cfg), a.out, bm25=not a.no_bm25)
    print(f"wrote {a.out}: {stats['corpus']['passages']} passages, vocab {stats['vocab_size']}, "
          + ", ".join(f"{t}.{s}={v['examples']}" for t, d in stats["tasks"].items() for s, v in d.items()))
    for name, r in stats.get("bm25", {}).items():
        print(f"  BM25 {name}: provenance recall@1/5/10 = "
              + "/".join(f"{r['provenance'][k]:.3f}" for k in ("1", "5", "10")))
    return stats


if __name__ == "__main__":
    main()
