"""Data formats, templates, chunking, pseudo-labels and the mini-KILT converters (on the real release files).

The real-data tests read ``../shared/data`` relative to the repository root (override with the environment
variable ``IMPRAG_SHARED_DATA``) and skip with a reason when it is absent. They run on subsets (``limit=``) so
the whole file takes well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import sys

import pytest

from imprag_jax.data import chunking, formats, pseudo_labels, templates
from imprag_jax.data.chunking import TruncationStats
from imprag_jax.data.formats import DataError, Example, Output, Passage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IMPRAG_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
HAVE_DATA = os.path.isfile(os.path.join(SHARED, "nq_open", "nq-open-oracle.jsonl.gz"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"real data not found at {SHARED} (set IMPRAG_SHARED_DATA)")
try:
    import bm25s  # noqa: F401
    HAVE_BM25 = True
except ImportError:
    HAVE_BM25 = False
needs_bm25 = pytest.mark.skipif(not HAVE_BM25, reason="bm25s not installed (pip install 'imprag_jax[data]')")

LIMIT = 300  # records per source in the real-data subset


class WordTok:
    """A word-level stub tokenizer: one id per word or punctuation mark."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r"\w+|[^\w\s]", text)]


def _bpe_tokenizer():
    """A small byte-level BPE trained on the fly (the same kind of tokenizer as Llama-3 / SmolLM2)."""
    tokenizers = pytest.importorskip("tokenizers")
    from imprag_jax.data.tokenizer import Tokenizer
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    text = ["The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen of Germany.",
            "Deadpool 2 is scheduled to be released in the United States on May 18, 2018."] * 20
    tok.train_from_iterator(text, tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tok)


# ============================================================================================== templates
def test_paper_templates_exact():
    r = templates.render
    assert r("qa", {"question": "who wrote hamlet"}) == "Q: who wrote hamlet A:"
    assert r("fact_verification", {"statement": "Paris is in France."}) == \
        "Is this statement true? Paris is in France. A:"
    assert r("slot_filling", {"entity": "Louis Trochu", "relation": "native language"}) == (
        "Louis Trochu [SEP] native language Provide the answer corresponding to the relation specified after "
        "[SEP] for the entity mentioned before [SEP] A:")
    assert r("entity_linking", {"context": "EU rejects [START] British [END] lamb"}) == (
        "EU rejects [START] British [END] lamb Output the Wikipedia page title of the entity mentioned between "
        "[START] and [END] in the given text A:")
    assert r("reading_comprehension", {"context": "Ann is 3.", "question": "How old is Ann?"}) == \
        "Ann is 3. Q: How old is Ann? A:"
    assert r("phrase_denoising", {"context": "a [START] b [END] c"}) == (
        "a [START] b [END] c Recover the original phrases marked between [START] and [END] in the given text A:")
    for d in ("next", "previous"):
        assert r("sentence_generation", {"context": "Ann ran.", "direction": d}) == (
            f"Ann ran. [SEP] {d} sentence Generate a sentence corresponding to the relation specified after [SEP] "
            "for the context mentioned before [SEP] A:")
    assert r("summarization", {"context": "Long text."}) == "Long text. Summarize this article:"


def test_response_and_pair():
    assert templates.render_response("  Wilhelm  Röntgen ") == " Wilhelm Röntgen"
    p, resp = templates.render_pair("qa", {"question": "who?  "}, "him")
    assert p + resp == "Q: who? A: him"
    with pytest.raises(templates.TemplateError, match="empty answer"):
        templates.render_response("  ")


def test_template_errors_and_overrides():
    with pytest.raises(templates.TemplateError, match="unknown task type 'nope'"):
        templates.render("nope", {})
    with pytest.raises(templates.TemplateError, match=r"needs field\(s\) \['relation'\]"):
        templates.render("slot_filling", {"entity": "X"})
    with pytest.raises(templates.TemplateError, match="needs field"):
        templates.render("qa", {"question": "   "})
    with pytest.raises(templates.TemplateError, match="direction"):
        templates.render("sentence_generation", {"context": "a", "direction": "sideways"})
    with pytest.raises(templates.TemplateError, match="plain field name"):
        templates.merge_templates({"qa": "Q: {0} A:"})
    over = {"qa": "Question: {question}\nAnswer:", "yesno": "{claim}? yes or no:"}
    assert templates.render("qa", {"question": "q"}, over) == "Question: q\nAnswer:"
    assert templates.render("yesno", {"claim": "c"}, over) == "c? yes or no:"
    assert templates.render("qa", {"question": "q"}) == "Q: q A:"  # defaults untouched
    with pytest.raises(TypeError):
        templates.TEMPLATES["qa"] = "x"  # read-only


