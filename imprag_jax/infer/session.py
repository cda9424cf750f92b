"""A trained ImpRAG run, loaded for inference: its config, parameters (latest or a given checkpoint), tokenizer,
knowledge source and index. Used by `python -m imprag_jax.generate --workdir` and `python -m imprag_jax.evaluate`.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import jax
import ml_collections as mlc
import numpy as np

from ..model import ModelConfig


def load_run_config(workdir: str) -> mlc.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a training run directory (no config.json)")
    with open(path) as f:
        return mlc.ConfigDict(json.load(f))


def restore_params(workdir: str, step: Optional[int] = None):
    """(params, step) from <workdir>/checkpoints (host arrays, single device)."""
    import orbax.checkpoint as ocp

    d = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    mngr = ocp.CheckpointManager(d, item_names=("state", "data", "meta"))
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"checkpoint step {step} not found in {d} (have {mngr.all_steps()})")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    mngr.close()
    params = jax.tree.map(np.asarray, restored["params"])
    return params, step, ModelConfig.from_dict(meta["model"])


class ImpRAGSession:
    def __init__(self, c, params, cfg: ModelConfig, tokenizer, data_dir: str, step: int):
        self.c, self.params, self.cfg, self.tok, self.data_dir, self.step = c, params, cfg, tokenizer, data_dir, step
        self._retriever = None

    @classmethod
    def from_workdir(cls, workdir: str, step: Optional[int] = None) -> "ImpRAGSession":
        from ..data.pipeline import load_tokenizer

        c = load_run_config(workdir)
        params, step, cfg = restore_params(workdir, step)
        data_dir = c.data.dir or os.path.join(workdir, "data")
        tok = None
        if c.model.init != "random":
            from ..convert.fetch import resolve_model

            tok = resolve_model(c.model.init)[2]
        tok = tok or load_tokenizer(data_dir)
        return cls(c, jax.tree.map(jax.numpy.asarray, params), cfg, tok, data_dir, step)

    @property
    def retriever(self):
        if self._retriever is None:
            from ..data.pipeline import corpus_tokens
            from ..train.trainer import _passage_texts
            from .imprag import Retriever

            toks, mask = corpus_tokens(self.data_dir, self.tok, self.c.data.l_max)
            self._retriever = Retriever.build(self.params, self.cfg, toks, mask, _passage_texts(self.data_dir),
                                              step=self.step, backend=self.c.eval.backend)
        return self._retriever

    def ask(self, prompts: List[str], k: Optional[int] = None, max_new_tokens: int = 8, show: int = 5):
        from ..data.chunking import encode_prompt
        from .imprag import answer

        k = int(str(self.c.eval.k).split(",")[0]) if k is None else k
        L = self.c.data.L_q
        toks = np.full((len(prompts), L), self.tok.pad_id, np.int32)
        mask = np.zeros((len(prompts), L), np.int32)
        for i, p in enumerate(prompts):
            ids = encode_prompt(self.tok, p, L, bos_id=self.tok.bos_id if self.c.data.add_bos else None)
            toks[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        outs, ids, scores = answer(self.params, self.cfg, self.retriever, toks, mask, k=k,
                                   max_new_tokens=max_new_tokens, stop_ids=self.tok.stop_ids, pad_id=self.tok.pad_id,
                                   search_k=max(show, k), use_score_bias=self.c.eval.score_bias)
        texts = self.retriever.texts
        res = []
        for i in range(len(prompts)):
            ps = []
            for j, s in zip(ids[i][:show], scores[i][:show]):
                title, _, body = texts[int(j)].partition(": ")
                ps.append((title, float(s), body))
            res.append({"answer": self.tok.decode(outs[i]).strip(), "passages": ps, "ids": [int(x) for x in ids[i]]})
        return res
