"""A run's config: the run directory's config.json, and the typed objects the code builds from a (locked)
ml_collections config, with one-line errors for bad values. Training-only objects (the step config) are built in
`train.config_lib`."""
from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections as mlc

from ..config_base import base_config, conform, parse_list, parse_weights
from ..model import ConfigError, ModelConfig
from ..model.config import ARCHITECTURE

# the model fields a pretrained init takes from the config (the ImpRAG split and the numerics); every other field
# is the checkpoint's
KEEP = ("b", "t", "retrieval_rope", "score_scale", "retrieval_pool", "passage_attention", "prompt_offset", "dtype",
        "param_dtype", "remat", "attention_impl")

CONFIG_FILE = "config.json"


class RunError(Exception):
    """A run directory, checkpoint, data folder or task that cannot be used; the message says which and why."""


def _fail(msg):
    raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------------- the file


def load_run_config(workdir: str) -> mlc.ConfigDict:
    """<workdir>/config.json, written by the trainer when the run started, as a locked config: fields added since
    at their defaults, list and weight fields parsed (older runs wrote comma strings); see `config_base.conform`."""
    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{workdir!r} is not a training run directory (no config.json); pass --config")
    with open(path) as f:
        d = json.load(f)
    try:
        return conform(d, path)
    except ConfigError as e:
        raise RunError(str(e)) from None


def write_run_config(c, workdir: str) -> None:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(c.to_json_best_effort(indent=2))


# ---------------------------------------------------------------------------------------------------- values


def eval_ks(c):
    """The passages read at evaluation (eval.k), as ints; the first is the inference default."""
    return parse_list(c.eval.k, int)


def eval_L_q(c) -> int:
    """Prompt length at evaluation and inference: eval.L_q, or data.L_q when 0."""
    return int(c.eval.L_q or c.data.L_q)


def model_config(c, vocab_size: Optional[int] = None, base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig from config.model. `base` (a loaded checkpoint's config) supplies the architecture: every field
    but the ImpRAG and numerics ones (KEEP); a config that sets one of those to another value than the checkpoint's
    is a ConfigError."""
    m = dict(c.model)
    m.pop("init", None)
    m.pop("tokenizer", None)  # what the run reads text with (run/model.py), not a model field
    if m.get("rope_scaling") is not None and hasattr(m["rope_scaling"], "to_dict"):
        m["rope_scaling"] = m["rope_scaling"].to_dict()
    for k, unset in (("head_dim", 0), ("prompt_offset", -1), ("vocab_size", 0)):  # older runs' "unset" values
        if m.get(k) == unset:
            m[k] = None
    if base is not None:  # pretrained: architecture from the checkpoint, ImpRAG/numerics from the config
        default = base_config().model
        for k, v in m.items():
            if k in KEEP or v is None or v == default.get(k) or v == getattr(base, k):
                continue
            _fail(f"model.{k}={v!r} disagrees with the checkpoint {c.model.init!r} ({getattr(base, k)!r}); a "
                  f"pretrained init takes its architecture from the checkpoint: drop model.{k} from the config")
        return base.replace(**{k: m[k] for k in KEEP if m.get(k) is not None})
    if not m.get("vocab_size"):
        if vocab_size is None:
            _fail("model.vocab_size is unset (= the tokenizer's) but no tokenizer is known")
        m["vocab_size"] = vocab_size
    missing = [k for k in ARCHITECTURE if m.get(k) is None]
    if missing:
        _fail(f"model.{missing[0]} is not set: a random init needs {', '.join('model.' + k for k in missing)} "
              "(or start from a pretrained model.init)")
    try:
        return ModelConfig(**m)
    except TypeError as e:
        _fail(f"model config: {e}")


def batch_config(c):
    from ..data.pipeline import BatchConfig

    d = c.data
    try:  # no task weights: every task of the data folder's stats.json, weighted 1
        return BatchConfig(batch_size=d.batch_size, free_batch_size=d.free_batch_size, L_q=d.L_q, L_r=d.L_r,
                           L_free=d.L_free, L_free_r=d.L_free_r,
                           l_max=d.l_max, k=d.k, tasks=parse_weights(d.tasks) or None,
                           free_tasks=parse_weights(d.free_tasks) or None,
                           positives=d.positives, n_pos=d.n_pos, negatives=d.negatives, n_neg=d.n_neg,
                           neg_ranks=tuple(d.neg_ranks), random_neg_fraction=d.random_neg_fraction, cf=d.cf,
                           cf_negatives=d.cf_negatives, add_bos=d.add_bos,
                           query_filler=d.get("query_filler", 0.0), query_filler_max=d.get("query_filler_max", 24),
                           query_filler_pool=d.get("query_filler_pool", "unseen"),
                           query_filler_gen=d.get("query_filler_gen", True),
                           query_filler_split=d.get("query_filler_split", False), L_query=d.get("L_query", 0),
                           query_filler_order=d.get("query_filler_order", "after"),
                           seed=c.seed)
    except ValueError as e:
        _fail(f"data config: {e}")
