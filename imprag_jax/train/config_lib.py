"""From a (locked) ml_collections config to the typed objects the code uses, with clear errors for bad values."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from ..model import ConfigError, ModelConfig
from .step import StepConfig

STAGES = ("both", "warmup", "distill", "none")
CANDIDATES = ("pseudo", "index", "mixed")


def _fail(msg):
    raise ConfigError(msg)


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
    return [x.strip() for x in str(s).split(",") if x.strip()]


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
        keep = ("b", "t", "retrieval_rope", "score_scale", "retrieval_pool", "passage_attention", "prompt_offset", "dtype", "param_dtype", "remat",
                "attention_impl")
        return base.replace(**{k: m[k] for k in keep})
    if not m.get("vocab_size"):
        if vocab_size is None:
            _fail("model.vocab_size is 0 (= the tokenizer's) but no tokenizer is known")
        m["vocab_size"] = vocab_size
    try:
        return ModelConfig(**m)
    except TypeError as e:
        _fail(f"model config: {e}")


def step_config(c) -> StepConfig:
    t = c.train
    if t.stages not in STAGES:
        _fail(f"train.stages must be one of {STAGES}, got {t.stages!r}")
    if t.candidates not in CANDIDATES:
        _fail(f"train.candidates must be one of {CANDIDATES}, got {t.candidates!r}")
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
    if not 0 <= t.get("retrieval_steps", 0) <= t.steps:
        _fail(f"train.retrieval_steps must be in [0, train.steps={t.steps}], got {t.retrieval_steps}")
    if t.get("retrieval_steps", 0) and t.closed_book:
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


def eval_L_q(c) -> int:
    """Prompt length at evaluation and inference: eval.L_q, or data.L_q when 0 / absent (older run configs)."""
    return int(c.eval.get("L_q", 0) or c.data.L_q)


def _lm_tasks(c) -> bool:
    w = parse_weights(c.data.free_tasks) or {}
    return "lm" in w


def batch_config(c):
    from ..data.pipeline import BatchConfig

    d = c.data
    try:
        return BatchConfig(batch_size=d.batch_size, free_batch_size=d.free_batch_size, L_q=d.L_q, L_r=d.L_r,
                           L_free=d.L_free, L_free_r=d.L_free_r,
                           l_max=d.l_max, k=d.k, tasks=parse_weights(d.tasks), free_tasks=parse_weights(d.free_tasks),
                           positives=d.positives, n_pos=d.n_pos, negatives=d.negatives, n_neg=d.n_neg,
                           neg_ranks=tuple(d.neg_ranks), random_neg_fraction=d.random_neg_fraction, cf=d.cf,
                           cf_negatives=d.cf_negatives, add_bos=d.add_bos, seed=c.seed)
    except ValueError as e:
        _fail(f"data config: {e}")


def data_dir(c, workdir: str) -> str:
    """The prepared data directory; for the synthetic world (the mini-KILT) it is generated (prepared) on first use,
    in <workdir>/data or in an explicit data.dir that exists (a data.dir that does not exist is a typo, not a
    place to create)."""
    d = c.data.dir or (os.path.join(workdir, "data") if c.data.kind in ("synthetic", "minikilt") else "")
    if c.data.kind not in ("synthetic", "prepared", "minikilt"):
        _fail(f"data.kind must be synthetic, minikilt or prepared, got {c.data.kind!r}")
    if c.data.dir and c.data.kind in ("synthetic", "minikilt") and not os.path.isdir(c.data.dir):
        if c.data.kind == "synthetic":
            _fail(f"data.dir={c.data.dir} does not exist; leave data.dir empty to generate the synthetic world in "
                  f"{os.path.join(workdir, 'data')}, or create it with python -m imprag_jax.data.synthetic --out DIR")
        _fail(f"data.dir={c.data.dir} does not exist; leave data.dir empty to prepare the mini-KILT in "
              f"{os.path.join(workdir, 'data')}, or prepare it with python -m imprag_jax.data.prepare --source "
              f"{c.data.source} --out DIR")
    if c.data.kind == "minikilt" and not os.path.exists(os.path.join(d, "passages.jsonl")):
        src = c.data.source
        if not os.path.isabs(src):
            src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), src)
        if not os.path.isdir(src):
            _fail(f"data.source={c.data.source!r} (resolved to {src}) is not a folder with the original data files")
        from ..data.prepare import main as prepare_main

        print(f"[data] preparing the mini-KILT from {src} into {d}", flush=True)
        prepare_main(["--source", src, "--out", d, "--seed", str(c.seed)])
        return d
    if c.data.kind == "prepared":
        if not d or not os.path.exists(os.path.join(d, "passages.jsonl")):
            _fail(f"data.dir={d!r} is not a prepared data directory (no passages.jsonl); run "
                  "`python -m imprag_jax.data.prepare --source ../shared/data --out DIR` first")
        return d
    want = dict(seed=c.data.world_seed, n_people=c.data.people, qa_templates=c.data.qa_templates)
    if not os.path.exists(os.path.join(d, "passages.jsonl")):
        from ..data.synthetic import World, WorldConfig, write_world

        print(f"[data] generating the synthetic world (seed {c.data.world_seed}, {c.data.people} people) in {d}",
              flush=True)
        try:
            wcfg = WorldConfig(**want)
        except ValueError as e:
            _fail(f"data: {e}")
        write_world(World.generate(wcfg), d, show_progress=True)
    elif os.path.exists(os.path.join(d, "world.json")):  # an existing world must be the one the config asks for
        with open(os.path.join(d, "world.json")) as f:
            have = json.load(f).get("config", {})
        # the seed and the question phrasings decide what a run trains on; another size than data.people is
        # allowed (tests and quick runs point data.dir at small worlds)
        diff = {k: (have[k], want[k]) for k in ("seed", "qa_templates") if k in have and have[k] != want[k]}
        if diff:
            _fail(f"data.dir={d} holds a synthetic world generated with "
                  + ", ".join(f"{k}={a}" for k, (a, _) in diff.items()) + " but the config asks for "
                  + ", ".join(f"{k}={b}" for k, (_, b) in diff.items()) + "; use another data.dir")
    return d