def test_fields_from_kilt_input_and_task_names():
    assert templates.fields_from_input("slot_filling", "Ann [SEP] place of birth") == \
        {"entity": "Ann", "relation": "place of birth"}
    assert templates.fields_from_input("entity_linking", "a [START_ENT] UK [END_ENT] b") == \
        {"context": "a [START] UK [END] b"}
    with pytest.raises(templates.TemplateError, match="entity \\[SEP\\] relation"):
        templates.fields_from_input("slot_filling", "no separator")
    assert templates.task_type_for("trex") == "slot_filling"
    assert templates.task_type_for("structured_zeroshot-dev-kilt") == "slot_filling"
    assert templates.task_type_for("fever.dev") == "fact_verification"
    assert templates.task_type_for("aidayago2") == "entity_linking"
    assert templates.task_type_for("mystery") is None
    ex = Example("1", "Ann [SEP] employer", [Output("Acme")], {"task_type": "slot_filling"})
    assert templates.render_example(ex).startswith("Ann [SEP] employer Provide")
    ex.meta["fields"] = {"entity": "Bob", "relation": "employer"}
    assert templates.render_example(ex).startswith("Bob [SEP] employer")
    with pytest.raises(templates.TemplateError, match="no meta.task_type"):
        templates.render_example(Example("2", "q", [Output("a")], {}))


# ============================================================================================== chunking
def test_prompt_truncated_from_the_left():
    tok, st = WordTok(), TruncationStats()
    full = tok.encode("one two three four five six A :")
    ids = chunking.encode_prompt(tok, "one two three four five six A :", 4, st)
    assert ids == full[-4:]  # the end of the prompt survives
    assert chunking.encode_prompt(tok, "short A :", 4, st) == tok.encode("short A :")
    ids = chunking.encode_prompt(tok, "one two three four five six A :", 4, st, bos_id=999)
    assert ids == [999] + full[-3:]
    assert (st.prompts, st.prompts_truncated, st.prompt_tokens_cut) == (3, 2, 4 + 5)
    with pytest.raises(ValueError):
        chunking.encode_prompt(tok, "x", 1, bos_id=0)


def test_passage_title_prefix_and_truncation():
    assert chunking.format_passage("Paris", "is big") == "Paris: is big"
    assert chunking.format_passage("", "is big") == "is big"
    assert chunking.format_passage("Paris", "is big", None) == "is big"
    assert chunking.format_passage("Paris", "is big", "{title}\n{text}") == "Paris\nis big"
    tok, st = WordTok(), TruncationStats()
    ids = chunking.encode_passage(tok, "Paris", "a b c d e f", 5, stats=st)
    assert ids == tok.encode("Paris: a b c d e f")[:5]
    chunking.encode_passage(tok, "P", "a", 5, stats=st)
    assert (st.passages, st.passages_truncated, st.passage_tokens_cut) == (2, 1, 3)


@pytest.mark.parametrize("make_tok", [WordTok, _bpe_tokenizer], ids=["words", "bpe"])
def test_chunk_passage_covers_text_within_l_max(make_tok):
    tok = make_tok()
    text = ("The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany. " * 6).strip()
    p = Passage("nq:0", "Nobel Prize", text)
    st = TruncationStats()
    out = chunking.chunk_passage(p, tok, 24, stats=st)
    assert len(out) > 2 and [c.id for c, _ in out] == [f"nq:0#{i}" for i in range(len(out))]
    assert " ".join(c.text for c, _ in out).split() == text.split()  # nothing lost, nothing repeated
    for c, ids in out:
        assert 0 < len(ids) <= 24 and c.title == "Nobel Prize"
        assert ids == list(tok.encode(chunking.format_passage(c.title, c.text)))  # re-encodes to the same ids
    # chunks are maximal: adding the next word would not fit
    for (c, _), (nxt, _) in zip(out, out[1:]):
        longer = c.text + " " + nxt.text.split()[0]
        assert len(tok.encode(chunking.format_passage(c.title, longer))) > 24
    assert (st.passages, st.passages_chunked, st.chunks, st.passages_truncated) == (1, 1, len(out), 0)
    short = chunking.chunk_passage(Passage("x", "T", "tiny text"), tok, 24, stats=st)
    assert short[0][0].id == "x" and len(short) == 1
    assert f"1/2 passages chunked ({len(out) + 1} passages out)" in st.summary()


def test_chunk_passage_word_longer_than_l_max_is_cut():
    class CharTok:
        def encode(self, text):
            return [ord(c) for c in text]
    st = TruncationStats()
    out = chunking.chunk_passage(Passage("p", "", "ab " + "x" * 30 + " cd"), CharTok(), 10, stats=st)
    assert all(len(ids) <= 10 for _, ids in out)
    assert st.passages_truncated == 1 and st.passage_tokens_cut == 20
    assert list(chunking.encode_passages([Passage("p", "", "a b")], CharTok(), 10, mode="chunk"))[0][1] == \
        [ord(c) for c in "a b"]
    with pytest.raises(ValueError, match="mode"):
        list(chunking.encode_passages([], CharTok(), 10, mode="slice"))


