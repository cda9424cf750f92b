"""Bring-your-own KILT data: usage mistakes are one-line errors (exit 2), provenance is resolved to passages (by
passage id, by page with or without a paragraph range), unresolvable provenance is an error unless
--allow_unresolved, and then every recall report says over how many examples it is measured; oracle reading of
examples without gold is an error (none has gold) or leaves them out (some lack it)."""
import json
import os
import re

import pytest

from imprag_jax.data import formats
from imprag_jax.data.formats import DataError

PAGES = [
    {"wikipedia_id": "1", "wikipedia_title": "Ann Lee", "text": [
        "Ann Lee\n", "Ann Lee is a poet born in Leeds.\n", "Section::::Work.\n", "She wrote Blue Hills in 1990.\n"]},
    {"wikipedia_id": "2", "wikipedia_title": "Leeds", "text": [
        "Leeds\n", "Leeds is a city in England.\n", "It lies on the river Aire.\n"]},
    {"wikipedia_id": "3", "wikipedia_title": "York", "text": ["York\n", "York is an old city in England.\n"]},
]


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ex(eid, inp, answer, *prov):
    return {"id": eid, "input": inp, "output": [{"answer": answer, "provenance": list(prov)}]}


@pytest.fixture()
def files(tmp_path):
    ks = _jsonl(tmp_path / "knowledge.jsonl", PAGES)
    sf = _jsonl(tmp_path / "birthplaces.jsonl", [
        _ex("s1", "Ann Lee [SEP] place of birth", "Leeds", {"wikipedia_id": "1", "title": "Ann Lee"}),
        _ex("s2", "Leeds [SEP] river", "Aire", {"wikipedia_id": "2", "start_paragraph_id": 2, "end_paragraph_id": 2}),
        _ex("s3", "York [SEP] country", "England", {"wikipedia_id": 3}),
        _ex("s4", "Bob Ray [SEP] country", "England", {"wikipedia_id": "99", "title": "Bob Ray"})])
    fv = _jsonl(tmp_path / "claims.jsonl", [
        _ex("c1", "Ann Lee wrote Blue Hills.", "SUPPORTS",
            {"wikipedia_id": "1", "start_paragraph_id": 1, "end_paragraph_id": 3}),
        _ex("c2", "York is in France.", "REFUTES", {"wikipedia_id": "3"})])
    return tmp_path, ks, sf, fv


