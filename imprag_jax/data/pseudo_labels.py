"""Pseudo-labels for the retrieval warmup: a ranking of the knowledge source per example, and retrieval recall.

The paper ranks passages with Contriever-MSMARCO using the whole templated prompt as the query, takes the top 5
as pseudo-positives ``P(q)`` and samples pseudo hard negatives ``N_h(q)`` from ranks 10-50. imprag_jax uses BM25
(``bm25s``) by default; a dense encoder from a local sentence-transformers directory is an option.

File format (one line per example, same order as the task file)::

    {"id": example_id, "ranked": [passage_id x 50], "scores": [float x 50]}

Public API
  * ``BM25Index(passages, k1=1.5, b=0.75, stopwords="en", stem=True, title_format=TITLE_FORMAT)`` with
    ``.search(queries, k, batch_size=512, show_progress=False) -> (list[list[passage_id]], np.ndarray)``.
  * ``DenseIndex(passages, model_dir, ...)`` -- same ``.search``; needs ``sentence-transformers`` or
    ``transformers`` installed and a LOCAL model directory (nothing is downloaded).
  * ``PseudoLabel(id, ranked, scores)``.
  * ``label_examples(index, examples, k=50, queries=None, templates=None, ...) -> list[PseudoLabel]`` -- the
    query defaults to the rendered prompt (`templates.render_example`).
  * ``write_pseudo_labels(path, labels)``, ``iter_pseudo_labels(path)``, ``load_pseudo_labels(path) -> dict``.
  * ``positives(label, n=5) -> list[str]`` -- ``P(q)``.
  * ``sample_hard_negatives(label, n, seed=0, lo=10, hi=50, exclude=()) -> list[str]`` -- ``N_h(q)``: ``n`` ids
    drawn without replacement from 1-based ranks ``lo..hi``, seeded per (seed, example id).
  * ``answer_in_text(answers, text) -> bool`` -- normalised answer-as-substring (word boundaries).
  * ``recall_at_k(examples, rankings, passages, ks=(1, 5, 10)) -> dict`` -- answer recall (the paper's
    definition) and gold-provenance recall (any / all gold passages in the top k).
  * ``require_bm25s()`` -- the module, or an ImportError that gives the install command.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from imprag_jax.cli import stderr_is_terminal
from imprag_jax.data.chunking import TITLE_FORMAT, format_passage
from imprag_jax.data.formats import DataError, Example, Passage, iter_jsonl, write_jsonl

INSTALL_HINT = "pip install 'imprag_jax[data]'"


def require_bm25s():
    try:
        import bm25s
    except ImportError as e:
        raise ImportError(f"BM25 pseudo-labels need the bm25s package: {INSTALL_HINT}") from e
    quiet_bm25s()
    return bm25s


def quiet_bm25s() -> None:
    """bm25s sets its logger to DEBUG on import ("Building index from IDs objects" in every log under absl)."""
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tqdm(it, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a core dependency; be quiet without it anyway
        return it
    kw.setdefault("disable", None)  # None: no bar when stderr is not a terminal (a redirected log)
    return tqdm(it, **kw)


# ----------------------------------------------------------------------------------------------------- indexes
class BM25Index:
    """BM25 over passages (``"{title}: {text}"``), English stopwords, Snowball stemming when PyStemmer is there."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75, stopwords: str = "en",
                 stem: bool = True, title_format: Optional[str] = TITLE_FORMAT, show_progress: bool = False):
        bm25s = require_bm25s()
        if not passages:
            raise ValueError("BM25Index needs at least one passage")
        self._bm25s = bm25s
        self.ids = [p.id for p in passages]
        self.stopwords = stopwords
        self.stemmer = None
        if stem:
            try:
                import Stemmer  # PyStemmer
                self.stemmer = Stemmer.Stemmer("english")
            except ImportError:
                self.stemmer = None  # still BM25, just unstemmed
        texts = [format_passage(p.title, p.text, title_format) for p in passages]
        show_progress = show_progress and stderr_is_terminal()  # bm25s' own bars: none in a redirected log
        tokens = bm25s.tokenize(texts, stopwords=stopwords, stemmer=self.stemmer, show_progress=show_progress)
        self._retriever = bm25s.BM25(k1=k1, b=b)
        self._retriever.index(tokens, show_progress=show_progress)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: Sequence[str], k: int, batch_size: int = 512, show_progress: bool = False,
               desc: str = "BM25 retrieval") -> tuple:
        """Top-``k`` passage ids per query (best first) and their scores ``[len(queries), k]`` (float32)."""
        k = min(k, len(self.ids))
        ranked, scores = [], []
        batches = range(0, len(queries), batch_size)
        if show_progress:
            batches = _tqdm(batches, desc=desc, total=math.ceil(len(queries) / batch_size), unit="batch")
        for s in batches:
            q = self._bm25s.tokenize(list(queries[s:s + batch_size]), stopwords=self.stopwords,
                                     stemmer=self.stemmer, return_ids=False, show_progress=False)
            d, sc = self._retriever.retrieve(q, k=k, show_progress=False)
            ranked.extend([[self.ids[i] for i in row] for row in np.asarray(d)])
            scores.append(np.asarray(sc, np.float32))
        return ranked, (np.concatenate(scores) if scores else np.zeros((0, k), np.float32))


