"""The device-resident passage index.

`PassageIndex` holds the passage embeddings `[N, D]` (bf16 by default), optionally the passages' token ids
`[N, l_max]` and their mask, with the rows sharded across every device of a mesh
(`NamedSharding(mesh, P(all_axes, None))`).  The rows are padded up to a multiple of the device count; `n` is the
number of real rows and `search` masks the padding.

It is a pytree: `embeddings`, `tokens`, `mask` and `step` are leaves (so a refreshed index with a new step does not
retrace a jitted function that takes it); `n`, `config_hash` and `mesh` are static.

Metadata:
  * `step`        -- the parameter step that produced the embeddings.
  * `config_hash` -- `config_fingerprint(fields)` of the model-config fields that determine the embedding
                     (`embedding_fingerprint(cfg)` picks them from a model config).  `search(...,
                     query_fingerprint=...)` refuses queries embedded under another configuration.

`save(path)` writes the arrays with orbax (`path/arrays`) and the metadata as JSON (`path/index.json`);
`PassageIndex.restore(path, mesh=None)` reads them back onto a mesh of any size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FORMAT_VERSION = 1
META_FILE = "index.json"
ARRAYS_DIR = "arrays"

# Model-config fields that determine E_q / E_p (anything upstream of layer b's q/k projections, plus how the state
# is read out).  Fields a config lacks are skipped.
EMBEDDING_FIELDS = (
    "vocab_size", "hidden_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "ffn_dim", "rope_theta", "rope_scaling", "rms_norm_eps", "norm_eps", "b",
    "retrieval_rope", "pooling", "tie_embeddings", "tie_word_embeddings", "qk_norm",
)


def config_fingerprint(fields: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a dict of config fields (key order does not matter)."""
    blob = json.dumps(_jsonable(dict(fields)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def embedding_fingerprint(cfg: Any, extra: Optional[Mapping[str, Any]] = None) -> str:
    """The fingerprint of the model-config fields that determine the retrieval embeddings: the config's own
    `retrieval_fingerprint()` when it has one (`imprag_jax.model.ModelConfig`), else `config_fingerprint` of its
    `EMBEDDING_FIELDS` (dataclass, dict or object); `extra` fields (e.g. a checkpoint name) are mixed in."""
    if hasattr(cfg, "retrieval_fingerprint") and callable(cfg.retrieval_fingerprint):
        fp = cfg.retrieval_fingerprint()
        return fp if not extra else config_fingerprint({"config": fp, **dict(extra)})
    if isinstance(cfg, Mapping):
        src = dict(cfg)
    elif dataclasses.is_dataclass(cfg):
        src = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    else:
        src = {k: getattr(cfg, k) for k in EMBEDDING_FIELDS if hasattr(cfg, k)}
    fields = {k: src[k] for k in EMBEDDING_FIELDS if k in src}
    if extra:
        fields.update(extra)
    return config_fingerprint(fields)


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


# ----------------------------------------------------------------------------------------------- mesh helpers
def default_mesh() -> Mesh:
    """A 1-D mesh over every device (axis "index", Auto axis type)."""
    return Mesh(np.asarray(jax.devices()), ("index",))


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types (jax.make_mesh makes Explicit ones, under which the
    model code's gathers would need explicit out_shardings)."""
    return Mesh(mesh.devices, mesh.axis_names)


def row_spec(mesh) -> P:
    """Rows over all mesh axes, columns replicated."""
    return P(tuple(mesh.axis_names), None)


def padded_rows(n: int, mesh) -> int:
    s = int(math.prod(mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else mesh.size
    return max(s, -(-n // s) * s)


def _put_rows(x: np.ndarray, mesh: Mesh, n_pad: int, pad_value=0) -> jax.Array:
    """Pad host array rows to n_pad and build a global array row-sharded over `mesh` (works multi-process: every
    process holds the whole host array and contributes its addressable shards)."""
    if x.shape[0] < n_pad:
        pad = np.full((n_pad - x.shape[0],) + x.shape[1:], pad_value, dtype=x.dtype)
        x = np.concatenate([x, pad], axis=0)
    sharding = NamedSharding(mesh, row_spec(mesh))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ------------------------------------------------------------------------------------------------- the index
@dataclasses.dataclass(frozen=True)
class PassageIndex:
    embeddings: jax.Array                  # [n_pad, D], row-sharded
    tokens: Optional[jax.Array] = None     # [n_pad, l_max] int32
    mask: Optional[jax.Array] = None       # [n_pad, l_max] bool/int
    step: Any = 0                          # parameter step that produced the embeddings
    n: int = 0                             # number of real rows (static)
    config_hash: str = ""                  # static
    mesh: Optional[Mesh] = None            # static

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, embeddings, tokens=None, mask=None, *, step: int = 0, config_hash: str = "",
               mesh: Optional[Mesh] = None, dtype=jnp.bfloat16) -> "PassageIndex":
        """Builds an index from host (numpy) or device arrays: casts the embeddings to `dtype`, pads the rows
        to a multiple of the mesh's device count and shards them over every mesh axis."""
        mesh = mesh if mesh is not None else default_mesh()
        emb = np.asarray(jax.device_get(embeddings))
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
        n = emb.shape[0]
        n_pad = padded_rows(n, mesh)
        emb = emb.astype(jnp.dtype(dtype), copy=False)
        tok = msk = None
        if tokens is not None:
            tok = np.asarray(jax.device_get(tokens)).astype(np.int32)
            if tok.shape[0] != n:
                raise ValueError(f"tokens have {tok.shape[0]} rows, embeddings {n}")
            tok = _put_rows(tok, mesh, n_pad)
        if mask is not None:
            msk = np.asarray(jax.device_get(mask))
            if msk.shape[0] != n:
                raise ValueError(f"mask has {msk.shape[0]} rows, embeddings {n}")
            msk = _put_rows(msk, mesh, n_pad)
        return cls(_put_rows(emb, mesh, n_pad), tok, msk, step=int(step), n=n, config_hash=config_hash,
                   mesh=mesh)

    # -------------------------------------------------------------------------------- properties
    @property
    def D(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def N(self) -> int:
        return self.n

    @property
    def dtype(self):
        return self.embeddings.dtype

    @property
    def num_padded(self) -> int:
        return int(self.embeddings.shape[0])

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "n": self.n, "d": self.D, "num_padded": self.num_padded, "dtype": jnp.dtype(self.dtype).name,
            "step": int(jax.device_get(self.step)), "config_hash": self.config_hash,
            "has_tokens": self.tokens is not None, "has_mask": self.mask is not None,
            "l_max": None if self.tokens is None else int(self.tokens.shape[1]),
        }

    def host_embeddings(self, dtype=np.float32) -> np.ndarray:
        """The real rows `[n, D]` as a host numpy array (for ScaNN / FAISS / numpy)."""
        return np.asarray(jax.device_get(self.embeddings))[: self.n].astype(dtype)

    def replace(self, **kw) -> "PassageIndex":
        return dataclasses.replace(self, **kw)

    def search(self, E_q, k: int, backend: str = "exact", **kw):
        from imprag_jax.retrieval.search import search

        return search(self, E_q, k, backend=backend, **kw)

    def __repr__(self):
        return (f"PassageIndex(n={self.n}, D={self.D if hasattr(self.embeddings, 'shape') else '?'}, "
                f"dtype={getattr(self.embeddings, 'dtype', '?')}, step={self.step}, "
                f"config_hash={self.config_hash!r}, tokens={self.tokens is not None})")

    # -------------------------------------------------------------------------------- save / restore
    def save(self, path: str) -> None:
        """Saves the arrays (orbax StandardCheckpointer, `path/arrays`) and the metadata (`path/index.json`).
        `path` must not hold an index already (orbax refuses to overwrite)."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        tree = {"embeddings": self.embeddings, "tokens": self.tokens, "mask": self.mask}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(path, ARRAYS_DIR), tree)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            tmp = os.path.join(path, META_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.metadata(), f, indent=1)
            os.replace(tmp, os.path.join(path, META_FILE))

    @staticmethod
    def load_metadata(path: str) -> dict:
        meta_path = os.path.join(path, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a saved PassageIndex (no {META_FILE})")
        with open(meta_path) as f:
            return json.load(f)

    @classmethod
    def restore(cls, path: str, mesh: Optional[Mesh] = None) -> "PassageIndex":
        """Restores a saved index onto `mesh` (default: a 1-D mesh over all devices).  When the saved padded
        row count divides evenly over the new mesh the arrays are read straight into their shards; otherwise
        they are read to the host and re-padded."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        meta = cls.load_metadata(path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"index format {meta.get('format_version')} != {FORMAT_VERSION}")
        mesh = mesh if mesh is not None else default_mesh()
        n, n_pad_saved, d = meta["n"], meta["num_padded"], meta["d"]
        dtype = jnp.dtype(meta["dtype"])
        l_max = meta["l_max"]
        arrays = os.path.join(path, ARRAYS_DIR)
        with ocp.StandardCheckpointer() as ckptr:
            mask_dtype = None
            if meta["has_mask"]:
                md = ckptr.metadata(arrays).item_metadata.tree["mask"]
                mask_dtype = md.dtype
            if n_pad_saved % padded_rows(1, mesh) == 0:
                sh = NamedSharding(mesh, row_spec(mesh))
                target = {
                    "embeddings": jax.ShapeDtypeStruct((n_pad_saved, d), dtype, sharding=sh),
                    "tokens": jax.ShapeDtypeStruct((n_pad_saved, l_max), jnp.int32, sharding=sh)
                    if meta["has_tokens"] else None,
                    "mask": jax.ShapeDtypeStruct((n_pad_saved, l_max), mask_dtype, sharding=sh)
                    if meta["has_mask"] else None,
                }
                r = ckptr.restore(arrays, target)
                return cls(r["embeddings"], r["tokens"], r["mask"], step=meta["step"], n=n,
                           config_hash=meta["config_hash"], mesh=mesh)
            target = {
                "embeddings": np.zeros((n_pad_saved, d), dtype),
                "tokens": np.zeros((n_pad_saved, l_max), np.int32) if meta["has_tokens"] else None,
                "mask": np.zeros((n_pad_saved, l_max), mask_dtype) if meta["has_mask"] else None,
            }
            r = ckptr.restore(arrays, target)
        cut = lambda x: None if x is None else np.asarray(x)[:n]
        return cls.create(cut(r["embeddings"]), cut(r["tokens"]), cut(r["mask"]), step=meta["step"],
                          config_hash=meta["config_hash"], mesh=mesh, dtype=dtype)


jax.tree_util.register_dataclass(
    PassageIndex,
    data_fields=["embeddings", "tokens", "mask", "step"],
    meta_fields=["n", "config_hash", "mesh"],
)
