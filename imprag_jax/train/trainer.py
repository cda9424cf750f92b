"""The training loop: build everything from the config, compile the step ahead, train, checkpoint, evaluate.

Resumable: <workdir>/checkpoints (`imprag_jax.run.checkpoint`) holds the train state, the data iterator state
and the model config; a restart with the same workdir continues from the latest step (a SIGTERM/SIGINT saves first).
On CPU a resumed run reproduces the uninterrupted run's losses exactly (tests/test_train.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import uuid
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from .. import evaluation
from .. import run as R
from ..data import paths as data_paths
from ..model import ModelConfig
from . import config_lib
from .losses import stage_at
from .setup import Setup, build, probe_batch_shapes
from .state import compile_step, create_state, memory_report, state_shardings
from .step import step_keys


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


def train(c, workdir: str) -> Dict:
    """Run training described by config `c` in `workdir`; returns the final metrics and evaluation rows."""
    from ..data.pipeline import TrainBatches

    os.makedirs(workdir, exist_ok=True)
    config_lib.step_config(c)  # the config's errors before any data is generated or prepared
    ddir = _data_dir(c, workdir)
    _check_oracle(c, ddir)
    tokenizer, cfg, init_params = _model_and_tokenizer(c, ddir, workdir)
    bcfg = R.batch_config(c)
    if c.train.candidates != "pseudo":  # mined negatives skip each row's gold and answer-containing passages
        bcfg = dataclasses.replace(bcfg, mined_exclude=MINED_EXCLUDE)
    if (bcfg.query_filler > 0 and bcfg.query_filler_pool == "vocab"
            and not data_paths.exists(data_paths.join(ddir, "world.json"))):
        raise config_lib.ConfigError(f"data config: query_filler_pool='vocab' draws its words from a synthetic "
                                     f"world, and {ddir} has none (no world.json); use 'all' or 'unseen'")
    s = build(c, cfg, process_count=jax.process_count())
    log(f"[train] model: {cfg.num_layers} layers (b={cfg.b}, t={cfg.t}), d={cfg.hidden_size}, "
        f"{cfg.num_params() / 1e6:.2f}M params; mesh {dict(s.mesh.shape)} over {jax.device_count()} devices "
        f"({jax.process_count()} process(es))")
    if jax.process_index() == 0:
        R.write_run_config(c, workdir)
    data = TrainBatches(ddir, tokenizer, bcfg, jax.process_index(), jax.process_count(), prefetch=c.data.prefetch)
    s = dataclasses.replace(s, shapes=probe_batch_shapes(data.batch(0), s.k_read, jax.process_count()))
    refresher, index_abs, s = _index_refresher(c, s, ddir, tokenizer, bcfg)
    steps = _Steps(c, s, index_abs, R.latest_step(workdir))
    ckpt = R.Checkpoints(workdir, c.train.keep)
    state = _restore_or_init(ckpt, c, s, data, init_params, refresher, index_abs)
    writer = MetricWriter(workdir)
    result, state = _run_steps(c, s, steps, state, data, ckpt, refresher, index_abs, _DevEval(c, cfg, ddir, tokenizer),
                               writer)
    if refresher is not None and refresher.scann_slot is not None:  # the run's host searchers go with it
        from ..retrieval.scann_backend import unpublish

        unpublish(refresher.scann_slot)
    if result["stopped_early"] is not True:  # an interrupted run has no final evaluation
        _final_evaluation(c, cfg, state["params"], ddir, tokenizer, result, writer, workdir)
    writer.close()
    _sync_end()
    return result


MINED_EXCLUDE = 64  # passages per row that mined negatives must not be (gold first, then answer-containing)


def _check_oracle(c, ddir: str) -> None:
    """Oracle reading in eval.modes / eval.dev_modes of a task whose examples have no gold passage: a config
    error before training, not a failed evaluation after it."""
    from ..data.pipeline import available_tasks
    from ..infer.imprag import NoGoldError

    E = c.eval
    for tasks, modes, limit in ((E.tasks, E.modes, E.limit), (E.get("dev_tasks", ""), E.get("dev_modes", ""),
                                                              E.get("dev_limit", 0))):
        modes = R.parse_list(modes)
        if "oracle" not in modes:
            continue
        have = available_tasks(ddir, E.split)
        try:
            evaluation.check_oracle(ddir, [t for t in R.parse_list(tasks) if t in have], modes, E.split,
                                    int(limit) if limit else None)
        except NoGoldError as e:
            raise config_lib.ConfigError(f"eval: {e}") from None


def _data_dir(c, workdir: str) -> str:
    """The run's data folder, generated or prepared on first use (by one process in a multi-process run)."""
    if jax.process_count() > 1:  # one writer for a generated world and its record files
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            from ..data.pipeline import prepare_records

            prepare_records(R.training_data_dir(c, workdir), None, ["train"])
        multihost_utils.sync_global_devices("imprag_jax:data")
    return R.training_data_dir(c, workdir)


