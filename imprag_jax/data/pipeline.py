"""Fixed-shape batches for ImpRAG training and evaluation, read with grain from ArrayRecord files.

A prepared data directory (the synthetic world of `imprag_jax.data.synthetic` or the mini-KILT of
`imprag_jax.data.prepare`) has ``passages.jsonl``, ``tasks/{task}.{split}.jsonl`` and, for retrieval tasks,
``pseudo_labels/{task}.{split}.jsonl``. `prepare_records` turns each task split into
``records/{task}.{split}.array_record`` (one JSON record per example: the templated prompt, the answers, gold /
BM25-ranked / generator hard-negative passages as corpus ROWS, and the meta). Records are tokenizer-independent;
tokenization happens when a batch is built, so one prepared directory serves every model. The iterators call
`prepare_records` themselves when a record file is missing or older than its sources. A folder that holds the TFDS
dataset of `imprag_jax.data.tfds_kilt` (``tfds/imprag_kilt/<version>/``, written by ``data.prepare`` unless
``--no_tfds``, or a ``tfds/location`` file naming one in a bucket) is read through it instead -- the same records,
the same batches bit for bit -- and needs no ``records/`` files. Every file of the folder is read through
`imprag_jax.data.paths`, so ``data_dir`` may be a bucket path (``gs://...``, with gcsfs) when the folder holds its
TFDS dataset (records are never written to a bucket); local paths are read with ``os`` as before.

Training batch (`TrainBatches`; every array is numpy, shapes fixed by `BatchConfig`, so a jitted step never
recompiles)::

    tokens         int32 [B, L]         prompt then response (+eos), right-padded with pad_id; L = L_q + L_r
    mask           int32 [B, L]         1 on real tokens
    prompt_mask    int32 [B, L]         1 on prompt tokens (E_q is read at the last one)
    loss_mask      int32 [B, L]         1 on the tokens to predict (response incl. eos)
    passages       int32 [B, k, l_max]  candidates: "{title}: {text}" then the end-of-passage id, right-padded
    passage_mask   int32 [B, k, l_max]
    passage_ids    int32 [B, k]         row of each candidate in passages.jsonl, -1 for an empty slot
    positives      int32 [B, k]         1 for (pseudo-)positive candidates
    example_index  int32 [B]            row of the example in its task split
  and, when free_batch_size > 0, the retrieval-free rows (format teaching, reading comprehension with the context
  in the prompt, plain text: no passages, generation loss only) at their own length Lf = L_free (or L):
    free_tokens    int32 [Bf, Lf]       prompt then response (+eos), right-padded
    free_mask      int32 [Bf, Lf]
    free_loss_mask int32 [Bf, Lf]
    free_index     int32 [Bf]           row of the example in its task split

``B`` / ``Bf`` are this host's shares of ``batch_size`` / ``free_batch_size`` (each divisible by the process
count). Free rows have their own length because their prompts hold a context (a passage, a paragraph) while
retrieval prompts are short: one shared length would pad every retrieval row -- and its passage stream -- to the
longest context. Plain-LM rows (``lm`` tasks) put one token (bos) in the prompt and the whole text in the
response, up to Lf.

Determinism: batch ``step`` is a pure function of (data, tokenizer, config, step). Each task split is shuffled
per epoch by grain (``MapDataset.source(...).shuffle(seed).repeat()``), mixed by weight (``MapDataset.mix``), and
every random choice for an example (negatives, candidate order, counterfactual values) is seeded by
``(seed, task, epoch, example row)``. The iterator state is ``{"step": n, "seed": s, "fingerprint": f}``; resuming
from it gives the same next batch, also on a different number of hosts.

Public API
  * ``BatchConfig`` -- shapes, mixture, candidate options, counterfactual ratio (``BatchConfig.synthetic()`` is the
    recipe of docs/feasibility_tiny.md).
  * ``TrainBatches(data_dir, tokenizer=None, cfg=BatchConfig(), process_index=0, process_count=1, prefetch=2)``
    -- iterator; ``.batch(step)``, ``.global_batch(step)``, ``.get_state()``, ``.set_state(state)``,
    ``.truncation_report()`` (prompts / passages / responses cut so far), ``.close()``.
  * ``make_train_iterator(data_dir, tokenizer=None, **config)`` -- shorthand.
  * ``eval_batches(data_dir, task, split="dev", tokenizer=None, batch_size=64, L_q=64, passages="none", k=1,
    l_max=32, ...)`` -- prompt-only batches plus answers for EM; optional oracle ("gold") or BM25 ("pseudo")
    passages.
  * ``corpus_tokens(data_dir, tokenizer, l_max, ...) -> (tokens [N, l_max], mask [N, l_max])`` -- the
    knowledge source as the model reads it (for the index).
  * ``prepare_records(data_dir, tasks=None, splits=None, force=False) -> list[path]``;
    ``load_tokenizer(data_dir)``; ``example_prompt(obj, task=None)``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from imprag_jax.data import paths
from imprag_jax.data import templates as T
from imprag_jax.data.records import (RECORDS_VERSION, _passage_rows, _task_splits, example_prompt,  # noqa: F401
                                     iter_task_records)
from imprag_jax.data.chunking import TITLE_FORMAT, TruncationStats, format_passage

BATCH_KEYS = ("tokens", "mask", "prompt_mask", "loss_mask", "passages", "passage_mask", "passage_ids", "positives",
              "example_index")
FREE_KEYS = ("free_tokens", "free_mask", "free_loss_mask", "free_index")
# retrieval rows carry them when the config asks (BatchConfig.mined_exclude, BatchConfig.query_filler_split)
OPTIONAL_KEYS = ("mined_exclude", "query_tokens", "query_mask")
TRUE_FALSE_ANSWERS = ("true", "false", "yes", "no")  # labels, not strings a passage "contains"


# ------------------------------------------------------------------------------------------------- config
@dataclass
class BatchConfig:
    """Everything that decides a training batch. All counts are GLOBAL (all hosts together)."""
    batch_size: int = 32                 # retrieval rows per global batch
    free_batch_size: int = 0             # retrieval-free rows (format teaching, plain LM) per global batch
    L_q: int = 64                        # prompt tokens (cut from the left; bos kept)
    L_r: int = 8                         # response tokens incl. eos (cut on the right)
    L_free: int = 0                      # length of a retrieval-free row (prompt + response); 0 = L_q + L_r
    L_free_r: int = 0                    # response tokens of a retrieval-free row (plain-LM rows: all); 0 = L_r
    l_max: int = 32                      # passage tokens incl. the end marker (cut on the right)
    k: int = 10                          # candidate slots per example
    tasks: Optional[Mapping[str, float]] = None       # retrieval task -> mixing weight; None: stats.json's list
    free_tasks: Optional[Mapping[str, float]] = None  # retrieval-free task -> weight; None: stats.json's lists
    lm_tasks: Sequence[str] = ("lm",)    # tasks read as plain text (meta.kind == "lm" also marks one)
    split: str = "train"
    positives: str = "pseudo"            # "pseudo": BM25 top n_pos | "gold": provenance | "both": gold + top n_pos
    n_pos: int = 5
    negatives: str = "bm25"              # "bm25": ranks neg_ranks | "generator": meta.hard_negatives | "both" | "random"
    n_neg: int = 5
    neg_ranks: tuple = (10, 50)          # 1-based, inclusive
    random_neg_fraction: float = 0.0     # each negative is a random corpus passage with this probability
    fill_random: bool = True             # fill slots a short negative pool leaves empty with random passages
    exclude_gold_from_negatives: bool = True
    mined_exclude: int = 0               # >0: each retrieval row carries `mined_exclude [this many]`, the passage
    #                                      rows negatives mined from the model's own index must not be (its gold,
    #                                      then passages containing an answer string; -1 padded; the trainer sets
    #                                      it for train.candidates index/mixed)
    cf: float = 0.0                      # share of synthetic training examples re-rendered counterfactually
    cf_negatives: bool = False           # also re-render the other candidates of a counterfactual example
    query_filler: float = 0.0            # share of retrieval rows given filler words before the answer marker
    query_filler_max: int = 24           # at most this many filler words (fewer when the prompt would not fit L_q)
    query_filler_pool: str = "unseen"    # "unseen": no word of an evaluated template | "all": every template word |
    #                                      "vocab" (synthetic world): every word of its vocabulary that names no entity
    #                                      or value (relation names, punctuation and [SEP] too; `non_entity_words`)
    query_filler_gen: bool = True        # False: a filled row trains the retrieval loss only (no generation loss)
    query_filler_split: bool = False     # True: the filled prompt goes to E_q only and the reader reads (and trains
    #                                      its generation loss on) the row's unfilled prompt; every retrieval row
    #                                      then carries `query_tokens` / `query_mask` [L_query], E_q's own prompt
    query_filler_order: str = "after"    # "after": the filler between the question and the answer marker |
    #                                      "shuffle": the question's words and the filler in a random order |
    #                                      "shuffle_entity": as shuffle, the entity's name (its gold passage's
    #                                      title) kept whole
    L_query: int = 0                     # length of E_q's own prompt under query_filler_split (the filled prompt
    #                                      fits it); 0 = L_q. The reader's unfilled prompt keeps L_q
    add_bos: bool = True
    title_format: Optional[str] = TITLE_FORMAT
    seed: int = 0

    def __post_init__(self):
        if self.positives not in ("pseudo", "gold", "both"):
            raise ValueError(f"positives must be pseudo|gold|both, got {self.positives!r}")
        if self.negatives not in ("bm25", "generator", "both", "random"):
            raise ValueError(f"negatives must be bm25|generator|both|random, got {self.negatives!r}")
        if self.batch_size < 0 or self.free_batch_size < 0 or self.batch_size + self.free_batch_size == 0:
            raise ValueError("need batch_size + free_batch_size > 0")
        if min(self.L_q, self.L_r, self.l_max, self.k) < 1 or self.L_q < 2 or self.L_r < 1 or self.l_max < 2:
            raise ValueError("L_q >= 2, L_r >= 1, l_max >= 2 and k >= 1 are needed")
        if self.L_free < 0 or self.L_free_r < 0 or self.Lf - self.Lf_r < 2:
            raise ValueError(f"L_free={self.L_free} must leave >= 2 prompt tokens beside L_free_r={self.Lf_r}")
        if not 0.0 <= self.cf <= 1.0 or not 0.0 <= self.random_neg_fraction <= 1.0 or not 0.0 <= self.query_filler <= 1.0:
            raise ValueError("cf, random_neg_fraction and query_filler are probabilities")
        if self.query_filler_pool not in ("unseen", "all", "vocab"):
            raise ValueError(f"query_filler_pool must be unseen|all|vocab, got {self.query_filler_pool!r}")
        if self.query_filler_order not in ("after", "shuffle", "shuffle_entity"):
            raise ValueError(f"query_filler_order must be after|shuffle|shuffle_entity, got "
                             f"{self.query_filler_order!r}")
        if self.query_filler_max < 0:
            raise ValueError(f"query_filler_max must be >= 0, got {self.query_filler_max}")
        if self.L_query < 0 or (self.L_query and not self.query_filler_split):
            raise ValueError(f"L_query={self.L_query} is E_q's own prompt length under query_filler_split (0 = L_q)")
        if self.query_filler_split and (self.query_filler <= 0 or not self.query_filler_gen):
            raise ValueError("query_filler_split needs query_filler > 0 and query_filler_gen = True (the split keeps "
                             "every row's generation loss, on its unfilled prompt)")
        if self.mined_exclude < 0:
            raise ValueError(f"mined_exclude must be >= 0, got {self.mined_exclude}")
        lo, hi = self.neg_ranks
        if lo < 1 or hi < lo:
            raise ValueError(f"neg_ranks must satisfy 1 <= lo <= hi, got {self.neg_ranks}")

    @property
    def L(self) -> int:
        return self.L_q + self.L_r

    @property
    def Lf(self) -> int:
        """Length of a retrieval-free row."""
        return self.L_free or self.L

    @property
    def Lf_r(self) -> int:
        """Response tokens of a retrieval-free (non-LM) row."""
        return self.L_free_r or self.L_r

    @classmethod
    def synthetic(cls, **overrides) -> "BatchConfig":
        """The synthetic-world recipe of docs/feasibility_tiny.md: gold + 3 generator hard negatives (25 % random),
        counterfactual gold and negatives, 32 QA rows + 8 format-teaching rows per step, k = 4."""
        base = dict(batch_size=32, free_batch_size=8, L_q=24, L_r=4, L_free=64, l_max=24, k=4, tasks={"qa": 1.0},
                    free_tasks={"format": 1.0}, positives="gold", negatives="generator", n_neg=3,
                    random_neg_fraction=0.25, cf=1.0, cf_negatives=True)
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------------------------------------- files
def load_tokenizer(data_dir: str):
    """``DIR/tokenizer.json`` as a `Tokenizer` with ``<bos>``/``<eos>``/``<pad>`` (the synthetic world's); a
    bucket folder's file is read from a local copy (`paths.local_copy`: the tokenizers library reads local files)."""
    from imprag_jax.data.tokenizer import Tokenizer

    path = paths.join(data_dir, "tokenizer.json")
    if not paths.exists(path):
        raise FileNotFoundError(f"{data_dir} has no tokenizer.json; pass the model's tokenizer")
    return Tokenizer.from_file(paths.local_copy(path), bos="<bos>", eos="<eos>", pad="<pad>")


def _read_stats(data_dir: str) -> dict:
    p = paths.join(data_dir, "stats.json")
    if paths.exists(p):
        with paths.open(p) as f:
            return json.load(f)
    return {}


# task types whose templates the evaluation uses: their words never serve as filler (`filler_words`)
_EVAL_TYPES = ("qa", "slot_filling", "entity_linking", "fact_verification")


def filler_words(world=None, pool: str = "unseen") -> list:
    """Words for `BatchConfig.query_filler`: the instruction words of the templates, plus, for the synthetic world,
    the words of its passage templates and two-hop questions. pool "unseen": less every word of the evaluated task
    types' templates, so no evaluation prompt's instruction word is ever seen as filler; "all": those words too
    (as a bag: never in a template's order); "vocab" (the synthetic world only): every word of the world's vocabulary
    that names no entity or value (`synthetic.non_entity_words`: the relation names, punctuation and [SEP] too).
    Sorted (deterministic)."""
    if pool == "vocab":
        if world is None:
            raise ValueError("query_filler_pool='vocab' draws from a synthetic world's vocabulary; this data has "
                             "none (use 'all' or 'unseen')")
        from imprag_jax.data import synthetic as S

        return S.non_entity_words(world)

    def words(s):
        return set(re.findall(r"[^\W_]+", re.sub(r"\{\w+\}", " ", s)))

    found = set().union(*[words(v) for v in T.TEMPLATES.values()])
    if world is not None:
        from imprag_jax.data import synthetic as S

        found |= set().union(*[words(x) for x in S.BIO_TEMPLATES + S.ORG_TEMPLATES + S.CITY_TEMPLATES
                              + S.COUNTRY_TEMPLATES + S.LETTER_TEMPLATES + S.EVENT_TEMPLATES
                              + tuple(S.TWO_HOP_QUESTIONS.values())])
    words_of = set().union(*[words(T.TEMPLATES[t]) for t in _EVAL_TYPES])
    return sorted(found - words_of if pool == "unseen" else found | words_of)


def _word_units(words: Sequence[str], keep: Sequence[str] = ()) -> list:
    """`words` with every run that spells a phrase of `keep` (trailing punctuation of its last word allowed, e.g.
    "Ropos?") joined into one unit, left to right, longest phrase first."""
    phrases = sorted({tuple(k.split()) for k in keep if k.split()}, key=len, reverse=True)
    out, i = [], 0
    while i < len(words):
        for ph in phrases:
            got = words[i:i + len(ph)]
            if len(got) == len(ph) and list(got[:-1]) == list(ph[:-1]) and got[-1].rstrip("?.,!;:") == ph[-1]:
                out.append(" ".join(got))
                i += len(ph)
                break
        else:
            out.append(words[i])
            i += 1
    return out


def _record_path(data_dir: str, task: str, split: str) -> str:
    return os.path.join(data_dir, "records", f"{task}.{split}.array_record")


def available_tasks(data_dir: str, split: str) -> list:
    return sorted(os.path.basename(p)[:-len(f".{split}.jsonl")]
                  for p in paths.glob(data_dir, f"tasks/*.{split}.jsonl"))


def prepare_records(data_dir: str, tasks: Optional[Sequence[str]] = None, splits: Optional[Sequence[str]] = None,
                    force: bool = False) -> list:
    """Write ``records/{task}.{split}.array_record`` for the given task splits (all by default) when missing or
    older than the task / pseudo-label files. Returns the record paths. A folder that holds a TFDS dataset
    (`imprag_jax.data.tfds_kilt`) is read through it and needs no record files: nothing is written, and the
    paths returned are those the folder would have."""
    from array_record.python.array_record_module import ArrayRecordWriter

    todo = _task_splits(data_dir, tasks, splits)
    out = [_record_path(data_dir, task, split) for task, split, _ in todo]
    if _tfds_dir(data_dir) is not None:
        return out
    if not paths.is_local(data_dir):
        raise FileNotFoundError(f"{data_dir} holds no TFDS dataset (tfds/imprag_kilt/<version>/): a data folder at a "
                                "bucket path is read through it; prepare the folder with it (python -m "
                                "imprag_jax.data.prepare writes it by default) and copy the whole folder")
    rows = None
    for task, split, path in todo:
        rec_path = _record_path(data_dir, task, split)
        pl_path = os.path.join(data_dir, "pseudo_labels", f"{task}.{split}.jsonl")
        sources = [path, os.path.join(data_dir, "passages.jsonl")] + ([pl_path] if os.path.exists(pl_path) else [])
        if (not force and os.path.exists(rec_path)
                and os.path.getmtime(rec_path) >= max(os.path.getmtime(s) for s in sources)):
            continue
        if rows is None:
            rows = _passage_rows(data_dir)[1]
        os.makedirs(os.path.dirname(rec_path), exist_ok=True)
        tmp = f"{rec_path}.tmp{os.getpid()}"
        w = ArrayRecordWriter(tmp, "group_size:1")
        for rec in iter_task_records(data_dir, task, split, rows):
            w.write(rec)
        w.close()
        os.replace(tmp, rec_path)
    return out


def _tfds_dir(data_dir: str) -> Optional[str]:
    """The TFDS dataset folder of a prepared data folder (`imprag_jax.data.tfds_kilt.find_dataset`; a stale local
    one raises), or None."""
    from imprag_jax.data import tfds_kilt

    d = tfds_kilt.find_dataset(data_dir)
    if d is not None:
        tfds_kilt.check_fresh(data_dir, d)
    return d


def _task_source(data_dir: str, task: str, split: str):
    """Random-access source of one task split's JSON records (bytes): the folder's TFDS dataset when it holds
    one, else ``records/{task}.{split}.array_record``."""
    d = _tfds_dir(data_dir)
    if d is not None:
        from imprag_jax.data import tfds_kilt

        return tfds_kilt.task_source(d, task, split)
    return _source(_record_path(data_dir, task, split))


def _source(path: str):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource([path])


def _crc(s: str) -> int:
    return zlib.crc32(s.encode("utf-8")) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------- tokenizing
class _Encoder:
    """Token-level helpers shared by the train and eval builders."""

    def __init__(self, tokenizer, title_format: Optional[str], add_bos: bool):
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos id")
        self.tok = tokenizer
        self.pad = int(tokenizer.pad_id)
        self.eos = int(tokenizer.eos_id)
        self.bos = int(tokenizer.bos_id) if (add_bos and tokenizer.bos_id is not None) else None
        eop = tokenizer.token_to_id("<eop>")
        self.eop = int(eop) if eop is not None else self.eos
        self.title_format = title_format

    def prompt(self, text: str, L_q: int, stats: TruncationStats) -> list:
        ids = self.tok.encode(text)
        room = L_q - (self.bos is not None)
        stats.prompts += 1
        if len(ids) > room:
            stats.prompts_truncated += 1
            stats.prompt_tokens_cut += len(ids) - room
            ids = ids[len(ids) - room:]
        return ([self.bos] if self.bos is not None else []) + list(ids)

    def response(self, answer: str, L_r: int, stats: dict) -> list:
        ids = self.tok.encode(" " + " ".join(answer.split()))
        stats["responses"] = stats.get("responses", 0) + 1
        if len(ids) > L_r - 1:
            stats["responses_truncated"] = stats.get("responses_truncated", 0) + 1
            ids = ids[:L_r - 1]
        return list(ids) + [self.eos]

    def passage(self, title: str, text: str, l_max: int, stats: TruncationStats) -> list:
        ids = self.tok.encode(format_passage(title, text, self.title_format))
        stats.passages += 1
        if len(ids) > l_max - 1:
            stats.passages_truncated += 1
            stats.passage_tokens_cut += len(ids) - (l_max - 1)
            ids = ids[:l_max - 1]
        return list(ids) + [self.eop]

    def passages(self, items: Sequence[tuple], l_max: int, stats: TruncationStats) -> tuple:
        """[N, l_max] tokens and mask for (title, text) pairs (batched tokenization)."""
        toks = np.full((len(items), l_max), self.pad, np.int32)
        mask = np.zeros((len(items), l_max), np.int32)
        texts = [format_passage(t, x, self.title_format) for t, x in items]
        enc = self.tok.encode_batch(texts) if hasattr(self.tok, "encode_batch") else [self.tok.encode(t) for t in texts]
        for i, ids in enumerate(enc):
            stats.passages += 1
            if len(ids) > l_max - 1:
                stats.passages_truncated += 1
                stats.passage_tokens_cut += len(ids) - (l_max - 1)
                ids = ids[:l_max - 1]
            n = len(ids) + 1
            toks[i, :n] = list(ids) + [self.eop]
            mask[i, :n] = 1
        return toks, mask


def corpus_tokens(data_dir: str, tokenizer=None, l_max: int = 32, title_format: Optional[str] = TITLE_FORMAT,
                  stats: Optional[TruncationStats] = None, rows=None) -> tuple:
    """Every passage of ``passages.jsonl`` as the model reads it: ``(tokens [N, l_max], mask [N, l_max])``; with
    ``rows`` (passage row numbers) only those, in that order (a host's share of a multi-process index)."""
    tokenizer = tokenizer or load_tokenizer(data_dir)
    ps, _ = _passage_rows(data_dir)
    if rows is not None:
        ps = [ps[int(i)] for i in rows]
    return _Encoder(tokenizer, title_format, False).passages([(t, x) for _, t, x in ps], l_max,
                                                            stats if stats is not None else TruncationStats())


# ------------------------------------------------------------------------------------------------- training
class TrainBatches:
    """Deterministic, resumable iterator over fixed-shape training batches (this host's rows).

    ``batch(step)`` builds any batch directly; iteration yields ``batch(state.step)`` and advances. ``prefetch``
    batches are built ahead in a background thread.
    """

    def __init__(self, data_dir: str, tokenizer=None, cfg: Optional[BatchConfig] = None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2, world=None):
        import grain

        self.cfg = cfg = cfg or BatchConfig()
        self.data_dir = data_dir
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
        if cfg.batch_size % process_count or cfg.free_batch_size % process_count:
            raise ValueError(f"batch_size {cfg.batch_size} and free_batch_size {cfg.free_batch_size} must each be "
                             f"divisible by process_count {process_count}")
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer or load_tokenizer(data_dir)
        self.enc = _Encoder(self.tokenizer, cfg.title_format, cfg.add_bos)
        stats = _read_stats(data_dir)
        tasks = dict(cfg.tasks) if cfg.tasks is not None else {
            t: 1.0 for t in stats.get("retrieval_tasks", []) if t in available_tasks(data_dir, cfg.split)}
        free = dict(cfg.free_tasks) if cfg.free_tasks is not None else {
            t: 1.0 for t in stats.get("free_tasks", []) + stats.get("lm_tasks", [])
            if t in available_tasks(data_dir, cfg.split)}
        if cfg.batch_size and not tasks:
            raise ValueError(f"no retrieval tasks for split {cfg.split!r} in {data_dir}")
        if cfg.free_batch_size and not free:
            raise ValueError(f"free_batch_size={cfg.free_batch_size} but no retrieval-free tasks")
        self.tasks, self.free_tasks = (tasks if cfg.batch_size else {}), (free if cfg.free_batch_size else {})
        prepare_records(data_dir, list(self.tasks) + list(self.free_tasks), [cfg.split])

        self.passages, self.passage_index = _passage_rows(data_dir)
        self.n_passages = len(self.passages)
        self._ptok = None  # corpus tokens, built on first use
        self._filler = None  # filler words of `data.query_filler`, built on first use
        self._answer_index = None  # (normalized passage texts, word -> rows) for `mined_exclude`, built on first use
        self._answer_rows_cache: dict = {}
        self.world = world
        if ((cfg.cf > 0 or cfg.query_filler > 0) and self.world is None
                and paths.exists(paths.join(data_dir, "world.json"))):
            from imprag_jax.data.synthetic import World
            self.world = World.load(data_dir)

        def stream(names: Mapping[str, float]):
            if not names:
                return None
            parts, weights = [], []
            for t, wgt in names.items():
                src = _task_source(data_dir, t, cfg.split)
                n = len(src)
                if n == 0:
                    raise ValueError(f"task {t}.{cfg.split} is empty")
                ds = (grain.MapDataset.source(src).shuffle(seed=_crc(f"{cfg.seed}:{t}")).repeat()
                      .map_with_index(lambda i, rec, n=n: (i // n, rec)))
                parts.append(ds)
                weights.append(float(wgt))
            return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)

        self._retr, self._free = stream(self.tasks), stream(self.free_tasks)
        self.global_batch_size = cfg.batch_size + cfg.free_batch_size
        self.host_batch_size = self.global_batch_size // process_count
        self.truncation = TruncationStats()          # prompts and batch-time (counterfactual) passages
        self.corpus_truncation = TruncationStats()   # the corpus, tokenized once
        self.response_truncation: dict = {"responses": 0, "responses_truncated": 0, "lm": 0, "lm_truncated": 0}
        self._step = 0
        self._prefetch = max(0, int(prefetch))
        self._pool = None
        self._pending: dict = {}

    def truncation_report(self) -> dict:
        """Counts over the batches built so far (prefetched ones included) and the corpus."""
        out = {f"{k}": v for k, v in self.truncation.as_dict().items() if not k.startswith(("chunk", "passages_ch"))}
        out.update({f"corpus_{k}": v for k, v in self.corpus_truncation.as_dict().items()
                    if k in ("passages", "passages_truncated", "passage_tokens_cut")})
        out.update(self.response_truncation)
        return out

    # ------------------------------------------------------------------ state
    @property
    def fingerprint(self) -> int:
        """A checksum of the data config (not of the host count: global batches do not depend on it)."""
        d = dataclasses.asdict(self.cfg)
        d.update(tasks=self.tasks, free_tasks=self.free_tasks)
        return _crc(json.dumps(d, sort_keys=True, default=str))

    def get_state(self) -> dict:
        """``{"step", "seed", "fingerprint"}`` (JSON-able): the next batch to yield."""
        return {"step": int(self._step), "seed": int(self.cfg.seed), "fingerprint": self.fingerprint}

    def set_state(self, state: Mapping) -> None:
        """Resume at ``state["step"]``. Raises if the state came from another seed or config (drop
        ``"fingerprint"`` from the state to resume on purpose with a changed config)."""
        if int(state.get("seed", self.cfg.seed)) != self.cfg.seed:
            raise ValueError(f"iterator state is for seed {state.get('seed')}, this iterator has {self.cfg.seed}")
        if "fingerprint" in state and int(state["fingerprint"]) != self.fingerprint:
            raise ValueError("iterator state comes from a different data config (batch sizes, tasks, candidates, "
                             "shapes); drop its 'fingerprint' to resume anyway")
        self._drop_pending()
        self._step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        step = self._step
        if self._prefetch:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imprag-data")
            for s in range(step, step + self._prefetch + 1):
                if s not in self._pending:
                    self._pending[s] = self._pool.submit(self.batch, s)
            batch = self._pending.pop(step).result()
        else:
            batch = self.batch(step)
        self._step = step + 1
        return batch

    def _drop_pending(self):
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    def close(self):
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ batches
    def _rows(self, step: int, part: int, count: int) -> tuple:
        """(retrieval rows, free rows) of global batch ``step`` for ``part`` of ``count`` equal shares."""
        cfg = self.cfg
        out = []
        for n, stream in ((cfg.batch_size, self._retr), (cfg.free_batch_size, self._free)):
            h = n // count
            rows = []
            for pos in range(part * h, (part + 1) * h):
                epoch, raw = stream[step * n + pos]
                rows.append(self._row(json.loads(raw), int(epoch)))
            out.append(rows)
        return tuple(out)

    def batch(self, step: int) -> dict:
        """This host's rows of global batch ``step``."""
        return _stack(*self._rows(step, self.process_index, self.process_count), self.cfg)

    def global_batch(self, step: int) -> dict:
        """All rows of global batch ``step`` (every host's `batch`, concatenated key by key)."""
        return _stack(*self._rows(step, 0, 1), self.cfg)

    def _corpus(self):
        if self._ptok is None:
            self._ptok = self.enc.passages([(t, x) for _, t, x in self.passages], self.cfg.l_max,
                                           self.corpus_truncation)
        return self._ptok

    def _row(self, rec: dict, epoch: int) -> dict:
        cfg = self.cfg
        seed = [cfg.seed, _crc(rec["task"]), epoch, rec["row"]]
        rng = np.random.default_rng(seed)
        cf = None
        if (self.world is not None and cfg.cf > 0 and rng.random() < cfg.cf
                and rec["task"] in self.world.examples):  # tasks the world can re-render
            cf = self.world.counterfactual(rec["task"], rec["meta"], seed + [1])
        prompt = cf.prompt if cf else rec["prompt"]
        answer = cf.answer if cf else (rec["answers"][0] if rec["answers"] else "")
        is_lm = rec["task"] in cfg.lm_tasks or rec["kind"] == "lm"
        if is_lm or rec["kind"] == "free" or rec["task"] in self.free_tasks:
            return self._free_row(rec, prompt, answer, is_lm)
        gold = [self.passage_index[g] for g in cf.gold] if cf else list(rec["gold"])
        cands, pos = self._candidates(rec, gold, rng)
        if cf and not set(gold) <= set(cands):  # pseudo positives missed the counterfactual gold: keep it real
            cf, prompt, answer = None, rec["prompt"], (rec["answers"][0] if rec["answers"] else "")
        filled = cfg.query_filler > 0 and rng.random() < cfg.query_filler  # drawn after the candidates
        Lq = (cfg.L_query or cfg.L_q) if cfg.query_filler_split else cfg.L_q
        keep = [self.passages[g][1] for g in gold] if cfg.query_filler_order == "shuffle_entity" else []
        query, q_fit = self._with_filler(prompt, rng, Lq, keep) if filled else (prompt, None)
        if not cfg.query_filler_split:
            prompt = query
        p_ids = self.enc.prompt(prompt, cfg.L_q, self.truncation)
        r_ids = self.enc.response(answer, cfg.L_r, self.response_truncation)
        row = self._tokens(p_ids, r_ids, rec["row"])
        if filled and not cfg.query_filler_gen:  # the filled prompt trains E_q only
            row["loss_mask"][:] = 0
        if cfg.query_filler_split:  # E_q's prompt (filled or not), the reader's stays unfilled
            q_ids = q_fit if q_fit is not None else (
                self.enc.prompt(query, Lq, TruncationStats()) if filled or Lq < cfg.L_q else p_ids)
            row["query_tokens"] = np.full((Lq,), self.enc.pad, np.int32)
            row["query_tokens"][:len(q_ids)] = q_ids
            row["query_mask"] = (np.arange(Lq) < len(q_ids)).astype(np.int32)
        ptok, pmask = self._corpus()
        toks = np.full((cfg.k, cfg.l_max), self.enc.pad, np.int32)
        mask = np.zeros((cfg.k, cfg.l_max), np.int32)
        texts = {}
        if cf:
            texts = {self.passage_index[g]: t for g, t in cf.texts.items()}
            if cfg.cf_negatives:
                others = [self.passages[c][0] for c in cands if c not in texts]
                texts.update({self.passage_index[p]: t for p, t in
                              self.world.counterfactual_passages(others, seed + [2], cf).items()})
        for j, c in enumerate(cands):
            if c in texts:
                ids = self.enc.passage(self.passages[c][1], texts[c], cfg.l_max, self.truncation)
                toks[j, :len(ids)] = ids
                mask[j, :len(ids)] = 1
            else:
                toks[j], mask[j] = ptok[c], pmask[c]
        ids = np.full((cfg.k,), -1, np.int32)
        ids[:len(cands)] = cands
        positives = np.zeros((cfg.k,), np.int32)
        positives[:len(cands)] = [c in pos for c in cands]
        row.update(passages=toks, passage_mask=mask, passage_ids=ids, positives=positives)
        if cfg.mined_exclude:
            keep = list(dict.fromkeys(list(gold) + list(rec["gold"]) + self.answer_rows(
                list(rec["answers"]) + ([answer] if cf else []))))
            ex = np.full((cfg.mined_exclude,), -1, np.int32)
            ex[:min(len(keep), cfg.mined_exclude)] = keep[:cfg.mined_exclude]
            row["mined_exclude"] = ex
        return row

    def answer_rows(self, answers) -> list:
        """Rows of the passages whose "title text" contains one of `answers` (the whole-word, normalised match of
        answer recall, `pseudo_labels.answer_in_text`), in row order; true/false labels match nothing."""
        from imprag_jax.data.pseudo_labels import normalize_text

        if self._answer_index is None:
            norm = [normalize_text(f"{t} {x}") for _, t, x in self.passages]
            words: dict = {}
            for r, n in enumerate(norm):
                for w in set(n.split()):
                    words.setdefault(w, []).append(r)
            self._answer_index = (norm, words)
        norm, words = self._answer_index
        out: set = set()
        for a in answers:
            na = normalize_text(a)
            key = na.strip()
            if not key or key in TRUE_FALSE_ANSWERS:
                continue
            if key not in self._answer_rows_cache:
                posting = sorted((words.get(w, []) for w in key.split()), key=len)
                cand = posting[0] if posting else []
                self._answer_rows_cache[key] = [r for r in cand if na in norm[r]]
            out.update(self._answer_rows_cache[key])
        return sorted(out)

    def _with_filler(self, prompt: str, rng, L_q: int, keep: Sequence[str] = ()) -> tuple:
        """The prompt with 0..query_filler_max random instruction-like words (`filler_words`) inserted before its
        answer marker ("A:"; the end when it has none), as many as fit L_q: the entity the question names then
        sits at varied distances from the last token, whose query state must find it by content (prompts of
        unseen formats put ~20 instruction words after it). With query_filler_order = "shuffle" the question's
        words and the filler words come in a random order (the entity anywhere, first included, as in slot
        filling's prompt), the marker last; "shuffle_entity" shuffles the same way but keeps each phrase of `keep`
        (the gold passages' titles: the entity's name) whole and in order. Returns (text, its prompt ids) with the
        ids fitting `L_q` tokens, or (prompt, None) when no filled form fits."""
        if self._filler is None:
            self._filler = filler_words(self.world, self.cfg.query_filler_pool)
        cut = prompt.rstrip().rfind("A:") if prompt.rstrip().endswith("A:") else len(prompt)
        head, tail = prompt[:cut].rstrip(), prompt[cut:].strip()
        n = int(rng.integers(0, self.cfg.query_filler_max + 1))
        words = [self._filler[i] for i in rng.integers(len(self._filler), size=n)]
        shuffle = self.cfg.query_filler_order in ("shuffle", "shuffle_entity")
        if shuffle:
            q = _word_units(head.split(), keep)
            order = rng.permutation(len(q) + n)  # over the question's words and all n filler words

        def render(m):  # the prompt with the first m filler words
            if shuffle:
                bag = q + words[:m]
                return " ".join([bag[i] for i in order if i < len(bag)] + ([tail] if tail else []))
            return " ".join(x for x in (head, " ".join(words[:m]), tail) if x)

        for m in range(n, -1 if shuffle else 0, -1):  # "after" with no word left is the prompt itself
            text = render(m)
            ids = self.enc.prompt(text, 10 ** 6, TruncationStats())
            if len(ids) <= L_q:
                return text, ids
        return prompt, None

    def _candidates(self, rec: dict, gold: list, rng) -> tuple:
        """(candidate rows in slot order, set of positive rows)."""
        cfg = self.cfg
        ranked = rec["ranked"]
        if cfg.positives == "pseudo":
            P = list(ranked[:cfg.n_pos])
        elif cfg.positives == "gold":
            P = list(gold)
        else:
            P = list(gold) + [r for r in ranked[:cfg.n_pos] if r not in gold]
        P = P[:cfg.k]
        taken = set(P) | (set(gold) | set(rec["gold"]) if cfg.exclude_gold_from_negatives else set())
        lo, hi = cfg.neg_ranks
        pool: list = []
        if cfg.negatives in ("generator", "both"):
            pool += rec["hard_negatives"]
        if cfg.negatives in ("bm25", "both"):
            pool += ranked[lo - 1:hi]
        pool = list(dict.fromkeys(r for r in pool if r not in taken))
        want = max(0, min(cfg.n_neg, cfg.k - len(P)))
        order = rng.permutation(len(pool))
        negs, used = [], set(taken)
        for i in order:
            if len(negs) == want:
                break
            negs.append(int(pool[i]))
            used.add(int(pool[i]))
        for j in range(len(negs)):
            if cfg.negatives == "random" or rng.random() < cfg.random_neg_fraction:
                used.discard(negs[j])
                negs[j] = self._random_passage(rng, used)
                used.add(negs[j])
        if cfg.fill_random or cfg.negatives == "random":
            while len(negs) < want and len(used) < self.n_passages:
                r = self._random_passage(rng, used)
                negs.append(r)
                used.add(r)
        cands = P + negs
        cands = [cands[i] for i in rng.permutation(len(cands))]
        return cands, set(P)

    def _random_passage(self, rng, avoid: set) -> int:
        while True:
            r = int(rng.integers(self.n_passages))
            if r not in avoid:
                return r

    def _tokens(self, p_ids: list, r_ids: list, example_row: int, L: Optional[int] = None) -> dict:
        L = L or self.cfg.L
        toks = np.full((L,), self.enc.pad, np.int32)
        seq = p_ids + r_ids
        toks[:len(seq)] = seq
        mask = np.zeros((L,), np.int32)
        mask[:len(seq)] = 1
        pm = np.zeros((L,), np.int32)
        pm[:len(p_ids)] = 1
        lm = np.zeros((L,), np.int32)
        lm[len(p_ids):len(seq)] = 1
        return {"tokens": toks, "mask": mask, "prompt_mask": pm, "loss_mask": lm,
                "example_index": np.int32(example_row)}

    def _free_row(self, rec: dict, prompt: str, answer: str, is_lm: bool) -> dict:
        cfg = self.cfg
        if is_lm:  # one sequence: bos (the prompt) then the text, loss on the text, up to Lf tokens
            ids = self.tok_text(f"{prompt} {answer}")
            head = [self.enc.bos] if self.enc.bos is not None else ids[:1]
            body = ids if self.enc.bos is not None else ids[1:]
            room = cfg.Lf - len(head) - 1
            self.response_truncation["lm"] += 1
            if len(body) > room:
                self.response_truncation["lm_truncated"] = self.response_truncation.get("lm_truncated", 0) + 1
                body = body[:room]
            row = self._tokens(head, body + [self.enc.eos], rec["row"], cfg.Lf)
        else:
            row = self._tokens(self.enc.prompt(prompt, cfg.Lf - cfg.Lf_r, self.truncation),
                               self.enc.response(answer, cfg.Lf_r, self.response_truncation), rec["row"], cfg.Lf)
        return {"free_tokens": row["tokens"], "free_mask": row["mask"], "free_loss_mask": row["loss_mask"],
                "free_index": row["example_index"]}

    def tok_text(self, text: str) -> list:
        return list(self.tokenizer.encode(text))


def _stack(rows: list, free_rows: list, cfg: BatchConfig) -> dict:
    if not rows and not free_rows:
        raise ValueError("empty batch")
    out = {}
    for keys, rs in ((BATCH_KEYS + tuple(k for k in OPTIONAL_KEYS if rows and k in rows[0]), rows),
                     (FREE_KEYS, free_rows)):
        for k in keys if rs else ():
            out[k] = np.stack([r[k] for r in rs]).astype(np.int32)
    return out


def make_train_iterator(data_dir: str, tokenizer=None, process_index: int = 0, process_count: int = 1,
                        prefetch: int = 2, **config) -> TrainBatches:
    """``TrainBatches(data_dir, tokenizer, BatchConfig(**config), process_index, process_count, prefetch)``."""
    return TrainBatches(data_dir, tokenizer, BatchConfig(**config), process_index, process_count, prefetch)


# ------------------------------------------------------------------------------------------------- evaluation
def eval_batches(data_dir: str, task: str, split: str = "dev", tokenizer=None, *, batch_size: int = 64,
                 L_q: int = 64, passages: str = "none", k: int = 1, l_max: int = 32, add_bos: bool = True,
                 title_format: Optional[str] = TITLE_FORMAT, limit: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1, stats: Optional[TruncationStats] = None) -> Iterator[dict]:
    """Prompt-only batches for EM evaluation, in file order, every batch the same shape.

    Yields dicts with numpy arrays ``tokens``/``mask``/``prompt_mask`` ``[b, L_q]`` (right-padded; the last prompt
    token is at ``mask.sum(-1) - 1``), ``example_index [b]`` (-1 for padding rows of the last batch), ``valid [b]``,
    ``gold_ids [b, G]`` (gold passage rows, -1 padded; G = the split's largest gold set, at least 1), and lists
    ``answers`` (list of answer strings per row), ``ids`` and ``prompts`` (the prompt texts). ``passages="gold"`` (oracle reading) or ``"pseudo"``
    (BM25 top k) adds ``passages``/``passage_mask [b, k, l_max]`` and ``passage_ids [b, k]``. ``b`` is this host's
    share of ``batch_size``.
    """
    if passages not in ("none", "gold", "pseudo"):
        raise ValueError(f"passages must be none|gold|pseudo, got {passages!r}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    tokenizer = tokenizer or load_tokenizer(data_dir)
    enc = _Encoder(tokenizer, title_format, add_bos)
    stats = stats if stats is not None else TruncationStats()
    prepare_records(data_dir, [task], [split])
    src = _task_source(data_dir, task, split)
    n = len(src) if limit is None else min(limit, len(src))
    recs = [json.loads(src[i]) for i in range(n)]
    G = max([len(r["gold"]) for r in recs] + [1])
    ps = _passage_rows(data_dir)[0] if passages != "none" else None
    h = batch_size // process_count
    for start in range(0, n, batch_size):
        lo = start + process_index * h
        chunk = [recs[i] if i < n else None for i in range(lo, lo + h)]
        toks = np.full((h, L_q), enc.pad, np.int32)
        mask = np.zeros((h, L_q), np.int32)
        idx = np.full((h,), -1, np.int32)
        gold = np.full((h, G), -1, np.int32)
        out = {"answers": [], "ids": [], "prompts": []}
        pt = np.full((h, k, l_max), enc.pad, np.int32) if ps else None
        pm = np.zeros((h, k, l_max), np.int32) if ps else None
        pid = np.full((h, k), -1, np.int32) if ps else None
        for i, r in enumerate(chunk):
            if r is None:
                out["answers"].append([])
                out["ids"].append("")
                out["prompts"].append("")
                continue
            ids = enc.prompt(r["prompt"], L_q, stats)
            toks[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
            idx[i] = r["row"]
            gold[i, :len(r["gold"])] = r["gold"]
            out["answers"].append(list(r["answers"]))
            out["ids"].append(r["id"])
            out["prompts"].append(r["prompt"])
            if ps:
                cands = (r["gold"] if passages == "gold" else r["ranked"])[:k]
                if cands:
                    t, m = enc.passages([(ps[c][1], ps[c][2]) for c in cands], l_max, stats)
                    pt[i, :len(cands)], pm[i, :len(cands)] = t, m
                    pid[i, :len(cands)] = cands
        out.update(tokens=toks, mask=mask, prompt_mask=mask.copy(), example_index=idx, valid=(idx >= 0).astype(np.int32),
                   gold_ids=gold)
        if ps:
            out.update(passages=pt, passage_mask=pm, passage_ids=pid)
        yield out


def gold_counts(data_dir: str, task: str, split: str = "dev", limit: Optional[int] = None) -> tuple:
    """(examples, examples with a gold passage) among the first `limit` examples of a task split: gold is the
    provenance that names a passage of passages.jsonl (what oracle reading and gold recall use)."""
    prepare_records(data_dir, [task], [split])
    src = _task_source(data_dir, task, split)
    n = len(src) if limit is None else min(limit, len(src))
    return n, sum(1 for i in range(n) if json.loads(src[i])["gold"])


__all__ = ["BatchConfig", "TrainBatches", "make_train_iterator", "eval_batches", "corpus_tokens", "prepare_records",
           "load_tokenizer", "example_prompt", "available_tasks", "gold_counts", "BATCH_KEYS", "FREE_KEYS",
           "OPTIONAL_KEYS", "RECORDS_VERSION"]
