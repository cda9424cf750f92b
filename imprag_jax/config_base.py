"""Every field a run's config has, with its default (`base_config`), and the one parser of config values.

This is the one place a run's defaults live: configs/*.py start from `base_config()` and set what differs; the
`model` section's defaults are `ModelConfig`'s field defaults (its shape fields have none: a config or a preset of
`model.config.PRESETS` gives them for a random init, a pretrained init takes them from the checkpoint). A run's
config.json is read back through `conform`, which fills fields added since the run was written with their defaults.

Values that are lists or {name: weight} dicts (`LIST_FIELDS`, `WEIGHT_FIELDS`) are real lists and dicts in the
configs; `parse_value` also reads them from a comma string: the command line (`--config.eval.k=1,5`,
`--config.data.tasks=nq:1,squad:0.5`) and config.json of runs written when they were strings.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any, Dict, List

import ml_collections as mlc

from .model.config import ARCHITECTURE, ConfigError, ModelConfig
from .model.sharding import DEFAULT_RULES

# element type of each list field, and the {name: weight} fields
LIST_FIELDS = {"data.neg_ranks": int, "eval.tasks": str, "eval.k": int, "eval.modes": str, "eval.dev_tasks": str,
               "eval.dev_modes": str}
WEIGHT_FIELDS = ("data.tasks", "data.free_tasks")
DICT_FIELDS = WEIGHT_FIELDS + ("model.rope_scaling",)  # dict values, not sections
# fields that runs written by older code may hold in config.json and that nothing reads any more: dropped on reading
RETIRED = ("model.preset",)


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = "run"
    c.seed = 0
    # model: `init` = "random" | "smollm2" | an HF dir | a .gguf file, and every ModelConfig field. The shape fields
    # (None here) must be set for a random init (vocab_size None = the tokenizer's size); a pretrained init takes
    # them, and every other architecture field, from the checkpoint: a value a config sets must agree with it.
    # `tokenizer` (random init only): "" = the data folder's tokenizer.json (the synthetic world's), else
    # "smollm2" | a .gguf file | an HF dir with tokenizer.json, whose tokenizer a random init reads real text with
    model = dict(init="random", tokenizer="")
    for f in dataclasses.fields(ModelConfig):
        model[f.name] = None if f.name in ARCHITECTURE else f.default
    c.model = mlc.ConfigDict(model)
    c.data = mlc.ConfigDict(dict(
        kind="synthetic",  # "synthetic" / "minikilt": built into <workdir>/data on first use | "prepared": data.dir
        dir="", source="../shared/data", people=1000, world_seed=0, qa_templates=2,
        batch_size=32, free_batch_size=8, L_q=64, L_r=4, L_free=0, L_free_r=0, l_max=24, k=4,
        tasks={"qa": 1.0}, free_tasks={"format": 1.0},  # {} = every task of the data folder, weighted 1
        positives="gold", n_pos=1, negatives="generator", n_neg=3,
        neg_ranks=[10, 50], random_neg_fraction=0.25, cf=1.0, cf_negatives=True, add_bos=True, prefetch=2,
        # filler words before the answer marker of a share of the retrieval rows (data/pipeline.py, BatchConfig)
        query_filler=0.0, query_filler_max=24, query_filler_pool="unseen", query_filler_gen=True,
        query_filler_split=False, query_filler_order="after", L_query=0))
    c.train = mlc.ConfigDict(dict(
        steps=4000, lr=2e-3, warmup_steps=150, end_lr_ratio=0.05, weight_decay=0.01, b1=0.9, b2=0.98,
        clip=1.0, accum=1,
        lam=1.0, stages="both", warmup_share=0.3, tau_t=1.0, tau_r=1.0, nce_reduction="sum",
        score_bias=False, score_bias_grad=False, score_bias_ramp=500, teacher_chunks=1, teacher_len=0,
        candidates="pseudo", refresh_every=500, index_negatives=2,
        index_backend="exact",  # search that mines index/mixed candidates: exact | binned | scann (host, pure_callback)
        retrieval_steps=0, log_grad_norms=True, init_from="",
        closed_book=False, time_budget_s=0.0, stop_at_step=0,
        log_every=50, ckpt_every=1000, keep=3, eval_every=0))
    c.eval = mlc.ConfigDict(dict(
        tasks=["qa", "two_hop_qa", "slot_filling", "fact_verification", "entity_linking"], split="dev", k=[1, 5],
        limit=400, max_new_tokens=4, batch_size=128, modes=["imprag", "oracle"], dev_tasks=["qa"], dev_limit=200,
        dev_modes=["imprag"], pool=0, L_q=0, backend="exact", score_bias=False))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = [list(r) for r in DEFAULT_RULES]
    return c


# ---------------------------------------------------------------------------------------------------- values


def parse_list(value, kind=str) -> List[Any]:
    """A list field's value: a list/tuple, or a comma string ('a, b,,c' -> ['a', 'b', 'c']); items as `kind`."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for x in items:
        x = str(x).strip() if kind is str or isinstance(x, str) else x
        if x == "":
            continue
        try:
            out.append(kind(x))
        except (TypeError, ValueError):
            raise ConfigError(f"bad list item {x!r}: expected {kind.__name__}") from None
    return out