def _model_and_tokenizer(c, ddir: str, workdir: str):
    """(tokenizer, ModelConfig, initial params or None): model.init's weights, or train.init_from's (another
    run's parameters) when this run starts rather than resumes."""
    tokenizer = R.tokenizer(c, ddir) if c.model.init == "random" else None
    cfg, pre_params, pre_tok = R.load_model(c, tokenizer.vocab_size if tokenizer else None)
    if _init_from(c) and R.latest_step(workdir) == 0:
        pre_params = params_from_run(_init_from(c), cfg)
    tokenizer = tokenizer or pre_tok or R.tokenizer(c, ddir)
    return tokenizer, cfg, pre_params


def _index_refresher(c, s: Setup, ddir: str, tokenizer, bcfg):
    """Negatives mined from the model's own index (train.candidates index/mixed): the refresher that re-encodes
    the knowledge source every refresh_every steps, the index's abstract arrays, and the step config that mines.
    (None, None, s) for pseudo-labelled candidates."""
    T = c.train
    if T.candidates == "pseudo":
        return None, None, s
    from ..data.pipeline import corpus_tokens
    from ..retrieval import IndexRefresher
    from ..retrieval.index import padded_rows
    from .state import index_specs

    backend = T.get("index_backend", "exact")
    # train.index_backend = "scann": every refresh also builds a host ScaNN searcher from the same embeddings and
    # publishes it in a slot of this run, which the compiled step's pure_callback searches
    slot = f"train:{uuid.uuid4().hex[:12]}" if backend == "scann" else None
    if evaluation.multi_process():  # each process tokenizes and encodes the index rows of its own devices
        # (index_backend 'scann', a host searcher of the whole index, is refused with several processes: step_config)
        from ..infer.imprag import passage_texts

        n = len(passage_texts(ddir))
        refresher = IndexRefresher(T.refresh_every, cfg=s.cfg, n=n, l_max=bcfg.l_max, batch_size=256, mesh=s.mesh,
                                   tokenize=lambda rows: corpus_tokens(ddir, tokenizer, bcfg.l_max, rows=rows),
                                   index_mesh=s.mesh, keep_tokens=True)
    else:
        ctoks, cmask = corpus_tokens(ddir, tokenizer, bcfg.l_max)
        n = len(ctoks)
        refresher = IndexRefresher(T.refresh_every, cfg=s.cfg, tokens=ctoks, mask=cmask, batch_size=256,
                                   mesh=s.mesh, index_mesh=s.mesh, keep_tokens=True, scann_slot=slot,
                                   progress=True)  # a bar on a terminal: the first index of a large corpus: minutes
    n_neg_slots = bcfg.k - (bcfg.n_pos if bcfg.positives != "gold" else 1)
    n_rep = n_neg_slots if T.candidates == "index" else min(T.index_negatives, n_neg_slots)
    sc = dataclasses.replace(s.sc, candidates=T.candidates, n_replace=max(1, n_rep), n_index=n,
                             index_backend=backend, scann_slot=slot or "")
    index_abs = index_specs(padded_rows(n, s.mesh), s.cfg.retrieval_dim, bcfg.l_max, s.mesh)
    return refresher, index_abs, dataclasses.replace(s, sc=sc)


class _Steps:
    """The compiled step of every retrieval stage the remaining steps use (and the per-loss gradient-norm probes
    when train.log_grad_norms), with the stage schedule."""

    def __init__(self, c, s: Setup, index_abs, start: int):
        T = c.train
        R_steps = int(T.get("retrieval_steps", 0))
        self.stage_of = lambda step: stage_at(step, T.steps, T.warmup_share, T.stages, R_steps)
        needed = sorted({self.stage_of(i) for i in range(start, T.steps)} or {self.stage_of(0)})
        self.compiled, self.probes = {}, {}
        for stage in needed:
            t0 = time.time()
            self.compiled[stage], self.shard = compile_step(s.cfg, s.sc, stage, s.tx, s.mesh, s.shapes, s.rules,
                                                            index_abstract=index_abs)
            mem = memory_report(self.compiled[stage])
            log(f"[train] compiled the '{stage}' step in {time.time() - t0:.1f}s; per-device memory: "
                + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items() if v))
            if T.get("log_grad_norms", False) and not T.closed_book:
                self.probes[stage], _ = compile_step(s.cfg, s.sc, stage, s.tx, s.mesh, s.shapes, s.rules,
                                                     index_abstract=index_abs, kind="grad_norms")



