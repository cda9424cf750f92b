"""ImpRAG's losses, written out by hand (every reduction is explicit; see tests/test_losses.py).

  J = J_gen + lambda * J_ret
  J_gen : mean negative log-likelihood of the response tokens (all tokens of the global batch weigh the same).
  J_ret : warmup           -> multi-label NCE (paper Eq. 3) over the pseudo-positives P(q), the hard negatives
                              N_h(q) and in-batch negatives from the whole (global) batch;
          self-distillation -> KL(P_T || P_R) (Eqs. 4-6), P_T = softmax(logP(r|p,q) / tau_t) under stop_gradient,
                              P_R = softmax(s(q,p) / tau_r); summed over the candidates, averaged over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30


def response_positions(loss_mask, r_len: int):
    """Positions whose logits predict the response tokens: ([B, r_len] gather index, [B, r_len] validity).

    loss_mask [B, L] marks the response tokens (a contiguous span). The token at position i is predicted by the
    logits at i-1, so we gather the hidden states at first-1 .. first+r_len-2.
    """
    B, L = loss_mask.shape
    first = jnp.argmax(loss_mask, axis=1)  # first response token
    tgt = first[:, None] + jnp.arange(r_len)[None]  # target token positions
    valid = (tgt < L) & (jnp.take_along_axis(loss_mask, jnp.clip(tgt, 0, L - 1), axis=1) > 0) & (tgt >= 1)
    src = jnp.clip(tgt - 1, 0, L - 1)
    return src, jnp.clip(tgt, 0, L - 1), valid


def token_logprobs(logits, targets):
    """log p(target) under fp32 logits [..., V]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return tgt - lse


def generation_nll(token_lp, valid):
    """J_gen: sum of -log p over valid response tokens, and their count (divide after summing over the batch)."""
    v = valid.astype(jnp.float32)
    return -(token_lp * v).sum(), v.sum()


def multilabel_nce(e_q, e_p, positives, passage_ids, valid, example_mask, reduction: str = "sum",
                   stats: bool = False):
    """Multi-label NCE (paper Eq. 3) with in-batch negatives.

    e_q [B, D]; e_p [B, k, D] (the candidates' embeddings); positives, valid [B, k] (0/1); passage_ids [B, k]
    (knowledge-source rows, -1 = none); example_mask [B] (1 = example takes the retrieval loss).
    For query i every candidate of every example in the batch is scored. Its negatives are all valid
    candidates that are not one of its positives (same passage id = same passage, wherever it appears);
    each positive is contrasted against the negatives only:
        -sum_{p in P(i)} log( e^{s_ip} / (e^{s_ip} + sum_{n in N(i)} e^{s_in}) ).
    reduction "sum" (the paper: sum over positives) or "mean" (divided by |P(i)|); then mean over examples.
    Returns (loss, number of examples that have a positive), and with `stats=True` a third item:
      nce_chance           the loss of a retriever that scores every candidate the same (each positive's term is
                           log(1 + |N(i)|)): the value the NCE sits at when it learns nothing;
      inbatch_top1_is_pos  the share of examples whose best-scored candidate among all the batch's candidates is
                           one of its positives (ties share the credit, so equal scores give exactly the chance);
      inbatch_top1_chance  that share for a random choice: |positives of i in the batch| / |batch candidates|.
    """
    B, k, D = e_p.shape
    flat = e_p.reshape(B * k, D)
    s = jnp.einsum("bd,nd->bn", e_q, flat, preferred_element_type=jnp.float32)  # [B, B*k]
    ids = passage_ids.reshape(B * k)
    fvalid = valid.reshape(B * k) > 0
    own = jnp.arange(B)[:, None] == jnp.repeat(jnp.arange(B), k)[None, :]  # [B, B*k]
    pos_own = own & (positives.reshape(B * k) > 0)[None, :] & fvalid[None, :]
    # a candidate is "positive for i" if it is one of i's positives or the same passage id as one of them
    own_pos_ids = jnp.where((positives > 0) & (valid > 0), passage_ids, -2)  # [B, k]
    same = (ids[None, :, None] == own_pos_ids[:, None, :]).any(-1) & (ids[None, :] >= 0)  # [B, B*k]
    is_pos_passage = pos_own | same
    neg = fvalid[None, :] & ~is_pos_passage
    neg_lse = jax.nn.logsumexp(jnp.where(neg, s, NEG), axis=1)  # [B]
    per_pos = s - jnp.logaddexp(s, neg_lse[:, None])  # log(e^s / (e^s + sum neg))
    npos = pos_own.sum(1)
    per_ex = -(jnp.where(pos_own, per_pos, 0.0)).sum(1)
    if reduction == "mean":
        per_ex = per_ex / jnp.maximum(npos, 1)
    use = (example_mask > 0) & (npos > 0)
    n = use.sum()
    loss = jnp.where(use, per_ex, 0.0).sum() / jnp.maximum(n, 1)
    if not stats:
        return loss, n
    mean_over = lambda x: jnp.where(use, x, 0.0).sum() / jnp.maximum(n, 1)
    term = jnp.log1p(neg.sum(1).astype(jnp.float32))  # [B]
    chance = term if reduction == "mean" else term * npos
    pos_in_batch = is_pos_passage & fvalid[None, :]
    top = top1_hit(s, pos_in_batch, jnp.broadcast_to(fvalid[None, :], s.shape))
    rate = pos_in_batch.sum(1) / jnp.maximum(fvalid.sum(), 1)
    return loss, n, {"nce_chance": mean_over(chance), "inbatch_top1_is_pos": mean_over(top),
                     "inbatch_top1_chance": mean_over(rate)}


