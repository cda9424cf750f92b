"""The synthetic knowledge world: facts, tasks, splits, counterfactuals, tokenizer, BM25, determinism."""
import filecmp
import json
import os

import pytest

pytest.importorskip("tokenizers")

from imprag_jax.data import synthetic as S  # noqa: E402
from imprag_jax.data.formats import load_examples, load_passages  # noqa: E402

SMALL = S.WorldConfig(seed=3, n_people=200, n_first_names=20, n_surnames=60, n_cities=20, n_countries=4, n_orgs=15,
                      n_letters=60, n_events=30)
TRAIN_TASKS = ("qa", "two_hop_qa", "format", "lm")


@pytest.fixture(scope="module")
def world():
    return S.World.generate(SMALL)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, world):
    d = str(tmp_path_factory.mktemp("small"))
    S.write_world(world, d, bm25=True)
    return d


@pytest.fixture(scope="module")
def default_stats(tmp_path_factory):
    """The default-size world, written once (about 4 s on the 2-core dev machine)."""
    d = str(tmp_path_factory.mktemp("default"))
    return S.write_world(S.World.generate(S.WorldConfig()), d, bm25=True)


def _passage(world, pid):
    return world.passages[world.passage_index[pid]]


def _has_name(text, name):
    """Whole-word occurrence of a (two-word) name."""
    return f" {name} " in " " + " ".join(S.words(text)) + " "


def test_default_world_size_and_vocab(default_stats):
    st = default_stats
    assert 1500 <= st["corpus"]["passages"] <= 2000
    assert st["vocab_size"] < 2000
    assert st["people"] == {"train": 800, "dev": 200}
    assert st["tasks"]["qa"]["train"]["examples"] == 6400 and st["tasks"]["qa"]["dev"]["examples"] == 1600
    for t in S.UNSEEN_TASKS:
        assert set(st["tasks"][t]) == {"dev"}
    assert set(st["tasks"]["format"]) == {"train"} and set(st["tasks"]["lm"]) == {"train"}
    assert st["corpus"]["tokens_with_title_and_eop"]["max"] <= 24  # fits l_max = 24


def test_bm25_recall_default_world(default_stats):
    # Measured (seed 0): provenance recall@5 = 1.000 for every task; recall@1 0.96-1.00 except slot filling
    # (0.81). Bounds a little below that.
    r = default_stats["bm25"]
    for name in ("qa.train", "qa.dev", "two_hop_qa.dev", "slot_filling.dev", "fact_verification.dev",
                 "entity_linking.dev"):
        assert r[name]["provenance"]["5"] >= 0.97, name
    assert r["qa.dev"]["provenance"]["1"] >= 0.90
    assert r["entity_linking.dev"]["provenance"]["1"] >= 0.90
    # two-hop: the second passage is not reachable from the question alone (the lexical retriever's known limit)
    assert r["two_hop_qa.dev"]["provenance_all"]["10"] < 0.2