def _restore_or_init(ckpt, c, s: Setup, data, init_params, refresher=None, index_abs=None):
    """The latest checkpoint's state (and the data iterator's position, and the index negatives are mined from),
    else a new state."""
    latest = ckpt.latest_step()
    if latest is None:
        return create_state(s.cfg, s.tx, s.mesh, jax.random.key(c.seed), params=init_params, rules=s.rules)
    s_shard, s_abs = state_shardings(s.cfg, s.tx, s.mesh, s.rules)
    state, data_state, _ = ckpt.restore(latest, s_abs, s_shard)
    data.set_state(data_state)
    log(f"[train] resumed from step {latest} ({ckpt.dir})")
    if refresher is not None:  # mine from the index the interrupted run had, not one encoded by today's params
        saved = ckpt.restore_index(latest, index_abs["emb"])
        if saved is not None and refresher.resume(saved[0], saved[1]["step"], saved[1]["config_hash"]):
            log(f"[train] index of step {saved[1]['step']} restored with the checkpoint")
        else:
            log(f"[train] the checkpoint has no usable index: encoding one with the parameters of step {latest}")
    return state


class _DevEval:
    """The dev curve: evaluation on eval.dev_tasks every eval_every steps (its time is kept out of the speed
    figures)."""

    def __init__(self, c, cfg, ddir: str, tokenizer):
        self.c, self.cfg, self.ddir, self.tokenizer = c, cfg, ddir, tokenizer
        self.corpus = None
        self.seconds = 0.0

    def __call__(self, params, at: int, writer) -> float:
        """Evaluate, log, write the metrics; returns the seconds it took."""
        from ..data.pipeline import corpus_tokens

        t0 = time.time()
        c = self.c
        if self.corpus is None and not evaluation.multi_process():  # several processes: each tokenizes its rows
            self.corpus = corpus_tokens(self.ddir, self.tokenizer, c.data.l_max)
        rows = evaluation.evaluate(params, self.cfg, c, self.ddir, self.tokenizer, tasks=R.parse_list(c.eval.dev_tasks),
                                   limit=c.eval.dev_limit, modes=R.parse_list(c.eval.dev_modes),
                                   ks=[1], ks_for=evaluation.training_ks, step=at, corpus=self.corpus)
        writer.write(at, {f"dev/{r['task']}/{r['mode']}/{key}": v for r in rows for key, v in r.items()
                          if isinstance(v, float)})
        log(f"[dev] step {at}: " + "; ".join(
            f"{r['task']} {r['mode']} " + " ".join(f"{key} {r[key]:.3f}" for key in
                                                  ("em", "gold_recall@1", "gold_recall@5", "gold_recall@20")
                                                  if r.get(key) is not None)
            + (f" (with gold {r['n_gold']}/{r['n']})" if r.get("n_gold") is not None and r["n_gold"] < r["n"]
               else "") for r in rows))
        dt = time.time() - t0
        self.seconds += dt
        return dt


def _run_steps(c, s: Setup, steps: _Steps, state, data, ckpt, refresher, index_abs, dev: _DevEval, writer):
    """The training loop from the state's step to train.steps (or a stop: a signal, stop_at_step, the time
    budget), with logging, checkpoints and the dev curve; the last step is always saved. Returns (result, state)."""
    from tqdm import tqdm

    T = c.train
    start = int(jax.device_get(state["step"]))

    def save(step, force=False):
        ckpt.save(step, state, data.get_state(), s.cfg, c.name, force=force,
                  index=refresher.index if refresher is not None else None)

    stopper = _Stop()
    B_glob, L_tok = s.shapes["mask"][0]
    Bf_glob, Lf_tok = s.shapes["free_mask"][0] if "free_mask" in s.shapes else (0, 0)
    # token slots processed per step: retrieval rows (prompt+response and passage slots) and retrieval-free rows
    tokens_per_step = int(B_glob * (L_tok + s.k_read * c.data.l_max) + Bf_glob * Lf_tok)
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

    if T.eval_every and start == 0:  # the curve starts at the initial weights
        t_last += dev(state["params"], 0, writer)
    _count_compiles()
    float(s.sched(start))  # warm the eager schedule ops so logging never compiles inside the loop
    try:
        for step in range(start, T.steps):
            stage = steps.stage_of(step)
            host = data.batch(step) if step == start else next_batch
            if T.closed_book:
                host = _drop_passages(host)
            batch = _global_batch(host, steps.shard["batch"])
            ramp = 1.0 if T.score_bias_ramp <= 0 else min(1.0, step / T.score_bias_ramp)
            index_arrays = None
            if refresher is not None:
                # a new index, or (resumed) the checkpoint's, the first time
                if refresher.maybe_refresh(step, state["params"]) is not None or cur_index is None:
                    ix = refresher.index
                    cur_index = {"emb": ix.embeddings.astype(index_abs["emb"].dtype),
                                 "tokens": ix.tokens.astype(jnp.int32), "mask": ix.mask.astype(jnp.int32),
                                 "step": jax.device_put(np.int32(int(jax.device_get(ix.step))),
                                                         index_abs["step"].sharding)}
                index_arrays = cur_index
            log_step = (step + 1) % T.log_every == 0 or step + 1 == T.steps
            probe = steps.probes.get(stage) if log_step else None
            # per-loss gradient norms on this step's batch, before the step donates the state
            norms = probe(state, batch, jnp.float32(ramp), index_arrays) if probe is not None else None
            state, metrics = steps.compiled[stage](state, batch, jnp.float32(ramp), index_arrays)
            if "clipped" in metrics:
                n_clipped = n_clipped + metrics["clipped"]
            data.set_state({"step": step + 1})
            next_batch = data.batch(step + 1) if step + 1 < T.steps else None  # overlaps with the device step
            if log_step:
                now = time.time()
                m = _step_metrics(metrics, norms, n_clipped, step + 1 - s_last, now - t_last, tokens_per_step,
                                  stage=stage, lr=float(s.sched(step)), elapsed_s=now - t_start)
                n_clipped = jnp.zeros((), jnp.float32)
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
                t_last += dev(state["params"], step + 1, writer)
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
        if ckpt.latest_step() != done:
            save(done, force=True)
        ckpt.close()
        data.close()
    train_s = time.time() - t_start - dev.seconds
    result = {"step": done, "train_seconds": train_s, "dev_eval_seconds": dev.seconds, "metrics": last_metrics,
              "stopped_early": stopped_early, "planned_steps": int(T.steps),
              "compiles_after_step_2": (_COMPILES[0] - compiles_before) if compiles_before is not None else None}
    return result, state