def test_sentence_packing():
    text = 'He said "Yes." Then 3 dogs ran! The U.S. Army is big? Yes'
    sents = [text[s:e] for s, e in chunking.split_sentences(text)]
    assert sents[0] == 'He said "Yes."' and sents[1] == "Then 3 dogs ran!" and sents[-1] == "Yes"
    chunks = chunking.pack_sentences(["a b c", "d e f g h i j", "k"], 4)
    assert chunks == [[(0, "a b c")], [(1, "d e f g")], [(1, "h i j"), (2, "k")]]
    assert chunking.pack_sentences(["a b", "", "c"], 0) == [[(0, "a b"), (2, "c")]]
    words = ("w " * 250).split()
    assert [len(c.split()) for c in chunking.chunk_words(" ".join(words), 100)] == [100, 100, 50]
    a, b = TruncationStats(prompts=1, chunks=2), TruncationStats(prompts=2, passages_chunked=1)
    assert a.merge(b).as_dict()["prompts"] == 3 and a.passages_chunked == 1


# =============================================================================================== formats
def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"id": "a", "input": "q?", "output": [{"answer": "x", "provenance": [{"passage_id": "p1"}]}]})


def test_malformed_json_reports_file_and_line(tmp_path):
    path = _write(tmp_path / "t.jsonl", [GOOD, '{"id": "b", "input": ', ""])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON")):
        formats.load_examples(path)
    path = _write(tmp_path / "l.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=":2: expected a JSON object"):
        formats.load_examples(path)


@pytest.mark.parametrize("output,msg", [
    ([], "no answer"),
    ([{"provenance": [{"passage_id": "p1"}]}], "no answer"),
    ([{"answer": "   "}], r"output\[0\].answer is empty"),
    ([{"answer": 3}], "must be a string"),
    ([{"answer": "x", "provenance": [{"title": "T"}]}], "neither 'passage_id' nor 'wikipedia_id'"),
    ("x", "'output' must be a list"),
])
def test_bad_answers(tmp_path, output, msg):
    path = _write(tmp_path / "t.jsonl", [GOOD, json.dumps({"id": "b", "input": "q", "output": output})])
    with pytest.raises(DataError, match=msg) as e:
        formats.load_examples(path)
    assert f"{path}:2: example 'b'" in str(e.value)


def test_missing_fields_and_test_sets(tmp_path):
    path = _write(tmp_path / "t.jsonl", [json.dumps({"id": "a", "output": [{"answer": "x"}]})])
    with pytest.raises(DataError, match="missing field 'input'"):
        formats.load_examples(path)
    path = _write(tmp_path / "t2.jsonl", [json.dumps({"id": "a", "input": "q"})])
    assert formats.load_examples(path, allow_no_answers=True)[0].answers == []


def test_duplicate_ids(tmp_path):
    path = _write(tmp_path / "t.jsonl", [GOOD, GOOD])
    with pytest.raises(DataError, match=":2: duplicate example id 'a'"):
        formats.load_examples(path)
    ex = formats.example_from_json(json.loads(GOOD))
    with pytest.raises(DataError, match="duplicate example id"):
        formats.validate_examples([ex, ex])
    path = _write(tmp_path / "p.jsonl", ['{"id": "p1", "title": "T", "text": "x"}',
                                         '{"id": "p1", "title": "T", "text": "y"}'])
    with pytest.raises(DataError, match="duplicate passage id 'p1'"):
        formats.load_passages(path)


def test_unknown_provenance(tmp_path):
    ex = formats.example_from_json(json.loads(GOOD))
    assert formats.validate_examples([ex], passage_ids={"p1"}) == 1
    with pytest.raises(DataError, match="unknown passage 'p1'"):
        formats.validate_examples([ex], passage_ids={"p2"}, source="nq.dev")
    wex = formats.example_from_json({"id": "w", "input": "q", "output": [
        {"answer": "x", "provenance": [{"wikipedia_id": 12, "title": "T"}]}]})
    assert formats.validate_examples([wex], passage_ids={"p1"}, wikipedia_ids={"12"}) == 1
    assert formats.validate_examples([wex], passage_ids={"p1"}) == 0  # no page ids known: not checkable
    with pytest.raises(DataError, match="unknown wikipedia_id 12"):
        formats.validate_examples([wex], wikipedia_ids={"13"})


def test_empty_passage(tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"id": "p1", "title": "T", "text": "x"}',
                                         '{"id": "p2", "title": "T", "text": "  "}'])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: passage 'p2' is empty")):
        formats.load_passages(path)
    path = _write(tmp_path / "q.jsonl", ['{"id": "", "title": "T", "text": "x"}'])
    with pytest.raises(DataError, match="field 'id' is empty"):
        formats.load_passages(path)


