"""A trained ImpRAG run, loaded for inference: its config, parameters (latest or a given checkpoint), tokenizer,
knowledge source and index, and optionally a precomputed passage K/V store (`infer/kv_store.py`) that the index's
E_p and the read passages' middle-group K/V then come from. Used by `python -m imprag_jax.generate --workdir`.
"""
from __future__ import annotations

from typing import List, Optional

import jax
import numpy as np

from ..model import ModelConfig
from .checkpoint import restore_params
from .config import eval_ks, eval_L_q, load_run_config
from .data import existing_data_dir
from .model import tokenizer as run_tokenizer


def open_kv_store(path: Optional[str], params, cfg: ModelConfig):
    """The passage K/V store at `path` (None when not given), checked against these weights; RunError (one line)
    when it cannot serve them (other weights or config, a joint-attention model, no store there)."""
    if not path:
        return None
    from ..infer.kv_store import KVStoreError, open_store
    from .config import RunError

    try:
        return open_store(path, params, cfg)
    except KVStoreError as e:
        raise RunError(str(e)) from None


class ImpRAGSession:
    def __init__(self, c, params, cfg: ModelConfig, tokenizer, data_dir: str, step: int, kv_store=None):
        """kv_store: an opened `infer.kv_store.KVStore` of this run's knowledge source, checked against `params`
        (`from_workdir` opens and checks it)."""
        self.c, self.params, self.cfg, self.tok, self.data_dir, self.step = c, params, cfg, tokenizer, data_dir, step
        self.kv_store = kv_store
        self._retriever = None

    @classmethod
    def from_workdir(cls, workdir: str, step: Optional[int] = None, config=None,
                     step_flag: str = "--checkpoint", kv_store: Optional[str] = None) -> "ImpRAGSession":
        """`step_flag`: the command-line flag that picks a checkpoint (named in a damaged checkpoint's error).
        kv_store: a store folder (`python -m imprag_jax.kv_store build`); RunError (one line) when it cannot
        serve these weights (other weights or config, a joint-attention model, no store there)."""
        c = config if config is not None else load_run_config(workdir)
        params, step, cfg = restore_params(workdir, step, step_flag=step_flag)
        data_dir = existing_data_dir(c, workdir)
        tok = run_tokenizer(c, data_dir)
        params = jax.tree.map(jax.numpy.asarray, params)
        return cls(c, params, cfg, tok, data_dir, step, kv_store=open_kv_store(kv_store, params, cfg))

    def passage_texts(self) -> List[str]:
        from ..infer.imprag import passage_texts

        return passage_texts(self.data_dir)

    def build_retriever(self, backend: Optional[str] = None, progress: bool = True):  # a bar on a terminal only
        from ..data.pipeline import corpus_tokens
        from ..infer.imprag import Retriever

        toks, mask = corpus_tokens(self.data_dir, self.tok, self.c.data.l_max)
        if self.kv_store is not None:  # the index from the stored E_p; K/V loaded after each search
            from ..infer.kv_store import KVStoreError
            from .config import RunError

            try:
                self._retriever = Retriever.from_kv_store(self.kv_store, toks, mask, self.passage_texts(),
                                                          step=self.step, backend=backend or self.c.eval.backend)
            except KVStoreError as e:  # a store of another corpus (passage count, l_max)
                raise RunError(str(e)) from None
        else:
            self._retriever = Retriever.build(self.params, self.cfg, toks, mask, self.passage_texts(),
                                              step=self.step, backend=backend or self.c.eval.backend,
                                              progress=progress)
        return self._retriever

    @property
    def retriever(self):
        if self._retriever is None:
            self.build_retriever()
        return self._retriever

    def encode_prompts(self, prompts: List[str]):
        """Right-padded [B, L_q] tokens / mask, each prompt cut from the left as in training."""
        from ..data.chunking import encode_prompt

        L = eval_L_q(self.c)
        toks = np.full((len(prompts), L), self.tok.pad_id, np.int32)
        mask = np.zeros((len(prompts), L), np.int32)
        bos = self.tok.bos_id if self.c.data.add_bos else None
        for i, p in enumerate(prompts):
            ids = encode_prompt(self.tok, p, L, bos_id=bos)
            toks[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        return toks, mask

    def ask(self, prompts: List[str], k: Optional[int] = None, max_new_tokens: Optional[int] = None, show: int = 5):
        """Retrieve with the model's own E_q, read the top k, answer. One dict per prompt: answer, passages
        [(title, score, text)] (the top `show`), ids."""
        from ..infer.imprag import answer

        k = eval_ks(self.c)[0] if k is None else k
        max_new_tokens = max_new_tokens or int(self.c.eval.max_new_tokens)
        toks, mask = self.encode_prompts(prompts)
        outs, ids, scores = answer(self.params, self.cfg, self.retriever, toks, mask, k=k,
                                   max_new_tokens=max_new_tokens, stop_ids=self.tok.stop_ids, pad_id=self.tok.pad_id,
                                   search_k=max(show, k), use_score_bias=self.c.eval.score_bias)
        texts = self.retriever.texts
        res = []
        for i in range(len(prompts)):
            ps = []
            for j, s in zip(ids[i][:show], scores[i][:show]):
                if int(j) < 0:
                    continue
                title, _, body = texts[int(j)].partition(": ")
                ps.append((title, float(s), body))
            res.append({"answer": self.tok.decode(outs[i]).strip(), "passages": ps,
                        "ids": [int(x) for x in ids[i]], "k": k})
        return res
