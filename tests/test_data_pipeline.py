"""Fixed-shape batch pipeline: the batch contract, candidates, counterfactuals, resume, determinism, hosts."""
import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record")
pytest.importorskip("tokenizers")

from imprag_jax.data import pipeline as P  # noqa: E402
from imprag_jax.data import synthetic as S  # noqa: E402

SMALL = S.WorldConfig(seed=1, n_people=150, n_first_names=15, n_surnames=50, n_cities=15, n_countries=4, n_orgs=12,
                      n_letters=40, n_events=20)


@pytest.fixture(scope="module")
def wdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    S.write_world(S.World.generate(SMALL), d, bm25=True)
    return d


@pytest.fixture(scope="module")
def tok(wdir):
    return P.load_tokenizer(wdir)


def _cfg(**kw):
    base = dict(batch_size=12, free_batch_size=4, L_q=24, L_r=4, L_free=64, l_max=24, k=4,
                tasks={"qa": 1.0, "two_hop_qa": 0.5}, free_tasks={"format": 1.0, "lm": 0.5})
    base.update(kw)
    return P.BatchConfig(**base)


def _it(wdir, tok, cfg, **kw):
    kw.setdefault("prefetch", 0)
    return P.TrainBatches(wdir, tok, cfg, **kw)


def _words(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special=True)


def _rows_ok(tok, m, pm, lm, toks, min_loss=2):
    assert np.all(lm <= m) and np.all(pm <= m) and not np.any(pm & lm)
    n_p, n = pm.sum(1), m.sum(1)
    for i in range(len(m)):
        assert np.all(pm[i, :n_p[i]] == 1) and np.all(m[i, :n[i]] == 1)  # prompt first, then response, no holes
        assert np.all(lm[i, n_p[i]:n[i]] == 1)
        assert toks[i, n[i] - 1] == tok.eos_id and np.all(toks[i, n[i]:] == tok.pad_id)
        assert lm[i].sum() >= min_loss  # an answer token and eos


def _check_contract(b, cfg, B, tok, Bf=0):
    L, Lf = cfg.L_q + cfg.L_r, cfg.Lf
    shapes = dict(tokens=(B, L), mask=(B, L), prompt_mask=(B, L), loss_mask=(B, L),
                  passages=(B, cfg.k, cfg.l_max), passage_mask=(B, cfg.k, cfg.l_max), passage_ids=(B, cfg.k),
                  positives=(B, cfg.k), example_index=(B,))
    if Bf:
        shapes.update(free_tokens=(Bf, Lf), free_mask=(Bf, Lf), free_loss_mask=(Bf, Lf), free_index=(Bf,))
    assert set(b) == set(shapes)
    for k, s in shapes.items():
        assert b[k].shape == s and b[k].dtype == np.int32, k
    _rows_ok(tok, b["mask"], b["prompt_mask"], b["loss_mask"], b["tokens"])
    if Bf:  # free rows: the response follows the prompt (plain-LM rows: bos is the prompt)
        fm, flm = b["free_mask"], b["free_loss_mask"]
        _rows_ok(tok, fm, fm & (1 - flm), flm, b["free_tokens"], min_loss=1)
    pmask, ids, pos = b["passage_mask"], b["passage_ids"], b["positives"]
    valid = ids >= 0
    assert np.array_equal(pmask.any(-1), valid)
    assert np.all(pos <= valid)
    eop = tok.token_to_id("<eop>")
    for i, j in zip(*np.nonzero(valid)):
        ln = pmask[i, j].sum()
        assert np.all(pmask[i, j, :ln] == 1) and b["passages"][i, j, ln - 1] == eop
    assert np.all(pos.sum(1) >= 1)