def test_roundtrip_gz_and_kilt_pages(tmp_path):
    ps = [Passage("p1", "Titel", "Röntgen won.\u2028 ok"), Passage("p2", "", "x", wikipedia_id="7")]
    for name in ("p.jsonl", "p.jsonl.gz"):
        path = str(tmp_path / name)
        assert formats.write_passages(path, ps) == 2
        assert list(formats.load_passages(path).values()) == ps
    first = open(tmp_path / "p.jsonl.gz", "rb").read()
    formats.write_passages(str(tmp_path / "p.jsonl.gz"), ps)
    assert open(tmp_path / "p.jsonl.gz", "rb").read() == first  # no timestamp in the gzip header
    ex = formats.example_from_json(json.loads(GOOD) | {"meta": {"task_type": "qa"}})
    formats.write_examples(str(tmp_path / "t.jsonl"), [ex])
    back = formats.load_examples(str(tmp_path / "t.jsonl"))[0]
    assert back.to_json() == ex.to_json() and back.passage_ids == ["p1"] and back.task_type == "qa"
    page = {"wikipedia_id": "12", "wikipedia_title": "Ann", "text": [
        "Ann\n", "Ann is a poet.\n", "Section::::Life.\n", "BULLET::::- She wrote.\n", "  \n"]}
    _write(tmp_path / "ks.jsonl", [json.dumps(page)])
    got = list(formats.iter_passages(str(tmp_path / "ks.jsonl")))
    assert [(p.id, p.text, p.wikipedia_id) for p in got] == [("12_1", "Ann is a poet.", "12"),
                                                              ("12_3", "She wrote.", "12")]


# ========================================================================================= pseudo-labels
def test_positives_and_hard_negatives():
    pl = pseudo_labels.PseudoLabel("ex1", [f"p{i}" for i in range(1, 51)], [50.0 - i for i in range(50)])
    assert pseudo_labels.positives(pl) == ["p1", "p2", "p3", "p4", "p5"]
    neg = pseudo_labels.sample_hard_negatives(pl, 5, seed=3)
    assert len(neg) == 5 and all(10 <= int(p[1:]) <= 50 for p in neg)
    assert neg == sorted(neg, key=lambda p: int(p[1:]))  # rank order
    assert neg == pseudo_labels.sample_hard_negatives(pl, 5, seed=3)  # seeded
    draws = {tuple(pseudo_labels.sample_hard_negatives(pl, 5, seed=s)) for s in range(10)}
    assert len(draws) > 5  # the seed matters
    other = pseudo_labels.PseudoLabel("ex2", pl.ranked, pl.scores)
    assert any(pseudo_labels.sample_hard_negatives(other, 5, seed=s) != pseudo_labels.sample_hard_negatives(
        pl, 5, seed=s) for s in range(5))  # and the example id
    neg = pseudo_labels.sample_hard_negatives(pl, 100, exclude={"p10", "p11"})
    assert len(neg) == 39 and "p10" not in neg and neg[0] == "p12"
    assert pseudo_labels.sample_hard_negatives(["a"] * 3, 2) == []  # ranking shorter than rank 10
    with pytest.raises(ValueError):
        pseudo_labels.sample_hard_negatives(pl, 2, lo=0)


def test_pseudo_label_files(tmp_path):
    pls = [pseudo_labels.PseudoLabel("a", ["p1", "p2"], [2.5, 1.0]), pseudo_labels.PseudoLabel("b", ["p2"], [1.0])]
    path = str(tmp_path / "pl.jsonl")
    pseudo_labels.write_pseudo_labels(path, pls)
    assert json.loads(open(path).readline()) == {"id": "a", "ranked": ["p1", "p2"], "scores": [2.5, 1.0]}
    assert pseudo_labels.load_pseudo_labels(path)["b"].ranked == ["p2"]
    _write(tmp_path / "bad.jsonl", ['{"id": "a", "ranked": ["p1", "p2"], "scores": [1.0]}'])
    with pytest.raises(DataError, match="bad.jsonl:1: 'scores' must be a list as long as 'ranked'"):
        pseudo_labels.load_pseudo_labels(str(tmp_path / "bad.jsonl"))


def test_answer_matching_and_recall():
    ait = pseudo_labels.answer_in_text
    assert ait(["Röntgen"], "awarded to Wilhelm Conrad ROENTGEN, no: Rontgen.")
    assert not ait(["one"], "someone came")
    assert ait(["U.S. Army"], "the u.s. army (1901)")
    assert not ait(["", " "], "anything")
    ps = {"p1": Passage("p1", "Paris", "capital of France"), "p2": Passage("p2", "Lyon", "a city"),
          "p3": Passage("p3", "Nice", "on the coast")}
    exs = [Example("e1", "q", [Output("France", [{"passage_id": "p1"}])], {"task_type": "qa"}),
           Example("e2", "q", [Output("coast", [{"passage_id": "p3"}, {"passage_id": "p2"}])], {"task_type": "qa"}),
           Example("e3", "s", [Output("True", [{"passage_id": "p2"}])], {"task_type": "fact_verification"})]
    ranks = {"e1": ["p2", "p1", "p3"], "e2": ["p3", "p1", "p2"], "e3": ["p2", "p3", "p1"]}
    r = pseudo_labels.recall_at_k(exs, ranks, ps, ks=(1, 2, 3))
    assert r["n"] == 3 and r["n_answer"] == 2  # fact verification has no answer recall
    assert r["answer"] == {1: 0.5, 2: 1.0, 3: 1.0}
    assert r["provenance"] == {1: round(2 / 3, 4), 2: 1.0, 3: 1.0}
    assert r["provenance_all"] == {1: round(1 / 3, 4), 2: round(2 / 3, 4), 3: 1.0}
    with pytest.raises(KeyError):
        pseudo_labels.recall_at_k(exs, {}, ps)


