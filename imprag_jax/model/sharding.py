"""Logical-axis sharding: modules name logical axes, the config maps them onto mesh axes (data, fsdp, tensor).

Parameters carry their logical names through `flax.linen.with_logical_partitioning`; activations are constrained
with `constrain(x, names)`, which is a no-op unless a `use_sharding(mesh, rules)` context is active (so the same
model code runs unsharded in tests and sharded under a mesh). A mesh axis is dropped for a dimension it does not
divide (e.g. SmolLM2's 3 KV heads on a 2-way tensor axis): that dimension is replicated instead of failing.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("index_rows", ("data", "fsdp", "tensor")),
    ("retrieval_dim", None),
)

_CTX: contextvars.ContextVar = contextvars.ContextVar("imprag_sharding", default=None)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one of the sizes may be -1 (whatever is left)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are visible "
            f"({jax.process_count()} process(es)); on a multi-host run, did you start every host?")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def rules_dict(rules) -> dict:
    return {k: v for k, v in rules}


def logical_to_spec(names: Sequence[Optional[str]], rules=DEFAULT_RULES, shape=None, mesh: Optional[Mesh] = None) -> P:
    """Map logical axis names to a PartitionSpec; drop a mesh axis that does not divide its dimension."""
    table = rules_dict(rules)
    used = set()
    out = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
        if mesh is not None and shape is not None:
            # keep the longest prefix of axes whose product divides the dimension
            kept = []
            for a in axes:
                if shape[i] % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
                    kept.append(a)
            axes = tuple(kept)
        axes = tuple(a for a in axes if mesh is None or mesh.shape[a] > 1) if mesh is not None else axes
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


@contextlib.contextmanager
def use_sharding(mesh: Optional[Mesh], rules=DEFAULT_RULES):
    """Activate activation sharding constraints for the model code traced inside this block."""
    tok = _CTX.set((mesh, tuple(rules)) if mesh is not None else None)
    try:
        yield
    finally:
        _CTX.reset(tok)


def current():
    return _CTX.get()


def constrain(x, names: Sequence[Optional[str]]):
    ctx = _CTX.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if x.ndim != len(names):
        raise ValueError(f"constrain: {len(names)} logical names for an array of rank {x.ndim}")
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree given its logical-axis tuples and its shapes (arrays or ShapeDtypeStructs)."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    return jax.tree.map(lambda names, s: NamedSharding(mesh, logical_to_spec(names, rules, s.shape, mesh)),
                        logical_tree, shape_tree, is_leaf=is_names)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, shape, mesh))
