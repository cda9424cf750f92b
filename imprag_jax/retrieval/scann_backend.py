"""ScaNN on the host: maximum-inner-product search for corpora larger than device memory, and for CPU serving.

    idx = ScannIndex.build(embeddings)                 # np [N, D]; defaults scaled by N
    scores, ids = idx.search(E_q, k=10)                # np f32 [Q, k], np int32 [Q, k]
    scores, ids = idx.search_in_graph(E_q, 10)         # the same from inside jax.jit (jax.pure_callback)
    idx.serialize(dir); idx = ScannIndex.load(dir)

    idx = build_searcher(passage_index, k)             # THE way the project builds one from a model's index:
                                                       # evaluation/generate (backend "scann") and training
    publish("train", idx)                              # a named host slot a compiled program calls back into:
    scores, ids = slot_search_in_graph("train", E_q, k, step=index_step, mesh=mesh)   # inside jit

Searchers change (the training index is refreshed every `train.refresh_every` steps) while a compiled step must
not: the step's callback therefore names a slot, not a searcher, and looks the searcher up when it runs, by
the device index's step (the last `SLOT_KEEP` searchers of a slot are kept, so a step dispatched before a
refresh still finds the searcher of its own index).  Under a mesh the queries are gathered (replicated) before
the callback, which then runs once, on the host of the first device, over the whole global batch; its [Q, k]
results are broadcast back (docs/retrieval.md, "ScaNN inside the train step").

Defaults (`default_params(N, D)`): below `BRUTE_FORCE_BELOW` (20k) rows, ScaNN's exact brute force (already
~5-10x numpy there: SIMD, threads).  Above, a k-means tree with ~sqrt(N) leaves of which 20% (at least 8) are
searched, scored with anisotropic-hashing (AH) codes of 2 dimensions per block, and the best `reorder` (200)
candidates rescored exactly in fp32.  Tuned on real SmolLM2 ImpRAG embeddings (passages and passage prefixes of
the real pool, with question E_q and held-out passage E_p as queries; docs/retrieval.md): at 10% of the leaves
the untrained model's E_q -- nearly one direction for every question, so every query wants the same few "hub"
passages -- sometimes missed the hubs' leaves on small trees.

`scann` is imported lazily; without it every entry point raises ImportError naming
`pip install 'imprag_jax[scann]'`.
"""
from __future__ import annotations

import collections
import json
import math
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np

INSTALL_HINT = "pip install 'imprag_jax[scann]'"
META_FILE = "imprag_scann.json"
BRUTE_FORCE_BELOW = 20_000
# fraction of the leaves searched; the floor keeps recall up on small trees
LEAVES_FRACTION = 0.20
MIN_LEAVES_TO_SEARCH = 8
REORDER_MIN = 200
DEFAULT_K = 10  # the searcher's default neighbour count (every search passes its own k)
SLOT_KEEP = 2   # searchers kept per slot (by index step)


def _pybind():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as e:  # pragma: no cover - exercised only without scann
        raise ImportError(f"the ScaNN backend needs the `scann` package: {INSTALL_HINT}") from e
    return scann_ops_pybind


def scann_available() -> bool:
    try:
        _pybind()
        return True
    except ImportError:
        return False