@needs_bm25
def test_bm25_index_toy():
    ps = [Passage("a", "Cats", "Cats purr and sleep all day."), Passage("b", "Rockets", "Rockets fly to orbit."),
          Passage("c", "Bread", "Bakers bake bread at night.")]
    idx = pseudo_labels.BM25Index(ps)
    ranked, scores = idx.search(["Q: when do bakers work? A:", "Q: what flies to orbit A:"], k=5)
    assert ranked[0][0] == "c" and ranked[1][0] == "b" and len(ranked[0]) == 3  # k clipped to the corpus
    assert scores.shape == (2, 3) and (scores[:, 0] >= scores[:, 1]).all()
    exs = [Example("x", "when do bakers work", [Output("night")], {"task_type": "qa"})]
    pl = pseudo_labels.label_examples(idx, exs, k=2)
    assert pl[0].id == "x" and pl[0].ranked[0] == "c" and len(pl[0].scores) == 2


def test_missing_bm25s_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'imprag_jax[data]'")):
        pseudo_labels.BM25Index([Passage("a", "", "x")])


def test_dense_labeller_local_dir_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        pseudo_labels.DenseIndex([Passage("a", "", "x")], str(tmp_path / "no-such-model"))
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    words = "cats purr sleep rockets fly orbit bakers bake bread night the to and at all day".split()
    (tmp_path / "m").mkdir()
    vocab = tmp_path / "m" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "."] + words) + "\n")
    tr.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(tmp_path / "m"))
    torch.manual_seed(0)
    tr.BertModel(tr.BertConfig(vocab_size=len(words) + 7, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(str(tmp_path / "m"))
    ps = [Passage("a", "cats", "cats purr and sleep all day"), Passage("b", "rockets", "rockets fly to orbit"),
          Passage("c", "bread", "bakers bake bread at night")]
    idx = pseudo_labels.DenseIndex(ps, str(tmp_path / "m"), normalize=True)
    queries = [chunking.format_passage(p.title, p.text) for p in ps]
    ranked, scores = idx.search(queries, k=3)
    assert [r[0] for r in ranked] == ["a", "b", "c"]  # a text is closest to itself
    assert abs(float(scores[0, 0]) - 1.0) < 1e-4 and (scores[:, :-1] >= scores[:, 1:]).all()


# ========================================================================================= real mini-KILT
@pytest.fixture(scope="module")
def minikilt(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip(f"real data not found at {SHARED} (set IMPRAG_SHARED_DATA)")
    pytest.importorskip("bm25s")
    from imprag_jax.data.prepare import prepare_minikilt
    out = str(tmp_path_factory.mktemp("minikilt"))
    stats = prepare_minikilt(SHARED, out, seed=0, limit=LIMIT, show_progress=False)
    return out, stats


def _load_tasks(out):
    tasks = {}
    for f in sorted(os.listdir(os.path.join(out, "tasks"))):
        tasks[f[:-len(".jsonl")]] = formats.load_examples(os.path.join(out, "tasks", f))
    return tasks


@needs_data
@pytest.mark.data
def test_minikilt_converters(minikilt):
    out, stats = minikilt
    ps = formats.load_passages(os.path.join(out, "passages.jsonl"))
    tasks = {n: x for n, x in _load_tasks(out).items() if n.split(".")[0] in stats["retrieval_tasks"]}
    assert sorted(tasks) == ["hotpotqa.dev", "nq.dev", "nq.train", "scifact.dev", "squad.dev", "squad.train",
                             "trex.dev"]
    assert len(ps) == stats["passages"]["total"] and all(len(p.text.split()) <= 100 for p in ps.values())
    assert {k.split(":")[0] for k in ps} == {"nq", "squad", "hotpotqa", "scifact", "trex", "dpr"}
    assert len({(p.title, p.text) for p in ps.values()}) == len(ps)  # deduplicated
    for name, exs in tasks.items():
        formats.validate_examples(exs, passage_ids=ps, source=name)  # provenance resolves
        assert exs and all(e.answers and e.passage_ids for e in exs), name
        assert stats["tasks"][name.split(".")[0]]["splits"][name.split(".")[1]]["examples"] == len(exs)
        for e in exs:
            templates.render_example(e)  # every example renders with its template
        if name.split(".")[0] in ("nq", "squad", "trex"):  # the evidence chunk holds the answer
            hit = sum(any(pseudo_labels.answer_in_text(e.answers, ps[p].title + " " + ps[p].text)
                          for p in e.passage_ids) for e in exs)
            assert hit == len(exs), name
    assert {a for e in tasks["scifact.dev"] for a in e.answers} == {"True", "False"}
    assert stats["dropped"]["scifact:not_enough_info"] > 0
    labels = {json.loads(l)["label"] for l in open(os.path.join(SHARED, "trex", "relations.jsonl"))}
    for e in tasks["trex.dev"]:
        assert e.meta["fields"]["relation"] in labels and e.input.endswith(e.meta["fields"]["relation"])
        assert e.passage_ids[0].startswith("trex:") and "[MASK]" not in ps[e.passage_ids[0]].text
    assert sum(len(e.passage_ids) >= 2 for e in tasks["hotpotqa.dev"]) >= 90  # two supporting paragraphs
    nq0 = tasks["nq.train"][0] if tasks["nq.train"][0].id == "nq-0" else next(
        e for n in ("nq.train", "nq.dev") for e in tasks[n] if e.id == "nq-0")
    assert nq0.input == "who got the first nobel prize in physics" and nq0.answers == ["Wilhelm Conrad Röntgen"]


FREE = ("squad_rc", "phrase_denoising", "sentence_generation", "lm")


@needs_data
@pytest.mark.data
def test_retrieval_free_training_tasks(minikilt):
    """squad_rc / phrase denoising / sentence generation / plain text: built from the pool, no retrieval."""
    out, stats = minikilt
    ps = formats.load_passages(os.path.join(out, "passages.jsonl"))
    tasks = _load_tasks(out)
    assert stats["free_tasks"] == ["squad_rc", "phrase_denoising", "sentence_generation"]
    assert stats["lm_tasks"] == ["lm"]
    squad_q = {e.input for e in tasks["squad.train"]}
    for e in tasks["squad_rc.train"]:
        assert e.meta["kind"] == "free" and e.meta["fields"]["question"] in squad_q
        assert e.meta["fields"]["context"] == ps[e.meta["passage"]].text
        assert pseudo_labels.answer_in_text(e.answers, e.meta["fields"]["context"])
        assert e.input.endswith(" A:") and e.input.startswith(e.meta["fields"]["context"])
    for e in tasks["phrase_denoising.train"]:
        ctx = e.meta["fields"]["context"]
        noisy = ctx.split("[START] ")[1].split(" [END]")[0].split()
        orig = e.answers[0].split()
        assert sorted(noisy) == sorted(orig) and noisy != orig and 2 <= len(orig) <= 4
        assert ctx.replace("[START] " + " ".join(noisy) + " [END]", e.answers[0]) == ps[e.meta["passage"]].text
        assert "Recover the original phrases" in e.input
    for e in tasks["sentence_generation.train"]:
        f = e.meta["fields"]
        text = ps[e.meta["passage"]].text
        assert f["direction"] in ("next", "previous") and f["context"] in text and e.answers[0] in text
        first, second = (f["context"], e.answers[0]) if f["direction"] == "next" else (e.answers[0], f["context"])
        assert text.index(first) < text.index(second)
    n3 = sum(len(tasks[f"{t}.train"]) for t in stats["free_tasks"])
    assert abs(len(tasks["lm.train"]) - 0.1 * n3) <= 1
    assert all(e.meta["kind"] == "lm" and e.answers[0] == ps[e.meta["passage"]].text for e in tasks["lm.train"])
    # the pipeline reads them as retrieval-free rows (the stats lists are its defaults)
    from imprag_jax.convert.fetch import smollm2_path
    from imprag_jax.data.pipeline import BatchConfig, TrainBatches

    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2): pipeline part skipped")
    from imprag_jax.convert.gguf import load_gguf_tokenizer

    it = TrainBatches(out, load_gguf_tokenizer(path), BatchConfig(batch_size=4, free_batch_size=4, tasks={"nq": 1.0}, L_q=256,
                                                         L_r=16, l_max=64, k=2, positives="pseudo",
                                                         negatives="bm25", n_neg=1, cf=0.0), prefetch=0)
    b = it.batch(0)
    assert it.free_tasks == {t: 1.0 for t in FREE}
    assert b["free_tokens"].shape == (4, 256 + 16) and b["tokens"].shape == (4, 256 + 16)
    assert (b["free_loss_mask"].sum(1) > 0).all() and (b["loss_mask"].sum(1) > 0).all()


@needs_data
@pytest.mark.data
def test_no_eval_question_in_train(minikilt):
    out, _ = minikilt
    tasks = _load_tasks(out)
    norm = pseudo_labels.normalize_text
    train = {norm(e.input) for n, xs in tasks.items() if n.endswith(".train") and n.split(".")[0] not in FREE
             for e in xs}
    evals = {norm(e.input) for n, xs in tasks.items() if not n.endswith(".train") for e in xs}
    assert train and evals and not train & evals
    for t in ("nq", "squad"):
        n_tr, n_dev = len(tasks[f"{t}.train"]), len(tasks[f"{t}.dev"])
        assert 0.15 < n_dev / (n_tr + n_dev) < 0.25
    assert not any(n.startswith(("hotpotqa", "scifact", "trex")) and n.endswith(".train") for n in tasks)


@needs_data
@pytest.mark.data
def test_pseudo_label_files_real(minikilt):
    out, _ = minikilt
    ps = formats.load_passages(os.path.join(out, "passages.jsonl"))
    for name, exs in _load_tasks(out).items():
        if name.split(".")[0] in FREE:
            assert not os.path.exists(os.path.join(out, "pseudo_labels", f"{name}.jsonl"))
            continue
        pls = list(pseudo_labels.iter_pseudo_labels(os.path.join(out, "pseudo_labels", f"{name}.jsonl")))
        assert [p.id for p in pls] == [e.id for e in exs]  # same order as the task file
        for p in pls:
            assert len(p.ranked) == 50 == len(set(p.ranked)) and all(r in ps for r in p.ranked)
            assert all(a >= b for a, b in zip(p.scores, p.scores[1:]))


@needs_data
@pytest.mark.data
def test_bm25_recall_on_real_subset(minikilt):
    """BM25 (query = templated prompt) on the LIMIT-record subset: recall above stated floors."""
    _, stats = minikilt
    rec = stats["bm25"]["recall"]

    def pooled(task, kind, k):
        parts = [r for n, r in rec.items() if n.split(".")[0] == task]
        n = sum(r["n_answer" if kind == "answer" else "n_provenance"] for r in parts)
        return sum(r[kind][k] * r["n_answer" if kind == "answer" else "n_provenance"] for r in parts) / n

    assert pooled("nq", "answer", 5) >= 0.85
    assert pooled("squad", "answer", 5) >= 0.80
    assert pooled("trex", "answer", 5) >= 0.90
    assert pooled("scifact", "provenance", 10) >= 0.85
    assert pooled("hotpotqa", "provenance", 10) >= 0.90
    assert rec["scifact.dev"]["answer"] is None  # True/False answers: no substring recall
    for r in rec.values():  # recall grows with k
        for kind in ("answer", "provenance"):
            if r[kind]:
                assert r[kind][1] <= r[kind][5] <= r[kind][10]


@needs_data
@pytest.mark.data
@needs_bm25
def test_prepare_is_deterministic_and_seeded(tmp_path, capsys):
    from imprag_jax.data.prepare import main, prepare_minikilt
    a, b, c = (str(tmp_path / x) for x in "abc")
    assert main(["--source", SHARED, "--out", a, "--limit", "120", "--no_progress"]) == 0
    assert "| nq | seen | qa | train |" in capsys.readouterr().out
    prepare_minikilt(SHARED, b, seed=0, limit=120, show_progress=False)
    cmp = filecmp.dircmp(a, b)
    files = ["passages.jsonl", "stats.json"] + [f"tasks/{f}" for f in os.listdir(os.path.join(a, "tasks"))] + \
        [f"pseudo_labels/{f}" for f in os.listdir(os.path.join(a, "pseudo_labels"))]
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == 2 + (7 + 4) + 7, cmp  # 4 retrieval-free task files
    prepare_minikilt(SHARED, c, seed=1, limit=120, show_progress=False, pseudo_labels=False)
    read = lambda d, f: open(os.path.join(d, f)).read()  # noqa: E731
    assert read(a, "tasks/nq.dev.jsonl") != read(c, "tasks/nq.dev.jsonl")  # the seed moves the split
    assert read(a, "passages.jsonl") == read(c, "passages.jsonl")


def test_missing_source_folder(tmp_path):
    from imprag_jax.data.prepare import build_minikilt, main
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_minikilt(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nq-open-oracle.jsonl.gz"):
        build_minikilt(str(tmp_path / "empty"))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "o")])  # neither --source nor KILT files


