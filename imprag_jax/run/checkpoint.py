"""A run's checkpoints, <workdir>/checkpoints/<step>/{state,data,meta[,index]}: written and restored here only.

    state  the train state (params, opt_state, step), sharded as in training
    data   the data iterator's state (JSON)
    meta   {"model": ModelConfig.to_dict(), "step": ..., "name": ...[, "index": PassageIndex.metadata()]} (JSON)
    index  runs that mine negatives from their own index (train.candidates index/mixed): the embeddings of the
           index the step mines from ({"emb": [n_pad, D]}, row-sharded), encoded at meta["index"]["step"] with
           the config fingerprint meta["index"]["config_hash"]; a resumed run mines from it until its next refresh

`Checkpoints` saves and restores the full state of a training run (resuming); `restore_params` reads the
parameters alone as host arrays (evaluation, inference, export, another run's initial weights): no optimizer
state, no device placement, so a checkpoint written by many hosts reads on one CPU machine.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import List, Optional

import jax
import numpy as np

from ..model import ModelConfig
from .config import RunError

DIR = "checkpoints"
ITEMS = ("state", "data", "meta", "index")


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, DIR))


def checkpoint_steps(workdir: str) -> List[int]:
    """The saved steps, read from the folder names (no checkpoint manager needed)."""
    d = os.path.join(workdir, DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def latest_step(workdir: str) -> int:
    """The step a run in `workdir` resumes from (0 when it has no checkpoint)."""
    steps = checkpoint_steps(workdir)
    return steps[-1] if steps else 0


class Checkpoints:
    """The orbax CheckpointManager of a training run: full train state + data iterator state + meta."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.dir = checkpoint_dir(workdir)
        self.mngr = ocp.CheckpointManager(self.dir, item_names=ITEMS,
                                          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                               enable_async_checkpointing=True))

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def restore(self, step: int, abstract_state, shardings):
        """(state placed with `shardings`, data iterator state, meta) of checkpoint `step`."""
        ocp = self._ocp
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state,
                                shardings)
        r = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return r["state"], r["data"], r["meta"]

    def restore_index(self, step: int, abstract_emb):
        """(embeddings placed as `abstract_emb` (a ShapeDtypeStruct with a sharding), index metadata) of the index
        saved with checkpoint `step`, or None when it has none (a pseudo-candidate run, an older checkpoint)."""
        ocp = self._ocp
        meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        info = meta.get("index")
        if not info:
            return None
        if (info["num_padded"], info["d"]) != tuple(abstract_emb.shape):
            return None  # another corpus or mesh: the caller re-encodes
        abstract = {"emb": jax.ShapeDtypeStruct(abstract_emb.shape, jax.numpy.dtype(info["dtype"]),
                                                sharding=abstract_emb.sharding)}
        r = self.mngr.restore(step, args=ocp.args.Composite(index=ocp.args.StandardRestore(abstract)))
        return r["index"]["emb"], info

    def save(self, step: int, state, data_state: dict, cfg: ModelConfig, name: str, force: bool = False,
             index=None):
        """`index`: the PassageIndex the run mines negatives from (its embeddings and metadata go along)."""
        ocp = self._ocp
        meta = {"model": cfg.to_dict(), "step": step, "name": name}
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        if index is not None:
            meta["index"] = index.metadata()
            items["index"] = ocp.args.StandardSave({"emb": index.embeddings})
        self.mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=force)

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def restore_params(workdir: str, step: Optional[int] = None, step_flag: str = "--checkpoint"):
    """(params, step, ModelConfig) from <workdir>/checkpoints (host numpy arrays as saved, single device). Only the
    parameters are read (not the optimizer state: damage there does not matter for inference). A checkpoint that
    cannot be read is a RunError that names it and the other steps (`step_flag` is the flag that picks one)."""
    import orbax.checkpoint as ocp
    from etils import epath

    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    d = checkpoint_dir(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunError(f"no checkpoints in {d}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise RunError(f"checkpoint step {step} not found in {d} (have {steps})")
    try:
        with quiet_failed_restore():
            mngr = ocp.CheckpointManager(d, item_names=ITEMS)
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
    by `restore_params`). A restore that succeeds leaves the hooks as they were."""
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
                       step_flag: str = "--checkpoint") -> RunError:
    """RunError: checkpoint N in D is damaged (<first line of the cause>); pick another (have [...])."""
    msg = " ".join(str(cause).split())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    others = [s for s in steps if s != step]
    hint = (f"use another with {step_flag} N (have {others})" if others
            else "it is the only checkpoint: train again, or delete the folder to start over")
    return RunError(f"checkpoint {step} in {d} is damaged ({type(cause).__name__}: {msg}); {hint}")
