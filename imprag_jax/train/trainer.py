"""The training loop: build everything from the config, compile the step ahead, train, checkpoint, evaluate.

Resumable: the orbax CheckpointManager in <workdir>/checkpoints holds the train state, the data iterator state
and the config; a restart with the same workdir continues from the latest step (a SIGTERM/SIGINT saves first).
On CPU a resumed run reproduces the uninterrupted run's losses exactly (tests/test_train.py).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..model.sharding import make_mesh
from . import config_lib
from .losses import stage_at
from .state import compile_step, create_state, memory_report, state_shardings
from .step import make_optimizer, step_keys


def log(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class MetricWriter:
    """metrics.jsonl plus TensorBoard (tensorboardX, when installed) on process 0."""

    def __init__(self, workdir: str):
        self.on = jax.process_index() == 0
        self.f = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.on else None
        self.tb = None
        if self.on:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, step: int, metrics: Dict):
        if not self.on:
            return
        row = {"step": int(step), **{k: (float(v) if not isinstance(v, (str, dict, list)) else v)
                                     for k, v in metrics.items()}}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("@", "_at"), v, step)

    def close(self):
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def load_model(c, tokenizer_vocab: Optional[int]):
    """(ModelConfig, params or None, tokenizer or None) from config.model.init."""
    init = c.model.init
    if init == "random":
        return config_lib.model_config(c, tokenizer_vocab), None, None
    from ..convert.fetch import resolve_model

    base_cfg, params, tok = resolve_model(init)
    return config_lib.model_config(c, base=base_cfg), params, tok


def _global_batch(batch: Dict[str, np.ndarray], shardings) -> Dict[str, jax.Array]:
    out = {}
    for k in step_keys(batch):
        x = np.asarray(batch[k])
        if jax.process_count() == 1:
            out[k] = jax.device_put(x, shardings[k])
        else:
            out[k] = jax.make_array_from_process_local_data(shardings[k], x)
    return out


class _Stop:
    """SIGTERM / SIGINT: finish the current step, save, exit."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        log(f"\n[train] signal {signum}: saving a checkpoint after this step, then stopping")

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(params, cfg: ModelConfig, c, data_dir: str, tokenizer, *, tasks, limit, modes, ks, step: int,
             mesh=None, corpus=None):
    """Build the index with the current parameters and evaluate each task/mode/k. Returns a list of result rows."""
    from ..data.pipeline import corpus_tokens
    from ..infer.imprag import Retriever, evaluate_modes

    if corpus is None:
        corpus = corpus_tokens(data_dir, tokenizer, c.data.l_max)
    toks, mask = corpus
    texts = _passage_texts(data_dir)
    rows = []
    rec_modes = [m for m in modes if m in ("recall", "bm25_recall")]
    modes = [m for m in modes if m not in rec_modes]
    if rec_modes:  # retrieval only (no generation): the model's and BM25's recall over the same pool
        from ..infer.recall import recall_rows

        rows += recall_rows(params, cfg, data_dir, list(tasks), tokenizer, corpus=(toks, mask), texts=texts,
                            modes=rec_modes, split=c.eval.split, limit=limit, L_q=config_lib.eval_L_q(c),
                            add_bos=bool(c.data.add_bos), pool=int(c.eval.get("pool", 0)), seed=c.seed,
                            batch_size=c.eval.batch_size)
    retriever = None
    if "imprag" in modes:
        pool_sel = None
        if int(c.eval.get("pool", 0)) > 0:  # the index holds a pool with every evaluated question's gold passage
            from ..infer.recall import eval_gold, pool_rows

            gold = eval_gold(data_dir, list(tasks), tokenizer, split=c.eval.split, limit=limit,
                             L_q=config_lib.eval_L_q(c), add_bos=bool(c.data.add_bos))
            pool_sel = pool_rows(len(toks), gold, int(c.eval.pool), c.seed)
        retriever = Retriever.build(params, cfg, toks, mask, texts, step=step, mesh=None, backend=c.eval.backend,
                                    rows=pool_sel)
    for task in tasks:
        for mode in modes:  # every k of a mode in one pass over the data
            mode_ks = {"imprag": list(ks), "oracle": [1], "closed_book": [0]}.get(mode, [max(ks)])
            rows += evaluate_modes(params, cfg, data_dir, task, tokenizer, retriever, split=c.eval.split, mode=mode,
                                   ks=mode_ks, L_q=config_lib.eval_L_q(c), l_max=c.data.l_max,
                                   max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size, limit=limit,
                                   use_score_bias=c.eval.score_bias, add_bos=bool(c.data.add_bos))
    return rows


