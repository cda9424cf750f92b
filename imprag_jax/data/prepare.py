"""Build imprag_jax's task files, knowledge source and BM25 pseudo-labels.

Mini-KILT from the original release files (``../shared/data`` relative to the repository root)::

    python -m imprag_jax.data.prepare --source ../shared/data --out DIR [--seed 0] [--l_max 100] [--no_tfds]

Full-size KILT files, validated, copied and pseudo-labelled (the knowledge source may be passage JSONL
``{"id", "title", "text"[, "wikipedia_id"]}`` or KILT's own one-page-per-line file)::

    python -m imprag_jax.data.prepare --kilt_knowledge kilt_knowledgesource.json \\
        --kilt_task nq.dev=nq-dev-kilt.jsonl --kilt_task trex.dev=trex-dev-kilt.jsonl --out DIR \\
        [--kilt_task_type mytask=slot_filling] [--allow_unresolved] [--no_tfds]

A task whose name is not a KILT task needs ``--kilt_task_type NAME=TYPE`` (or ``meta.task_type`` in its
examples). Provenance is resolved to passages by passage id, by page and paragraph range, or by page alone (every
passage of the page is then gold); provenance the knowledge source lacks is an error unless
``--allow_unresolved`` (then stats.json counts the examples left without a gold passage).

Output in DIR::

    passages.jsonl                     pooled knowledge source, deduplicated
    tasks/{task}.{split}.jsonl         KILT task files (meta.task_type / meta.fields drive the templates)
    pseudo_labels/{task}.{split}.jsonl BM25 top-50 per example, query = the templated prompt
    stats.json                         counts, chunking, dropped records, BM25 recall@1/5/10
    tfds/imprag_kilt/1.0.0/            the task splits and passages as a TFDS dataset (ArrayRecord files,
                                       `imprag_jax.data.tfds_kilt`), written last; the pipeline and the evaluation
                                       read the task splits through it. ``--no_tfds`` (``tfds=False``) leaves it
                                       out (and removes one an earlier run left): the JSONL-only folder, whose task
                                       splits the pipeline turns into ``records/*.array_record`` on first use.

The TFDS dataset is the default dataset layer: the batches are the same bit for bit either way, and a folder at a
bucket path (``data.dir=gs://...``, `imprag_jax.data.paths`) is read through it (the JSONL-only folder would need
its ``records/`` written next to it). Its cost (docs/data.md): on the test-size mini-KILT
(``--limit 60 --free_per_task 20``) 2.0 s instead of 1.5 s and 1.5 MB -> 3.5 MB on disk; on the whole mini-KILT
18.7 s instead of 14.7 s and 79 MB -> 119 MB.

Mini-KILT tasks: ``nq`` and ``squad`` (seen formats, train/dev split by question text) and ``hotpotqa``,
``scifact``, ``trex`` (unseen formats, evaluation only: split ``dev``); retrieval-free training tasks in the paper's
spirit (`build_free_tasks`): ``squad_rc`` (SQuAD with its passage as context), ``phrase_denoising``,
``sentence_generation`` and plain-text ``lm`` rows. No evaluation question text occurs in
any train file. Passages longer than ``--l_max`` words are split at sentence boundaries (``0`` = keep whole);
provenance points at the chunk that holds the evidence. The output is a deterministic function of the inputs
and the flags: two runs write the same bytes.

Public API (besides the command line)
  * ``build_minikilt(source, seed=0, l_max=100, dev_frac=0.2, limit=None) -> MiniKilt`` (passages, examples per
    ``(task, split)``, stats) -- no files written.
  * ``prepare_minikilt(source, out, seed=0, l_max=100, dev_frac=0.2, limit=None, bm25_k=50, query="prompt",
    show_progress=True, tfds=True) -> dict`` (the stats).
  * ``prepare_kilt(tasks, knowledge, out, l_max=0, bm25_k=50, task_types=None, allow_unresolved=False, ...,
    tfds=True) -> dict``; ``check_kilt_inputs(tasks, knowledge, task_types)`` -- the usage mistakes, before any work.
  * ``write_tfds(out, tfds=True)`` -- the folder's dataset layer alone (``check_tfds``: tensorflow-datasets there).
  * ``stats_markdown(stats) -> str`` -- the tables of ``docs/data.md``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import time
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from imprag_jax.cli import first_line
from imprag_jax.data.chunking import pack_sentences, split_sentences
from imprag_jax.data.formats import (DataError, Example, Output, Passage, iter_examples, iter_jsonl,
                                     iter_passages, validate_examples, write_examples, write_passages)
from imprag_jax.data.pseudo_labels import (BM25Index, answer_in_text, label_examples, normalize_text, recall_at_k,
                                           write_pseudo_labels)
from imprag_jax.data.templates import fields_from_input, render, task_type_for

SEEN_TASKS = ("nq", "squad")
UNSEEN_TASKS = ("hotpotqa", "scifact", "trex")
SOURCE_ORDER = ("nq", "squad", "hotpotqa", "scifact", "trex", "dpr")  # first copy of a duplicate passage wins
RECALL_KS = (1, 5, 10)
FEVER_LABELS = {"SUPPORTS": "True", "REFUTES": "False"}


# --------------------------------------------------------------------------------------------- intermediate
@dataclass
class Doc:
    """A source document before chunking: sentences, so evidence can be located in a chunk."""
    id: str
    title: str
    sentences: list
    source: str


@dataclass
class RawExample:
    task: str
    id: str
    input: str
    answers: list
    task_type: str
    fields: dict
    refs: list  # [(doc_id, frozenset(sentence ids) | None)]; None: the chunk(s) holding an answer
    meta: dict = field(default_factory=dict)


@dataclass
class MiniKilt:
    passages: list  # [Passage]
    examples: dict  # {(task, split): [Example]}
    stats: dict


def _distinct(xs):
    out, seen = [], set()
    for x in xs:
        x = " ".join(str(x).split())
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _path(source: str, *parts: str) -> str:
    p = os.path.join(source, *parts)
    if not os.path.exists(p):
        raise FileNotFoundError(f"missing source file {p} (see ../shared/data/README.md for the expected layout)")
    return p


def _sentences_of(text: str) -> list:
    return [text[s:e] for s, e in split_sentences(text)]


# ------------------------------------------------------------------------------------------------ converters
def convert_nq(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """NQ-open dev questions that have a gold DPR passage -> QA; the gold passages -> documents."""
    docs: "OrderedDict[tuple, Doc]" = OrderedDict()
    exs = []
    with gzip.open(_path(source, "nq_open", "nq-open-oracle.jsonl.gz"), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(exs) >= limit:
                break
            r = json.loads(line)
            answers = _distinct(r.get("answers") or [])
            if not answers:
                drops["nq:no_answer"] += 1
                continue
            refs = []
            ctxs = [c for c in r.get("ctxs", []) if c.get("isgold")] or r.get("ctxs", [])
            for c in ctxs:
                key = (c["title"].strip(), " ".join(c["text"].split()))
                if not key[1]:
                    continue
                if key in docs:
                    drops["merged:nq_duplicate_passage"] += 1
                else:
                    docs[key] = Doc(f"nq:{len(docs)}", key[0], _sentences_of(c["text"]), "nq")
                refs.append((docs[key].id, None))
            q = " ".join(r["question"].split())
            exs.append(RawExample("nq", f"nq-{i}", q, answers, "qa", {"question": q}, refs,
                                  {"source": "NQ-open dev (oracle subset)"}))
    return list(docs.values()), exs


def convert_squad(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """SQuAD v1.1 dev: paragraphs -> documents, questions -> open-domain QA (`Q: {question} A:`)."""
    with zipfile.ZipFile(_path(source, "squad", "dev-v1.1.json.zip")) as z:
        name = next(n for n in sorted(z.namelist()) if n.endswith(".json"))
        data = json.loads(z.read(name).decode("utf-8"))["data"]
    docs, exs = [], []
    for a, art in enumerate(data):
        title = art["title"].replace("_", " ").strip()
        for p, para in enumerate(art["paragraphs"]):
            if limit is not None and len(exs) >= limit:
                return docs, exs
            ctx = para["context"]
            spans = split_sentences(ctx)
            doc = Doc(f"squad:{a}-{p}", title, [ctx[s:e] for s, e in spans], "squad")
            docs.append(doc)
            for qa in para["qas"]:
                if limit is not None and len(exs) >= limit:
                    break
                answers = _distinct(x["text"] for x in qa.get("answers", []))
                if not answers:
                    drops["squad:no_answer"] += 1
                    continue
                sents = set()
                for x in qa["answers"]:
                    lo, hi = x["answer_start"], x["answer_start"] + len(x["text"])
                    sents |= {j for j, (s, e) in enumerate(spans) if s < hi and lo < e}
                q = " ".join(qa["question"].split())
                exs.append(RawExample("squad", f"squad-{qa['id']}", q, answers, "qa", {"question": q},
                                      [(doc.id, frozenset(sents) or None)], {"source": "SQuAD v1.1 dev"}))
    return docs, exs


def convert_hotpotqa(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """HotpotQA distractor sample: the 10 paragraphs of each question -> documents; questions -> multi-hop QA."""
    docs: "OrderedDict[tuple, Doc]" = OrderedDict()
    exs = []
    for _, r in iter_jsonl(_path(source, "hotpotqa", "hotpot-qa-distractor-sample.jsonl")):
        if limit is not None and len(exs) >= limit:
            break
        by_title = {}
        for title, sents in zip(r["context"]["title"], r["context"]["sentences"]):
            sents = [" ".join(s.split()) for s in sents]
            key = (title.strip(), " ".join(" ".join(sents).split()))
            if not key[1]:
                continue
            if key in docs:
                drops["merged:hotpotqa_duplicate_paragraph"] += 1
            else:
                docs[key] = Doc(f"hotpotqa:{len(docs)}", key[0], sents, "hotpotqa")
            by_title[title] = docs[key].id
        want: "OrderedDict[str, set]" = OrderedDict()
        for title, sid in zip(r["supporting_facts"]["title"], r["supporting_facts"]["sent_id"]):
            if title not in by_title:
                drops["hotpotqa:supporting_fact_not_in_context"] += 1
                continue
            want.setdefault(by_title[title], set()).add(int(sid))
        answers = _distinct([r["answer"]])
        if not answers:
            drops["hotpotqa:no_answer"] += 1
            continue
        q = " ".join(r["question"].split())
        exs.append(RawExample("hotpotqa", f"hotpotqa-{r['id']}", q, answers, "qa", {"question": q},
                              [(d, frozenset(s)) for d, s in want.items()],
                              {"source": "HotpotQA dev distractor sample", "type": r.get("type"),
                               "level": r.get("level")}))
    return list(docs.values()), exs


def convert_scifact(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """SciFact claims -> fact verification (SUPPORT -> "True", REFUTE -> "False", not-enough-info dropped);
    abstracts -> documents."""
    exs = []
    for split in ("train", "dev"):
        for _, c in iter_jsonl(_path(source, "scifact", f"claims_{split}.jsonl")):
            if limit is not None and len(exs) >= limit:
                break
            labels = {e["label"] for evs in c.get("evidence", {}).values() for e in evs}
            if not labels:
                drops["scifact:not_enough_info"] += 1
                continue
            if len(labels) > 1:
                drops["scifact:mixed_labels"] += 1
                continue
            label = labels.pop()
            if label not in ("SUPPORT", "REFUTE"):
                drops[f"scifact:label_{label}"] += 1
                continue
            refs = [(f"scifact:{d}", frozenset(s for e in evs for s in e["sentences"]))
                    for d, evs in sorted(c["evidence"].items(), key=lambda kv: int(kv[0]))]
            st = " ".join(c["claim"].split())
            exs.append(RawExample("scifact", f"scifact-{c['id']}", st, ["True" if label == "SUPPORT" else "False"],
                                  "fact_verification", {"statement": st}, refs,
                                  {"source": f"SciFact claims_{split}", "label": label}))
    need = {d for e in exs for d, _ in e.refs}
    docs = []
    with gzip.open(_path(source, "scifact", "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            r = json.loads(line)
            did = f"scifact:{r['doc_id']}"
            if limit is not None and n >= limit and did not in need:
                continue
            sents = [" ".join(s.split()) for s in r.get("abstract", [])]
            docs.append(Doc(did, " ".join(r.get("title", "").split()).rstrip("."), sents, "scifact"))
    return docs, exs


def convert_trex(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """T-REx (LAMA) facts -> slot filling `{subject} [SEP] {relation label}`; evidence sentences with the object
    restored -> one document per subject."""
    labels = {}
    for _, r in iter_jsonl(_path(source, "trex", "relations.jsonl")):
        labels[r["relation"]] = " ".join(r["label"].split())
    tdir = _path(source, "trex")
    files = sorted(f for f in os.listdir(tdir) if f.startswith("P") and f.endswith(".jsonl.gz"))
    per_rel = None if limit is None else max(1, -(-limit // max(len(files), 1)))
    subjects: "OrderedDict[str, Doc]" = OrderedDict()
    sent_idx: dict = {}
    exs = []
    for fn in files:
        with gzip.open(os.path.join(tdir, fn), "rt", encoding="utf-8") as f:
            taken = 0
            for line in f:
                if per_rel is not None and taken >= per_rel:
                    break
                r = json.loads(line)
                rel = r["predicate_id"]
                if rel not in labels:
                    drops["trex:unknown_relation"] += 1
                    continue
                sub = " ".join(r["sub_label"].split())
                sid = r.get("sub_uri") or sub
                doc = subjects.setdefault(sid, Doc(f"trex:{sid}", sub, [], "trex"))
                idx = sent_idx.setdefault(sid, {})
                mine = set()
                surfaces = []
                for e in r.get("evidences", []):
                    ms = e.get("masked_sentence", "")
                    if ms.count("[MASK]") != 1:
                        drops["trex:evidence_without_one_mask"] += 1
                        continue
                    s = " ".join(ms.replace("[MASK]", e["obj_surface"]).split())
                    if s not in idx:
                        idx[s] = len(doc.sentences)
                        doc.sentences.append(s)
                    mine.add(idx[s])
                    surfaces.append(e["obj_surface"])
                if not mine:
                    drops["trex:no_evidence"] += 1
                    continue
                answers = _distinct([r["obj_label"]] + surfaces)
                fields = {"entity": sub, "relation": labels[rel]}
                exs.append(RawExample("trex", f"trex-{r['uuid']}", f"{sub} [SEP] {labels[rel]}", answers,
                                      "slot_filling", fields, [(doc.id, frozenset(mine))],
                                      {"source": "T-REx (LAMA)", "predicate_id": rel, "obj_uri": r.get("obj_uri"),
                                       "sub_uri": r.get("sub_uri")}))
                taken += 1
    return [d for d in subjects.values() if d.sentences], exs


def convert_dpr(source: str, limit: Optional[int] = None, drops: Optional[Counter] = None):
    """DPR Wikipedia passages (distractors): ``contents`` is ``"Title"\\ntext``."""
    docs = []
    for _, r in iter_jsonl(_path(source, "wiki_passages", "dpr_wiki_sample_1000.jsonl")):
        if limit is not None and len(docs) >= limit:
            break
        head, _, body = r["contents"].partition("\n")
        title = head.strip()
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        if not body.strip():
            drops["dpr:empty"] += 1
            continue
        docs.append(Doc(f"dpr:{r['id']}", title, _sentences_of(body), "dpr"))
    return docs, []


CONVERTERS = OrderedDict([("nq", convert_nq), ("squad", convert_squad), ("hotpotqa", convert_hotpotqa),
                          ("scifact", convert_scifact), ("trex", convert_trex), ("dpr", convert_dpr)])


# ------------------------------------------------------------------------------------ chunk, dedupe, resolve
def chunk_docs(docs: list, l_max: int):
    """Documents -> passages of at most ``l_max`` words (whole sentences where possible).

    Returns (passages, {doc_id: [(passage_id, sentence_ids)]}, counts). A document that fits keeps its id; the
    chunks of a longer one are ``{doc_id}#{i}``.
    """
    passages, where = [], {}
    counts = Counter()
    for d in docs:
        chunks = pack_sentences(d.sentences, l_max)
        if not chunks:
            counts["empty_documents"] += 1
            continue
        counts["documents"] += 1
        counts["long_sentences_split"] += sum(1 for s in d.sentences if l_max > 0 and len(s.split()) > l_max)
        if len(chunks) > 1:
            counts["documents_chunked"] += 1
        entries = []
        for i, c in enumerate(chunks):
            pid = d.id if len(chunks) == 1 else f"{d.id}#{i}"
            passages.append((Passage(pid, d.title, " ".join(t for _, t in c)), d.source))
            entries.append((pid, frozenset(j for j, _ in c)))
        where[d.id] = entries
        counts["chunks"] += len(chunks)
    return passages, where, counts


def dedupe(passages: list):
    """Keep the first passage of each (title, text); returns (passages, {dropped_id: kept_id}, by_source)."""
    seen, canon, out, by_source = {}, {}, [], Counter()
    for p, src in passages:
        key = (p.title, p.text)
        if key in seen:
            canon[p.id] = seen[key]
            continue
        seen[key] = p.id
        canon[p.id] = p.id
        out.append(p)
        by_source[src] += 1
    return out, canon, by_source


def resolve(ex: RawExample, where: dict, canon: dict, by_id: dict, drops: Counter) -> Example:
    """RawExample -> KILT Example with provenance on the (deduplicated) chunks that hold the evidence."""
    prov_ids = []
    for doc_id, sents in ex.refs:
        entries = where.get(doc_id)
        if not entries:
            drops[f"{ex.task}:provenance_document_missing"] += 1
            continue
        if sents is None:
            hit = [pid for pid, _ in entries if answer_in_text(ex.answers, f"{by_id[canon[pid]].title} "
                                                               f"{by_id[canon[pid]].text}")]
        else:
            hit = [pid for pid, ss in entries if ss & sents]
        for pid in hit or [pid for pid, _ in entries]:
            prov_ids.append(canon[pid])
    prov = [{"passage_id": pid, "title": by_id[pid].title} for pid in _distinct(prov_ids)]
    meta = {"task_type": ex.task_type, "fields": ex.fields}
    meta.update({k: v for k, v in ex.meta.items() if v is not None})
    return Example(ex.id, ex.input, [Output(a, prov) for a in ex.answers], meta)


def split_seen(exs: list, task: str, seed: int, dev_frac: float) -> dict:
    """Train/dev by normalised question text (equal questions land in one split), seeded per task."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for e in exs:
        groups.setdefault(normalize_text(e.input), []).append(e)
    keys = list(groups)
    random.Random(f"{seed}:{task}:split").shuffle(keys)
    n_dev = int(round(dev_frac * len(keys)))
    dev = set(keys[:n_dev])
    return {"train": [e for e in exs if normalize_text(e.input) not in dev],
            "dev": [e for e in exs if normalize_text(e.input) in dev]}