def top1_hit(scores, is_pos, valid):
    """Per row: the share of the best-scored valid candidates that are positives (1/0 without ties; ties split the
    credit, so a row of equal scores gets exactly |positives| / |valid|). scores, is_pos, valid: [B, n]."""
    s = jnp.where(valid, scores, NEG)
    at_max = valid & (s >= s.max(-1, keepdims=True))
    return (at_max & is_pos).sum(-1) / jnp.maximum(at_max.sum(-1), 1)


def kl_chance(p_t, valid):
    """KL(P_T || uniform) per row: the self-distillation loss of a retriever that scores every candidate the same."""
    v = valid > 0
    lp = jnp.log(jnp.where(v & (p_t > 0), p_t, 1.0))
    return jnp.where(v, p_t * (lp + jnp.log(jnp.maximum(v.sum(-1, keepdims=True), 1))), 0.0).sum(-1)


def self_distillation_kl(teacher_ll, scores, valid, example_mask, tau_t: float, tau_r: float):
    """KL(P_T || P_R) over each example's candidates (Eqs. 4-6), written out by hand.

    teacher_ll [B, k]: log P_LM(r | p, q) per candidate (mean token log-likelihood), treated as constant;
    scores [B, k]: s(q, p); valid [B, k]; example_mask [B]. Sum over candidates, mean over the examples used
    (no division by k, which `KLDivLoss()`-style means would silently add).
    Returns (loss, P_T, P_R).
    """
    teacher_ll = jax.lax.stop_gradient(teacher_ll)
    v = valid > 0
    lt = jax.nn.log_softmax(jnp.where(v, teacher_ll / tau_t, NEG), axis=-1)
    lr = jax.nn.log_softmax(jnp.where(v, scores / tau_r, NEG), axis=-1)
    pt = jnp.exp(lt)
    kl = jnp.where(v, pt * (lt - lr), 0.0).sum(-1)  # [B]
    use = (example_mask > 0) & (v.sum(-1) > 1)
    n = use.sum()
    return jnp.where(use, kl, 0.0).sum() / jnp.maximum(n, 1), pt, jnp.exp(lr)


def stage_at(step, total_steps: int, warmup_share: float, stages: str, retrieval_steps: int = 0):
    """Which retrieval loss a step uses.

    The first `retrieval_steps` steps train the retrieval path alone ("retrieval": NCE on the bottom group and
    layer b's q/k projections, no generation loss; an option beyond the paper). The remaining steps follow
    `stages`: "both" (the paper) = "warmup" (NCE) for the first warmup_share of them, then "distill" (KL);
    "warmup" (NCE throughout), "distill" (KL throughout), "none" (no J_ret).
    """
    if step < retrieval_steps:
        return "retrieval"
    if stages in ("warmup", "distill", "none"):
        return stages
    if stages != "both":
        raise ValueError(f"unknown retrieval stages {stages!r}")
    rest = total_steps - retrieval_steps
    return "warmup" if step - retrieval_steps < int(round(warmup_share * rest)) else "distill"
