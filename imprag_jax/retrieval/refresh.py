"""Index refresh: re-encode the corpus with the current parameters on a schedule (Atlas-style).

    refresher = IndexRefresher(every_n_steps=1000, cfg=cfg, tokens=tok, mask=mask, batch_size=64, mesh=mesh)
    for step in ...:
        new = refresher.maybe_refresh(step, params)   # a PassageIndex when it re-encoded, else None
        index = refresher.index                        # the current one (its .step says which parameters)

The first call always encodes (there is no index yet) unless an `index` is handed in.  A refresh happens when
`step - index.step >= every_n_steps` (so a resumed run keeps the schedule of the restored index).  With
`save_dir`, each new index is saved to `save_dir/index_<step>` (the previous `keep` are kept).  With
`scann_slot`, each new index also gets a host ScaNN searcher (`scann_backend.build_searcher`, from the same
embeddings, at the same refresh), published in that slot for a compiled step's `slot_search_in_graph`; the
newest is `refresher.scann`.

Several processes (jax.distributed): `IndexRefresher(..., n=N, tokenize=fn, l_max=l)` instead of tokens/mask:
each process tokenizes (`fn(rows) -> (tokens, mask)`, once) and encodes only the rows its devices hold, the index
assembled on the global mesh (`encode_corpus_sharded`); the same index as a single process's `encode_corpus`.

Exact resume: a checkpoint keeps the current index's embeddings (`run.checkpoint.Checkpoints.save(index=...)`);
`resume(embeddings, step, config_hash)` puts that index back (tokens and mask from the corpus), so the resumed
run mines from the same index as the uninterrupted one until the next scheduled refresh.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from imprag_jax.retrieval.encode import encode_corpus, encode_corpus_sharded, local_index_rows, put_local_rows
from imprag_jax.retrieval.index import PassageIndex

log = logging.getLogger(__name__)


class IndexRefresher:
    def __init__(self, every_n_steps: int, *, cfg, tokens=None, mask=None, batch_size: int = 64, mesh=None,
                 index: Optional[PassageIndex] = None, save_dir: Optional[str] = None, keep: int = 1,
                 scann_slot: Optional[str] = None, n: Optional[int] = None, tokenize: Optional[Callable] = None,
                 l_max: Optional[int] = None, **encode_kwargs: Any):
        """`encode_kwargs` go to `encode_corpus` (dtype, fingerprint, index_mesh, keep_tokens, progress, ...).
        `tokenize` (with `n` passages of `l_max` tokens, on the global `mesh`, every process together): the
        sharded encoding of a multi-process run, each process tokenizing only its own rows."""
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if (tokenize is None) == (tokens is None):
            raise ValueError("give either tokens and mask (the whole corpus) or tokenize (each process's rows)")
        if tokenize is not None and (n is None or l_max is None or mesh is None):
            raise ValueError("the sharded encoding (tokenize) needs n, l_max and the global mesh")
        self.every_n_steps = int(every_n_steps)
        self.cfg = cfg
        self.tokens = None if tokens is None else np.asarray(tokens)
        self.mask = None if mask is None else np.asarray(mask)
        self.n = len(self.tokens) if tokenize is None else int(n)
        self.tokenize, self.l_max = tokenize, l_max
        self._local = None  # (rows, tokens, mask) of this process's share (sharded encoding), tokenized once
        self.batch_size = batch_size
        self.mesh = mesh
        self.index = index
        self.save_dir = save_dir
        self.keep = keep
        self.encode_kwargs = encode_kwargs
        self.history: list = []  # (step, seconds) of each refresh
        self.scann_slot = scann_slot
        self.scann = None  # the newest host ScaNN searcher (scann_slot only)
        self.scann_history: list = []  # (step, seconds) of each ScaNN build
        if index is not None and scann_slot is not None:
            self._build_scann(index)

    @property
    def last_step(self) -> Optional[int]:
        return None if self.index is None else int(jax.device_get(self.index.step))

    def due(self, step: int) -> bool:
        return self.index is None or int(step) - self.last_step >= self.every_n_steps

    def maybe_refresh(self, step: int, params, force: bool = False) -> Optional[PassageIndex]:
        """Re-encodes the corpus with `params` when due (or `force`); returns the new index, else None."""
        if not (force or self.due(step)):
            return None
        t0 = time.perf_counter()
        if self.tokenize is None:
            index = encode_corpus(params, self.cfg, self.tokens, self.mask, batch_size=self.batch_size,
                                  mesh=self.mesh, step=int(step), **self.encode_kwargs)
        else:
            kw = {k: v for k, v in self.encode_kwargs.items() if k in ("fingerprint", "dtype", "keep_tokens",
                                                                       "embed_fn")}
            index = encode_corpus_sharded(params, self.cfg, self.n, self._rows_tokens, mesh=self._index_mesh(),
                                          l_max=self.l_max, batch_size=self.batch_size, step=int(step), **kw)
        secs = time.perf_counter() - t0
        self.index = index
        self.history.append((int(step), secs))
        log.info("index refreshed at step %d: %d passages in %.1fs", step, index.n, secs)
        if self.scann_slot is not None:
            self._build_scann(index)
        if self.save_dir is not None:
            self._save(index, int(step))
        return index

    def _index_mesh(self):
        from imprag_jax.retrieval.index import auto_mesh, default_mesh

        return self.encode_kwargs.get("index_mesh") or (auto_mesh(self.mesh) if self.mesh is not None
                                                        else default_mesh())

    def _rows_tokens(self, rows: np.ndarray):
        """This process's rows (sharded encoding): tokenized on the first call, then kept (the corpus is fixed)."""
        if self._local is None or not np.array_equal(self._local[0], rows):
            self._local = (np.asarray(rows), *(np.asarray(a) for a in self.tokenize(rows)))
        return self._local[1], self._local[2]

    def resume(self, embeddings, step: int, config_hash: str) -> bool:
        """Restores the index of a checkpoint from its (padded, row-sharded) device embeddings, the step that
        encoded them and their config fingerprint; False (nothing restored: the next `maybe_refresh` encodes)
        when the fingerprint is not this model's."""
        from imprag_jax.retrieval.encode import _resolve_fingerprint
        from imprag_jax.retrieval.index import _put_rows, padded_rows

        fp = _resolve_fingerprint(self.cfg, self.encode_kwargs.get("fingerprint"))
        if config_hash != fp:
            log.warning("checkpointed index has config fingerprint %s, the model %s: re-encoding", config_hash, fp)
            return False
        mesh = self._index_mesh()
        n = self.n
        if embeddings.shape[0] != padded_rows(n, mesh):
            log.warning("checkpointed index has %d rows, the corpus pads to another count: re-encoding",
                        embeddings.shape[0])
            return False
        tok = msk = None
        if self.encode_kwargs.get("keep_tokens", True) and self.tokenize is not None:  # this process's rows only
            rows = local_index_rows(n, mesh)
            t, m = self._rows_tokens(rows)
            tok, msk = put_local_rows(n, rows, t.astype(np.int32), mesh), put_local_rows(n, rows, m, mesh)
        elif self.encode_kwargs.get("keep_tokens", True):
            tok = _put_rows(self.tokens.astype(np.int32), mesh, embeddings.shape[0])
            msk = _put_rows(self.mask, mesh, embeddings.shape[0])
        self.index = PassageIndex(embeddings, tok, msk, step=int(step), n=n, config_hash=config_hash, mesh=mesh)
        log.info("index of step %d restored from the checkpoint: %d passages", step, n)
        if self.scann_slot is not None:
            self._build_scann(self.index)
        return True

    def _build_scann(self, index: PassageIndex) -> None:
        from imprag_jax.retrieval.scann_backend import build_searcher, publish

        t0 = time.perf_counter()
        self.scann = build_searcher(index)
        publish(self.scann_slot, self.scann)
        self.scann_history.append((int(self.scann.step), time.perf_counter() - t0))

    def _save(self, index: PassageIndex, step: int) -> None:
        path = os.path.join(self.save_dir, f"index_{step:08d}")
        if os.path.exists(path):
            shutil.rmtree(path)
        index.save(path)
        if jax.process_index() == 0:
            old = sorted(d for d in os.listdir(self.save_dir) if d.startswith("index_"))
            for d in old[: max(0, len(old) - self.keep)]:
                shutil.rmtree(os.path.join(self.save_dir, d), ignore_errors=True)

    @staticmethod
    def latest_saved(save_dir: str, mesh=None) -> Optional[PassageIndex]:
        """The newest index saved under `save_dir` (to resume a run), or None."""
        if not os.path.isdir(save_dir):
            return None
        names = sorted(d for d in os.listdir(save_dir) if d.startswith("index_"))
        return PassageIndex.restore(os.path.join(save_dir, names[-1]), mesh=mesh) if names else None