@needs_bm25
def test_prepare_kilt_files(tmp_path):
    """Full-size KILT mode on tiny files: KILT pages as knowledge, paragraph provenance resolved, bad input caught."""
    from imprag_jax.data.prepare import main, prepare_kilt
    pages = [{"wikipedia_id": "1", "wikipedia_title": "Ann Lee", "text": [
        "Ann Lee\n", "Ann Lee is a poet born in Leeds.\n", "Section::::Work.\n", "She wrote Blue Hills in 1990.\n"]},
        {"wikipedia_id": "2", "wikipedia_title": "Leeds", "text": ["Leeds\n", "Leeds is a city in England.\n"]}]
    ks = _write(tmp_path / "ks.jsonl", [json.dumps(p) for p in pages])
    tr = _write(tmp_path / "trex-dev-kilt.jsonl", [json.dumps({
        "id": "t1", "input": "Ann Lee [SEP] place of birth", "output": [
            {"answer": "Leeds", "provenance": [{"wikipedia_id": "1", "title": "Ann Lee", "start_paragraph_id": 1,
                                                "end_paragraph_id": 1}]}]})])
    qa = _write(tmp_path / "myqa.jsonl", [json.dumps({"id": "q1", "input": "which poem from 1990 did Ann Lee write",
                                                      "output": [{"answer": "Blue Hills"}]})])
    fev = _write(tmp_path / "fever-dev-kilt.jsonl", [json.dumps({
        "id": "f1", "input": "Ann Lee was born in Leeds.", "output": [{"answer": "SUPPORTS", "provenance": [
            {"wikipedia_id": "1", "title": "Ann Lee", "start_paragraph_id": 1, "end_paragraph_id": 3}]}]})])
    out = str(tmp_path / "out")
    stats = prepare_kilt({"trex": tr, "myqa.test": qa, "fever": fev}, ks, out, task_types={"myqa": "qa"},
                         show_progress=False)
    fx = formats.load_examples(os.path.join(out, "tasks", "fever.dev.jsonl"))[0]
    assert fx.answers == ["True"] and fx.passage_ids == ["1_1", "1_3"]  # paragraph 2 is a section heading
    assert templates.render_example(fx) == "Is this statement true? Ann Lee was born in Leeds. A:"
    assert stats["notes"]["fever:relabelled_answers"] == 1
    assert stats["passages"]["total"] == 3 and stats["tasks"]["trex"]["splits"]["dev"]["examples"] == 1
    ex = formats.load_examples(os.path.join(out, "tasks", "trex.dev.jsonl"))[0]
    assert ex.passage_ids == ["1_1"] and ex.meta["task_type"] == "slot_filling"
    assert ex.meta["fields"] == {"entity": "Ann Lee", "relation": "place of birth"}
    pl = pseudo_labels.load_pseudo_labels(os.path.join(out, "pseudo_labels", "myqa.test.jsonl"))
    assert pl["q1"].ranked[0] == "1_3"
    assert stats["bm25"]["recall"]["trex.dev"]["provenance"][1] == 1.0
    bad = _write(tmp_path / "bad-dev.jsonl", [json.dumps({"id": "b", "input": "q", "output": [
        {"answer": "x", "provenance": [{"wikipedia_id": "99", "title": "Nope"}]}]})])
    with pytest.raises(DataError, match="wikipedia_id '99' is not a page of the knowledge source"):
        prepare_kilt({"nq": bad}, ks, str(tmp_path / "o2"), show_progress=False)
    with pytest.raises(DataError, match="--kilt_task_type"):
        prepare_kilt({"mystery": qa}, ks, str(tmp_path / "o3"), show_progress=False)
    assert main(["--kilt_knowledge", ks, "--kilt_task", f"trex.dev={tr}", "--out", str(tmp_path / "o4"),
                 "--no_progress"]) == 0
    assert os.path.exists(tmp_path / "o4" / "pseudo_labels" / "trex.dev.jsonl")