class DenseIndex:
    """Dense pseudo-labeller from a local sentence-transformers (or plain HF encoder) directory.

    Uses ``sentence_transformers`` when installed, else ``transformers`` with the pooling named in the
    directory's ``1_Pooling/config.json`` (mean by default). Never downloads: the directory must exist, and
    loading runs with ``local_files_only``. Scores are dot products (``normalize=True`` makes them cosines).
    """

    def __init__(self, passages: Sequence[Passage], model_dir: str, batch_size: int = 64, max_length: int = 256,
                 normalize: bool = False, title_format: Optional[str] = TITLE_FORMAT, show_progress: bool = False):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"dense pseudo-labeller: {model_dir} is not a local model directory "
                                    "(imprag_jax never downloads models)")
        self.ids = [p.id for p in passages]
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self._encode = self._load(model_dir)
        texts = [format_passage(p.title, p.text, title_format) for p in passages]
        self.emb = self._embed(texts, show_progress, "dense: encode passages")

    def _load(self, model_dir: str):
        try:
            from sentence_transformers import SentenceTransformer  # noqa: F401
            have_st = os.path.exists(os.path.join(model_dir, "modules.json"))
        except ImportError:
            have_st = False
        if have_st:
            from sentence_transformers import SentenceTransformer
            m = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
            m.max_seq_length = self.max_length
            return lambda texts: np.asarray(m.encode(list(texts), batch_size=self.batch_size,
                                                     convert_to_numpy=True), np.float32)
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError("the dense pseudo-labeller needs sentence-transformers or transformers+torch: "
                              "pip install 'imprag_jax[torch]'") from e
        pooling = "mean"
        pc = os.path.join(model_dir, "1_Pooling", "config.json")
        if os.path.exists(pc):
            with open(pc) as f:
                cfg = json.load(f)
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

        def enc(texts):
            b = tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                h = model(**b).last_hidden_state
            if pooling == "cls":
                e = h[:, 0]
            else:
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            return e.float().numpy()
        return enc

    def _embed(self, texts: Sequence[str], show_progress: bool, desc: str) -> np.ndarray:
        out = []
        it = range(0, len(texts), self.batch_size)
        if show_progress:
            it = _tqdm(it, desc=desc, total=math.ceil(len(texts) / self.batch_size), unit="batch")
        for s in it:
            out.append(self._encode(texts[s:s + self.batch_size]))
        e = np.concatenate(out).astype(np.float32)
        if self.normalize:
            e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: Sequence[str], k: int, batch_size: int = 512, show_progress: bool = False,
               desc: str = "dense retrieval") -> tuple:
        k = min(k, len(self.ids))
        q = self._embed(list(queries), show_progress, "dense: encode queries")
        ranked, scores = [], []
        for s in range(0, len(q), batch_size):
            sc = q[s:s + batch_size] @ self.emb.T
            top = np.argpartition(-sc, k - 1, axis=1)[:, :k]
            part = np.take_along_axis(sc, top, 1)
            order = np.lexsort((top, -part), axis=1)  # score desc, then index asc: deterministic ties
            top, part = np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1)
            ranked.extend([[self.ids[i] for i in row] for row in top])
            scores.append(part.astype(np.float32))
        return ranked, (np.concatenate(scores) if scores else np.zeros((0, k), np.float32))