def test_names_are_shared_tokens(world):
    from collections import Counter
    last = Counter(p["last"] for p in world.people)
    first = Counter(p["first"] for p in world.people)
    assert len(last) == SMALL.n_surnames and max(last.values()) <= -(-SMALL.n_people // SMALL.n_surnames)
    assert min(first.values()) >= 2
    assert len({(p["first"], p["last"]) for p in world.people}) == SMALL.n_people


def test_answers_occur_in_gold_passages(world):
    for task in ("qa", "two_hop_qa", "slot_filling", "entity_linking"):
        for split, exs in world.examples[task].items():
            for e in exs:
                gold = [_passage(world, pid) for pid in e.passage_ids]
                assert gold and gold[0].id.startswith("bio-")
                ans = e.answers[0]
                if task == "two_hop_qa":  # bio names the bridge entity; the second passage holds the answer
                    assert len(gold) == 2
                    assert " ".join(S.words(gold[1].title)) in " ".join(S.words(gold[0].text))
                    assert " ".join(S.words(ans)) in " ".join(S.words(gold[1].text))
                elif task == "entity_linking":
                    assert ans == gold[0].title
                    assert _has_name(gold[0].text, ans)
                else:
                    assert " ".join(S.words(ans)) in " ".join(S.words(gold[0].text))


def test_fact_verification_balanced_and_consistent(world):
    exs = world.examples["fact_verification"]["dev"]
    n_true = sum(e.answers[0] == S.TRUE for e in exs)
    assert n_true * 2 == len(exs)
    for e in exs:
        bio = _passage(world, e.passage_ids[0]).text
        m = e.meta
        value = S._View(world).value(m["person"], m["attr"]) if m["label"] else m["claim_value"]
        assert value in e.input
        assert (" ".join(S.words(value)) in " ".join(S.words(bio))) == m["label"]


def test_entity_linking_mention_is_ambiguous_but_context_is_not(world):
    for e in world.examples["entity_linking"]["dev"]:
        assert "[START]" in e.input and "[END]" in e.input
        mention = e.input.split("[START]")[1].split("[END]")[0].strip()
        assert mention in e.answers[0].split() and mention != e.answers[0]
        assert "Output the Wikipedia page title" in S.prompt_of(e)


def test_heldout_people_never_in_training_prompts(world):
    dev_names = {world.full_name(p) for p in world.dev_people}
    train_names = {world.full_name(p) for p in world.train_people}
    for task in TRAIN_TASKS:
        for e in world.examples[task]["train"]:
            text = " ".join(S.words(S.prompt_of(e) + " " + e.answers[0]))
            bigrams = {" ".join(p) for p in zip(S.words(text), S.words(text)[1:])}
            assert not (bigrams & dev_names), (task, e.id)
            if "person" in e.meta:
                assert e.meta["person"] in set(world.train_people)
    # every evaluation entity of the unseen formats (and of dev QA) is a held-out person
    for task in S.UNSEEN_TASKS + ("qa", "two_hop_qa"):
        for e in world.examples[task]["dev"]:
            assert world.split_of[e.meta["person"]] == "dev"
            assert world.full_name(e.meta["person"]) in dev_names - train_names


def test_format_examples_carry_their_evidence(world):
    exs = world.examples["format"]["train"]
    assert {e.meta["format"] for e in exs} == set(S.FORMATS)
    for e in exs:
        assert S.EOP in e.input and not e.passage_ids
        if e.meta["format"] != "fv":
            assert " ".join(S.words(e.answers[0])) in " ".join(S.words(e.input))
    fv = [e.answers[0] for e in exs if e.meta["format"] == "fv"]
    assert 0.3 < sum(a == S.TRUE for a in fv) / len(fv) < 0.7


def test_hard_negatives_share_a_name_or_mention_the_person(world):
    for e in world.examples["qa"]["train"][:200]:
        p = world.people[e.meta["person"]]
        assert e.meta["hard_negatives"]
        for pid in e.meta["hard_negatives"]:
            psg = _passage(world, pid)
            w = set(S.words(psg.title + " " + psg.text))
            assert pid not in e.passage_ids
            assert p["first"] in w or p["last"] in w


def test_counterfactual_changes_answer_consistently_and_is_deterministic(world):
    view = S._View(world)
    for e in world.examples["qa"]["train"][:40]:
        cf = world.counterfactual("qa", e.meta, [7, 1])
        assert cf.prompt == S.prompt_of(e)  # the question is the same
        assert cf.answer != e.answers[0]
        assert cf.gold == e.passage_ids
        text = cf.texts[cf.gold[0]]
        assert " ".join(S.words(cf.answer)) in " ".join(S.words(text))
        assert " ".join(S.words(e.answers[0])) not in " ".join(S.words(text))
        assert _has_name(text, view.name(e.meta["person"]))  # same person, other facts
        again = world.counterfactual("qa", e.meta, [7, 1])
        assert (again.answer, again.texts) == (cf.answer, cf.texts)
    answers = {world.counterfactual("qa", world.examples["qa"]["train"][0].meta, [s]).answer for s in range(20)}
    assert len(answers) > 5
    # the real world is untouched
    assert world.passage_text(world.examples["qa"]["train"][0].passage_ids[0]) == \
        _passage(world, world.examples["qa"]["train"][0].passage_ids[0]).text


def test_counterfactual_two_hop_and_format(world):
    for e in world.examples["two_hop_qa"]["train"][:30]:
        cf = world.counterfactual("two_hop_qa", e.meta, 11)
        bio, second = cf.texts[cf.gold[0]], cf.texts[cf.gold[1]]
        title = _passage(world, cf.gold[1]).title
        assert " ".join(S.words(title)) in " ".join(S.words(bio))
        assert " ".join(S.words(cf.answer)) in " ".join(S.words(second))
    for e in world.examples["format"]["train"][:50]:
        cf = world.counterfactual("format", e.meta, 5)
        assert cf.prompt != e.input and S.EOP in cf.prompt
        if e.meta["format"] != "fv":
            assert " ".join(S.words(cf.answer)) in " ".join(S.words(cf.prompt))
        else:
            assert cf.answer == e.answers[0]
    for e in world.examples["lm"]["train"][:30]:
        cf = world.counterfactual("lm", e.meta, 5)
        assert cf.prompt == e.input and cf.answer != e.answers[0]


def test_counterfactual_negatives_are_per_passage_and_respect_the_gold(world):
    e = world.examples["two_hop_qa"]["train"][0]
    cf = world.counterfactual("two_hop_qa", e.meta, 3)
    negs = e.meta["hard_negatives"][:4]
    a = world.counterfactual_passages(negs, [3, 2], cf)
    b = world.counterfactual_passages(negs[::-1], [3, 2], cf)
    assert a == b and all(a[p] != _passage(world, p).text for p in negs)
    # a negative that is the counterfactual bridge passage is rendered with the counterfactual's values
    again = world.counterfactual_passages([cf.gold[1]], [3, 2], cf)
    assert again[cf.gold[1]] == cf.texts[cf.gold[1]]


def test_tokenizer_covers_the_world(world, small_dir):
    tok = S.load_tokenizer(small_dir)
    for i, t in enumerate(S.SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert tok.pad_id == 0 and tok.bos_id == 1 and tok.eos_id == 2
    unk = tok.token_to_id("<unk>")
    texts = [p.title + ": " + p.text for p in world.passages]
    texts += [S.prompt_of(e) + " " + e.answers[0] for ts in world.examples.values() for es in ts.values() for e in es]
    for ids in tok.encode_batch(texts):
        assert unk not in ids
    e = world.examples["slot_filling"]["dev"][0]
    ids = tok.encode(S.prompt_of(e))
    assert tok.token_to_id("[SEP]") in ids
    assert tok.decode(tok.encode("Born in 1850, a <eop>")) == "Born in 1850 , a"
    assert tok.encode("Born zzqx")[1] == unk
    # counterfactual values are in the vocabulary too
    cf = world.counterfactual("qa", world.examples["qa"]["train"][5].meta, 99)
    assert unk not in tok.encode(cf.texts[cf.gold[0]] + " " + cf.answer)


def test_written_layout_and_reload(world, small_dir):
    for f in ("passages.jsonl", "stats.json", "tokenizer.json", "world.json"):
        assert os.path.exists(os.path.join(small_dir, f))
    ps = load_passages(os.path.join(small_dir, "passages.jsonl"))
    assert list(ps) == [p.id for p in world.passages]
    qa = load_examples(os.path.join(small_dir, "tasks", "qa.dev.jsonl"))
    assert [e.to_json() for e in qa] == [e.to_json() for e in world.examples["qa"]["dev"]]
    with open(os.path.join(small_dir, "pseudo_labels", "qa.dev.jsonl")) as f:
        pl = [json.loads(x) for x in f]
    assert [x["id"] for x in pl] == [e.id for e in qa] and all(len(x["ranked"]) == 50 for x in pl)
    assert not os.path.exists(os.path.join(small_dir, "pseudo_labels", "format.train.jsonl"))
    back = S.World.load(small_dir)
    assert [p.to_json() for p in back.passages] == [p.to_json() for p in world.passages]
    assert back.examples["format"]["train"][3].to_json() == world.examples["format"]["train"][3].to_json()


def test_same_seed_same_files(tmp_path, small_dir):
    d = str(tmp_path / "again")
    S.main(["--out", d, "--seed", str(SMALL.seed), "--people", str(SMALL.n_people), "--first-names", "20",
            "--surnames", "60", "--cities", "20", "--countries", "4", "--orgs", "15", "--letters", "60",
            "--events", "30"])
    rel = ["passages.jsonl", "tokenizer.json", "world.json", "stats.json"]
    rel += [os.path.join("tasks", f) for f in sorted(os.listdir(os.path.join(small_dir, "tasks")))]
    rel += [os.path.join("pseudo_labels", f) for f in sorted(os.listdir(os.path.join(small_dir, "pseudo_labels")))]
    for r in rel:
        assert filecmp.cmp(os.path.join(small_dir, r), os.path.join(d, r), shallow=False), r
    other = S.World.generate(S.WorldConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert [p.text for p in other.passages] != [p.text for p in S.World.load(small_dir).passages]


def test_long_question_phrasing_names_the_person_far_from_the_end():
    cfg = S.WorldConfig(**{**SMALL.__dict__, "qa_templates": 3})
    w = S.World.generate(cfg)
    qa = w.examples["qa"]["train"]
    assert qa, "no QA examples"
    by_tpl = {}
    for e in qa:
        by_tpl.setdefault(e.meta["tpl"], e)
    assert sorted(by_tpl) == [0, 1, 2]
    long_q = by_tpl[2].input
    name = long_q.split(" is named in")[0]
    assert long_q.startswith(name) and len(long_q.split()) - len(name.split()) >= 15, long_q
    assert all(len(by_tpl[t].input.split()) < len(long_q.split()) for t in (0, 1))
    with pytest.raises(ValueError, match="qa_templates must be 1, 2 or 3"):
        S.WorldConfig(qa_templates=4)
    # the vocabulary holds the long phrasing's words only in a world that uses it (a 2-phrasing world keeps the
    # tokenizer it had before the long phrasing existed, so earlier runs stay reproducible)
    long_words = {"named", "town", "records", "letters", "kept", "family"}
    assert long_words <= set(S.world_vocabulary(w))
    assert not long_words & set(S.world_vocabulary(S.World.generate(SMALL)))
