"""The training objects built from a (locked) ml_collections config, with one-line errors for bad values: the
step config. The objects every run needs (model, batch, data folder) are built in `imprag_jax.run`."""
from __future__ import annotations

from ..config_base import check_fields, parse_weights
from ..model import ConfigError
from .step import StepConfig

STAGES = ("both", "warmup", "distill", "none")
CANDIDATES = ("pseudo", "index", "mixed")
INDEX_BACKENDS = ("exact", "binned", "scann")  # train.index_backend: the search that mines index/mixed candidates

__all__ = ["CANDIDATES", "ConfigError", "INDEX_BACKENDS", "STAGES", "step_config"]


def _fail(msg):
    raise ConfigError(msg)


def step_config(c) -> StepConfig:
    check_fields(c, "the config")  # a config built in Python, not through a config file's loader
    t = c.train
    if t.stages not in STAGES:
        _fail(f"train.stages must be one of {STAGES}, got {t.stages!r}")
    if t.candidates not in CANDIDATES:
        _fail(f"train.candidates must be one of {CANDIDATES}, got {t.candidates!r}")
    backend = t.get("index_backend", "exact")
    if backend not in INDEX_BACKENDS:
        _fail(f"train.index_backend must be one of {INDEX_BACKENDS}, got {backend!r}")
    if backend == "scann" and t.candidates != "pseudo":
        import jax

        if jax.process_count() > 1:
            _fail("train.index_backend='scann' searches one host's copy of the index; a multi-process run mines "
                  "with 'exact' or 'binned'")
        from ..retrieval.scann_backend import INSTALL_HINT, scann_available

        if not scann_available():
            _fail(f"train.index_backend='scann' needs the `scann` package: {INSTALL_HINT}")
    if not 0.0 <= t.warmup_share <= 1.0:
        _fail(f"train.warmup_share must be in [0, 1], got {t.warmup_share}")
    if t.tau_t <= 0 or t.tau_r <= 0:
        _fail("train.tau_t and train.tau_r must be positive")
    if t.nce_reduction not in ("sum", "mean"):
        _fail(f"train.nce_reduction must be sum or mean, got {t.nce_reduction!r}")
    if t.steps < 1 or t.lr <= 0:
        _fail("train.steps must be >= 1 and train.lr > 0")
    if t.accum < 1:
        _fail("train.accum must be >= 1")
    if not 0 <= t.retrieval_steps <= t.steps:
        _fail(f"train.retrieval_steps must be in [0, train.steps={t.steps}], got {t.retrieval_steps}")
    if t.retrieval_steps and t.closed_book:
        _fail("train.retrieval_steps trains the retrieval path; a closed-book run has none")
    d = c.data
    if d.batch_size < 1:
        _fail(f"data.batch_size must be >= 1 (retrieval rows per global batch), got {d.batch_size}")
    if d.batch_size % t.accum or d.free_batch_size % t.accum:
        _fail(f"data.batch_size={d.batch_size} and data.free_batch_size={d.free_batch_size} must each be divisible "
              f"by train.accum={t.accum}")
    Lf = d.L_free or d.L_q + d.L_r
    return StepConfig(r_len=d.L_r, r_len_free=Lf if _lm_tasks(c) else (d.L_free_r or d.L_r), lam=t.lam,
                      tau_t=t.tau_t, tau_r=t.tau_r, nce_reduction=t.nce_reduction, score_bias=t.score_bias,
                      score_bias_grad=t.score_bias_grad, accum=t.accum, teacher_chunks=t.teacher_chunks,
                      teacher_len=t.teacher_len, clip=float(t.clip or 0.0))


def _lm_tasks(c) -> bool:
    return "lm" in parse_weights(c.data.free_tasks)
