"""Model configuration: a Llama-3-family decoder split into ImpRAG layer groups.

Layer groups (0-indexed, N layers):
  bottom  0..b      retrieval embeddings come from layer b (its query / key projections)
  middle  b..t      the prompt also attends to the retrieved passages' key/value states
  top     t+1..N-1  prompt only
The parameters do not depend on b and t: every layer lives in one stacked array and the groups are slices of it,
so one checkpoint serves any (b, t).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

ROPE_TYPES = ("default", "llama3")


class ConfigError(ValueError):
    """A model configuration that cannot work; the message says which field and why."""


# attention implementations the layer knows: the built-in two, plus any added by model.layers.register_attention
ATTENTION_IMPLS = {"xla", "cudnn"}


def _llama3_rope(factor: float) -> dict:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


# The architectures the code knows by name: the one place their numbers live (`ModelConfig.preset`,
# configs/llama3.py, configs/smollm2.py, the benchmarks). A pretrained init takes its architecture from the
# checkpoint instead.
PRESETS = {
    # a few-layer random model for tests (GQA: 4 heads over 2 KV heads)
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 rope_theta=10000.0, b=1, t=2, max_position=4096),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True, b=7, t=21,
                         max_position=8192),
    "llama3_2_3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                        rope_scaling=_llama3_rope(32.0), max_position=131072, b=7, t=19,
                        dtype="bfloat16"),
    "llama3_1_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False,
                        rope_scaling=_llama3_rope(8.0), max_position=131072, b=7, t=23,
                        dtype="bfloat16"),
}

# the shape fields have no default: a config, a preset or a checkpoint gives them
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "b", "t")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Field defaults here are the defaults of a run's `model` section too (imprag_jax/config_base.py reads them)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    embed_scale: float = 1.0  # multiply token embeddings (sqrt(d) helps tied from-scratch models; Llama uses 1)
    max_position: int = 131072
    # ImpRAG groups
    b: int
    t: int
    retrieval_rope: str = "pre"  # "pre" | "post": take E_q / E_p before or after RoPE
    passage_attention: str = "joint"  # "joint" | "independent" (middle group)
    prompt_offset: Optional[int] = None  # prompt position shift when reading; None = k * l_max
    # s(q,p) = score_multiplier * <E_q, E_p>: "raw" (1, the paper's Eq. 3 as written), "sqrt_dim" (1/sqrt(head_dim),
    # as attention scales q.k), or a positive number. Applied to E_q, so every user of the scores (NCE, KL,
    # retrieval, score bias, export) sees the same s(q,p); rankings do not depend on it.
    score_scale: str = "raw"
    # which tokens' layer-b states form E_q / E_p: "last" (the paper: the last real token) or "mean" (an option
    # beyond the paper: the mean over the row's real tokens of the projected states)
    retrieval_pool: str = "last"
    # numerics / memory
    dtype: str = "float32"  # compute dtype: "bfloat16" | "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" (see model/transformer.py)
    attention_impl: str = "xla"  # "xla" (einsum) | "cudnn" (jax.nn.dot_product_attention on GPU) | a registered one
    init_std: float = 0.02

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                  "set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                              "(grouped-query attention)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not (0 <= self.b <= self.t < self.num_layers):
            raise ConfigError(f"ImpRAG layer groups need 0 <= b <= t < num_layers; got b={self.b}, t={self.t}, "
                              f"num_layers={self.num_layers}")
        if self.retrieval_rope not in ("pre", "post"):
            raise ConfigError(f"retrieval_rope must be 'pre' or 'post', got {self.retrieval_rope!r}")
        try:
            self.score_multiplier
        except ValueError:
            raise ConfigError(f"score_scale must be 'raw', 'sqrt_dim' or a positive number, got {self.score_scale!r}")
        if self.retrieval_pool not in ("last", "mean"):
            raise ConfigError(f"retrieval_pool must be 'last' or 'mean', got {self.retrieval_pool!r}")
        if self.passage_attention not in ("joint", "independent"):
            raise ConfigError(f"passage_attention must be 'joint' or 'independent', got {self.passage_attention!r}")
        if self.dtype not in ("float32", "bfloat16", "float16") or self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"unsupported dtype/param_dtype {self.dtype!r}/{self.param_dtype!r}")
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise ConfigError(f"remat must be one of none/full/dots/dots_no_batch, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {', '.join(sorted(ATTENTION_IMPLS))}, got "
                              f"{self.attention_impl!r}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"unknown rope_scaling type {kind!r}; supported: {ROPE_TYPES}")
            if kind == "llama3":
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k not in rs]
                if missing:
                    raise ConfigError(f"llama3 rope_scaling is missing {missing}")

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def score_multiplier(self) -> float:
        """The factor of s(q,p) = factor * <E_q, E_p> (see `score_scale`)."""
        v = str(self.score_scale)
        if v == "raw":
            return 1.0
        if v == "sqrt_dim":
            return 1.0 / float(self.head_dim) ** 0.5
        f = float(v)
        if not f > 0:
            raise ValueError(v)
        return f

    @property
    def retrieval_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def n_bottom(self) -> int:
        """Layers run before layer b (layer b itself only contributes its q/k projections to retrieval)."""
        return self.b

    @property
    def n_middle(self) -> int:
        return self.t - self.b + 1

    @property
    def n_top(self) -> int:
        return self.num_layers - self.t - 1

    def __hash__(self):  # usable as a static jit argument (rope_scaling is a dict)
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * per_layer + emb + d

    def retrieval_fingerprint(self) -> str:
        """Hash of the fields that decide what E_q/E_p mean (not the weights: the index records the step)."""
        keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                "b", "retrieval_rope", "retrieval_pool")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **kw) -> "ModelConfig":
        """A PRESETS architecture, with `kw` replacing any field."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **kw})

    @classmethod
    def tiny(cls, **kw) -> "ModelConfig":
        return cls.preset("tiny", **kw)

    @classmethod
    def smollm2_135m(cls, **kw) -> "ModelConfig":
        return cls.preset("smollm2_135m", **kw)

    @classmethod
    def llama3_2_3b(cls, **kw) -> "ModelConfig":
        return cls.preset("llama3_2_3b", **kw)

    @classmethod
    def llama3_1_8b(cls, **kw) -> "ModelConfig":
        return cls.preset("llama3_1_8b", **kw)