def _prompt(ex: Example) -> str:
    return render(ex.meta["task_type"], ex.meta["fields"])


# ------------------------------------------------------------------------------------- retrieval-free tasks
FREE_TASKS = ("squad_rc", "phrase_denoising", "sentence_generation")
LM_TASKS = ("lm",)


def _free(task: str, n: int, task_type: str, fields: dict, answer: str, **meta) -> Example:
    return Example(f"{task}-train-{n:05d}", render(task_type, fields), [Output(answer)],
                   dict(task_type=task_type, fields=fields, kind="free", **meta))


def build_free_tasks(passages: list, squad_train: list, seed: int = 0, n_per_task: int = 5000,
                     lm_share: float = 0.1) -> "OrderedDict[tuple, list]":
    """The paper's retrieval-free training data, built from the passage pool (no passages retrieved for them):

    * ``squad_rc``: SQuAD training questions with their gold passage as the context (reading comprehension);
    * ``phrase_denoising``: a 2-4 word phrase of a passage has its words shuffled and is marked with
      ``[START] ... [END]``; the answer is the original phrase (a rule-based stand-in for the paper's
      LLM-generated phrase denoising);
    * ``sentence_generation``: one sentence of a passage as the context, ``next``/``previous``; the answer is the
      adjacent sentence;
    * ``lm``: plain passages (``lm_share`` of the three tasks' size), the paper's ~10 % of plain Wikipedia text.
    Deterministic in ``seed``.
    """
    rng = random.Random(seed * 7919 + 17)
    out: "OrderedDict[tuple, list]" = OrderedDict()
    by_id = {p.id: p for p in passages}
    rc = []
    for e in squad_train:
        if len(rc) >= n_per_task:
            break
        hits = [(g, a) for g in e.passage_ids if g in by_id for a in e.answers if answer_in_text([a], by_id[g].text)]
        if hits:  # the chunk that holds an answer, and that answer's spelling
            p, ans = by_id[hits[0][0]], hits[0][1]
            rc.append(_free("squad_rc", len(rc), "reading_comprehension", {"context": p.text, "question": e.input},
                            ans, passage=p.id, source_id=e.id))
    out[("squad_rc", "train")] = rc
    order = list(range(len(passages)))
    rng.shuffle(order)
    pd, sg = [], []
    for i in order:
        if len(pd) >= n_per_task and len(sg) >= n_per_task:
            break
        p = passages[i]
        words = p.text.split()
        if len(pd) < n_per_task and len(words) >= 8:
            n = rng.randint(2, 4)
            starts = [j for j in range(len(words) - n + 1) if len(set(words[j:j + n])) == n]
            if starts:
                j = rng.choice(starts)
                phrase = words[j:j + n]
                noisy = phrase[:]
                while noisy == phrase:
                    rng.shuffle(noisy)
                ctx = " ".join(words[:j] + ["[START]"] + noisy + ["[END]"] + words[j + n:])
                pd.append(_free("phrase_denoising", len(pd), "phrase_denoising", {"context": ctx},
                                " ".join(phrase), passage=p.id))
        sents = [x.strip() for x in _sentences_of(p.text) if len(x.split()) >= 3]
        if len(sg) < n_per_task and len(sents) >= 2:
            j = rng.randrange(len(sents) - 1)
            d = rng.choice(("next", "previous"))
            ctx, ans = (sents[j], sents[j + 1]) if d == "next" else (sents[j + 1], sents[j])
            sg.append(_free("sentence_generation", len(sg), "sentence_generation", {"context": ctx, "direction": d},
                            ans, passage=p.id))
    out[("phrase_denoising", "train")] = pd
    out[("sentence_generation", "train")] = sg
    n_lm = int(round(lm_share * (len(rc) + len(pd) + len(sg))))
    lm = []
    for i in order[::-1][:n_lm]:
        p = passages[i]
        lm.append(Example(f"lm-train-{len(lm):05d}", f"{p.title}:", [Output(p.text)], {"passage": p.id, "kind": "lm"}))
    out[("lm", "train")] = lm
    return out