def _step_metrics(metrics, norms, n_clipped, n_steps: int, seconds: float, tokens_per_step: int, *, stage: str,
                  lr: float, elapsed_s: float) -> Dict:
    """A log step's metrics: the step's, the gradient norms, the share of clipped updates, the stage, the learning
    rate and the speed since the last log step."""
    m = jax.device_get({**metrics, **(norms or {}), "n_clipped": n_clipped})
    m = {k: float(v) for k, v in m.items()}
    m["clip_fraction"] = m.pop("n_clipped") / max(n_steps, 1)
    m.pop("clipped", None)
    m.update(stage=stage, lr=lr, steps_per_s=n_steps / seconds, tokens_per_s=n_steps * tokens_per_step / seconds,
             elapsed_s=elapsed_s)
    return m


def _final_evaluation(c, cfg, params, ddir: str, tokenizer, result: Dict, writer, workdir: str) -> None:
    """eval.tasks x eval.modes x eval.k with the final parameters, into `result` (eval, eval_seconds),
    metrics.jsonl, eval/final.json and eval/final.md."""
    done, T = result["step"], c.train
    t0 = time.time()
    rows = evaluation.evaluate(params, cfg, c, ddir, tokenizer, tasks=R.parse_list(c.eval.tasks),
                               limit=c.eval.limit, modes=R.parse_list(c.eval.modes), ks=R.eval_ks(c),
                               ks_for=evaluation.training_ks, step=done, progress=True)
    result["eval"] = rows
    result["eval_seconds"] = time.time() - t0
    writer.write(done, {f"eval/{r['task']}/{r['mode']}/k{r['k']}/{key}": v for r in rows for key, v in r.items()
                        if isinstance(v, float)})
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "final.json"), "w") as f:
            json.dump(result, f, indent=2)
        table = evaluation.markdown_table(rows)
        if result["stopped_early"] == "budget":  # the model is not the documented one: say so where the numbers are
            table = budget_warning(T.time_budget_s, done, T.steps) + "\n\n" + table
        train_s = result["train_seconds"]
        with open(os.path.join(workdir, "eval", "final.md"), "w") as f:
            f.write(f"# {c.name}: step {done}, {train_s:.0f}s training\n\n{table}\n")
        log(f"\n[eval] step {done} ({train_s:.0f}s training, {result['eval_seconds']:.0f}s evaluation)\n{table}")


def _init_from(c) -> str:
    return str(c.train.init_from or "")


def params_from_run(run_dir: str, cfg: ModelConfig):
    """The latest checkpoint's parameters of another run (e.g. the retrieval-path run whose retriever formed), as
    the initial weights of this one; its architecture must be this config's (the ImpRAG split may differ)."""
    try:
        params, step, have = R.restore_params(run_dir)
    except R.RunError as e:
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


def _drop_passages(b):
    b = dict(b)
    b["passages"] = b["passages"][:, :0]
    b["passage_mask"] = b["passage_mask"][:, :0]
    b["passage_ids"] = b["passage_ids"][:, :0]
    b["positives"] = b["positives"][:, :0]
    return b