def _main(argv, capsys):
    from imprag_jax.data.prepare import main

    with pytest.raises(SystemExit) as e:
        main(argv + ["--no_progress", "--no_pseudo_labels"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_usage_mistakes_are_one_line_errors(files, capsys):
    tmp, ks, sf, fv = files
    base = ["--kilt_knowledge", ks, "--out", str(tmp / "out")]
    err = _main(base + ["--kilt_task", f"birthplaces.dev={sf}"], capsys)
    assert err.startswith("prepare: error: ") and "--kilt_task_type birthplaces=TYPE" in err
    err = _main(base + ["--kilt_task", f"birthplaces.dev={sf}", "--kilt_task_type", "birthplaces=slotfilling"],
                capsys)
    assert "unknown task type 'slotfilling'" in err and "slot_filling" in err
    err = _main(base + ["--kilt_task", f"birthplaces.dev={sf}", "--kilt_task_type", "birthplaces"], capsys)
    assert "NAME=VALUE" in err
    err = _main(base + ["--kilt_task", f"birthplaces.dev={sf}", "--kilt_task_type", "places=qa"], capsys)
    assert "names no --kilt_task" in err
    err = _main(base + ["--kilt_task", f"birthplaces.dev={tmp / 'nope.jsonl'}", "--kilt_task_type",
                        "birthplaces=slot_filling"], capsys)
    assert "no such file" in err and "nope.jsonl" in err
    err = _main(base + ["--kilt_task", f"birthplaces.dev={tmp}", "--kilt_task_type", "birthplaces=slot_filling"],
                capsys)
    assert "is a folder" in err
    err = _main(["--kilt_knowledge", str(tmp / "none.jsonl"), "--out", str(tmp / "out"), "--kilt_task",
                 f"fever.dev={fv}"], capsys)
    assert "no such file" in err
    # an input the task type cannot read (slot filling needs "entity [SEP] relation")
    err = _main(base + ["--kilt_task", f"claims.dev={fv}", "--kilt_task_type", "claims=slot_filling"], capsys)
    assert "example 'c1'" in err and "[SEP]" in err
    assert not os.path.exists(tmp / "out")  # a failed run leaves no output folder


def test_page_provenance_resolves_to_passages(files):
    from imprag_jax.data.prepare import prepare_kilt

    tmp, ks, sf, fv = files
    out = str(tmp / "out")
    stats = prepare_kilt({"birthplaces.dev": sf, "claims.dev": fv}, ks, out, allow_unresolved=True,
                         task_types={"birthplaces": "slot_filling", "claims": "fact_verification"},
                         pseudo_labels=False, show_progress=False)
    ex = {e.id: e for e in formats.load_examples(os.path.join(out, "tasks", "birthplaces.dev.jsonl"))}
    assert ex["s1"].passage_ids == ["1_1", "1_3"]  # page only: every passage of the page is gold
    assert ex["s2"].passage_ids == ["2_2"]  # a paragraph range: those paragraphs
    assert ex["s3"].passage_ids == ["3_1"]  # an integer wikipedia_id is read as the page's id
    assert ex["s4"].passage_ids == [] and ex["s4"].wikipedia_ids == ["99"]  # kept on record, not gold
    assert ex["s1"].wikipedia_ids == ["1"]  # the page-level entry stays beside the resolved passages
    cl = {e.id: e for e in formats.load_examples(os.path.join(out, "tasks", "claims.dev.jsonl"))}
    assert cl["c1"].passage_ids == ["1_1", "1_3"] and cl["c1"].answers == ["True"]  # paragraph 2 is a heading
    assert cl["c2"].passage_ids == ["3_1"] and cl["c2"].answers == ["False"]
    sp = stats["tasks"]["birthplaces"]["splits"]["dev"]
    assert sp == {"examples": 4, "with_provenance": 4, "with_gold": 3, "without_gold": 1, "unresolved": 1}
    assert stats["tasks"]["claims"]["splits"]["dev"]["without_gold"] == 0
    assert stats["notes"]["birthplaces:page_level_provenance"] == 2
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["tasks"]["birthplaces"]["splits"]["dev"]["without_gold"] == 1

    # chunked passages of a passage-JSONL source with wikipedia_id fields: a page is every chunk of it, a paragraph
    # range (no paragraph numbers there) the whole page
    ks2 = _jsonl(tmp / "psgs.jsonl", [
        {"id": "a", "title": "Ann Lee", "wikipedia_id": "1",
         "text": "Ann Lee is a poet. She was born in Leeds. She wrote Blue Hills."},
        {"id": "b", "title": "Leeds", "wikipedia_id": "2", "text": "Leeds is a city."}])
    qa = _jsonl(tmp / "qa.jsonl", [_ex("q1", "where was Ann Lee born", "Leeds", {"wikipedia_id": "1"}),
                                   _ex("q2", "what is Leeds", "a city",
                                       {"wikipedia_id": "2", "start_paragraph_id": 4, "end_paragraph_id": 4})])
    st = prepare_kilt({"nq": qa}, ks2, str(tmp / "o2"), l_max=5, pseudo_labels=False, show_progress=False)
    got = {e.id: e.passage_ids for e in formats.load_examples(str(tmp / "o2" / "tasks" / "nq.dev.jsonl"))}
    assert got == {"q1": ["a#0", "a#1", "a#2"], "q2": ["b"]}
    assert st["notes"]["nq:paragraph_range_read_as_whole_page"] == 1


def test_unresolved_provenance_is_an_error_unless_allowed(files, capsys):
    from imprag_jax.data.prepare import main, prepare_kilt

    tmp, ks, sf, fv = files
    with pytest.raises(DataError) as e:
        prepare_kilt({"birthplaces.dev": sf}, ks, str(tmp / "o"), task_types={"birthplaces": "slot_filling"},
                     pseudo_labels=False, show_progress=False)
    msg = str(e.value)
    assert "\n" not in msg and sf in msg and "1 of 4 examples" in msg and "'s4'" in msg and "'99'" in msg
    assert "--allow_unresolved" in msg
    err = _main(["--kilt_knowledge", ks, "--out", str(tmp / "o"), "--kilt_task", f"birthplaces.dev={sf}",
                 "--kilt_task_type", "birthplaces=slot_filling"], capsys)
    assert "--allow_unresolved" in err
    # passage ids the knowledge source lacks, and page ids of a source without pages, are unresolved too
    psg = _jsonl(tmp / "p.jsonl", [{"id": "p1", "title": "T", "text": "Some text."}])
    bad = _jsonl(tmp / "bad.jsonl", [_ex("b1", "q", "x", {"passage_id": "p9"}), _ex("b2", "q2", "x",
                                                                                   {"wikipedia_id": "5"})])
    with pytest.raises(DataError, match=r"2 of 2 examples .*passage_id 'p9'"):
        prepare_kilt({"nq": bad}, psg, str(tmp / "o3"), pseudo_labels=False, show_progress=False)
    st = prepare_kilt({"nq": bad}, psg, str(tmp / "o3"), pseudo_labels=False, show_progress=False,
                      allow_unresolved=True)
    assert st["tasks"]["nq"]["splits"]["dev"]["without_gold"] == 2
    assert st["notes"]["nq:unresolved_passage_ids_removed"] == 1
    b1 = formats.load_examples(str(tmp / "o3" / "tasks" / "nq.dev.jsonl"))[0]
    assert b1.provenance == []  # an unknown passage id is not written out


def test_allowed_unresolved_is_counted_in_stats_and_bm25_recall(files, capsys):
    pytest.importorskip("bm25s")
    from imprag_jax.data.prepare import main

    tmp, ks, sf, fv = files
    out = str(tmp / "out")
    assert main(["--kilt_knowledge", ks, "--out", out, "--kilt_task", f"birthplaces.dev={sf}", "--kilt_task_type",
                 "birthplaces=slot_filling", "--allow_unresolved", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    stats = json.load(open(os.path.join(out, "stats.json")))
    rec = stats["bm25"]["recall"]["birthplaces.dev"]
    assert rec["n"] == 4 and rec["n_provenance"] == 3  # gold recall over the 3 examples that have gold
    assert re.search(r"\| birthplaces\.dev \| 4 \|.*\| 3 / 4 \|", printed)
    assert "birthplaces.dev 1 of 4 (1 with provenance the knowledge source lacks)" in printed
    assert re.search(r"\| birthplaces \| unseen \| slot_filling \| dev \| 4 \| 4 \| 1 \|", printed)


# ------------------------------------------------------------------------------------------- evaluation reports


def _word_tokenizer(out):
    """A word-level tokenizer over the prepared folder's words, saved as its tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from imprag_jax.data.pipeline import load_tokenizer

    words = set()
    for root, _, names in os.walk(out):
        for n in names:
            if n.endswith(".jsonl"):
                words |= set(re.findall(r"\w+|[^\w\s]+", open(os.path.join(root, n), encoding="utf-8").read()))
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<eop>", "[UNK]"] + sorted(words))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(os.path.join(out, "tokenizer.json"))
    return load_tokenizer(out)


def test_recall_reports_and_oracle_over_examples_with_gold(files):
    import jax

    from imprag_jax.data.pipeline import corpus_tokens
    from imprag_jax.data.prepare import prepare_kilt
    from imprag_jax.evaluation import check_oracle, markdown_table
    from imprag_jax.infer.imprag import NoGoldError, Retriever, evaluate_modes, passage_texts
    from imprag_jax.infer.recall import recall_rows
    from imprag_jax.model import ModelConfig, init_params

    tmp, ks, sf, fv = files
    out = str(tmp / "out")
    nogold = _jsonl(tmp / "nogold.jsonl", [_ex("n1", "Ann Lee [SEP] occupation", "poet", {"wikipedia_id": "7"}),
                                           _ex("n2", "York [SEP] river", "Ouse")])
    prepare_kilt({"birthplaces.dev": sf, "unknown.dev": nogold}, ks, out, allow_unresolved=True,
                 task_types={"birthplaces": "slot_filling", "unknown": "slot_filling"}, pseudo_labels=False,
                 show_progress=False)
    tok = _word_tokenizer(out)
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    toks, mask = corpus_tokens(out, tok, 16)
    retr = Retriever.build(params, cfg, toks, mask, passage_texts(out))
    kw = dict(split="dev", L_q=24, l_max=16, max_new_tokens=2, batch_size=4)
    rows = []
    for task in ("birthplaces", "unknown"):
        rows += evaluate_modes(params, cfg, out, task, tok, retr, mode="imprag", ks=(1,), **kw)
    bp, un = rows
    assert (bp["n"], bp["n_gold"]) == (4, 3) and bp["gold_recall@5"] is not None
    assert (un["n"], un["n_gold"]) == (2, 0) and un["gold_recall@1"] is None and "gold_recall@10" in un
    oracle = evaluate_modes(params, cfg, out, "birthplaces", tok, None, mode="oracle", ks=(1,), **kw)[0]
    assert (oracle["n"], oracle["n_gold"]) == (4, 3) and oracle["em"] is not None
    with pytest.raises(NoGoldError, match="none of the 2 examples of unknown.dev"):
        evaluate_modes(params, cfg, out, "unknown", tok, None, mode="oracle", ks=(1,), **kw)
    with pytest.raises(NoGoldError):
        check_oracle(out, ["birthplaces", "unknown"], ["imprag", "oracle"], "dev", None)
    check_oracle(out, ["unknown"], ["imprag"], "dev", None)  # no oracle asked: fine

    rec = recall_rows(params, cfg, out, ["birthplaces", "unknown"], tok, corpus=(toks, mask),
                      texts=passage_texts(out), modes=("recall",), L_q=24)
    assert [(r["n"], r["n_gold"]) for r in rec] == [(4, 3), (2, 0)]
    assert rec[1]["gold_recall@5"] is None and rec[0]["gold_recall@5"] is not None
    table = markdown_table(rec + rows + [oracle]).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert "with gold" in head and "gold_recall@1" in head  # the column stays although one task has no gold
    cells = {(r.split("|")[1].strip(), r.split("|")[2].strip()): [c.strip() for c in r.strip("|").split("|")]
             for r in table[2:]}
    un_row = cells[("unknown", "imprag")]
    assert un_row[head.index("with gold")] == "0/2" and un_row[head.index("gold_recall@1")] == "n/a"
    assert cells[("birthplaces", "oracle")][head.index("with gold")] == "3/4"
    assert cells[("birthplaces", "recall")][head.index("with gold")] == "3/4"


def test_bm25_recall_leaves_out_provenance_the_passages_lack():
    from imprag_jax.data.formats import Example, Output, Passage
    from imprag_jax.data.pseudo_labels import recall_at_k

    ps = {"1_1": Passage("1_1", "Ann", "a poet", "1"), "2_1": Passage("2_1", "Leeds", "a city", "2")}
    exs = [Example("e1", "q", [Output("poet", [{"wikipedia_id": "1"}])], {"task_type": "qa"}),
           Example("e2", "q", [Output("x", [{"wikipedia_id": "77"}, {"passage_id": "9_9"}])], {"task_type": "qa"}),
           Example("e3", "q", [Output("city", [{"passage_id": "2_1"}])], {"task_type": "qa"})]
    r = recall_at_k(exs, {"e1": ["1_1", "2_1"], "e2": ["1_1", "2_1"], "e3": ["1_1", "2_1"]}, ps, ks=(1, 2))
    assert r["n"] == 3 and r["n_provenance"] == 2  # e2's gold is nowhere: not a miss, not measured
    assert r["provenance"] == {1: 0.5, 2: 1.0}