_TEXTS: Dict[str, list] = {}


def _passage_texts(data_dir: str):
    if data_dir not in _TEXTS:
        with open(os.path.join(data_dir, "passages.jsonl")) as f:
            _TEXTS[data_dir] = [(lambda o: f"{o.get('title', '')}: {o['text']}")(json.loads(line)) for line in f]
    return _TEXTS[data_dir]


def results_table(rows) -> str:
    cols = ["task", "mode", "k", "n", "em", "accuracy", "pool", "gold_recall@1", "gold_recall@5",
            "chance_gold_recall@5", "gold_recall@20", "answer_recall@1", "answer_recall@5", "answer_recall@10"]
    cols = [c for c in cols if any(c in r and r[c] is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train(c, workdir: str) -> Dict:
    """Run training described by config `c` in `workdir`; returns the final metrics and evaluation rows."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from ..data.pipeline import TrainBatches, load_tokenizer

    os.makedirs(workdir, exist_ok=True)
    sc = config_lib.step_config(c)
    if jax.process_count() > 1:  # one writer for a generated world and its record files
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            from ..data.pipeline import prepare_records

            prepare_records(config_lib.data_dir(c, workdir), None, ["train"])
        multihost_utils.sync_global_devices("imprag_jax:data")
    ddir = config_lib.data_dir(c, workdir)
    tokenizer = None
    if c.model.init == "random":
        tokenizer = load_tokenizer(ddir)
    cfg, pre_params, pre_tok = load_model(c, tokenizer.vocab_size if tokenizer else None)
    if _init_from(c) and start_step_hint(workdir) == 0:  # start from another run's parameters (not resuming)
        pre_params = params_from_run(_init_from(c), cfg)
    tokenizer = tokenizer or pre_tok
    if tokenizer is None:
        tokenizer = load_tokenizer(ddir)
    bcfg = config_lib.batch_config(c)
    try:
        mesh = make_mesh(**dict(c.mesh))
    except ValueError as e:  # "... needs 16 devices but 8 are visible ...; did you start every host?"
        raise config_lib.ConfigError(str(e)) from None
    if jax.process_count() > 1:  # each host feeds its own rows: every kind of row must split evenly over the shards
        shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        for name, n in (("data.batch_size", c.data.batch_size), ("data.free_batch_size", c.data.free_batch_size)):
            if n % shards:
                raise config_lib.ConfigError(f"{name}={n} must be divisible by the batch shards (mesh data x fsdp = "
                                             f"{shards}) in a multi-process run")
    rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], (list, tuple)) else r[1]) for r in c.rules)
    T = c.train
    tx, sched = make_optimizer(T.lr, T.steps, T.warmup_steps, end_lr_ratio=T.end_lr_ratio,
                               weight_decay=T.weight_decay, b1=T.b1, b2=T.b2, clip=T.clip)
    log(f"[train] model: {cfg.num_layers} layers (b={cfg.b}, t={cfg.t}), d={cfg.hidden_size}, "
        f"{cfg.num_params() / 1e6:.2f}M params; mesh {dict(mesh.shape)} over {jax.device_count()} devices "
        f"({jax.process_count()} process(es))")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))

    data = TrainBatches(ddir, tokenizer, bcfg, jax.process_index(), jax.process_count(), prefetch=c.data.prefetch)
    probe = data.batch(0)
    k_read = 0 if T.closed_book else bcfg.k
    shapes = {k: ((probe[k].shape[0] * jax.process_count(),) + probe[k].shape[1:], probe[k].dtype)
              for k in step_keys(probe)}
    for key in ("passages", "passage_mask"):
        shapes[key] = ((shapes[key][0][0], k_read) + shapes[key][0][2:], shapes[key][1])
    for key in ("passage_ids", "positives"):
        shapes[key] = ((shapes[key][0][0], k_read), shapes[key][1])

    refresher, index_abs = None, None
    if T.candidates != "pseudo":  # negatives mined from the model's own index, re-encoded every refresh_every steps
        import dataclasses

        from ..data.pipeline import corpus_tokens
        from ..retrieval import IndexRefresher
        from ..retrieval.index import padded_rows
        from .state import index_specs

        ctoks, cmask = corpus_tokens(ddir, tokenizer, bcfg.l_max)
        refresher = IndexRefresher(T.refresh_every, cfg=cfg, tokens=ctoks, mask=cmask, batch_size=256, mesh=mesh,
                                   index_mesh=mesh, keep_tokens=True, progress=False)
        n_neg_slots = bcfg.k - (bcfg.n_pos if bcfg.positives != "gold" else 1)
        n_rep = n_neg_slots if T.candidates == "index" else min(T.index_negatives, n_neg_slots)
        sc = dataclasses.replace(sc, candidates=T.candidates, n_replace=max(1, n_rep), n_index=len(ctoks))
        index_abs = index_specs(padded_rows(len(ctoks), mesh), cfg.retrieval_dim, bcfg.l_max, mesh)
    R = int(T.get("retrieval_steps", 0))
    stage_of = lambda s: stage_at(s, T.steps, T.warmup_share, T.stages, R)
    stages_needed = sorted({stage_of(s) for s in range(start_step_hint(workdir), T.steps)} or {stage_of(0)})
    compiled, probes = {}, {}
    for stage in stages_needed:
        t0 = time.time()
        compiled[stage], shard = compile_step(cfg, sc, stage, tx, mesh, shapes, rules, index_abstract=index_abs)
        mem = memory_report(compiled[stage])
        log(f"[train] compiled the '{stage}' step in {time.time() - t0:.1f}s; per-device memory: "
            + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items() if v))
        if T.get("log_grad_norms", False) and not T.closed_book:
            probes[stage], _ = compile_step(cfg, sc, stage, tx, mesh, shapes, rules, index_abstract=index_abs,
                                            kind="grad_norms")
    s_shard, s_abs = state_shardings(cfg, tx, mesh, rules)

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "meta"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=T.keep, create=True,
                                                                      enable_async_checkpointing=True))
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s_abs, s_shard)
        restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                data=ocp.args.JsonRestore(),
                                                                meta=ocp.args.JsonRestore()))
        state = restored["state"]
        data.set_state(restored["data"])
        log(f"[train] resumed from step {latest} ({ckpt_dir})")
    else:
        state = create_state(cfg, tx, mesh, jax.random.key(c.seed), params=pre_params, rules=rules)
    start = int(jax.device_get(state["step"]))

    def save(step, force=False):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=ocp.args.JsonSave(data.get_state()),
                                                meta=ocp.args.JsonSave({"model": cfg.to_dict(), "step": step,
                                                                        "name": c.name})), force=force)

    writer = MetricWriter(workdir)
    stopper = _Stop()
    B_glob, L_tok = shapes["mask"][0]
    Bf_glob, Lf_tok = shapes["free_mask"][0] if "free_mask" in shapes else (0, 0)
    # token slots processed per step: retrieval rows (prompt+response and passage slots) and retrieval-free rows
    tokens_per_step = int(B_glob * (L_tok + k_read * bcfg.l_max) + Bf_glob * Lf_tok)
    pbar = tqdm(total=T.steps, initial=start, desc="train", dynamic_ncols=True,
                disable=jax.process_index() != 0 or not os.isatty(2) and os.environ.get("IMPRAG_PROGRESS") != "1",
                mininterval=2.0)
    t_start = time.time()
    t_last, s_last = time.time(), start
    last_metrics: Dict = {}
    n_clipped = jnp.zeros((), jnp.float32)
    step = start
    stopped_early = False
    compiles_before = None
    cur_index = None
    next_batch = None
    dev_corpus = []

    dev_seconds = [0.0]  # dev evaluations are not training: their time is kept out of the speed figures

    def dev_eval(params, at: int):
        nonlocal t_last
        t0 = time.time()
        _dev_eval(params, at)
        dt = time.time() - t0
        dev_seconds[0] += dt
        t_last += dt

    def _dev_eval(params, at: int):
        if not dev_corpus:
            from ..data.pipeline import corpus_tokens

            dev_corpus.append(corpus_tokens(ddir, tokenizer, c.data.l_max))
        rows = evaluate(params, cfg, c, ddir, tokenizer, tasks=parse(c.eval.dev_tasks), limit=c.eval.dev_limit,
                        modes=parse(c.eval.get("dev_modes", "imprag")), ks=[1], step=at, corpus=dev_corpus[0])
        writer.write(at, {f"dev/{r['task']}/{r['mode']}/{key}": v for r in rows for key, v in r.items()
                          if isinstance(v, float)})
        log(f"[dev] step {at}: " + "; ".join(
            f"{r['task']} {r['mode']} " + " ".join(f"{key} {r[key]:.3f}" for key in
                                                  ("em", "gold_recall@1", "gold_recall@5", "gold_recall@20")
                                                  if r.get(key) is not None) for r in rows))

    if T.eval_every and start == 0:  # the curve starts at the initial weights
        dev_eval(state["params"], 0)
    _count_compiles()
    float(sched(start))  # warm the eager schedule ops so logging never compiles inside the loop
    try:
        for step in range(start, T.steps):
            stage = stage_of(step)
            host = data.batch(step) if step == start else next_batch
            if T.closed_book:
                host = _drop_passages(host)
            batch = _global_batch(host, shard["batch"])
            ramp = 1.0 if T.score_bias_ramp <= 0 else min(1.0, step / T.score_bias_ramp)
            index_arrays = None
            if refresher is not None:
                if refresher.maybe_refresh(step, state["params"]) is not None:
                    ix = refresher.index
                    index_arrays = {"emb": ix.embeddings.astype(index_abs["emb"].dtype),
                                    "tokens": ix.tokens.astype(jnp.int32), "mask": ix.mask.astype(jnp.int32)}
                    cur_index = index_arrays
                index_arrays = cur_index
            log_step = (step + 1) % T.log_every == 0 or step + 1 == T.steps
            norms = probes[stage](state, batch, jnp.float32(ramp), index_arrays) if log_step and stage in probes \
                else None  # per-loss gradient norms on this step's batch, before the step donates the state
            state, metrics = compiled[stage](state, batch, jnp.float32(ramp), index_arrays)
            if "clipped" in metrics:
                n_clipped = n_clipped + metrics["clipped"]
            data.set_state({"step": step + 1})
            next_batch = data.batch(step + 1) if step + 1 < T.steps else None  # overlaps with the device step
            if log_step:
                m = jax.device_get({**metrics, **(norms or {}), "n_clipped": n_clipped})
                now = time.time()
                m = {k: float(v) for k, v in m.items()}
                m["clip_fraction"] = m.pop("n_clipped") / max(step + 1 - s_last, 1)
                m.pop("clipped", None)
                n_clipped = jnp.zeros((), jnp.float32)
                m.update(stage=stage, lr=float(sched(step)), steps_per_s=(step + 1 - s_last) / (now - t_last),
                         tokens_per_s=(step + 1 - s_last) * tokens_per_step / (now - t_last),
                         elapsed_s=now - t_start)
                t_last, s_last = now, step + 1
                writer.write(step + 1, m)
                last_metrics = m
                pbar.set_postfix(loss=f"{m['loss']:.3f}", gen=f"{m['gen_nll']:.3f}", ret=f"{m['ret_loss']:.3f}",
                                 tok_s=f"{m['tokens_per_s']:.0f}")
                if pbar.disable:
                    log(f"[train] step {step + 1}/{T.steps} {stage} loss {m['loss']:.4f} gen {m['gen_nll']:.4f} "
                        + health_line(m) + f" {m['tokens_per_s']:.0f} tok/s")
            pbar.update(1)
            if T.ckpt_every and (step + 1) % T.ckpt_every == 0:
                save(step + 1)
            if T.eval_every and (step + 1) % T.eval_every == 0 and step + 1 < T.steps:
                dev_eval(state["params"], step + 1)
            if stopper.requested:
                stopped_early = True
                break
            if step + 1 == 2:
                compiles_before = _COMPILES[0]
            if T.stop_at_step and step + 1 >= T.stop_at_step:  # a planned interruption (preemptible schedules)
                log(f"[train] stop_at_step={T.stop_at_step}: saving and stopping")
                stopped_early = True
                break
            if T.time_budget_s and time.time() - t_start > T.time_budget_s:
                log(f"[train] time budget of {T.time_budget_s:.0f}s reached at step {step + 1}")
                stopped_early = "budget"
                break
    finally:
        pbar.close()
        stopper.restore()
        done = int(jax.device_get(state["step"]))
        if mngr.latest_step() != done:
            save(done, force=True)
        mngr.wait_until_finished()
        mngr.close()
        data.close()
    train_s = time.time() - t_start - dev_seconds[0]
    result = {"step": done, "train_seconds": train_s, "dev_eval_seconds": dev_seconds[0], "metrics": last_metrics, "stopped_early": stopped_early,
              "planned_steps": int(T.steps),
              "compiles_after_step_2": (_COMPILES[0] - compiles_before) if compiles_before is not None else None}
    if stopped_early is True:
        writer.close()
        _sync_end()
        return result
    # final evaluation
    t0 = time.time()
    ks = [int(x) for x in parse(c.eval.k)]
    rows = evaluate(state["params"], cfg, c, ddir, tokenizer, tasks=parse(c.eval.tasks), limit=c.eval.limit,
                    modes=parse(c.eval.modes), ks=ks, step=done)
    result["eval"] = rows
    result["eval_seconds"] = time.time() - t0
    writer.write(done, {f"eval/{r['task']}/{r['mode']}/k{r['k']}/{key}": v for r in rows for key, v in r.items()
                        if isinstance(v, float)})
    writer.close()
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "final.json"), "w") as f:
            json.dump(result, f, indent=2)
        table = results_table(rows)
        if stopped_early == "budget":  # the model is not the documented one: say so where the numbers are
            table = budget_warning(T.time_budget_s, done, T.steps) + "\n\n" + table
        with open(os.path.join(workdir, "eval", "final.md"), "w") as f:
            f.write(f"# {c.name}: step {done}, {train_s:.0f}s training\n\n{table}\n")
        log(f"\n[eval] step {done} ({train_s:.0f}s training, {result['eval_seconds']:.0f}s evaluation)\n{table}")
    _sync_end()
    return result


def _init_from(c) -> str:
    return str(c.train.get("init_from", "") or "")


def params_from_run(run_dir: str, cfg: ModelConfig):
    """The latest checkpoint's parameters of another run (e.g. the retrieval-path run whose retriever formed), as
    the initial weights of this one; its architecture must be this config's (the ImpRAG split may differ)."""
    from ..infer.session import RunError, restore_params

    try:
        params, step, have = restore_params(run_dir)
    except RunError as e:
        raise config_lib.ConfigError(f"train.init_from={run_dir!r}: {e}") from None
    arch = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "tie_embeddings")
    diff = {k: (getattr(have, k), getattr(cfg, k)) for k in arch if getattr(have, k) != getattr(cfg, k)}
    if diff:
        raise config_lib.ConfigError(f"train.init_from={run_dir!r} holds another architecture: "
                                     + ", ".join(f"{k} {a} (config: {b})" for k, (a, b) in diff.items()))
    log(f"[train] initial parameters from {run_dir} (step {step})")
    return params


def budget_warning(budget_s: float, done: int, steps: int) -> str:
    return (f"**WARNING: train.time_budget_s={budget_s:.0f} stopped training at step {done} of {steps}; these "
            "results depend on the machine's speed and are not the config's documented ones.**")


def health_line(m: Dict) -> str:
    """The retrieval loss and top-1 rates beside their chance levels, the per-loss gradient norms and the share of
    clipped updates, as one log fragment (keys that a step did not produce are left out)."""
    parts = []
    if "ret_chance" in m:
        parts.append(f"ret {m['ret_loss']:.4f} (chance {m['ret_chance']:.4f})")
    elif m.get("ret_loss"):
        parts.append(f"ret {m['ret_loss']:.4f}")
    if "inbatch_top1_is_pos" in m:
        parts.append(f"top1 {m['inbatch_top1_is_pos']:.3f} (chance {m['inbatch_top1_chance']:.3f})")
    elif "cand_top1_chance" in m:
        parts.append(f"top1 {m['cand_top1_is_pos']:.3f} (chance {m['cand_top1_chance']:.3f})")
    if "grad_norm_gen" in m:
        parts.append(f"|g_gen| {m['grad_norm_gen']:.3g} |g_ret| {m['grad_norm_ret']:.3g}")
    if "grad_norm" in m:
        parts.append(f"|g| {m['grad_norm']:.3g}")
    if "clip_fraction" in m:
        parts.append(f"clipped {m['clip_fraction']:.2f}")
    return " ".join(parts)


def start_step_hint(workdir: str) -> int:
    """The step a run in `workdir` resumes from (the latest checkpoint folder's number; 0 when none), read from the
    folder names so that the compiled stages can be chosen before the checkpoint manager opens."""
    d = os.path.join(workdir, "checkpoints")
    steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else 0


def _sync_end():
    if jax.process_count() > 1:  # leave together (a process that exits early breaks the shutdown barrier)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("imprag_jax:end")


_COMPILES = [0]
_LISTENING = [False]


def _count_compiles():
    """Count XLA compilations (jax.monitoring), to check that the loop never recompiles."""
    if _LISTENING[0]:
        return

    def on_event(event, duration, **kw):
        if event == "/jax/compilation/backend_compile_duration":
            _COMPILES[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    _LISTENING[0] = True


def parse(s):
    return config_lib.parse_list(s)


def _drop_passages(b):
    b = dict(b)
    b["passages"] = b["passages"][:, :0]
    b["passage_mask"] = b["passage_mask"][:, :0]
    b["passage_ids"] = b["passage_ids"][:, :0]
    b["positives"] = b["positives"][:, :0]
    return b
