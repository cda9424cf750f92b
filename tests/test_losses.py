"""Each loss against values computed by hand (numpy loops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imprag_jax.train import losses


def test_response_positions_and_generation_nll():
    loss_mask = jnp.asarray([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    src, tgt, valid = losses.response_positions(loss_mask, 3)
    np.testing.assert_array_equal(np.asarray(tgt), [[2, 3, 4], [1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(src), [[1, 2, 3], [0, 1, 2]])
    np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 0], [1, 1, 1]])
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 7).astype(np.float32)
    targets = rng.randint(0, 7, (2, 3))
    lp = losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    want = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(want, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5)
    s, n = losses.generation_nll(lp, valid)
    assert float(n) == 5
    np.testing.assert_allclose(float(s), -(want * np.asarray(valid)).sum(), rtol=1e-5)


def _nce_by_hand(e_q, e_p, pos, ids, valid, use, reduction):
    B, k, _ = e_p.shape
    s = e_q @ e_p.reshape(B * k, -1).T
    out = []
    for i in range(B):
        if not use[i]:
            continue
        P = [(i, j) for j in range(k) if pos[i, j] and valid[i, j]]
        if not P:
            continue
        pos_ids = {ids[i, j] for (_, j) in P}
        negs = [a * k + b for a in range(B) for b in range(k)
                if valid[a, b] and not (a == i and pos[a, b]) and ids[a, b] not in pos_ids]
        tot = 0.0
        for (_, j) in P:
            sp = s[i, i * k + j]
            tot += -np.log(np.exp(sp) / (np.exp(sp) + sum(np.exp(s[i, n]) for n in negs)))
        out.append(tot / (len(P) if reduction == "mean" else 1))
    return np.mean(out)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_multilabel_nce_matches_hand_computation(reduction):
    rng = np.random.RandomState(1)
    B, k, D = 3, 4, 5
    e_q = rng.randn(B, D).astype(np.float32)
    e_p = rng.randn(B, k, D).astype(np.float32)
    pos = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    ids = np.array([[10, 11, 12, 13], [20, 10, 22, -1], [30, 31, 11, 33]])  # 10 and 11 reappear elsewhere
    valid = (ids >= 0).astype(np.int32)
    use = np.array([1, 1, 1])
    got, n = losses.multilabel_nce(jnp.asarray(e_q), jnp.asarray(e_p), jnp.asarray(pos), jnp.asarray(ids),
                                   jnp.asarray(valid), jnp.asarray(use), reduction)
    want = _nce_by_hand(e_q, e_p, pos, ids, valid, use, reduction)
    assert int(n) == 3
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # an example without the retrieval loss is left out
    got2, n2 = losses.multilabel_nce(jnp.asarray(e_q), jnp.asarray(e_p), jnp.asarray(pos), jnp.asarray(ids),
                                     jnp.asarray(valid), jnp.asarray([1, 0, 1]), reduction)
    np.testing.assert_allclose(float(got2), _nce_by_hand(e_q, e_p, pos, ids, valid, [1, 0, 1], reduction), rtol=1e-5)
    assert int(n2) == 2


def test_self_distillation_kl_matches_hand_computation_and_stops_teacher_gradients():
    rng = np.random.RandomState(2)
    B, k = 2, 4
    t_ll = rng.randn(B, k).astype(np.float32)
    s = rng.randn(B, k).astype(np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 1]])
    tau_t, tau_r = 0.5, 2.0
    loss, pt, pr = losses.self_distillation_kl(jnp.asarray(t_ll), jnp.asarray(s), jnp.asarray(valid),
                                               jnp.asarray([1, 1]), tau_t, tau_r)
    want = []
    for i in range(B):
        v = valid[i] > 0
        a = np.exp(t_ll[i][v] / tau_t); a /= a.sum()
        b = np.exp(s[i][v] / tau_r); b /= b.sum()
        want.append((a * np.log(a / b)).sum())  # summed over candidates: no division by k
    np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
    assert float(pt[1, 2]) == 0.0 and float(pr[1, 2]) == 0.0
    g_t, g_s = jax.grad(lambda a, b: losses.self_distillation_kl(a, b, jnp.asarray(valid), jnp.asarray([1, 1]),
                                                                 tau_t, tau_r)[0], argnums=(0, 1))(
        jnp.asarray(t_ll), jnp.asarray(s))
    assert float(jnp.abs(g_t).max()) == 0.0 and float(jnp.abs(g_s).max()) > 0
    # gradient w.r.t. the scores is (P_R - P_T) / tau_r / B
    np.testing.assert_allclose(np.asarray(g_s), np.asarray((pr - pt) / tau_r / B) * valid, atol=1e-6)


def test_stage_schedule():
    assert [losses.stage_at(s, 10, 0.3, "both") for s in range(10)] == ["warmup"] * 3 + ["distill"] * 7
    assert losses.stage_at(9, 10, 0.3, "warmup") == "warmup"
    assert losses.stage_at(0, 10, 0.3, "distill") == "distill"
    with pytest.raises(ValueError):
        losses.stage_at(0, 10, 0.3, "sometimes")


def test_stage_schedule_with_a_retrieval_path_stage():
    # 4 retrieval-path steps, then the paper's schedule over the remaining 10 (30 % warmup)
    got = [losses.stage_at(s, 14, 0.3, "both", retrieval_steps=4) for s in range(14)]
    assert got == ["retrieval"] * 4 + ["warmup"] * 3 + ["distill"] * 7
    assert losses.stage_at(3, 14, 0.3, "none", retrieval_steps=4) == "retrieval"
    assert losses.stage_at(4, 14, 0.3, "none", retrieval_steps=4) == "none"


def test_chance_levels_are_exact_on_equal_scores():
    """A retriever that scores every candidate the same sits exactly at the logged chance levels: the NCE equals
    nce_chance, the in-batch top-1 rate equals its chance, the KL equals KL(P_T || uniform)."""
    rng = np.random.default_rng(0)
    B, k, D = 4, 3, 8
    e_q = jnp.zeros((B, D))  # every score is 0
    e_p = jnp.asarray(rng.normal(size=(B, k, D)), jnp.float32)
    pos = jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0]], jnp.int32)
    ids = jnp.asarray([[0, 1, 2], [3, 4, 5], [6, 7, 1], [8, 9, 10]], jnp.int32)  # passage 1 appears twice
    valid = jnp.asarray([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], jnp.int32)
    use = jnp.ones((B,), jnp.int32)
    for reduction in ("sum", "mean"):
        loss, n, st = losses.multilabel_nce(e_q, e_p, pos, ids, valid, use, reduction, stats=True)
        np.testing.assert_allclose(float(loss), float(st["nce_chance"]), rtol=1e-6)
        np.testing.assert_allclose(float(st["inbatch_top1_is_pos"]), float(st["inbatch_top1_chance"]), rtol=1e-6)
    # by hand for "sum": 11 valid candidates in the batch; examples 0, 2, 3 have one positive and 10 negatives
    # (log 11 each), example 1 two positives and 9 negatives (2 log 10)
    loss, _, st = losses.multilabel_nce(e_q, e_p, pos, ids, valid, use, "sum", stats=True)
    np.testing.assert_allclose(float(st["nce_chance"]), (3 * np.log(11) + 2 * np.log(10)) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(st["inbatch_top1_chance"]), (1 + 2 + 1 + 1) / 11 / 4, rtol=1e-6)
    # a retriever that scores its positives 1 and everything else 0 is at 1.0
    one_hot = jax.nn.one_hot(ids, 16)  # [B, k, 16]
    e_q_good = jnp.einsum("bk,bkd->bd", (pos * valid).astype(jnp.float32), one_hot)
    _, _, st2 = losses.multilabel_nce(e_q_good, one_hot, pos, ids, valid, use, "sum", stats=True)
    assert float(st2["inbatch_top1_is_pos"]) == 1.0

    t_ll = jnp.asarray(rng.normal(size=(B, k)), jnp.float32)
    kl, p_t, _ = losses.self_distillation_kl(t_ll, jnp.zeros((B, k)), valid, use, 1.0, 1.0)
    np.testing.assert_allclose(float(kl), float(losses.kl_chance(p_t, valid).mean()), rtol=1e-6)


def test_top1_hit_splits_ties():
    s = jnp.asarray([[1.0, 1.0, 0.0], [2.0, 1.0, 3.0]])
    pos = jnp.asarray([[True, False, False], [False, False, True]])
    v = jnp.ones((2, 3), bool)
    np.testing.assert_allclose(np.asarray(losses.top1_hit(s, pos, v)), [0.5, 1.0])