def test_batch_contract_and_mixture(wdir, tok):
    cfg = _cfg(positives="both", n_pos=2, negatives="both", n_neg=2, cf=1.0, cf_negatives=True)
    it = _it(wdir, tok, cfg)
    kinds = set()
    for step in range(4):
        b = it.batch(step)
        _check_contract(b, cfg, 12, tok, Bf=4)
        rows = [("r", b["tokens"][i][b["mask"][i] == 1], b["prompt_mask"][i].sum()) for i in range(12)]
        rows += [("f", b["free_tokens"][i][b["free_mask"][i] == 1], (b["free_mask"][i] & (1 - b["free_loss_mask"][i])).sum())
                 for i in range(4)]
        for kind, t, n_prompt in rows:
            text = _words(tok, t)
            kinds.add("two_hop" if kind == "r" and ("headquartered" in text or "country" in text or "founded" in text)
                      else "fmt" if "<eop>" in tok.decode(t, skip_special=False) else
                      "lm" if n_prompt == 1 else "qa")
            assert kind == "f" or "<eop>" not in tok.decode(t, skip_special=False)  # passages only in free rows
    assert kinds == {"two_hop", "fmt", "lm", "qa"}
    assert b["free_tokens"].shape[1] == 64 and b["tokens"].shape[1] == 28  # each kind of row at its own length
    # plain-LM rows: bos alone is the prompt, the passage text is the target
    b = _it(wdir, tok, _cfg(free_tasks={"lm": 1.0})).batch(0)
    for i in range(4):
        lm, m = b["free_loss_mask"][i], b["free_mask"][i]
        assert (m & (1 - lm)).sum() == 1 and b["free_tokens"][i, 0] == tok.bos_id
        assert lm.sum() >= 8 and ":" in _words(tok, b["free_tokens"][i][lm == 1])