@needs_bm25
def test_prepare_kilt_passage_knowledge_with_chunking(tmp_path):
    from imprag_jax.data.prepare import prepare_kilt
    ks = _write(tmp_path / "psgs.jsonl", [
        json.dumps({"id": "p1", "title": "Ann",
                    "text": "Ann was born in Leeds. She moved to York in 1990. Then she wrote."}),
        json.dumps({"id": "p2", "title": "York", "text": "York is old."})])
    qa = _write(tmp_path / "qa-dev.jsonl", [json.dumps({"id": "q", "input": "where was Ann born", "output": [
        {"answer": "Leeds", "provenance": [{"passage_id": "p1"}]}]})])
    stats = prepare_kilt({"nq": qa}, ks, str(tmp_path / "o"), l_max=5, show_progress=False)
    ps = formats.load_passages(str(tmp_path / "o" / "passages.jsonl"))
    assert list(ps) == ["p1#0", "p1#1", "p1#2", "p2"] and stats["chunking"]["documents_chunked"] == 1
    ex = formats.load_examples(str(tmp_path / "o" / "tasks" / "nq.dev.jsonl"))[0]
    assert ex.passage_ids == ["p1#0"]  # a split passage's provenance names the chunk holding the answer
    bad = _write(tmp_path / "bad-dev.jsonl", [json.dumps({"id": "q", "input": "x", "output": [
        {"answer": "y", "provenance": [{"passage_id": "p9"}]}]})])
    with pytest.raises(DataError, match="passage_id 'p9' is not a passage of the knowledge source"):
        prepare_kilt({"nq": bad}, ks, str(tmp_path / "o2"), show_progress=False)
