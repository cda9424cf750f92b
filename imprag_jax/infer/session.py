"""A trained ImpRAG run, loaded for inference: its config, parameters (latest or a given checkpoint), tokenizer,
knowledge source and index. Used by `python -m imprag_jax.generate --workdir` and `python -m imprag_jax.evaluate`.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import List, Optional

import jax
import ml_collections as mlc
import numpy as np

from ..model import ModelConfig


class RunError(Exception):
    """A run directory, checkpoint, data folder or task that cannot be used; the message says which and why."""


def load_run_config(workdir: str) -> mlc.ConfigDict:
    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise RunError(f"{workdir!r} is not a training run directory (no config.json); pass --config")
    with open(path) as f:
        return mlc.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> List[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def restore_params(workdir: str, step: Optional[int] = None, step_flag: str = "--checkpoint"):
    """(params, step, ModelConfig) from <workdir>/checkpoints (host arrays, single device). Only the parameters
    are read (not the optimizer state: damage there does not matter for inference). A checkpoint that cannot be
    read is a RunError that names it and the other steps (`step_flag` is the flag that picks one)."""
    import orbax.checkpoint as ocp
    from etils import epath

    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    d = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunError(f"no checkpoints in {d}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise RunError(f"checkpoint step {step} not found in {d} (have {steps})")
    try:
        with quiet_failed_restore():
            mngr = ocp.CheckpointManager(d, item_names=("state", "data", "meta"))
            try:
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                cfg = ModelConfig.from_dict(meta["model"])
                # the params subtree of the saved state's own tree metadata (shapes/dtypes as written), read as
                # host numpy arrays: no sharding, no optimizer moments
                tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(d) / str(step) / "state")
                tree = getattr(tree, "tree", tree)
                if "params" not in tree:
                    raise ValueError("the saved state has no 'params'")
                item = {"params": tree["params"]}
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Sharding info not provided")
                    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True)))["state"]
            finally:
                mngr.close()
    except RunError:
        raise
    except Exception as e:  # orbax / TensorStore: a truncated or overwritten file, a missing array, bad JSON
        raise damaged_checkpoint(d, step, steps, e, step_flag) from None
    params = jax.tree.map(np.asarray, restored["params"])
    return params, step, cfg


@contextlib.contextmanager
def quiet_failed_restore():
    """Around an orbax restore: when it fails, its sibling reads still finish in TensorStore's threads and report
    into orbax's closed event loop ("RuntimeError: Event loop is closed" as unraisable exceptions, asyncio's "Task
    exception was never retrieved", coroutines closed at interpreter exit): dozens of traceback lines around the
    one-line error, some of them before the exception even reaches the caller. Drop exactly those while the
    restore runs, and, when it fails, for the rest of the process (the failure itself is raised, as a RunError
    or ExportError by the callers). A restore that succeeds leaves the hooks as they were."""
    import gc
    import logging
    import sys

    prev = sys.unraisablehook

    def hook(u):
        text = str(u.exc_value)
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in text:
            return
        if "sys.meta_path is None" in text:  # a read's coroutine closed at interpreter exit
            return
        prev(u)

    class _NeverRetrieved(logging.Filter):
        def filter(self, record):
            return "exception was never retrieved" not in str(record.msg)

    flt = _NeverRetrieved()
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(flt)
    try:
        yield
    except BaseException:
        gc.collect()  # the failed restore's dead tasks and coroutines: now, while the filters are in place
        raise
    else:
        if sys.unraisablehook is hook:
            sys.unraisablehook = prev
        logging.getLogger("asyncio").removeFilter(flt)


def damaged_checkpoint(d: str, step: int, steps: List[int], cause: BaseException,
                       step_flag: str = "--checkpoint") -> "RunError":
    """RunError: checkpoint N in D is damaged (<first line of the cause>); pick another (have [...])."""
    msg = " ".join(str(cause).split())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    others = [s for s in steps if s != step]
    hint = (f"use another with {step_flag} N (have {others})" if others
            else "it is the only checkpoint: train again, or delete the folder to start over")
    return RunError(f"checkpoint {step} in {d} is damaged ({type(cause).__name__}: {msg}); {hint}")


def run_data_dir(c, workdir: str) -> str:
    """The run's prepared data folder (never generated here)."""
    d = c.data.dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(d, "passages.jsonl")):
        raise RunError(f"the run's data folder {d!r} has no passages.jsonl (set --config.data.dir)")
    return d


def run_tokenizer(c, data_dir: str):
    from ..data.pipeline import load_tokenizer

    if c.model.init != "random":
        from ..convert.fetch import resolve_model

        tok = resolve_model(c.model.init)[2]
        if tok is not None:
            return tok
    return load_tokenizer(data_dir)


class ImpRAGSession:
    def __init__(self, c, params, cfg: ModelConfig, tokenizer, data_dir: str, step: int):
        self.c, self.params, self.cfg, self.tok, self.data_dir, self.step = c, params, cfg, tokenizer, data_dir, step
        self._retriever = None

    @classmethod
    def from_workdir(cls, workdir: str, step: Optional[int] = None, config=None,
                     step_flag: str = "--checkpoint") -> "ImpRAGSession":
        """`step_flag`: the command-line flag that picks a checkpoint (named in a damaged checkpoint's error)."""
        c = config if config is not None else load_run_config(workdir)
        params, step, cfg = restore_params(workdir, step, step_flag=step_flag)
        data_dir = run_data_dir(c, workdir)
        tok = run_tokenizer(c, data_dir)
        return cls(c, jax.tree.map(jax.numpy.asarray, params), cfg, tok, data_dir, step)

    def passage_texts(self) -> List[str]:
        from .imprag import passage_texts

        return passage_texts(self.data_dir)

    def build_retriever(self, backend: Optional[str] = None, progress: bool = False):
        from ..data.pipeline import corpus_tokens
        from .imprag import Retriever

        toks, mask = corpus_tokens(self.data_dir, self.tok, self.c.data.l_max)
        self._retriever = Retriever.build(self.params, self.cfg, toks, mask, self.passage_texts(), step=self.step,
                                          backend=backend or self.c.eval.backend, progress=progress)
        return self._retriever

    @property
    def retriever(self):
        if self._retriever is None:
            self.build_retriever()
        return self._retriever

    def encode_prompts(self, prompts: List[str]):
        """Right-padded [B, L_q] tokens / mask, each prompt cut from the left as in training."""
        from ..data.chunking import encode_prompt

        L = int(self.c.eval.get("L_q", 0) or self.c.data.L_q)  # eval.L_q, else data.L_q (train.config_lib.eval_L_q)
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
        from .imprag import answer

        k = int(str(self.c.eval.k).split(",")[0]) if k is None else k
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
