"""A small real passage pool with gold-labelled questions, for retrieval tests, benchmarks and baselines.

Built straight from the raw files of the shared data folder (`../shared/data` beside the repository, or
`$IMPRAG_SHARED_DATA`):
  * NQ-open oracle (`nq_open/nq-open-oracle.jsonl.gz`): each question's gold DPR passage goes into the pool;
    the question is labelled with it.
  * SQuAD v1.1 dev (`squad/dev-v1.1.json.zip`): every paragraph goes into the pool; `squad_questions_per_paragraph`
    of its questions are labelled with it.
  * DPR distractors (`wiki_passages/dpr_wiki_sample_1000.jsonl`): unlabelled passages.
Passages are deduplicated by (title, text).  The text the model reads is `"{title}: {text}"` and the prompt
`"Q: {question} A:"` (the project's defaults).

    pool = load_eval_pool(max_nq=1000, max_squad_paragraphs=1000)
    tokens, mask = tokenize(tokenizer, pool.passage_texts(), l_max=128)
    recall = recall_at_ks(ranked_ids, pool.gold(), ks=(1, 5, 10))
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PASSAGE_FORMAT = "{title}: {text}"
PROMPT_FORMAT = "Q: {question} A:"


def shared_data_dir() -> Optional[str]:
    """`$IMPRAG_SHARED_DATA`, else `../shared/data` beside the repository root; None when absent."""
    env = os.environ.get("IMPRAG_SHARED_DATA")
    if env:
        return env if os.path.isdir(env) else None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.normpath(os.path.join(repo, "..", "shared", "data"))
    return path if os.path.isdir(path) else None


@dataclasses.dataclass
class EvalPool:
    passages: List[Tuple[str, str, str]]          # (id, title, text)
    questions: List[dict]                          # {"question", "gold": passage row, "source": "nq" | "squad"}

    def passage_texts(self, fmt: str = PASSAGE_FORMAT) -> List[str]:
        return [fmt.format(title=t, text=x) if t else x for _, t, x in self.passages]

    def prompts(self, fmt: str = PROMPT_FORMAT, source: Optional[str] = None) -> List[str]:
        return [fmt.format(question=q["question"]) for q in self.questions
                if source is None or q["source"] == source]

    def gold(self, source: Optional[str] = None) -> np.ndarray:
        return np.array([q["gold"] for q in self.questions if source is None or q["source"] == source], np.int64)

    def sources(self) -> List[str]:
        return sorted({q["source"] for q in self.questions})

    def __len__(self) -> int:
        return len(self.passages)


def load_eval_pool(data_dir: Optional[str] = None, *, max_distractors: Optional[int] = 1000,
                   max_nq: Optional[int] = None, max_squad_paragraphs: Optional[int] = None,
                   squad_questions_per_paragraph: int = 1, seed: int = 0) -> EvalPool:
    """The pool described in the module docstring; `max_*` subsample (seeded) each part (None = all)."""
    data_dir = data_dir or shared_data_dir()
    if data_dir is None or not os.path.isdir(data_dir):
        raise FileNotFoundError("the shared data folder (../shared/data or $IMPRAG_SHARED_DATA) is not there")
    rng = random.Random(seed)
    passages: List[Tuple[str, str, str]] = []
    key_to_row: Dict[tuple, int] = {}
    questions: List[dict] = []

    def add(pid, title, text) -> int:
        title, text = (title or "").strip(), " ".join((text or "").split())
        key = (title, text)
        if key not in key_to_row:
            key_to_row[key] = len(passages)
            passages.append((pid, title, text))
        return key_to_row[key]

    # NQ-open oracle
    nq_path = os.path.join(data_dir, "nq_open", "nq-open-oracle.jsonl.gz")
    if os.path.exists(nq_path):
        with gzip.open(nq_path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if max_nq is not None and max_nq < len(rows):
            rows = rng.sample(rows, max_nq)
        for i, r in enumerate(rows):
            gold = [c for c in r.get("ctxs", []) if c.get("isgold")] or r.get("ctxs", [])[:1]
            if not gold:
                continue
            row = add(f"nq:{i}", gold[0].get("title", ""), gold[0].get("text", ""))
            questions.append({"question": r["question"], "gold": row, "source": "nq"})

    # SQuAD v1.1 dev
    sq_path = os.path.join(data_dir, "squad", "dev-v1.1.json.zip")
    if os.path.exists(sq_path):
        with zipfile.ZipFile(sq_path) as z:
            name = [n for n in z.namelist() if n.endswith(".json")][0]
            data = json.loads(z.read(name).decode("utf-8"))["data"]
        paras = []
        for art in data:
            title = art.get("title", "").replace("_", " ")
            for j, p in enumerate(art["paragraphs"]):
                paras.append((title, p["context"], [qa["question"] for qa in p.get("qas", [])],
                              f"squad:{title}:{j}"))
        if max_squad_paragraphs is not None and max_squad_paragraphs < len(paras):
            paras = rng.sample(paras, max_squad_paragraphs)
        for title, ctx, qs, pid in paras:
            row = add(pid, title, ctx)
            for q in qs[:squad_questions_per_paragraph]:
                questions.append({"question": q, "gold": row, "source": "squad"})

    # DPR distractors
    dpr_path = os.path.join(data_dir, "wiki_passages", "dpr_wiki_sample_1000.jsonl")
    if os.path.exists(dpr_path) and (max_distractors is None or max_distractors > 0):
        with open(dpr_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if max_distractors is not None and max_distractors < len(rows):
            rows = rng.sample(rows, max_distractors)
        for r in rows:
            contents = r.get("contents", "")
            title, _, text = contents.partition("\n")
            add(f"dpr:{r.get('id')}", title.strip().strip('"'), text)
    if not passages:
        raise FileNotFoundError(f"no pool files found under {data_dir}")
    return EvalPool(passages, questions)


def tokenize(tokenizer, texts: Sequence[str], l_max: int, *, pad_id: int = 0,
             keep: str = "left") -> Tuple[np.ndarray, np.ndarray]:
    """Token ids `[N, l_max]` (int32, right padded) and mask (bool).  `keep="left"` truncates the end (passages),
    `keep="right"` the beginning (prompts: the last token, where ImpRAG reads E_q, survives).  `tokenizer`
    has `encode_batch(texts)` or `encode(text)` returning ids (or objects with `.ids`)."""
    if hasattr(tokenizer, "encode_batch"):
        ids = tokenizer.encode_batch(list(texts))
    else:
        ids = [tokenizer.encode(t) for t in texts]
    ids = [list(getattr(x, "ids", x)) for x in ids]
    tok = np.full((len(ids), l_max), pad_id, np.int32)
    mask = np.zeros((len(ids), l_max), bool)
    for i, x in enumerate(ids):
        x = x[:l_max] if keep == "left" else x[-l_max:]
        tok[i, : len(x)] = x
        mask[i, : len(x)] = True
    return tok, mask


def recall_at_ks(ranked: np.ndarray, gold: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> Dict[int, float]:
    """Fraction of questions whose gold row is among the first k of `ranked` [Q, K]."""
    ranked, gold = np.asarray(ranked), np.asarray(gold)
    return {k: float(np.mean((ranked[:, :k] == gold[:, None]).any(axis=1))) for k in ks}


def bm25_search(texts: Sequence[str], queries: Sequence[str], k: int) -> np.ndarray:
    """BM25 (bm25s, English stopwords, Snowball stemming when PyStemmer is there): ranked rows [Q, k]."""
    try:
        import bm25s
    except ImportError as e:  # pragma: no cover
        raise ImportError("BM25 needs bm25s: pip install 'imprag_jax[data]'") from e
    from imprag_jax.data.pseudo_labels import quiet_bm25s

    quiet_bm25s()
    try:
        import Stemmer

        stemmer = Stemmer.Stemmer("english")
    except ImportError:  # pragma: no cover
        stemmer = None
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    q = bm25s.tokenize(list(queries), stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    docs, _ = retriever.retrieve(q, k=min(k, len(texts)), show_progress=False)
    return np.asarray(docs)


def bottom_key_states(params, cfg, tokens, mask, *, stride: int = 8, batch_size: int = 32,
                      progress: bool = False) -> Dict[str, np.ndarray]:
    """One bottom-group pass over passages -> their E_p pre- and post-RoPE (`last_pre`, `last_post` [N, D]) and
    the layer-b key state of every `stride`-th real token (`prefix_pre` [M, D], pre-RoPE; `prefix_owner` [M]
    their passage rows).  The causal bottom group makes the key state at token i exactly the E_p of the passage
    cut after token i, so this is a corpus of M real passage-prefix embeddings for the cost of N passages (used
    to test and benchmark search at sizes the pool alone does not reach)."""
    import jax
    import jax.numpy as jnp

    from imprag_jax.model.layers import DecoderLayer, apply_rope, rope_inv_freq
    from imprag_jax.model.transformer import last_index, positions_from_mask, run_bottom

    layer_b = jax.tree.map(lambda x: x[cfg.b], params["layers"])
    inv = rope_inv_freq(cfg)

    @jax.jit
    def run(params, layer_b, t, m):
        h = run_bottom(params, cfg, t, m)
        k = DecoderLayer(cfg).apply({"params": layer_b}, h, method=DecoderLayer.retrieval_k).astype(jnp.float32)
        idx = last_index(m)
        last = jnp.take_along_axis(k, idx[:, None, None, None], axis=1)  # [B, 1, kv, hd]
        pos = jnp.take_along_axis(positions_from_mask(m), idx[:, None], axis=1)
        B = t.shape[0]
        return (last.reshape(B, -1), apply_rope(last, pos, inv).reshape(B, -1),
                k[:, stride - 1::stride].reshape(B, -1, cfg.num_kv_heads * cfg.head_dim))

    tokens, mask = np.asarray(tokens), np.asarray(mask)
    n = tokens.shape[0]
    outs = ([], [], [])
    it = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, unit="batch", desc="bottom_key_states", disable=None)  # None: no bar unless a terminal
    for s in it:
        t, m = tokens[s:s + batch_size], mask[s:s + batch_size]
        r = len(t)
        if r < batch_size:  # fixed shape: pad with copies of the first row
            t = np.concatenate([t, np.repeat(t[:1], batch_size - r, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch_size - r, 0)])
        for o, x in zip(outs, run(params, layer_b, jnp.asarray(t), jnp.asarray(m))):
            o.append(np.asarray(x)[:r])
    last_pre, last_post, pref = (np.concatenate(o) for o in outs)
    valid = mask[:, stride - 1::stride].astype(bool)
    owner = np.broadcast_to(np.arange(n)[:, None], valid.shape)[valid]
    return {"last_pre": last_pre, "last_post": last_post, "prefix_pre": pref[valid], "prefix_owner": owner}
