"""A run's config: the run directory's config.json, and the typed objects the code builds from a (locked)
ml_collections config, with one-line errors for bad values. Training-only objects (the step config) are built in
`train.config_lib`."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import ml_collections as mlc

from ..model import ConfigError, ModelConfig

CONFIG_FILE = "config.json"


class RunError(Exception):
    """A run directory, checkpoint, data folder or task that cannot be used; the message says which and why."""


def _fail(msg):
    raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------------- the file


def load_run_config(workdir: str) -> mlc.ConfigDict:
    """<workdir>/config.json, written by the trainer when the run started."""
    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{workdir!r} is not a training run directory (no config.json); pass --config")
    with open(path) as f:
        return mlc.ConfigDict(json.load(f))


def write_run_config(c, workdir: str) -> None:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(c.to_json_best_effort(indent=2))


# ---------------------------------------------------------------------------------------------------- values


def parse_weights(s) -> Optional[Dict[str, float]]:
    """'qa:1,two_hop_qa:0.5' -> {'qa': 1.0, 'two_hop_qa': 0.5}; '' -> None."""
    if not s:
        return None
    if isinstance(s, dict):
        return {k: float(v) for k, v in s.items()}
    out = {}
    for part in str(s).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            _fail(f"bad task weight {part!r}: expected name:weight")
    return out


def parse_list(s):
    """'a, b,,c' -> ['a', 'b', 'c']; a list or tuple -> its items as stripped strings."""
    items = s if isinstance(s, (list, tuple)) else str(s).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def eval_ks(c):
    """The passages read at evaluation (eval.k), as ints; the first is the inference default."""
    return [int(x) for x in parse_list(c.eval.k)]


def eval_L_q(c) -> int:
    """Prompt length at evaluation and inference: eval.L_q, or data.L_q when 0 / absent (older run configs)."""
    return int(c.eval.get("L_q", 0) or c.data.L_q)


def model_config(c, vocab_size: Optional[int] = None, base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig from config.model. `base` (a loaded checkpoint's config) supplies the architecture."""
    m = dict(c.model)
    for k in ("init", "preset"):
        m.pop(k, None)
    if m.get("head_dim", 0) in (0, None):
        m["head_dim"] = None
    if m.get("rope_scaling") is not None and hasattr(m["rope_scaling"], "to_dict"):
        m["rope_scaling"] = m["rope_scaling"].to_dict()
    if m.get("prompt_offset", -1) in (-1, None):
        m["prompt_offset"] = None
    if base is not None:  # pretrained: architecture from the checkpoint, ImpRAG/numerics from the config
        keep = ("b", "t", "retrieval_rope", "score_scale", "retrieval_pool", "passage_attention", "prompt_offset",
                "dtype", "param_dtype", "remat", "attention_impl")
        return base.replace(**{k: m[k] for k in keep})
    if not m.get("vocab_size"):
        if vocab_size is None:
            _fail("model.vocab_size is 0 (= the tokenizer's) but no tokenizer is known")
        m["vocab_size"] = vocab_size
    try:
        return ModelConfig(**m)
    except TypeError as e:
        _fail(f"model config: {e}")


def batch_config(c):
    from ..data.pipeline import BatchConfig

    d = c.data
    try:
        return BatchConfig(batch_size=d.batch_size, free_batch_size=d.free_batch_size, L_q=d.L_q, L_r=d.L_r,
                           L_free=d.L_free, L_free_r=d.L_free_r,
                           l_max=d.l_max, k=d.k, tasks=parse_weights(d.tasks), free_tasks=parse_weights(d.free_tasks),
                           positives=d.positives, n_pos=d.n_pos, negatives=d.negatives, n_neg=d.n_neg,
                           neg_ranks=tuple(d.neg_ranks), random_neg_fraction=d.random_neg_fraction, cf=d.cf,
                           cf_negatives=d.cf_negatives, add_bos=d.add_bos,
                           query_filler=d.get("query_filler", 0.0), query_filler_max=d.get("query_filler_max", 24),
                           query_filler_pool=d.get("query_filler_pool", "unseen"),
                           query_filler_gen=d.get("query_filler_gen", True),
                           seed=c.seed)
    except ValueError as e:
        _fail(f"data config: {e}")