# ------------------------------------------------------------------------------------------------ pseudo-labels
@dataclass
class PseudoLabel:
    id: str
    ranked: list
    scores: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "ranked": list(self.ranked), "scores": list(self.scores)}


def label_examples(index, examples: Sequence[Example], k: int = 50, queries: Optional[Sequence[str]] = None,
                   templates: Optional[Mapping] = None, batch_size: int = 512, show_progress: bool = False,
                   desc: str = "BM25 retrieval", score_decimals: int = 4) -> list:
    """Rank the knowledge source for each example (query = the rendered prompt unless ``queries`` is given)."""
    if queries is None:
        from imprag_jax.data.templates import render_example
        queries = [render_example(ex, templates=templates) for ex in examples]
    if len(queries) != len(examples):
        raise ValueError(f"{len(queries)} queries for {len(examples)} examples")
    ranked, scores = index.search(list(queries), k, batch_size=batch_size, show_progress=show_progress, desc=desc)
    return [PseudoLabel(ex.id, r, [round(float(x), score_decimals) for x in s])
            for ex, r, s in zip(examples, ranked, scores)]


def write_pseudo_labels(path: str, labels: Iterable[PseudoLabel]) -> int:
    return write_jsonl(path, labels)


def iter_pseudo_labels(path: str) -> Iterator[PseudoLabel]:
    seen: set = set()
    for n, obj in iter_jsonl(path):
        w = f"{path}:{n}: "
        if not isinstance(obj.get("id"), str) or not isinstance(obj.get("ranked"), list):
            raise DataError(f"{w}pseudo-label lines need 'id' (string) and 'ranked' (list)")
        sc = obj.get("scores", [])
        if not isinstance(sc, list) or (sc and len(sc) != len(obj["ranked"])):
            raise DataError(f"{w}'scores' must be a list as long as 'ranked'")
        if obj["id"] in seen:
            raise DataError(f"{w}duplicate example id {obj['id']!r}")
        seen.add(obj["id"])
        yield PseudoLabel(obj["id"], [str(x) for x in obj["ranked"]], sc)


def load_pseudo_labels(path: str) -> dict:
    """``{example_id: PseudoLabel}``."""
    return {pl.id: pl for pl in iter_pseudo_labels(path)}


def _ranked(label) -> list:
    return list(label.ranked if isinstance(label, PseudoLabel) else label)


def positives(label, n: int = 5) -> list:
    """``P(q)``: the top ``n`` passage ids."""
    return _ranked(label)[:n]


def sample_hard_negatives(label, n: int, seed=0, lo: int = 10, hi: int = 50, exclude: Iterable[str] = (),
                          rng: Optional[random.Random] = None) -> list:
    """``N_h(q)``: ``n`` passage ids sampled without replacement from 1-based ranks ``lo..hi`` (inclusive),
    skipping ``exclude`` (e.g. the gold provenance). Returned in rank order; fewer when the pool is smaller.

    The draw depends only on ``(seed, example id)`` (for a bare list of ids: ``(seed, its top-1 id)``; or on
    ``rng`` when given), so it is the same whatever order the examples are visited in; change ``seed`` (e.g. per
    epoch) for fresh negatives.
    """
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo} hi={hi}")
    ranked = _ranked(label)
    ex = set(exclude)
    pool = [(r, p) for r, p in enumerate(ranked[lo - 1:hi], lo) if p not in ex]
    if rng is None:
        key = label.id if isinstance(label, PseudoLabel) else "|".join(ranked[:1])
        rng = random.Random(f"{seed}:{key}")
    picked = rng.sample(pool, min(n, len(pool)))
    return [p for _, p in sorted(picked)]