def build_minikilt(source: str, seed: int = 0, l_max: int = 100, dev_frac: float = 0.2,
                   limit: Optional[int] = None, free_per_task: int = 5000) -> MiniKilt:
    """Convert the release files in ``source`` into passages + task examples (in memory)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"source folder {source} does not exist")
    drops: Counter = Counter()
    docs, raw = [], OrderedDict()
    for name, fn in CONVERTERS.items():
        d, e = fn(source, limit, drops)
        docs.extend(d)
        if e:
            raw[name] = e
    docs.sort(key=lambda d: SOURCE_ORDER.index(d.source))  # stable: within a source, file order
    chunked, where, ccounts = chunk_docs(docs, l_max)
    passages, canon, by_source = dedupe(chunked)
    by_id = {p.id: p for p in passages}

    examples: "OrderedDict[tuple, list]" = OrderedDict()
    for task, rexs in raw.items():
        exs = [resolve(r, where, canon, by_id, drops) for r in rexs]
        if task in SEEN_TASKS:
            for split, part in split_seen(exs, task, seed, dev_frac).items():
                examples[(task, split)] = part
        else:
            examples[(task, "dev")] = exs
    # No evaluation question text anywhere in training (also across tasks).
    eval_text = {normalize_text(e.input) for (t, s), xs in examples.items() if s != "train" for e in xs}
    for (t, s), xs in list(examples.items()):
        if s == "train":
            keep = [e for e in xs if normalize_text(e.input) not in eval_text]
            if len(keep) < len(xs):
                drops[f"{t}:train_question_also_in_eval"] += len(xs) - len(keep)
            examples[(t, s)] = keep
    if free_per_task:
        examples.update(build_free_tasks(passages, examples.get(("squad", "train"), []), seed, free_per_task))
    for (t, s), xs in examples.items():
        validate_examples(xs, passage_ids=by_id, source=f"{t}.{s}")

    tasks = OrderedDict()
    for (t, s), xs in examples.items():
        d = tasks.setdefault(t, {"task_type": xs[0].meta.get("task_type") if xs else None, "splits": {},
                                 "seen_format": t in SEEN_TASKS, "multi_hop": t == "hotpotqa",
                                 "retrieval": t not in FREE_TASKS + LM_TASKS})
        words = [len((_prompt(e) if e.meta.get("task_type") else e.input).split()) for e in xs]
        d["splits"][s] = {"examples": len(xs), "with_provenance": sum(1 for e in xs if e.passage_ids),
                          "prompt_words_mean": round(sum(words) / max(len(words), 1), 1),
                          "prompt_words_max": max(words, default=0)}
    lengths = [len(p.text.split()) for p in passages]
    merged = {k.split(":", 1)[1]: v for k, v in drops.items() if k.startswith("merged:")}
    pool_dups = len(chunked) - len(passages)
    stats = OrderedDict(
        seed=seed, l_max_words=l_max, dev_frac=dev_frac, limit=limit,
        passages=OrderedDict(total=len(passages), by_source=OrderedDict((s, by_source[s]) for s in SOURCE_ORDER),
                             duplicates_removed=sum(merged.values()) + pool_dups,
                             duplicates_detail=OrderedDict(sorted(merged.items()), pooled_chunks=pool_dups),
                             words_mean=round(sum(lengths) / max(len(lengths), 1), 1),
                             words_max=max(lengths, default=0)),
        chunking=OrderedDict((k, ccounts[k]) for k in ("documents", "documents_chunked", "chunks",
                                                       "long_sentences_split", "empty_documents")),
        tasks=tasks, dropped=OrderedDict(sorted((k, v) for k, v in drops.items() if not k.startswith("merged:"))))
    stats["retrieval_tasks"] = [t for t in tasks if t not in FREE_TASKS + LM_TASKS]
    stats["free_tasks"] = [t for t in FREE_TASKS if t in tasks]
    stats["lm_tasks"] = [t for t in LM_TASKS if t in tasks]
    return MiniKilt(passages, dict(examples), stats)


# ---------------------------------------------------------------------------------------------- write + BM25
def _write_all(out: str, passages: list, examples: dict, stats: dict, bm25_k: int, query: str,
               show_progress: bool, pseudo: bool = True, tfds: bool = True) -> dict:
    os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
    write_passages(os.path.join(out, "passages.jsonl"), passages)
    for (t, s), xs in examples.items():
        write_examples(os.path.join(out, "tasks", f"{t}.{s}.jsonl"), xs)
    if pseudo and passages:
        t0 = time.time()
        if show_progress:
            print(f"BM25: indexing {len(passages)} passages", file=sys.stderr)
        index = BM25Index(passages, show_progress=show_progress)
        by_id = {p.id: p for p in passages}
        recall = OrderedDict()
        for (t, s), xs in examples.items():
            if not xs or t in FREE_TASKS + LM_TASKS:  # retrieval-free: no pseudo-labels
                continue
            queries = [_prompt(e) for e in xs] if query == "prompt" else [e.input for e in xs]
            labels = label_examples(index, xs, k=bm25_k, queries=queries, show_progress=show_progress,
                                    desc=f"BM25 {t}.{s}")
            write_pseudo_labels(os.path.join(out, "pseudo_labels", f"{t}.{s}.jsonl"), labels)
            recall[f"{t}.{s}"] = recall_at_k(xs, {pl.id: pl for pl in labels}, by_id, RECALL_KS)
        stats["bm25"] = OrderedDict(k=bm25_k, query=query, index="bm25s lucene k1=1.5 b=0.75, English stopwords, "
                                    "Snowball stemmer, documents '{title}: {text}'", recall=recall)
        if show_progress:
            print(f"BM25: done in {time.time() - t0:.1f}s", file=sys.stderr)
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8", newline="") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
        f.write("\n")
    write_tfds(out, tfds, show_progress)
    return stats


def check_tfds(tfds: bool = True) -> None:
    """ImportError (one line: what to install) when the TFDS dataset is asked for and tensorflow-datasets is
    missing; called before any work."""
    import importlib.util

    if tfds and importlib.util.find_spec("tensorflow_datasets") is None:
        raise ImportError("the TFDS dataset layer needs tensorflow-datasets (pip install tensorflow-datasets, or "
                          "pip install -e .[data]); or pass --no_tfds (tfds=False) for the JSONL-only folder")


def write_tfds(out: str, tfds: bool = True, show_progress: bool = False) -> None:
    """The folder's dataset layer: with ``tfds`` the TFDS dataset ``imprag_kilt`` (`imprag_jax.data.tfds_kilt`,
    written last, so it is never older than the files it holds); without, a dataset an earlier run left there is
    removed (it would be stale) and the pipeline reads the JSONL files through ``records/``."""
    import shutil

    from imprag_jax.data import tfds_kilt

    if not tfds:
        stale = os.path.join(out, "tfds", tfds_kilt.NAME)
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        return
    check_tfds(tfds)
    if show_progress:
        print("TFDS: writing the imprag_kilt dataset", file=sys.stderr)
    tfds_kilt.build(out, show_progress=show_progress)


def prepare_minikilt(source: str, out: str, seed: int = 0, l_max: int = 100, dev_frac: float = 0.2,
                     limit: Optional[int] = None, bm25_k: int = 50, query: str = "prompt",
                     show_progress: bool = True, pseudo_labels: bool = True, free_per_task: int = 5000,
                     tfds: bool = True) -> dict:
    """Build the mini-KILT from ``source`` and write it to ``out`` (with the TFDS dataset unless ``tfds=False``,
    `write_tfds`); returns the stats."""
    check_tfds(tfds)
    mk = build_minikilt(source, seed=seed, l_max=l_max, dev_frac=dev_frac, limit=limit, free_per_task=free_per_task)
    return _write_all(out, mk.passages, mk.examples, mk.stats, bm25_k, query, show_progress, pseudo_labels, tfds)


def _name_split(name: str, path: str) -> tuple:
    if "." in name:
        t, s = name.split(".", 1)
        return t, s
    base = os.path.basename(path).lower()
    for s in ("train", "dev", "test"):
        if s in base:
            return name, s
    return name, "dev"


def check_kilt_inputs(tasks: dict, knowledge: str, task_types: Optional[dict] = None) -> dict:
    """The user's mistakes in a KILT run, found before any file is read in full: a task or knowledge file that is
    missing (or a folder), a ``task_types`` entry with an unknown type or naming no task, a task whose type cannot
    be told (its name is not a KILT task, no ``task_types`` entry, and its first example has no
    ``meta.task_type``). Raises `DataError` / `FileNotFoundError` (one line each); returns ``{name: type or None}``
    (None: every example names its own ``meta.task_type``)."""
    from imprag_jax.data.templates import TEMPLATES

    task_types = dict(task_types or {})
    for what, path in [("--kilt_knowledge", knowledge)] + [(f"--kilt_task {n}", p) for n, p in tasks.items()]:
        if os.path.isdir(path):
            raise DataError(f"{what}: {path} is a folder; give the JSONL file itself")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such file {path}")
    names = set(tasks) | {_name_split(n, p)[0] for n, p in tasks.items()}
    for name, tt in task_types.items():
        if tt not in TEMPLATES:
            raise DataError(f"--kilt_task_type {name}={tt}: unknown task type {tt!r}; known: "
                            f"{', '.join(sorted(TEMPLATES))}")
        if name not in names:
            raise DataError(f"--kilt_task_type {name}={tt} names no --kilt_task (tasks: {', '.join(sorted(names))})")
    out = OrderedDict()
    for name, path in tasks.items():
        t, _ = _name_split(name, path)
        tt = task_types.get(name) or task_types.get(t) or task_type_for(t)
        if tt is None:
            first = next(iter_jsonl(path), (None, {}))[1]
            meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
            if not meta.get("task_type"):
                raise DataError(f"{path}: cannot tell the task type of {t!r} (not a KILT task name, and its examples "
                                f"carry no meta.task_type); pass --kilt_task_type {t}=TYPE, TYPE one of "
                                f"{', '.join(sorted(TEMPLATES))}")
        out[name] = tt
    return out


_PARAGRAPH_ID = re.compile(r"^(.*)_(\d+)$")


class _Provenance:
    """Resolves KILT provenance entries to passage ids of the (possibly chunked) knowledge source.

    * ``passage_id``: that passage (a split passage: its chunks that hold an answer, all of them if none does);
    * ``wikipedia_id`` with ``start_paragraph_id``/``end_paragraph_id``: the passages of those paragraphs (KILT
      pages read one passage per paragraph, ids ``{wikipedia_id}_{i}``); a page whose passages carry no paragraph
      number (passage JSONL with a ``wikipedia_id`` field) counts whole;
    * ``wikipedia_id`` alone: every passage of that page is gold (KILT gives no finer evidence then).
    `resolve` returns ``(passage ids, None)`` or ``([], why)`` when the knowledge source lacks them.
    """

    def __init__(self, passages: list, where: dict, originals: list):
        self.by_id = {p.id: p for p in passages}
        self.where = where  # split passage id -> [(chunk id, sentence ids)]
        self.pages: dict = {}  # wikipedia_id -> passage ids (chunks), file order
        self.paras: dict = {}  # wikipedia_id -> {paragraph index -> passage ids}
        for orig_id, wid in originals:  # (original passage id, wikipedia_id or None), file order
            if wid is None:
                continue
            ids = [q for q, _ in where[orig_id]] if orig_id in where else [orig_id]
            self.pages.setdefault(wid, []).extend(ids)
            m = _PARAGRAPH_ID.match(orig_id)
            if m and m.group(1) == wid:
                self.paras.setdefault(wid, {})[int(m.group(2))] = ids

    def _answer_chunks(self, ids: list, answers: list) -> list:
        if len(ids) < 2:
            return list(ids)
        return [q for q in ids if answer_in_text(answers, f"{self.by_id[q].title} {self.by_id[q].text}")] or list(ids)

    def resolve(self, pr: dict, answers: list, notes: Counter, t: str) -> tuple:
        pid, wid = pr.get("passage_id"), pr.get("wikipedia_id")
        if pid is not None:
            pid = str(pid)
            if pid in self.where:
                return self._answer_chunks([q for q, _ in self.where[pid]], answers), None
            if pid in self.by_id:
                return [pid], None
            return [], f"passage_id {pid!r} is not a passage of the knowledge source"
        wid = str(wid)
        if wid not in self.pages:
            if not self.pages:
                return [], f"wikipedia_id {wid!r}: the knowledge source's passages carry no wikipedia_id"
            return [], f"wikipedia_id {wid!r} is not a page of the knowledge source"
        if "start_paragraph_id" in pr or "end_paragraph_id" in pr:
            if wid in self.paras:
                try:
                    lo = int(pr.get("start_paragraph_id", pr.get("end_paragraph_id")))
                    hi = int(pr.get("end_paragraph_id", lo))
                except (TypeError, ValueError):
                    return [], f"wikipedia_id {wid!r}: paragraph range {pr.get('start_paragraph_id')!r}-" \
                               f"{pr.get('end_paragraph_id')!r} is not a pair of integers"
                got = []
                for i in range(lo, hi + 1):
                    got += self._answer_chunks(self.paras[wid].get(i, []), answers)
                if got:
                    return got, None
                return [], f"paragraphs {lo}-{hi} of page {wid!r} are no passages of the knowledge source"
            notes[f"{t}:paragraph_range_read_as_whole_page"] += 1
        else:
            notes[f"{t}:page_level_provenance"] += 1
        return list(self.pages[wid]), None


def prepare_kilt(tasks: dict, knowledge: str, out: str, l_max: int = 0, bm25_k: int = 50,
                 task_types: Optional[dict] = None, query: str = "prompt", show_progress: bool = True,
                 pseudo_labels: bool = True, allow_unresolved: bool = False, tfds: bool = True) -> dict:
    """Validate, copy and pseudo-label KILT files (and write the TFDS dataset unless ``tfds=False``,
    `write_tfds`). ``tasks`` is ``{"name[.split]": path}``.

    The knowledge source is passage JSONL or KILT pages (read one passage per paragraph); passages longer than
    ``l_max`` words are split (``0`` = keep). Provenance is resolved to ``passage_id`` entries (`_Provenance`: by
    passage id, by page and paragraph range, or by page alone -- then every passage of the page is gold); the
    original page-level entries are kept beside them. Provenance the knowledge source lacks raises `DataError`
    (the file, how many examples, one example) unless ``allow_unresolved``: then it is not gold, and stats.json
    counts per split the examples left without a gold passage (``without_gold``; recall is reported over the
    others). ``meta.task_type``/``meta.fields`` are filled in from the task name (or ``task_types``) and the KILT
    ``input``; FEVER labels SUPPORTS/REFUTES become True/False.
    """
    from imprag_jax.data.templates import TemplateError

    check_tfds(tfds)
    types = check_kilt_inputs(tasks, knowledge, task_types)
    drops: Counter = Counter()
    passages, where, counts, originals = [], {}, Counter(), []
    seen_ids: set = set()
    for p in iter_passages(knowledge):
        if p.id in seen_ids:
            raise DataError(f"{knowledge}: duplicate passage id {p.id!r}")
        seen_ids.add(p.id)
        originals.append((p.id, p.wikipedia_id))
        if l_max <= 0 or len(p.text.split()) <= l_max:
            passages.append(Passage(p.id, p.title, " ".join(p.text.split()), p.wikipedia_id))
            counts["documents"] += 1
            counts["chunks"] += 1
            continue
        ps, w, c = chunk_docs([Doc(p.id, p.title, _sentences_of(p.text), "kilt")], l_max)
        counts.update(c)
        for q, _ in ps:
            passages.append(Passage(q.id, q.title, q.text, p.wikipedia_id))
        where.update(w)  # only split passages: original id -> chunks
    prov = _Provenance(passages, where, originals)
    examples, meta_types, split_stats = OrderedDict(), OrderedDict(), OrderedDict()
    for name, path in tasks.items():
        t, s = _name_split(name, path)
        tt = types[name]
        xs, unresolved, n_any, n_gold = [], [], 0, 0
        for ex in iter_examples(path, allow_no_answers=(s == "test")):
            mt = ex.meta.get("task_type") or tt
            if mt is None:
                raise DataError(f"{path}: example {ex.id!r} has no meta.task_type and the task type of {t!r} is "
                                f"unknown; pass --kilt_task_type {t}=TYPE")
            ex.meta = dict(ex.meta, task_type=mt)
            if "fields" not in ex.meta:
                try:
                    ex.meta["fields"] = fields_from_input(mt, ex.input)
                except TemplateError as e:
                    raise DataError(f"{path}: example {ex.id!r}: {first_line(e)} (task type {mt!r}; another type: "
                                    f"--kilt_task_type {t}=TYPE)") from None
            if mt == "fact_verification":  # KILT FEVER labels -> the template's True/False
                for o in ex.outputs:
                    if o.answer in FEVER_LABELS:
                        o.answer = FEVER_LABELS[o.answer]
                        drops[f"{t}:relabelled_answers"] += 1
            answers = ex.answers
            why_not = None
            gold: set = set()
            for o in ex.outputs:
                keep, extra = [], []
                for pr in o.provenance:
                    ids, why = prov.resolve(pr, answers, drops, t)
                    if why is not None:
                        why_not = why_not or why
                        if pr.get("passage_id") is None:
                            keep.append(pr)  # the page stays on record; it is not gold
                        else:
                            drops[f"{t}:unresolved_passage_ids_removed"] += 1
                        continue
                    gold.update(ids)
                    if pr.get("passage_id") is None:  # a page (range): kept on record, its passages added
                        keep.append(pr)
                        extra += ids
                    elif str(pr["passage_id"]) not in where:
                        keep.append(pr)
                    else:  # a split passage: its chunks instead
                        extra += ids
                have = {str(pr["passage_id"]) for pr in keep if pr.get("passage_id") is not None}
                o.provenance = keep + [{"passage_id": q, "title": prov.by_id[q].title} for q in _distinct(extra)
                                       if q not in have]
            n_any += bool(ex.provenance) or why_not is not None
            n_gold += bool(gold)
            if why_not is not None:
                unresolved.append((ex.id, why_not))
            xs.append(ex)
        if unresolved and not allow_unresolved:
            eid, why = unresolved[0]
            raise DataError(f"{path}: the provenance of {len(unresolved)} of {len(xs)} examples names passages the "
                            f"knowledge source {knowledge} lacks (e.g. example {eid!r}: {why}); pass "
                            "--allow_unresolved to keep them (that provenance is then not gold; stats.json counts "
                            "the examples left without a gold passage)")
        validate_examples(xs, passage_ids=prov.by_id, source=path)
        examples[(t, s)] = xs
        meta_types[t] = tt or (xs[0].meta.get("task_type") if xs else None)
        split_stats[(t, s)] = {"examples": len(xs), "with_provenance": n_any, "with_gold": n_gold,
                               "without_gold": len(xs) - n_gold, "unresolved": len(unresolved)}
    tstats = OrderedDict()
    for (t, s), d in split_stats.items():
        tstats.setdefault(t, {"task_type": meta_types[t], "splits": {}})["splits"][s] = d
    stats = OrderedDict(mode="kilt", l_max_words=l_max, allow_unresolved=bool(allow_unresolved),
                        passages=OrderedDict(total=len(passages), by_source={"kilt": len(passages)},
                                             pages=len(prov.pages)),
                        chunking=OrderedDict(sorted(counts.items())), tasks=tstats,
                        notes=OrderedDict(sorted((k, v) for k, v in drops.items() if v)),
                        # what the trainer reads by default (data.tasks unset): every task; its train split if any
                        retrieval_tasks=list(tstats), eval_tasks=[t for t, d in tstats.items()
                                                                  if any(s != "train" for s in d["splits"])],
                        free_tasks=[], lm_tasks=[])
    return _write_all(out, passages, examples, stats, bm25_k, query, show_progress, pseudo_labels, tfds)


# ------------------------------------------------------------------------------------------------- markdown
def stats_markdown(stats: dict) -> str:
    """Markdown tables (dataset sizes; BM25 recall) from a ``stats.json`` dict."""
    gold_col = any("without_gold" in x for d in stats["tasks"].values() for x in d["splits"].values())
    lines = ["| task | format | type | split | examples | with provenance | "
             + ("without gold passage | " if gold_col else "") + "prompt words (mean / max) |",
             "|---|---|---|---|---:|---:|" + ("---:|" if gold_col else "") + "---:|"]
    for t, d in stats["tasks"].items():
        for s, x in d["splits"].items():
            fmt = "seen" if d.get("seen_format") else ("unseen" if d.get("retrieval", True) else "no retrieval")
            wg = f"{x.get('without_gold', 0):,} | " if gold_col else ""
            lines.append(f"| {t} | {fmt} | {d['task_type']} | {s} | {x['examples']:,} | {x['with_provenance']:,} | "
                         f"{wg}{x.get('prompt_words_mean', '-')} / {x.get('prompt_words_max', '-')} |")
    p = stats["passages"]
    lines += ["", "| knowledge source | passages |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in p["by_source"].items()]
    lines += [f"| **total (after removing {p.get('duplicates_removed', 0):,} duplicates)** | **{p['total']:,}** |"]
    if "bm25" in stats:
        ks = RECALL_KS
        lines += ["", "| task.split | n | answer R@1 | R@5 | R@10 | with gold | gold-passage R@1 | R@5 | R@10 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in stats["bm25"]["recall"].items():
            a = r["answer"] or {}
            pr = r["provenance"] or {}
            f = lambda d, k: f"{d[k] if k in d else d[str(k)]:.3f}" if d else "–"  # noqa: E731
            wg = f"{r['n_provenance']:,} / {r['n']:,}" if "n_provenance" in r else "–"
            lines.append(f"| {name} | {r['n']:,} | " + " | ".join(f(a, k) for k in ks) + f" | {wg} | "
                         + " | ".join(f(pr, k) for k in ks) + " |")
        for name, r in stats["bm25"]["recall"].items():
            pa = r.get("provenance_all") or {}
            if pa and stats["tasks"].get(name.split(".")[0], {}).get("multi_hop"):
                lines.append(f"\n{name}: all gold passages in the top k: "
                             + ", ".join(f"R@{k} {f(pa, k)}" for k in ks))
    short = [(f"{t}.{s}", x) for t, d in stats["tasks"].items() for s, x in d["splits"].items()
             if x.get("without_gold")]
    if short:
        lines += ["", "examples without a gold passage (gold recall and oracle reading leave them out): "
                  + ", ".join(f"{n} {x['without_gold']:,} of {x['examples']:,}"
                              + (f" ({x['unresolved']:,} with provenance the knowledge source lacks)"
                                 if x.get("unresolved") else "") for n, x in short)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def _kv(items, what):
    out = OrderedDict()
    for it in items or []:
        if "=" not in it:
            from imprag_jax import cli

            cli.fail(f"{what} expects NAME=VALUE, got {it!r}", prefix="prepare: error")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def main(argv=None) -> int:
    from imprag_jax import cli

    ap = cli.ArgumentParser(prog="python -m imprag_jax.data.prepare", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="folder with the release files (e.g. ../shared/data)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l_max", type=int, default=None,
                    help="split passages longer than this many words (default 100 for --source, 0 = keep whole for "
                         "KILT files)")
    ap.add_argument("--dev_frac", type=float, default=0.2, help="dev share of the seen-format tasks' questions")
    ap.add_argument("--limit", type=int, default=None, help="at most this many records per source (quick runs)")
    ap.add_argument("--bm25_k", type=int, default=50, help="passages stored per example")
    ap.add_argument("--query", choices=("prompt", "input"), default="prompt",
                    help="BM25 query: the templated prompt (as the paper) or the raw input")
    ap.add_argument("--free_per_task", type=int, default=5000,
                    help="examples per retrieval-free training task (squad_rc, phrase_denoising, "
                         "sentence_generation; plus 10 %% plain-text lm rows); 0 = none")
    ap.add_argument("--no_pseudo_labels", action="store_true")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--no_tfds", dest="tfds", action="store_false",
                    help="write the JSONL files only: no TFDS dataset imprag_kilt (by default the tasks and the "
                         "knowledge source are also written as ArrayRecord files under OUT/tfds/, "
                         "imprag_jax.data.tfds_kilt, which the pipeline then reads; a folder at a bucket path "
                         "needs them)")
    ap.add_argument("--tfds", dest="tfds", action="store_true", help=argparse.SUPPRESS)  # the default (old commands)
    ap.add_argument("--kilt_task", action="append", metavar="NAME=PATH",
                    help="a KILT task file; NAME is task or task.split (repeatable)")
    ap.add_argument("--kilt_task_type", action="append", metavar="NAME=TYPE",
                    help="template type for a KILT task whose name is not a known KILT task (repeatable)")
    ap.add_argument("--kilt_knowledge", metavar="PATH", help="knowledge source for --kilt_task files")
    ap.add_argument("--allow_unresolved", action="store_true",
                    help="keep KILT examples whose provenance names passages or pages the knowledge source lacks "
                         "(that provenance is not gold; stats.json and the table count the examples left without "
                         "a gold passage); without it they are an error")
    a = ap.parse_args(argv)
    t0 = time.time()
    kilt = bool(a.kilt_task or a.kilt_knowledge)
    if kilt and a.source:
        ap.error("give either --source or --kilt_task/--kilt_knowledge, not both")
    if kilt and not (a.kilt_task and a.kilt_knowledge):
        ap.error("--kilt_task and --kilt_knowledge go together")
    if not kilt and not a.source:
        ap.error("--source (or --kilt_task + --kilt_knowledge) is required")
    if not kilt and (a.kilt_task_type or a.allow_unresolved):
        ap.error("--kilt_task_type and --allow_unresolved go with --kilt_task/--kilt_knowledge")
    show = not a.no_progress and cli.stderr_is_terminal()  # no progress bars in a redirected log
    try:
        with cli.remove_if_unused(a.out):  # a failed run leaves no empty output folder behind
            if kilt:
                stats = prepare_kilt(_kv(a.kilt_task, "--kilt_task"), a.kilt_knowledge, a.out,
                                     l_max=a.l_max if a.l_max is not None else 0, bm25_k=a.bm25_k,
                                     task_types=_kv(a.kilt_task_type, "--kilt_task_type"), query=a.query,
                                     show_progress=show, pseudo_labels=not a.no_pseudo_labels,
                                     allow_unresolved=a.allow_unresolved, tfds=a.tfds)
            else:
                stats = prepare_minikilt(a.source, a.out, seed=a.seed,
                                         l_max=a.l_max if a.l_max is not None else 100, dev_frac=a.dev_frac,
                                         limit=a.limit, bm25_k=a.bm25_k, query=a.query, show_progress=show,
                                         pseudo_labels=not a.no_pseudo_labels, free_per_task=a.free_per_task,
                                         tfds=a.tfds)
    except DataError as e:  # "<file>:<line>: what is wrong" (or "<file>: ...; what to do")
        msg = cli.first_line(e)
        if re.search(r":\d+: ", msg):
            msg += "; fix or remove that line and run again"
        cli.fail(msg, prefix="prepare: error")
    except ImportError as e:  # tensorflow-datasets missing for the default TFDS dataset
        cli.fail(cli.first_line(e), prefix="prepare: error")
    except FileNotFoundError as e:  # a missing input file or --source folder
        cli.fail(f"{cli.first_line(e)}; check the path (--source, --kilt_task NAME=PATH, --kilt_knowledge)",
                 prefix="prepare: error")
    except OSError as e:  # a folder where a file belongs, an unreadable file
        cli.fail(f"{cli.first_line(e)}; check the path (--source, --kilt_task NAME=PATH, --kilt_knowledge)",
                 prefix="prepare: error")
    print(stats_markdown(stats))
    for key in ("dropped", "notes"):
        if stats.get(key):
            print(f"\n{key}: " + ", ".join(f"{k}={v}" for k, v in stats[key].items()))
    print(f"\nwrote {a.out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