def parse_weights(value) -> Dict[str, float]:
    """A {name: weight} field's value: a dict, or 'qa:1,two_hop_qa:0.5' (a bare name weighs 1); '' -> {}."""
    if value is None:
        return {}
    if hasattr(value, "to_json"):  # a ConfigDict: its JSON keeps the order the tasks were given in (to_dict sorts)
        value = json.loads(value.to_json())
    if isinstance(value, dict):
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"bad task weights {value!r}: expected name: number") from None
    out = {}
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        try:
            out[name.strip()] = float(w) if w.strip() else 1.0
        except ValueError:
            raise ConfigError(f"bad task weight {part!r}: expected name:weight") from None
    return out


def _parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_value(key: str, raw, current):
    """The value of field `key` (dotted) from `raw`, a string from the command line or a value from a file, for a
    field whose present value is `current`. Raises ConfigError (one line) when it does not fit."""
    try:
        if key in LIST_FIELDS:
            return parse_list(raw, LIST_FIELDS[key])
        if key in WEIGHT_FIELDS:
            return parse_weights(raw)
    except ConfigError as e:
        raise ConfigError(f"{key}={raw!r}: {e}") from None
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(current, bool):
            return _parse_bool(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"{key}={raw!r}: {e}") from None
    if isinstance(current, str):
        return raw
    try:  # None (a field that may be unset), a list or a dict: a Python literal, else the string
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def set_value(c, key: str, raw) -> None:
    """Set field `key` (dotted; it must exist) of `c` from `raw` (see `parse_value`)."""
    node, parts = c, key.split(".")
    for p in parts[:-1]:
        node = node[p]
    value = parse_value(key, raw, node[parts[-1]])
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:  # e.g. a dict for an int field
        raise ConfigError(f"{key}={raw!r}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------- fields


def flat_fields(node, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of the leaves of a config (a DICT_FIELDS dict and a list are leaves)."""
    out = {}
    for k in node.keys():
        key = f"{prefix}{k}"
        v = node[k]
        if hasattr(v, "keys") and key not in DICT_FIELDS:
            out.update(flat_fields(v, key + "."))
        else:
            out[key] = v
    return out


def unknown_fields(c) -> List[str]:
    """Dotted keys of `c` that `base_config` does not have (a misspelt or invented field)."""
    known = flat_fields(base_config())
    return sorted(k for k in flat_fields(c) if k not in known)


def check_fields(c, source: str) -> None:
    """ConfigError naming the first field of `c` the base config does not have."""
    import difflib

    bad = unknown_fields(c)
    if bad:
        close = difflib.get_close_matches(bad[0], list(flat_fields(base_config())), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "imprag_jax/config_base.py lists every field"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"{source} sets unknown field {bad[0]!r}{more} ({hint})")


def normalize(c) -> None:
    """Put the list and weight fields of `c` in their real types (from comma strings, tuples, ConfigDicts)."""
    for key in list(LIST_FIELDS) + list(WEIGHT_FIELDS):
        section, _, name = key.partition(".")
        if section in c and name in c[section]:
            set_value(c, key, c[section][name])


def conform(d: dict, source: str) -> mlc.ConfigDict:
    """A locked config from a plain dict (a run's config.json): the base config with `d`'s values, list and weight
    fields parsed (older runs wrote them as comma strings), fields runs no longer have dropped, fields added since
    at their defaults; a field the base config does not have is a ConfigError."""
    c = base_config()
    given = mlc.ConfigDict(d)
    for key in RETIRED:
        section, _, name = key.partition(".")
        if section in given and name in given[section]:
            del given[section][name]
    check_fields(given, source)
    for key, v in flat_fields(given).items():
        if hasattr(v, "to_dict") and key not in WEIGHT_FIELDS:  # rope_scaling: a plain dict
            v = v.to_dict()
        parts = key.split(".")
        node = c
        for p in parts[:-1]:
            node = node[p]
        if key in LIST_FIELDS or key in WEIGHT_FIELDS:
            node[parts[-1]] = parse_value(key, v, None)
        else:
            node[parts[-1]] = v if not isinstance(v, tuple) else list(v)
    c.lock()
    return c