def default_params(n: int, d: int, k: int = 10, tree: Optional[bool] = None) -> dict:
    """Build/search parameters scaled by the corpus size n (tree=None: a tree from BRUTE_FORCE_BELOW rows on)."""
    if tree is None:
        tree = n >= BRUTE_FORCE_BELOW
    if not tree:
        return {"brute_force": True, "k": k}
    num_leaves = int(max(2, min(round(math.sqrt(n)), n // 20)))
    leaves = int(min(num_leaves, max(MIN_LEAVES_TO_SEARCH, math.ceil(LEAVES_FRACTION * num_leaves))))
    return {
        "brute_force": False,
        "k": k,
        "num_leaves": num_leaves,
        "num_leaves_to_search": leaves,
        "training_sample_size": int(min(n, 250_000)),
        "dims_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": int(max(REORDER_MIN, 20 * k)),
    }


class ScannIndex:
    """A ScaNN searcher over `[N, D]` embeddings (dot product), with the index metadata of `PassageIndex`."""

    def __init__(self, searcher, n: int, d: int, params: dict, config_hash: str = "", step: int = 0):
        self.searcher = searcher
        self.n, self.d = int(n), int(d)
        self.params = dict(params)
        self.config_hash = config_hash
        self.step = int(step)

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, embeddings, *, k: int = 10, num_leaves: Optional[int] = None,
              num_leaves_to_search: Optional[int] = None, dims_per_block: Optional[int] = None,
              anisotropic_quantization_threshold: Optional[float] = None, reorder: Optional[int] = None,
              training_sample_size: Optional[int] = None, brute_force: Optional[bool] = None,
              num_threads: int = 0, config_hash: str = "", step: int = 0) -> "ScannIndex":
        """Builds the searcher; every parameter left None takes `default_params(N, D, k)`.  `embeddings` may be
        a numpy array, a jax array or a `PassageIndex` (its real rows, its config_hash and step)."""
        from imprag_jax.retrieval.index import PassageIndex

        if isinstance(embeddings, PassageIndex):
            config_hash = config_hash or embeddings.config_hash
            step = step or int(embeddings.step)
            embeddings = embeddings.host_embeddings()
        pb = _pybind()
        db = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        if db.ndim != 2 or db.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got {db.shape}")
        n, d = db.shape
        p = default_params(n, d, k, tree=None if brute_force is None else not brute_force)
        given = dict(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search, dims_per_block=dims_per_block,
                     anisotropic_quantization_threshold=anisotropic_quantization_threshold, reorder=reorder,
                     training_sample_size=training_sample_size)
        if not p["brute_force"]:
            p.update({key: v for key, v in given.items() if v is not None})
        builder = pb.builder(db, k, "dot_product")
        if p["brute_force"]:
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                                   training_sample_size=p["training_sample_size"])
            builder = builder.score_ah(p["dims_per_block"],
                                       anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"])
            builder = builder.reorder(p["reorder"])
        if num_threads:
            builder = builder.set_n_training_threads(num_threads)
        return cls(builder.build(), n, d, p, config_hash=config_hash, step=step)

    # ----------------------------------------------------------------------------------------------- search
    def search(self, E_q, k: Optional[int] = None, *, leaves_to_search: Optional[int] = None,
               reorder: Optional[int] = None, parallel: Optional[bool] = None,
               query_fingerprint: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, ids [Q, k] int32), best first; -inf / -1 past the end of a small index."""
        if query_fingerprint is not None and query_fingerprint != self.config_hash:
            raise ValueError(f"query embedding fingerprint {query_fingerprint!r} does not match the ScaNN index's "
                             f"config_hash {self.config_hash!r}")
        q = np.ascontiguousarray(np.asarray(E_q, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"E_q must be [Q, {self.d}], got {q.shape}")
        k = int(k or self.params.get("k", 10))
        kw = {"final_num_neighbors": min(k, self.n)}
        if not self.params.get("brute_force"):
            kw["leaves_to_search"] = leaves_to_search or self.params["num_leaves_to_search"]
            kw["pre_reorder_num_neighbors"] = max(k, reorder or self.params["reorder"])
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        if parallel is None:
            parallel = q.shape[0] >= 64
        fn = self.searcher.search_batched_parallel if parallel else self.searcher.search_batched
        ids, scores = fn(q, **kw)
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        ids, scores = ids[:, : min(k, self.n)], scores[:, : min(k, self.n)]
        if ids.shape[1] < k:  # fewer rows than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores, ids.astype(np.int32)

    def search_in_graph(self, E_q, k: int):
        """`search` as a `jax.pure_callback`: usable inside `jax.jit` (and `vmap`), same outputs as the device
        `search()`: (scores [..., k] float32, ids [..., k] int32).  The search runs on the host.  This searcher
        is baked into the traced program; a program that must follow refreshed searchers uses
        `slot_search_in_graph`."""
        return _in_graph(lambda step: self, self.d, E_q, k)

    # ------------------------------------------------------------------------------------------- save / load
    def serialize(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.searcher.serialize(os.path.abspath(directory), relative_path=True)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({"n": self.n, "d": self.d, "params": self.params, "config_hash": self.config_hash,
                       "step": self.step}, f, indent=1)

    @classmethod
    def load(cls, directory: str) -> "ScannIndex":
        pb = _pybind()
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{directory} is not a serialized ScannIndex (no {META_FILE})")
        with open(meta_path) as f:
            meta = json.load(f)
        searcher = pb.load_searcher(os.path.abspath(directory))
        return cls(searcher, meta["n"], meta["d"], meta["params"], meta["config_hash"], meta["step"])

    def __repr__(self):
        return f"ScannIndex(n={self.n}, d={self.d}, params={self.params}, step={self.step})"


# --------------------------------------------------------------------------------- the project's one builder
def build_searcher(index, k: int = DEFAULT_K, **params) -> ScannIndex:
    """The ScaNN searcher over a model's passage index (a `PassageIndex`: its real rows as fp32, its
    config_hash and step), with `default_params` for its size; `params` override them (`ScannIndex.build`).

    Evaluation and generation (`infer.imprag.Retriever` with backend "scann") and training
    (`retrieval.refresh.IndexRefresher(scann_slot=...)`, train.index_backend = "scann") both build their searcher
    here, so a trained model is searched the same way during training and at evaluation."""
    return ScannIndex.build(index, k=max(int(k), DEFAULT_K), **params)


# ------------------------------------------------------------------------------- named slots for jit programs
_SLOTS: Dict[str, "collections.OrderedDict[int, ScannIndex]"] = {}
_LOCK = threading.Lock()


def publish(slot: str, searcher: ScannIndex) -> None:
    """Makes `searcher` the newest of `slot`, under its index step (the last SLOT_KEEP stay available)."""
    with _LOCK:
        d = _SLOTS.setdefault(slot, collections.OrderedDict())
        d.pop(int(searcher.step), None)
        d[int(searcher.step)] = searcher
        while len(d) > SLOT_KEEP:
            d.popitem(last=False)


def published(slot: str, step: Optional[int] = None) -> ScannIndex:
    """The searcher of `slot` built from the index of parameter step `step` (None or < 0: the newest)."""
    with _LOCK:
        d = _SLOTS.get(slot)
        if not d:
            raise LookupError(f"no ScaNN searcher published in slot {slot!r}")
        if step is None or int(step) < 0:
            return next(reversed(d.values()))
        if int(step) not in d:
            raise LookupError(f"slot {slot!r} has no ScaNN searcher for the index of step {int(step)} "
                              f"(it holds steps {list(d)}): the host searcher and the device index are out of step")
        return d[int(step)]


def unpublish(slot: str) -> None:
    with _LOCK:
        _SLOTS.pop(slot, None)


def slot_search_in_graph(slot: str, E_q, k: int, *, d: Optional[int] = None, step=None, mesh=None):
    """Top-k ScaNN search of `E_q` [Q, D] from inside `jax.jit`: a `jax.pure_callback` that looks up the
    searcher of `slot` when the program runs (so a compiled step follows index refreshes without recompiling).

    step: the parameter step of the device index the program was handed (a traced int scalar), checked against
      the searcher's: the callback searches the searcher built from that same index; None = the newest.
    mesh: under a multi-device mesh the queries are first constrained to be replicated (an all-gather of the
      [Q, D] queries: tiny), so the callback runs once, on the host of the first device, over every data shard's
      queries, and its [Q, k] results are broadcast back to all devices.
    Returns (scores [Q, k] float32, ids [Q, k] int32), best first; -inf / -1 past the end of a small index."""
    if d is None:
        d = published(slot).d
    return _in_graph(lambda step_: published(slot, step_), d, E_q, k, step=step, mesh=mesh)


def _in_graph(lookup, d: int, E_q, k: int, step=None, mesh=None):
    import jax
    import jax.numpy as jnp

    if E_q.shape[-1] != d:
        raise ValueError(f"query embedding dimension {E_q.shape[-1]} does not match the ScaNN index "
                         f"dimension {d}")
    lead = E_q.shape[:-1]
    out = (jax.ShapeDtypeStruct(lead + (k,), jnp.float32), jax.ShapeDtypeStruct(lead + (k,), jnp.int32))
    q = E_q.astype(jnp.float32)
    if mesh is not None and mesh.size > 1:
        from jax.sharding import NamedSharding, PartitionSpec as P

        q = jax.lax.with_sharding_constraint(q, NamedSharding(mesh, P()))
    st = jnp.asarray(-1 if step is None else step, jnp.int32)

    def host(q, st):
        q = np.asarray(q, np.float32)
        idx = lookup(int(np.asarray(st).reshape(-1)[0]))
        s, i = idx.search(q.reshape(-1, d), k)
        return s.reshape(q.shape[:-1] + (k,)), i.reshape(q.shape[:-1] + (k,))

    return jax.pure_callback(host, out, q, st, vmap_method="expand_dims")