# ------------------------------------------------------------------------------------------------------- recall
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize_text(s: str) -> str:
    """Lowercase, accents stripped, punctuation to spaces, single spaces, padded with one space each side."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c)).lower()
    return " " + " ".join(_NON_WORD.sub(" ", s).split()) + " "


def answer_in_text(answers: Sequence[str], text: str, _normalized: bool = False) -> bool:
    """Whether any answer occurs in ``text`` as a whole-word substring after `normalize_text`."""
    t = text if _normalized else normalize_text(text)
    for a in answers:
        na = normalize_text(a)
        if na.strip() and na in t:
            return True
    return False


def recall_at_k(examples: Sequence[Example], rankings: Mapping, passages: Mapping, ks: Sequence[int] = (1, 5, 10),
                answer_recall: Optional[bool] = None, include_title: bool = True) -> dict:
    """Retrieval recall of ``rankings`` (``{example_id: PseudoLabel | list[passage_id]}``).

    * ``answer@k``: share of examples with an answer inside one of the top-k passages (title + text when
      ``include_title``) -- the paper's "retrieval recall". Off for fact verification (answers True/False);
      ``answer_recall`` forces it on/off.
    * ``provenance@k``: share of examples with a gold passage (provenance naming a passage, or a page, of
      ``passages``; ``n_provenance`` of them) that have a gold passage in the top k;
      ``provenance_all@k`` needs all of them (multi-hop). Page-level when provenance has only
      ``wikipedia_id`` and passages carry one.

    Returns ``{"n": .., "answer": {k: r} | None, "provenance": {k: r} | None, "provenance_all": ...,
    "n_provenance": ..}`` with recalls rounded to 4 decimals.
    """
    ks = sorted(set(ks))
    norm_cache: dict = {}

    def ntext(pid):
        if pid not in norm_cache:
            p = passages[pid]
            norm_cache[pid] = normalize_text(f"{p.title} {p.text}" if include_title else p.text)
        return norm_cache[pid]

    pages: list = []

    def page_ids():
        if not pages:
            pages.append({p.wikipedia_id for p in passages.values() if p.wikipedia_id is not None})
        return pages[0]

    hit_a = {k: 0 for k in ks}
    hit_p = {k: 0 for k in ks}
    hit_pa = {k: 0 for k in ks}
    n = n_ans = n_prov = 0
    for ex in examples:
        if ex.id not in rankings:
            raise KeyError(f"no ranking for example {ex.id!r}")
        ranked = _ranked(rankings[ex.id])
        n += 1
        use_ans = answer_recall if answer_recall is not None else ex.task_type != "fact_verification"
        if use_ans and ex.answers:
            n_ans += 1
            first = next((i for i, pid in enumerate(ranked[:ks[-1]])
                          if answer_in_text(ex.answers, ntext(pid), _normalized=True)), None)
            for k in ks:
                hit_a[k] += first is not None and first < k
        # gold the passages can show: known passage ids, else known pages (an unknown id is no gold, so an example
        # whose provenance the knowledge source lacks is left out of provenance recall instead of counting 0)
        gold_p = {g for g in ex.passage_ids if g in passages}
        gold_w = set() if gold_p else {w for w in ex.wikipedia_ids if w in page_ids()}
        if gold_p or gold_w:
            n_prov += 1
            for k in ks:
                found_p = {pid for pid in ranked[:k] if pid in gold_p}
                found_w = {passages[pid].wikipedia_id for pid in ranked[:k] if pid in passages} & gold_w
                hit_p[k] += bool(found_p or found_w)
                need = len(gold_p) if gold_p else len(gold_w)
                hit_pa[k] += (len(found_p) if gold_p else len(found_w)) >= need
    r = lambda h, d: {k: round(h[k] / d, 4) for k in ks} if d else None  # noqa: E731
    return {"n": n, "n_answer": n_ans, "answer": r(hit_a, n_ans), "n_provenance": n_prov,
            "provenance": r(hit_p, n_prov), "provenance_all": r(hit_pa, n_prov)}


__all__ = ["require_bm25s", "BM25Index", "DenseIndex", "PseudoLabel", "label_examples", "write_pseudo_labels",
           "iter_pseudo_labels", "load_pseudo_labels", "positives", "sample_hard_negatives", "normalize_text",
           "answer_in_text", "recall_at_k", "INSTALL_HINT"]
