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
