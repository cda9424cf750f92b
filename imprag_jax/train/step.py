"""The ImpRAG train step: one jitted function computes E_q, fresh E_p (with gradient), the reader's generation loss
over all k candidates, the per-candidate teacher log-likelihoods (self-distillation stage, under stop_gradient),
the retrieval loss and the optax update.

    prompt ─► bottom ─► E_q ─────────────────────────────┐
    candidates ─► bottom (each alone) ─► E_p ─► s(q,p) ───┼─► J_ret (NCE | KL)
                      └─► middle (joint) ─► passage K/V   │
    prompt ─► middle (+ passage K/V) ─► top ─► J_gen      │
    prompt ×k ─► middle (one passage each) ─► top ─► log P(r|p,q) (stop_gradient) ─► P_T

Two programs are compiled ahead of the loop, one per retrieval stage ("warmup" = NCE, "distill" = KL); neither
recompiles afterwards (the batch has fixed shapes and the step-dependent scalars are arguments).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict

import jax
import jax.numpy as jnp
import optax

from ..model import ModelConfig
from ..model.transformer import (PassageKV, logits_from_hidden, passage_kv, prompt_offset, prompt_through,
                                 retrieval_embedding, run_bottom)
from . import losses

BATCH_KEYS = ("tokens", "mask", "prompt_mask", "loss_mask", "passages", "passage_mask", "passage_ids", "positives")
FREE_KEYS = ("free_tokens", "free_mask", "free_loss_mask")  # retrieval-free rows, when the batch has them
# [B, X] passage rows mined negatives must not be (gold, answer-containing; -1 padded), when the batch has them
MINED_KEYS = ("mined_exclude",)
# [B, L_q] E_q's own prompt (data.query_filler_split: the filled prompt, while the reader reads `tokens`), when present
QUERY_KEYS = ("query_tokens", "query_mask")


def step_keys(batch) -> tuple:
    """The keys of `batch` the step reads (BATCH_KEYS, plus FREE_KEYS / MINED_KEYS / QUERY_KEYS when the batch has
    them)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}")
    return BATCH_KEYS + tuple(k for k in FREE_KEYS + MINED_KEYS + QUERY_KEYS if k in batch)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static hyperparameters of the compiled step (changing one means a new program)."""

    r_len: int = 8  # response tokens scored per example (the pipeline's L_r)
    r_len_free: int = 0  # response tokens scored per retrieval-free row (plain-LM rows: the row length); 0 = r_len
    lam: float = 1.0  # weight of J_ret
    tau_t: float = 1.0
    tau_r: float = 1.0
    nce_reduction: str = "sum"
    score_bias: bool = False  # extension: add log_softmax_j s(q,p_j) to the attention logits of passage j
    score_bias_grad: bool = False
    accum: int = 1  # gradient accumulation micro-steps
    teacher_chunks: int = 1  # >1: read the k teacher copies in chunks (lower peak memory)
    candidates: str = "pseudo"  # "pseudo" | "index" | "mixed": negatives mined from the model's own index
    n_replace: int = 0  # negatives replaced by mined passages per example ("index": all of them)
    n_index: int = 0  # real rows of the device index (static)
    index_backend: str = "exact"  # mining search: "exact" | "binned" (device, retrieval.search) | "scann" (host
    #                               ScaNN through jax.pure_callback: the searcher published in scann_slot)
    scann_slot: str = ""
    clip: float = 0.0  # the optimizer's global-norm clip (only for the "clipped" metric; 0 = none)
    teacher_len: int = 0  # >0: the teacher reads only the first teacher_len prompt+response tokens (rows that are
    #                       longer leave the KL); saves the B*k prompt copies' padding when retrieval rows are short


# ---------------------------------------------------------------------------------------------------- forward


def _response_logprobs(params, cfg, hidden, tokens, loss_mask, r_len):
    src, tgt, valid = losses.response_positions(loss_mask, r_len)
    h = jnp.take_along_axis(hidden, src[..., None], axis=1)  # [B, r, d]
    logits = logits_from_hidden(params, cfg, h)
    lp = losses.token_logprobs(logits, jnp.take_along_axis(tokens, tgt, axis=1))
    return lp, valid


def teacher_loglik(params, cfg: ModelConfig, sc: StepConfig, h_q, mask, tokens, loss_mask, h_p, passage_mask):
    """log P(r | p_j, q) for every candidate j: the prompt reads candidate j alone (mean over response tokens).

    Reuses the student's bottom-group states (each passage was encoded alone there); the passages go through the
    middle group independently, in their own slots, so copy (i, j) sees exactly passage j of example i.
    """
    params, h_q, h_p = jax.lax.stop_gradient((params, h_q, h_p))
    B, k, L, d = h_p.shape
    pkv = passage_kv(params, cfg, h_p, passage_mask, attention="independent")
    n_mid = pkv.k.shape[0]
    kk = pkv.k.reshape(n_mid, B, k, L, *pkv.k.shape[3:])
    vv = pkv.v.reshape(n_mid, B, k, L, *pkv.v.shape[3:])
    pm = passage_mask.astype(bool)
    off = prompt_offset(cfg, k, L)
    # keys of passage j keep their slot positions (j*L ..), as in the student's read

    def one(j):  # all examples, candidate j (j may be a traced index)
        kv = PassageKV(jnp.take(kk, j, axis=2), jnp.take(vv, j, axis=2), jnp.take(pm, j, axis=1))
        h = prompt_through(params, cfg, h_q, mask, kv, off)
        lp, valid = _response_logprobs(params, cfg, h, tokens, loss_mask, sc.r_len)
        v = valid.astype(jnp.float32)
        return (lp * v).sum(-1) / jnp.maximum(v.sum(-1), 1.0)  # [B]

    if sc.teacher_chunks > 1:
        return jax.lax.map(one, jnp.arange(k)).T  # [B, k], sequential over candidates

    # batched: B*k prompt copies at once
    rep = lambda x: jnp.repeat(x, k, axis=0)
    kv = PassageKV(kk.reshape(n_mid, B * k, L, *kk.shape[4:]), vv.reshape(n_mid, B * k, L, *vv.shape[4:]),
                   pm.reshape(B * k, L))
    # copy (i, j) = row i*k + j holds passage j's keys, already rotated at their slot-j positions
    h = prompt_through(params, cfg, rep(h_q), rep(mask), kv, off)
    lp, valid = _response_logprobs(params, cfg, h, rep(tokens), rep(loss_mask), sc.r_len)
    v = valid.astype(jnp.float32)
    return ((lp * v).sum(-1) / jnp.maximum(v.sum(-1), 1.0)).reshape(B, k)


def mine_from_index(e_q, batch, index, sc: StepConfig):
    """Replace up to `sc.n_replace` negative candidates per example with the best-scoring passages of the model's
    own index (E_q under stop_gradient) that are not already candidates and not one of the row's
    `mined_exclude` passages (its gold passages and those containing an answer string, when the batch has
    them: a passage that answers the question is no negative).

    The search is `sc.index_backend`: "exact" / "binned" in-graph over `index["emb"]` (sharded over the mesh),
    or "scann": the host ScaNN searcher published in slot `sc.scann_slot` (built from the same embeddings at
    the same refresh), called through `jax.pure_callback` with the queries of every data shard gathered;
    `index["step"]` (when present) names the index the searcher must have been built from."""
    from ..model.sharding import current
    from ..retrieval.search import search

    B, k = batch["passage_ids"].shape
    excl = batch.get("mined_exclude")
    X = 0 if excl is None else excl.shape[1]
    m = min(sc.n_replace + k + X, sc.n_index)
    ctx = current()
    mesh = ctx[0] if ctx is not None and ctx[0].size > 1 else None
    q = jax.lax.stop_gradient(e_q)
    if sc.index_backend == "scann":
        from ..retrieval.scann_backend import slot_search_in_graph

        _, ids = slot_search_in_graph(sc.scann_slot, q, m, d=q.shape[-1], step=index.get("step"), mesh=mesh)
    else:
        _, ids = search(index["emb"], q, m, sc.index_backend, n_valid=sc.n_index, mesh=mesh)
    own = batch["passage_ids"]
    dup = (ids[:, :, None] == own[:, None, :]).any(-1) | (ids < 0)
    if excl is not None:
        dup = dup | ((ids[:, :, None] == excl[:, None, :]) & (excl[:, None, :] >= 0)).any(-1)
    order = jnp.where(dup, -1e9, -jnp.arange(m, dtype=jnp.float32)[None])  # keep search order, drop duplicates
    _, sel = jax.lax.top_k(order, sc.n_replace)
    mined = jnp.take_along_axis(ids, sel, axis=1)
    ok = ~jnp.take_along_axis(dup, sel, axis=1)
    neg = batch["positives"] == 0
    rank = jnp.clip(jnp.cumsum(neg, axis=1) - 1, 0, sc.n_replace - 1)
    replace = neg & (jnp.cumsum(neg, axis=1) <= sc.n_replace) & jnp.take_along_axis(ok, rank, axis=1)
    new_ids = jnp.where(replace, jnp.take_along_axis(mined, rank, axis=1), own)
    safe = jnp.maximum(new_ids, 0)
    out = dict(batch)
    out["passage_ids"] = new_ids
    out["passages"] = jnp.where(replace[..., None], jnp.take(index["tokens"], safe, axis=0), batch["passages"])
    out["passage_mask"] = jnp.where(replace[..., None], jnp.take(index["mask"], safe, axis=0).astype(
        batch["passage_mask"].dtype), batch["passage_mask"])
    return out, replace


def free_rows_nll(params, cfg: ModelConfig, sc: StepConfig, batch):
    """(sum of -log p, token count) over the retrieval-free rows: the plain decoder, no passages."""
    if "free_tokens" not in batch:
        z = jnp.zeros((), jnp.float32)
        return z, z
    t, m = batch["free_tokens"], batch["free_mask"]
    h = prompt_through(params, cfg, run_bottom(params, cfg, t, m), m, None, 0)
    lp, valid = _response_logprobs(params, cfg, h, t, batch["free_loss_mask"], sc.r_len_free or sc.r_len)
    return losses.generation_nll(lp, valid)


def _retrieval_health(metrics, scores, pos, valid, example_mask):
    """Own-candidate top-1 rate (tie-aware) and its chance level, over the examples that take the retrieval loss."""
    n = jnp.maximum(example_mask.sum(), 1)
    hit = losses.top1_hit(scores, pos, valid)
    chance = pos.sum(-1) / jnp.maximum(valid.sum(-1), 1)
    metrics["cand_top1_is_pos"] = jnp.where(example_mask, hit, 0.0).sum() / n
    metrics["cand_top1_chance"] = jnp.where(example_mask, chance, 0.0).sum() / n


def loss_fn(params, cfg: ModelConfig, sc: StepConfig, stage: str, batch: Dict[str, jax.Array], bias_scale,
            index=None, part: str = "total"):
    """(J, metrics). part: which loss is returned for differentiation -- "total" (J_gen + lam * J_ret, the step),
    "gen" or "ret" (the per-loss gradient norms at log steps); the metrics are the same for all three.

    stage "retrieval" trains the retrieval path alone: the bottom group (embeddings frozen) and layer b's q/k
    projections under the NCE, nothing above layer b is run."""
    if stage == "retrieval":  # the embedding table is also the LM head: keep it out of a retrieval-only update
        params = {**params, "embed": jax.lax.stop_gradient(params["embed"])}
    tokens, mask = batch["tokens"], batch["mask"]
    h_q = run_bottom(params, cfg, tokens, mask)
    if "query_tokens" in batch:  # E_q from its own prompt: one more bottom-group pass over [B, L_q]
        qm = batch["query_mask"]
        e_q = retrieval_embedding(params, cfg, run_bottom(params, cfg, batch["query_tokens"], qm), qm, "q")
    else:
        e_q = retrieval_embedding(params, cfg, h_q, batch["prompt_mask"], "q")
    mined = None
    if index is not None and sc.n_replace > 0:
        batch, mined = mine_from_index(e_q, batch, index, sc)
    z = jnp.zeros((), jnp.float32)
    free_sum, free_n = free_rows_nll(params, cfg, sc, batch) if stage != "retrieval" else (z, z)
    pmask = batch["passage_mask"]
    B, k, L = batch["passages"].shape
    if k == 0:  # closed book: the plain decoder, generation loss only
        h = prompt_through(params, cfg, h_q, mask, None, 0)
        lp, rvalid = _response_logprobs(params, cfg, h, tokens, batch["loss_mask"], sc.r_len)
        gen_sum, n_tok = losses.generation_nll(lp, rvalid)
        gen = (gen_sum + free_sum) / jnp.maximum(n_tok + free_n, 1.0)
        return (z if part == "ret" else gen), {"gen_nll": gen, "n_tokens": n_tok + free_n, "n_ret_examples": z,
                                               "cand_top1_is_pos": z, "ret_loss": z, "loss": gen}
    valid = (pmask.sum(-1) > 0) & (batch["passage_ids"] >= 0)  # [B, k]
    example_mask = valid.any(-1)

    # bottom group: each candidate alone (the prompt's ran above)
    flat_t, flat_m = batch["passages"].reshape(B * k, L), pmask.reshape(B * k, L)
    h_p = run_bottom(params, cfg, flat_t, flat_m)
    e_p = retrieval_embedding(params, cfg, h_p, flat_m, "k").reshape(B, k, -1)
    h_p = h_p.reshape(B, k, L, -1)
    scores = jnp.einsum("bd,bkd->bk", e_q, e_p, preferred_element_type=jnp.float32)

    if stage == "retrieval":
        gen = z
        metrics = {"gen_nll": z, "n_tokens": z}
    else:
        bias = None
        if sc.score_bias:
            g = jax.nn.log_softmax(jnp.where(valid, scores, losses.NEG), axis=-1)
            g = jnp.where(valid, g, 0.0)
            if not sc.score_bias_grad:
                g = jax.lax.stop_gradient(g)
            bias = (bias_scale * jnp.repeat(g, L, axis=1))  # [B, k*L]

        # middle (passages jointly) and the prompt's reading
        pkv = passage_kv(params, cfg, h_p, pmask)
        h = prompt_through(params, cfg, h_q, mask, pkv, prompt_offset(cfg, k, L), bias)
        lp, rvalid = _response_logprobs(params, cfg, h, tokens, batch["loss_mask"], sc.r_len)
        gen_sum, n_tok = losses.generation_nll(lp, rvalid)
        gen = (gen_sum + free_sum) / jnp.maximum(n_tok + free_n, 1.0)  # every response token of the batch weighs the same
        metrics = {"gen_nll": gen, "n_tokens": n_tok + free_n}

    metrics["n_ret_examples"] = example_mask.sum().astype(jnp.float32)
    if mined is not None:
        metrics["mined_per_example"] = mined.sum() / jnp.maximum(example_mask.sum(), 1)
    pos = (batch["positives"] > 0) & valid
    _retrieval_health(metrics, jax.lax.stop_gradient(scores), pos, valid, example_mask)
    metrics["score_mean"] = jnp.where(valid, scores, 0.0).sum() / jnp.maximum(valid.sum(), 1)
    metrics["score_std"] = jnp.sqrt(jnp.maximum(jnp.where(valid, (scores - metrics["score_mean"]) ** 2, 0.0).sum()
                                                / jnp.maximum(valid.sum(), 1), 0.0))

    ret = z
    if stage in ("warmup", "retrieval"):
        ret, _, st = losses.multilabel_nce(e_q, e_p, batch["positives"], batch["passage_ids"],
                                           valid.astype(jnp.int32), example_mask, sc.nce_reduction, stats=True)
        metrics["nce"] = ret
        metrics["ret_chance"] = st["nce_chance"]
        metrics["inbatch_top1_is_pos"] = st["inbatch_top1_is_pos"]
        metrics["inbatch_top1_chance"] = st["inbatch_top1_chance"]
    elif stage == "distill":
        Lt = sc.teacher_len if 0 < sc.teacher_len < tokens.shape[1] else tokens.shape[1]
        t_ll = teacher_loglik(params, cfg, sc, h_q[:, :Lt], mask[:, :Lt], tokens[:, :Lt], batch["loss_mask"][:, :Lt],
                              h_p, pmask)
        kl_rows = example_mask & (mask[:, Lt:].sum(-1) == 0) if Lt < tokens.shape[1] else example_mask
        ret, p_t, p_r = losses.self_distillation_kl(t_ll, scores, valid, kl_rows, sc.tau_t, sc.tau_r)
        metrics["kl"] = ret
        use = kl_rows & (valid.sum(-1) > 1)
        metrics["ret_chance"] = jnp.where(use, losses.kl_chance(p_t, valid), 0.0).sum() / jnp.maximum(use.sum(), 1)
        tt = jnp.argmax(jnp.where(valid, t_ll, losses.NEG), axis=-1)
        metrics["teacher_top1_is_pos"] = ((jnp.take_along_axis(pos, tt[:, None], 1)[:, 0]) & example_mask).sum() \
            / jnp.maximum(example_mask.sum(), 1)
    elif stage != "none":
        raise ValueError(f"unknown stage {stage!r}")
    total = gen + sc.lam * ret
    metrics["ret_loss"] = ret
    metrics["loss"] = total
    return {"total": total, "gen": gen, "ret": ret}[part], metrics


def loss_grad_norms(state, batch, bias_scale, index=None, *, cfg: ModelConfig, sc: StepConfig, stage: str):
    """Global norms of d J_gen / d params and d J_ret / d params (before clipping; J_ret without lam), computed
    with two separate gradients on the same batch. Diagnostic: the trainer calls it at log steps only."""
    batch = {k: batch[k] for k in step_keys(batch)}
    out = {}
    for part in ("gen", "ret"):
        g = jax.grad(lambda p: loss_fn(p, cfg, sc, stage, batch, bias_scale, index, part=part)[0])(state["params"])
        out[f"grad_norm_{part}"] = optax.tree.norm(g)
    return out


# ---------------------------------------------------------------------------------------------------- optimizer


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, *, end_lr_ratio: float = 0.05,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8,
                   clip: float = 1.0):
    """AdamW with linear warmup and cosine decay, global-norm clipping; no decay on norm scales."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
                                               end_value=lr * end_lr_ratio)
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), p)
    tx = optax.chain(optax.clip_by_global_norm(clip) if clip and clip > 0 else optax.identity(),
                     optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return tx, sched


# ---------------------------------------------------------------------------------------------------- the step


def _split_micro(x, accum):
    # rows are laid out so that micro-batch a = rows a, a+A, a+2A, ...: the sharded batch dim stays first
    b = x.shape[0] // accum
    return jnp.swapaxes(x.reshape(b, accum, *x.shape[1:]), 0, 1)


def train_step(state, batch, bias_scale, index=None, *, cfg: ModelConfig, sc: StepConfig, stage: str, tx):
    """state = {"params", "opt_state", "step"} -> (new state, metrics). Pure; jit it with `compile_step`.

    index: optional {"emb" [N, D], "tokens" [N, l], "mask" [N, l], "step" []} (the device PassageIndex and the
    parameter step that encoded it) for mined candidates.
    """
    params = state["params"]
    grad_fn = jax.value_and_grad(partial(loss_fn, cfg=cfg, sc=sc, stage=stage, index=index), has_aux=True)
    batch = {k: batch[k] for k in step_keys(batch)}
    if sc.accum == 1:
        (_, metrics), grads = grad_fn(params, batch=batch, bias_scale=bias_scale)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, sc.accum), batch)

        def body(acc, mb):
            (_, m), g = grad_fn(params, batch=mb, bias_scale=bias_scale)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        m0 = jax.eval_shape(lambda: grad_fn(params, batch=jax.tree.map(lambda x: x[0], micro),
                                             bias_scale=bias_scale)[0][1])
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), micro)
        grads = jax.tree.map(lambda g: g / sc.accum, grads)
        metrics = {k: (v if k.startswith("n_") else v / sc.accum) for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if sc.clip > 0:
        metrics["clipped"] = (metrics["grad_norm"] > sc.clip).astype(jnp.float32)
    metrics["param_norm"] = optax.tree.norm(new_params)
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