def test_gold_positives_contain_the_answer_with_counterfactuals(wdir, tok):
    world = S.World.load(wdir)
    real = {e.id: e.answers[0] for e in world.examples["qa"]["train"]}
    rows = [e.id for e in world.examples["qa"]["train"]]
    cfg = _cfg(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=1.0,
               cf_negatives=True)
    it = _it(wdir, tok, cfg)
    changed = 0
    for step in range(3):
        b = it.batch(step)
        for i in range(cfg.batch_size):
            ans = _words(tok, b["tokens"][i][b["loss_mask"][i] == 1])
            (j,) = np.nonzero(b["positives"][i])[0]
            gold_text = _words(tok, b["passages"][i, j])
            assert f" {ans} " in f" {gold_text} "
            # the positive is the asked person's bio (same passage id, counterfactual text)
            assert b["passage_ids"][i, j] == world.passage_index[world.examples["qa"]["train"][
                int(b["example_index"][i])].passage_ids[0]]
            changed += ans != real[rows[int(b["example_index"][i])]]
    assert changed == 3 * cfg.batch_size  # cf = 1: every answer differs from the real one
    # cf = 0: the real answers and the real passages
    b = _it(wdir, tok, _cfg(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", cf=0.0)).batch(0)
    for i in range(cfg.batch_size):
        assert _words(tok, b["tokens"][i][b["loss_mask"][i] == 1]) == real[rows[int(b["example_index"][i])]]


def test_pseudo_positives_and_bm25_negatives(wdir, tok):
    labels = {}
    with open(os.path.join(wdir, "pseudo_labels", "qa.train.jsonl")) as f:
        for n, line in enumerate(f):
            labels[n] = json.loads(line)["ranked"]
    world = S.World.load(wdir)
    cfg = _cfg(tasks={"qa": 1.0}, free_batch_size=0, k=6, positives="pseudo", n_pos=2, negatives="bm25", n_neg=4,
               fill_random=False, exclude_gold_from_negatives=False)
    b = _it(wdir, tok, cfg).batch(0)
    for i in range(cfg.batch_size):
        ranked = [world.passage_index[p] for p in labels[int(b["example_index"][i])]]
        ids, pos = b["passage_ids"][i], b["positives"][i] == 1
        assert set(ids[pos]) == set(ranked[:2])
        assert set(ids[~pos]) <= set(ranked[9:50]) and (~pos).sum() == 4


def test_resume_gives_the_same_next_batch(wdir, tok):
    cfg = _cfg(cf=1.0, cf_negatives=True, negatives="both", random_neg_fraction=0.3)
    it = _it(wdir, tok, cfg, prefetch=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    after = next(it)
    it.close()
    it2 = _it(wdir, tok, cfg, prefetch=1)
    it2.set_state(state)
    for ref in (want, after):
        got = next(it2)
        for k in P.BATCH_KEYS + P.FREE_KEYS:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    it2.close()
    with pytest.raises(ValueError):
        _it(wdir, tok, _cfg(seed=5)).set_state(state)
    with pytest.raises(ValueError):  # another config
        _it(wdir, tok, _cfg(cf=1.0, cf_negatives=True, negatives="both", random_neg_fraction=0.3, k=5)).set_state(state)


def test_determinism_and_epochs(wdir, tok):
    cfg = _cfg(cf=1.0, cf_negatives=True)
    a, b = _it(wdir, tok, cfg).batch(7), _it(wdir, tok, cfg).batch(7)
    for k in P.BATCH_KEYS + P.FREE_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    c = _it(wdir, tok, _cfg(cf=1.0, cf_negatives=True, seed=1)).batch(7)
    assert not np.array_equal(a["tokens"], c["tokens"])
    # every example once per epoch, in a new order each epoch
    one = _it(wdir, tok, _cfg(tasks={"qa": 1.0}, free_batch_size=0, batch_size=8))
    n = len(S.World.load(wdir).examples["qa"]["train"])
    assert n % 8 == 0
    ep0 = np.concatenate([one.batch(s)["example_index"] for s in range(n // 8)])
    ep1 = np.concatenate([one.batch(s)["example_index"] for s in range(n // 8, 2 * n // 8)])
    assert sorted(ep0) == list(range(n)) == sorted(ep1) and not np.array_equal(ep0, ep1)


def test_host_slices_concatenate_to_the_global_batch(wdir, tok):
    cfg = _cfg(cf=1.0, cf_negatives=True)
    single = _it(wdir, tok, cfg)
    hosts = [_it(wdir, tok, cfg, process_index=p, process_count=4) for p in range(4)]
    for step in (0, 5):
        g = single.global_batch(step)
        parts = [h.batch(step) for h in hosts]
        for k in P.BATCH_KEYS + P.FREE_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k], err_msg=k)
            np.testing.assert_array_equal(single.batch(step)[k], g[k])
        assert all(p["tokens"].shape[0] == 3 and p["free_tokens"].shape[0] == 1 for p in parts)
    with pytest.raises(ValueError, match="divisible by process_count"):
        _it(wdir, tok, cfg, process_index=0, process_count=3)  # 4 free rows over 3 hosts


def test_truncation_counts(wdir, tok):
    cfg = _cfg(tasks={"qa": 1.0}, free_batch_size=0, L_q=6, L_r=2, l_max=8, positives="gold", negatives="generator",
               n_neg=1, fill_random=False)
    it = _it(wdir, tok, cfg)
    b = it.batch(0)
    _check_contract(b, cfg, cfg.batch_size, tok)
    t = it.truncation
    assert t.prompts == cfg.batch_size == t.prompts_truncated  # every QA prompt is longer than 6
    assert np.all(b["prompt_mask"].sum(1) == 6) and np.all(b["tokens"][:, 0] == tok.bos_id)
    colon, a_id = tok.token_to_id(":"), tok.token_to_id("A")
    assert np.all(b["tokens"][:, 5] == colon) and np.all(b["tokens"][:, 4] == a_id)  # the end "A :" survives
    # every passage is longer than 8 tokens: all cut (the corpus is tokenized once), all end with <eop>
    c = it.corpus_truncation
    assert c.passages == len(S.World.load(wdir).passages) == c.passages_truncated
    assert np.all(b["passage_mask"].sum(-1)[b["passage_ids"] >= 0] == 8)
    # responses: L_r = 2 keeps one answer token + eos; two-token answers (companies) are counted
    assert np.all(b["loss_mask"].sum(1) == 2)
    assert it.truncation_report()["responses_truncated"] == sum(
        len(S.words(_answer)) > 1 for _answer in _answers(wdir, b["example_index"]))
    stats = P.TruncationStats()
    toks, mask = P.corpus_tokens(wdir, tok, l_max=8, stats=stats)
    assert toks.shape == (len(S.World.load(wdir).passages), 8) and stats.passages_truncated == stats.passages


def _answers(wdir, rows):
    exs = S.World.load(wdir).examples["qa"]["train"]
    return [exs[int(r)].answers[0] for r in rows]


def test_eval_batches(wdir, tok):
    world = S.World.load(wdir)
    exs = world.examples["slot_filling"]["dev"]
    batches = list(P.eval_batches(wdir, "slot_filling", "dev", tok, batch_size=16, L_q=32, passages="gold", k=1,
                                  l_max=24))
    assert len(batches) == -(-len(exs) // 16)
    rows = np.concatenate([b["example_index"] for b in batches])
    assert list(rows[rows >= 0]) == list(range(len(exs))) and (rows < 0).sum() == len(batches) * 16 - len(exs)
    for b in batches:
        assert b["tokens"].shape == (16, 32) and b["passages"].shape == (16, 1, 24)
        for i in np.nonzero(b["valid"])[0]:
            e = exs[b["example_index"][i]]
            assert b["answers"][i] == e.answers and b["ids"][i] == e.id
            prompt = _words(tok, b["tokens"][i][b["mask"][i] == 1])
            assert prompt.endswith("A :") and "[SEP]" in prompt
            assert b["gold_ids"][i, 0] == world.passage_index[e.passage_ids[0]] == b["passage_ids"][i, 0]
            assert f" {' '.join(S.words(e.answers[0]))} " in f" {_words(tok, b['passages'][i, 0])} "
        assert not b["mask"][b["valid"] == 0].any()
    # two hosts split each batch
    h = [list(P.eval_batches(wdir, "qa", "dev", tok, batch_size=8, L_q=16, process_index=p, process_count=2,
                             limit=20)) for p in range(2)]
    full = list(P.eval_batches(wdir, "qa", "dev", tok, batch_size=8, L_q=16, limit=20))
    for a, b, f in zip(h[0], h[1], full):
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), f["tokens"])
        assert a["answers"] + b["answers"] == f["answers"]


def test_plain_kilt_directory_without_world(tmp_path, wdir, tok):
    """The layout of imprag_jax.data.prepare: raw KILT inputs templated by meta.task_type / the task name."""
    from imprag_jax.data.formats import Example, Output, Passage, write_examples, write_passages

    d = str(tmp_path)
    name = S.World.load(wdir).full_name(0)  # words the world's tokenizer knows
    ps = [Passage(f"p{i}", name, f"{name} was born in {1800 + i}.") for i in range(30)]
    write_passages(os.path.join(d, "passages.jsonl"), ps)
    exs = [Example(f"nq-{i}", f"When was {name} born?", [Output(str(1800 + i), [{"passage_id": f"p{i}"}])])
           for i in range(12)]
    write_examples(os.path.join(d, "tasks", "nq.train.jsonl"), exs)
    cfg = P.BatchConfig(batch_size=4, L_q=16, L_r=4, l_max=16, k=3, tasks={"nq": 1.0}, positives="gold",
                        negatives="random", n_neg=2)
    it = _it(d, tok, cfg)
    b = it.batch(0)
    _check_contract(b, cfg, 4, tok)
    for i in range(4):
        assert _words(tok, b["tokens"][i][b["prompt_mask"][i] == 1]) == f"Q : When was {name} born ? A :"
        assert (b["passage_ids"][i] >= 0).sum() == 3
        (j,) = np.nonzero(b["positives"][i])[0]
        assert b["passage_ids"][i, j] == int(b["example_index"][i])
    with pytest.raises(ValueError):  # no pseudo-labels and nothing to fall back on is fine; no tasks is not
        P.TrainBatches(d, tok, P.BatchConfig(batch_size=4, tasks={}), prefetch=0)


def test_query_filler_moves_the_entity_away_from_the_last_token(wdir, tok):
    """data.query_filler: filler words (never a word of an evaluated template) go before the answer marker, the
    prompt still fits L_q, the question and everything else of the row are unchanged; off, rows are as before."""
    from imprag_jax.data import templates as T

    world = S.World.load(wdir)
    pool = P.filler_words(world)
    evaluated = " ".join(re.sub(r"\{\w+\}", " ", T.TEMPLATES[t])  # the templates' words, not their slots
                         for t in ("qa", "slot_filling", "entity_linking", "fact_verification"))
    assert pool and not set(pool) & set(_words(tok, tok.encode(evaluated)).split())
    assert set(P.filler_words()) < set(pool)  # without a world: the retrieval-free instructions' words only
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=40)
    plain = _it(wdir, tok, _cfg(**kw)).batch(0)
    assert all(np.array_equal(plain[k], _it(wdir, tok, _cfg(query_filler=0.0, **kw)).batch(0)[k]) for k in plain)
    filled = _it(wdir, tok, _cfg(query_filler=1.0, query_filler_max=20, **kw)).batch(0)
    for k in ("passages", "passage_ids", "positives", "example_index"):
        assert np.array_equal(plain[k], filled[k]), k
    longer = 0
    for i in range(len(plain["tokens"])):
        p = _words(tok, plain["tokens"][i][plain["prompt_mask"][i] == 1])
        f = _words(tok, filled["tokens"][i][filled["prompt_mask"][i] == 1])
        assert filled["prompt_mask"][i].sum() <= 40
        q, marker = p[:p.rindex("A")].strip(), p[p.rindex("A"):]
        assert f.startswith(q) and f.endswith(marker)
        extra = f[len(q):len(f) - len(marker)].split()
        assert set(extra) <= set(pool)
        longer += len(extra) > 0
        ans = _words(tok, plain["tokens"][i][plain["loss_mask"][i] == 1])
        assert ans == _words(tok, filled["tokens"][i][filled["loss_mask"][i] == 1])
    assert longer >= len(plain["tokens"]) // 2


def test_query_filler_all_words_and_retrieval_only_rows(wdir, tok):
    """query_filler_pool="all" adds the evaluated templates' words; query_filler_gen=False drops the generation
    loss of exactly the filled rows (their prompts grew), the other rows keep it."""
    world = S.World.load(wdir)
    assert set(P.filler_words(world)) < set(P.filler_words(world, "all"))
    assert {"Provide", "relation", "entity"} <= set(P.filler_words(world, "all"))
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=40)
    plain = _it(wdir, tok, _cfg(**kw)).batch(1)
    b = _it(wdir, tok, _cfg(query_filler=0.5, query_filler_pool="all", query_filler_gen=False, **kw)).batch(1)
    grew = b["prompt_mask"].sum(1) > plain["prompt_mask"].sum(1)
    assert 0 < grew.sum() < len(grew)
    kept = b["loss_mask"].sum(1) > 0  # (a filled row may have drawn 0 words: then it did not grow)
    assert np.all(b["loss_mask"][grew] == 0) and kept.any() and not (kept & grew).any()
    assert np.array_equal(b["tokens"][kept], plain["tokens"][kept])
    with pytest.raises(ValueError, match="query_filler_pool"):
        _cfg(query_filler_pool="nope")


def test_query_filler_split_gives_e_q_the_filled_prompt_and_the_reader_the_plain_one(wdir, tok):
    """query_filler_split: the row's tokens, masks and loss are those of the unfilled run (the reader reads and
    trains on the plain prompt); `query_tokens` holds the filled prompt for the filled rows and the plain prompt
    for the others; the split without filler is a config error."""
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=40)
    plain = _it(wdir, tok, _cfg(**kw)).batch(1)
    filled = _it(wdir, tok, _cfg(query_filler=0.5, query_filler_pool="all", **kw)).batch(1)
    split = _it(wdir, tok, _cfg(query_filler=0.5, query_filler_pool="all", query_filler_split=True, **kw)).batch(1)
    for k in plain:
        assert np.array_equal(plain[k], split[k]), k
    np.testing.assert_array_equal(split["query_mask"], filled["prompt_mask"][:, :40])
    np.testing.assert_array_equal(split["query_tokens"] * split["query_mask"],
                                  filled["tokens"][:, :40] * filled["prompt_mask"][:, :40])
    grew = filled["prompt_mask"].sum(1) > plain["prompt_mask"].sum(1)
    assert 0 < grew.sum() < len(grew) and split["loss_mask"][grew].sum() > 0
    with pytest.raises(ValueError, match="query_filler_split"):
        _cfg(query_filler_split=True)
    # E_q's prompt gets its own length: the reader's rows stay those of a short L_q, the filled queries fit L_query
    kw.update(L_q=24)
    short = _it(wdir, tok, _cfg(**kw)).batch(1)
    own = _it(wdir, tok, _cfg(query_filler=0.5, query_filler_pool="all", query_filler_split=True, L_query=40,
                              **kw)).batch(1)
    assert all(np.array_equal(short[k], own[k]) for k in short) and own["query_tokens"].shape[1] == 40
    assert own["query_mask"].sum(1).max() > 24
    with pytest.raises(ValueError, match="L_query"):
        _cfg(L_query=40)


def test_query_filler_shuffle_mixes_the_question_words_with_the_filler(wdir, tok):
    """query_filler_order="shuffle": a filled query holds exactly the question's words plus filler words, the
    marker last, the order changed in most rows; the reader's rows (split) and the "after" rows are unchanged."""
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=24,
              query_filler=1.0, query_filler_pool="all", query_filler_split=True, L_query=40)
    after = _it(wdir, tok, _cfg(**kw)).batch(0)
    mixed = _it(wdir, tok, _cfg(query_filler_order="shuffle", **kw)).batch(0)
    pool = set(P.filler_words(S.World.load(wdir), "all"))
    for k in after:
        if not k.startswith("query"):
            assert np.array_equal(after[k], mixed[k]), k
    moved = 0
    for i in range(len(mixed["tokens"])):
        p = _words(tok, mixed["tokens"][i][mixed["prompt_mask"][i] == 1]).split()
        q = _words(tok, mixed["query_tokens"][i][mixed["query_mask"][i] == 1]).split()
        assert q[-2:] == p[-2:] == ["A", ":"]
        rest = list(q[:-2])
        for w in p[:-2]:  # every question word is there; what is left is filler
            rest.remove(w)
        assert set(rest) <= pool
        moved += q[:len(p) - 2] != p[:-2]
    assert moved >= len(mixed["tokens"]) // 2
    with pytest.raises(ValueError, match="query_filler_order"):
        _cfg(query_filler_order="first")


def test_query_filler_vocab_pool_holds_every_non_entity_word_and_no_entity(wdir, tok):
    """query_filler_pool="vocab": the world's words that name no entity or value -- slot filling's relation names,
    [SEP] and punctuation included, which the template pools lack -- and never a name, city, company, occupation
    or year; filled queries tokenize without <unk>; without a world it is a one-line error."""
    world = S.World.load(wdir)
    pool = set(P.filler_words(world, "vocab"))
    assert set(P.filler_words(world, "all")) <= pool
    assert {"place", "date", "birth", "[SEP]", "?"} <= pool and not {"place", "[SEP]"} & set(P.filler_words(world, "all"))
    entity = set(world.first_names + world.surnames + world.occupations + world.country_names)
    entity |= {c["name"] for c in world.cities} | {w for o in world.orgs for w in (o["stem"], o["suffix"])}
    entity |= {str(y) for y in range(world.cfg.year_min, world.cfg.year_max + 1)}
    assert not pool & entity
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=24,
              query_filler=1.0, query_filler_pool="vocab", query_filler_split=True, L_query=40,
              query_filler_order="shuffle")
    b = _it(wdir, tok, _cfg(**kw)).batch(0)
    q = b["query_tokens"][b["query_mask"] == 1]
    assert tok.token_to_id("<unk>") not in set(q.tolist()) and tok.token_to_id("[SEP]") in set(q.tolist())
    with pytest.raises(ValueError, match="vocab"):
        P.filler_words(None, "vocab")


def test_query_filler_shuffle_entity_keeps_the_name_whole(wdir, tok):
    """query_filler_order="shuffle_entity": the question's words and the filler in a random order as with "shuffle",
    but the entity's name (the gold passage's title) stays whole and in order in every filled query."""
    assert P._word_units("Where was Daivau Ropos born ?".split(), ["Daivau Ropos"]) == [
        "Where", "was", "Daivau Ropos", "born", "?"]
    assert P._word_units("Which company employs Daivau Ropos?".split(), ["Daivau Ropos"])[-1] == "Daivau Ropos?"
    assert P._word_units("a b c".split(), []) == ["a", "b", "c"]
    titles = [json.loads(line)["title"] for line in open(os.path.join(wdir, "passages.jsonl"))]
    kw = dict(tasks={"qa": 1.0}, free_batch_size=0, positives="gold", negatives="generator", n_neg=3, cf=0.0, L_q=24,
              query_filler=1.0, query_filler_pool="vocab", query_filler_split=True, L_query=40)
    b = _it(wdir, tok, _cfg(query_filler_order="shuffle_entity", **kw)).batch(0)
    split_names = 0
    for i in range(len(b["tokens"])):
        q = _words(tok, b["query_tokens"][i][b["query_mask"][i] == 1])
        name = titles[int(b["passage_ids"][i][np.argmax(b["positives"][i])])]
        assert name in q, (name, q)
    mixed = _it(wdir, tok, _cfg(query_filler_order="shuffle", **kw)).batch(0)
    for i in range(len(mixed["tokens"])):
        q = _words(tok, mixed["query_tokens"][i][mixed["query_mask"][i] == 1])
        split_names += titles[int(mixed["passage_ids"][i][np.argmax(mixed["positives"][i])])] not in q
    assert split_names >= len(mixed["tokens"]) // 3  # plain shuffle tears most names apart
