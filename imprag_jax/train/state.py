"""Train state, its shardings over the mesh, and ahead-of-time compilation of the step."""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..model import ModelConfig, init_params, param_logical_axes
from ..model.sharding import DEFAULT_RULES, logical_to_spec, tree_shardings, use_sharding
from .step import StepConfig, loss_grad_norms, step_keys, train_step


def _path_key(path):
    return tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path)


def state_shardings(cfg: ModelConfig, tx, mesh, rules=DEFAULT_RULES):
    """Shardings of {"params", "opt_state", "step"}: optimizer moments follow their parameter's sharding."""
    pshapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    pshard = tree_shardings(param_logical_axes(cfg), pshapes, mesh, rules)
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(pshard)[0]:
        by_path[_path_key(path)] = sh
    shapes_by_path = {_path_key(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(pshapes)[0]}
    oshapes = jax.eval_shape(tx.init, pshapes)
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            suf = key[i:]
            if suf in by_path and shapes_by_path[suf] == leaf.shape:
                return by_path[suf]
        return rep

    oshard = jax.tree_util.tree_map_with_path(pick, oshapes)
    return {"params": pshard, "opt_state": oshard, "step": rep}, {"params": pshapes, "opt_state": oshapes,
                                                                  "step": jax.ShapeDtypeStruct((), jnp.int32)}


def create_state(cfg: ModelConfig, tx, mesh, rng=None, params=None, rules=DEFAULT_RULES):
    """Initialise (or adopt `params`) directly into their shardings."""
    shard, _ = state_shardings(cfg, tx, mesh, rules)

    def init(key):
        p = init_params(cfg, key) if params is None else params
        return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}

    if params is None:
        return jax.jit(init, out_shardings=shard)(rng if rng is not None else jax.random.key(0))
    params = jax.device_put(params, shard["params"])
    return {"params": params, "opt_state": jax.jit(tx.init, out_shardings=shard["opt_state"])(params),
            "step": jax.device_put(jnp.zeros((), jnp.int32), shard["step"])}


def batch_specs(batch_shapes: Dict[str, tuple], mesh, rules=DEFAULT_RULES):
    """Abstract batch arrays and their shardings (rows over the batch mesh axes)."""
    abstract, shard = {}, {}
    for k in step_keys(batch_shapes):
        shape, dtype = batch_shapes[k]
        abstract[k] = jax.ShapeDtypeStruct(shape, dtype)
        shard[k] = NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, shape, mesh))
    return abstract, shard


def index_specs(n_pad: int, D: int, l_max: int, mesh, dtype=jnp.bfloat16):
    """Abstract device-index arrays (rows sharded over every mesh axis), for steps that mine candidates."""
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names), None))
    return {"emb": jax.ShapeDtypeStruct((n_pad, D), dtype, sharding=rows),
            "tokens": jax.ShapeDtypeStruct((n_pad, l_max), jnp.int32, sharding=rows),
            "mask": jax.ShapeDtypeStruct((n_pad, l_max), jnp.int32, sharding=rows),
            # the parameter step that encoded the index (the ScaNN backend checks its host searcher against it)
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


def compile_step(cfg: ModelConfig, sc: StepConfig, stage: str, tx, mesh, batch_shapes, rules=DEFAULT_RULES,
                 state_abstract=None, index_abstract=None, kind: str = "step"):
    """Lower and compile the step for one stage ahead of the loop. Returns (compiled, shardings).

    index_abstract: `index_specs(...)` when the step mines candidates from the device index (then the compiled
    step takes the index arrays as a fourth argument).
    kind: "step" (state, batch, bias_scale[, index]) -> (new state, metrics), the state donated; or "grad_norms"
    (same arguments) -> {"grad_norm_gen", "grad_norm_ret"} (`step.loss_grad_norms`), nothing donated."""
    s_shard, s_abs = state_shardings(cfg, tx, mesh, rules)
    if state_abstract is not None:
        s_abs = state_abstract
    b_abs, b_shard = batch_specs(batch_shapes, mesh, rules)
    rep = NamedSharding(mesh, P())

    def fn(state, batch, bias_scale, index=None):
        with use_sharding(mesh, rules):
            if kind == "grad_norms":
                return loss_grad_norms(state, batch, bias_scale, index, cfg=cfg, sc=sc, stage=stage)
            return train_step(state, batch, bias_scale, index, cfg=cfg, sc=sc, stage=stage, tx=tx)

    in_sh = (s_shard, b_shard, rep)
    args_extra = ()
    if index_abstract is not None:
        in_sh = in_sh + ({k: v.sharding for k, v in index_abstract.items()},)
        args_extra = (index_abstract,)
    if kind == "grad_norms":
        jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=rep)
    elif kind == "step":
        jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(s_shard, rep), donate_argnums=(0,))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    s_abs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s_abs, s_shard)
    b_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard[k]) for k, v in b_abs.items()}
    lowered = jitted.lower(s_abs, b_abs, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep), *args_extra)
    compiled = lowered.compile()
    return CompiledStep(compiled, index_abstract is not None), {"state": s_shard, "batch": b_shard}


class CompiledStep:
    """The AOT-compiled step; accepts a pipeline batch with extra keys (they are dropped). It cannot recompile."""

    def __init__(self, compiled, takes_index: bool = False):
        self.compiled = compiled
        self.takes_index = takes_index

    def __call__(self, state, batch, bias_scale, index=None):
        b = {k: batch[k] for k in step_keys(batch)}
        if self.takes_index:
            if index is None:
                raise ValueError("this step was compiled to mine candidates: pass the index arrays")
            return self.compiled(state, b, bias_scale, index)
        return self.compiled(state, b, bias_scale)

    def memory_analysis(self):
        return self.compiled.memory_analysis()

    def cost_analysis(self):
        return self.compiled.cost_analysis()


def memory_report(compiled) -> Dict[str, float]:
    """Per-device bytes from XLA's memory analysis (arguments, outputs, temporaries, generated code)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", ""): float(getattr(m, k, 0)) for k in keys}
