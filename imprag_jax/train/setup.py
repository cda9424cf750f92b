"""One setup for a config: what the trainer and `compile_check` both build before compiling the step (model
config, step config, optimizer and schedule, mesh, sharding rules, global batch shapes)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..model import ConfigError, ModelConfig
from ..model.sharding import make_mesh
from ..run.config import model_config
from .config_lib import step_config
from .step import StepConfig, make_optimizer, step_keys


@dataclasses.dataclass
class Setup:
    cfg: ModelConfig
    sc: StepConfig
    tx: Any  # optax.GradientTransformation
    sched: Callable[[int], Any]  # learning rate at a step
    mesh: Any  # jax.sharding.Mesh
    rules: Tuple
    shapes: Dict[str, tuple]  # global batch: key -> (shape, dtype)
    k_read: int  # passages read per retrieval row (0 for a closed-book run)


def rules_of(c) -> tuple:
    return tuple((r[0], tuple(r[1]) if isinstance(r[1], (list, tuple)) else r[1]) for r in c.rules)


def mesh_of(c, process_count: int = 1):
    """The config's mesh; a device count that does not fit, or (several processes) batch rows that do not split
    evenly over the batch shards, is a ConfigError."""
    try:
        mesh = make_mesh(**dict(c.mesh))
    except ValueError as e:  # "... needs 16 devices but 8 are visible ...; did you start every host?"
        raise ConfigError(str(e)) from None
    if process_count > 1:  # each host feeds its own rows: every kind of row must split evenly over the shards
        shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        for name, n in (("data.batch_size", c.data.batch_size), ("data.free_batch_size", c.data.free_batch_size)):
            if n % shards:
                raise ConfigError(f"{name}={n} must be divisible by the batch shards (mesh data x fsdp = "
                                  f"{shards}) in a multi-process run")
    return mesh


def config_batch_shapes(c, k_read: Optional[int] = None) -> Dict[str, tuple]:
    """The global batch the trainer feeds the step, from the config alone (every array int32)."""
    B, Bf = c.data.batch_size, c.data.free_batch_size
    L = c.data.L_q + c.data.L_r
    Lf = c.data.L_free or L
    k = c.data.k if k_read is None else k_read
    i32 = np.dtype(np.int32)
    out = {"tokens": ((B, L), i32), "mask": ((B, L), i32), "prompt_mask": ((B, L), i32),
           "loss_mask": ((B, L), i32), "passages": ((B, k, c.data.l_max), i32),
           "passage_mask": ((B, k, c.data.l_max), i32), "passage_ids": ((B, k), i32), "positives": ((B, k), i32)}
    if Bf:
        out.update({"free_tokens": ((Bf, Lf), i32), "free_mask": ((Bf, Lf), i32), "free_loss_mask": ((Bf, Lf), i32)})
    if B and c.data.get("query_filler_split", False):  # E_q's own prompt (data.query_filler_split)
        Lq = c.data.get("L_query", 0) or c.data.L_q
        out.update({"query_tokens": ((B, Lq), i32), "query_mask": ((B, Lq), i32)})
    return out


def probe_batch_shapes(probe: Mapping[str, np.ndarray], k_read: int, process_count: int = 1) -> Dict[str, tuple]:
    """The global batch shapes from one host batch of the data pipeline, with `k_read` passage slots."""
    shapes = {k: ((probe[k].shape[0] * process_count,) + probe[k].shape[1:], probe[k].dtype)
              for k in step_keys(probe)}
    for key in ("passages", "passage_mask"):
        shapes[key] = ((shapes[key][0][0], k_read) + shapes[key][0][2:], shapes[key][1])
    for key in ("passage_ids", "positives"):
        shapes[key] = ((shapes[key][0][0], k_read), shapes[key][1])
    return shapes


def build(c, cfg: Optional[ModelConfig] = None, probe: Optional[Mapping[str, np.ndarray]] = None,
          process_count: int = 1) -> Setup:
    """Everything the step needs from config `c`. `cfg`: the model config when the caller has it (a pretrained
    model's, a tokenizer's vocabulary), else built from the config; `probe`: a host batch of the data pipeline
    to take the batch shapes from (else they are computed from the config)."""
    cfg = cfg if cfg is not None else model_config(c, c.model.vocab_size or None)
    sc = step_config(c)
    mesh = mesh_of(c, process_count)
    T = c.train
    tx, sched = make_optimizer(T.lr, T.steps, T.warmup_steps, end_lr_ratio=T.end_lr_ratio,
                               weight_decay=T.weight_decay, b1=T.b1, b2=T.b2, clip=T.clip)
    k_read = 0 if T.closed_book else c.data.k
    shapes = (probe_batch_shapes(probe, k_read, process_count) if probe is not None
              else config_batch_shapes(c, k_read))
    return Setup(cfg=cfg, sc=sc, tx=tx, sched=sched, mesh=mesh, rules=rules_of(c), shapes=shapes, k_read=k_read)
