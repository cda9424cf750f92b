"""The decoder and its ImpRAG layer groups: invariants of read / embeddings, sharding, config errors, decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_with_devices
from imprag_jax.model.decode import greedy_generate
from oracles import greedy_recompute
from imprag_jax.model import ConfigError, ModelConfig, forward, init_params, passage_embedding, query_embedding, read
from imprag_jax.model.transformer import passage_kv, passage_slots, run_bottom

TOL = 1e-4


def _setup(seed=0, **kw):
    cfg = ModelConfig.tiny(init_std=0.2, **kw)
    return cfg, init_params(cfg, jax.random.key(seed))


def _batch(rng, B, L, V, lengths):
    toks = rng.randint(1, V, (B, L)).astype(np.int32)
    mask = np.zeros((B, L), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return jnp.asarray(toks * mask), jnp.asarray(mask)


def _passages(rng, B, k, L, V):
    toks = rng.randint(1, V, (B, k, L)).astype(np.int32)
    lens = rng.randint(2, L + 1, (B, k))
    mask = (np.arange(L)[None, None] < lens[..., None]).astype(np.int32)
    return jnp.asarray(toks * mask), jnp.asarray(mask)


def test_read_without_passages_is_the_plain_lm():
    cfg, p = _setup()
    rng = np.random.RandomState(0)
    t, m = _batch(rng, 3, 12, cfg.vocab_size, [12, 7, 3])
    a = read(p, cfg, t, m).logits
    b = forward(p, cfg, t, m)
    np.testing.assert_allclose(np.asarray(a) * np.asarray(m)[..., None], np.asarray(b) * np.asarray(m)[..., None],
                               atol=TOL)
    c = read(p, cfg, t, m, jnp.zeros((3, 0, 8), jnp.int32), jnp.zeros((3, 0, 8), jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(c) * np.asarray(m)[..., None], np.asarray(b) * np.asarray(m)[..., None],
                               atol=TOL)


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_full_middle_equals_decoder_on_concatenation(rope):
    """b = 0, t = N-1: reading is the plain decoder over [passage slots ; prompt] with padding masked."""
    cfg, p = _setup(b=0, t=3, retrieval_rope=rope)
    rng = np.random.RandomState(1)
    B, k, L, Lq = 2, 3, 6, 9
    pt, pm = _passages(rng, B, k, L, cfg.vocab_size)
    qt, qm = _batch(rng, B, Lq, cfg.vocab_size, [9, 5])
    got = read(p, cfg, qt, qm, pt, pm).logits
    toks = jnp.concatenate([pt.reshape(B, k * L), qt], 1)
    mask = jnp.concatenate([pm.reshape(B, k * L), qm], 1)
    qpos = jnp.maximum(jnp.cumsum(qm, 1) - 1, 0) + k * L
    pos = jnp.concatenate([passage_slots(pm, L), qpos], 1)
    want = forward(p, cfg, toks, mask, positions=pos)[:, k * L:]
    w = np.asarray(qm)[..., None]
    np.testing.assert_allclose(np.asarray(got) * w, np.asarray(want) * w, atol=TOL)


def test_passages_change_the_reading_and_padding_does_not():
    cfg, p = _setup()
    rng = np.random.RandomState(2)
    qt, qm = _batch(rng, 2, 8, cfg.vocab_size, [8, 8])
    pt, pm = _passages(rng, 2, 2, 6, cfg.vocab_size)
    base = read(p, cfg, qt, qm, pt, pm).logits
    assert np.abs(np.asarray(base - read(p, cfg, qt, qm).logits)).max() > 1e-3
    # garbage in padded passage positions must not matter
    junk = jnp.where(pm == 0, 7, pt)
    np.testing.assert_allclose(np.asarray(read(p, cfg, qt, qm, junk, pm).logits), np.asarray(base), atol=TOL)
    # fully masked passages = no passages (read ignores them)
    empty = read(p, cfg, qt, qm, pt, jnp.zeros_like(pm)).logits
    np.testing.assert_allclose(np.asarray(empty), np.asarray(read(p, cfg, qt, qm).logits), atol=TOL)


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_passage_embedding_is_the_same_alone_in_a_batch_and_in_any_slot(rope):
    cfg, p = _setup(retrieval_rope=rope)
    rng = np.random.RandomState(3)
    pt, pm = _passages(rng, 1, 4, 7, cfg.vocab_size)
    flat_t, flat_m = pt[0], pm[0]
    batch_ep, _ = passage_embedding(p, cfg, flat_t, flat_m)
    for j in range(4):
        alone, _ = passage_embedding(p, cfg, flat_t[j:j + 1, :int(flat_m[j].sum())],
                                     flat_m[j:j + 1, :int(flat_m[j].sum())])
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(batch_ep[j]), atol=TOL)
    qt, qm = _batch(rng, 1, 5, cfg.vocab_size, [5])
    perm = jnp.asarray([2, 0, 3, 1])
    e1 = read(p, cfg, qt, qm, pt, pm).e_p[0]
    e2 = read(p, cfg, qt, qm, pt[:, perm], pm[:, perm]).e_p[0]
    np.testing.assert_allclose(np.asarray(e1), np.asarray(batch_ep), atol=TOL)
    np.testing.assert_allclose(np.asarray(e2), np.asarray(batch_ep[perm]), atol=TOL)
    assert batch_ep.shape == (4, cfg.num_kv_heads * cfg.head_dim)


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_query_embedding_ignores_the_position_shift_and_padding(rope):
    cfg, p = _setup(retrieval_rope=rope)
    rng = np.random.RandomState(4)
    qt, qm = _batch(rng, 2, 10, cfg.vocab_size, [10, 6])
    eq = query_embedding(p, cfg, qt, qm)
    for k, L in [(1, 4), (3, 8)]:
        pt, pm = _passages(rng, 2, k, L, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(read(p, cfg, qt, qm, pt, pm).e_q), np.asarray(eq), atol=TOL)
    # left padding instead of right padding
    lt = jnp.asarray(np.roll(np.asarray(qt[1]), 4))[None]
    lm = jnp.asarray(np.roll(np.asarray(qm[1]), 4))[None]
    np.testing.assert_allclose(np.asarray(query_embedding(p, cfg, lt, lm))[0], np.asarray(eq[1]), atol=TOL)
    assert eq.shape == (2, cfg.retrieval_dim)


def test_query_embedding_is_the_group_mean_of_layer_b_queries():
    cfg, p = _setup()
    rng = np.random.RandomState(5)
    qt, qm = _batch(rng, 1, 6, cfg.vocab_size, [6])
    h = run_bottom(p, cfg, qt, qm)[0, -1]
    lp = jax.tree.map(lambda a: a[cfg.b], p["layers"])
    x = h * jax.lax.rsqrt(jnp.mean(h * h) + cfg.rms_norm_eps) * lp["input_norm"]["scale"]
    q = jnp.einsum("d,dhk->hk", x, lp["attn"]["wq"]).reshape(cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
    k = jnp.einsum("d,dhk->hk", x, lp["attn"]["wk"])
    np.testing.assert_allclose(np.asarray(query_embedding(p, cfg, qt, qm)[0]), np.asarray(q.mean(1).reshape(-1)),
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(passage_embedding(p, cfg, qt, qm)[0][0]), np.asarray(k.reshape(-1)),
                               atol=TOL)


def test_independent_middle_attention_isolates_passages():
    cfg, p = _setup(passage_attention="independent")
    rng = np.random.RandomState(6)
    pt, pm = _passages(rng, 1, 3, 5, cfg.vocab_size)
    h = run_bottom(p, cfg, pt.reshape(3, 5), pm.reshape(3, 5)).reshape(1, 3, 5, -1)
    kv = passage_kv(p, cfg, h, pm)
    pt2 = pt.at[0, 0].set((pt[0, 0] + 1) % cfg.vocab_size)  # change passage 0 only
    h2 = run_bottom(p, cfg, pt2.reshape(3, 5), pm.reshape(3, 5)).reshape(1, 3, 5, -1)
    kv2 = passage_kv(p, cfg, h2, pm)
    np.testing.assert_allclose(np.asarray(kv.k[:, :, 5:]), np.asarray(kv2.k[:, :, 5:]), atol=TOL)
    joint = passage_kv(p, cfg, h2, pm, attention="joint")
    jointa = passage_kv(p, cfg, h, pm, attention="joint")
    # in joint mode the middle group's later layers of later passages see passage 0
    assert np.abs(np.asarray(joint.k[1:, :, 5:] - jointa.k[1:, :, 5:])).max() > 1e-4


@pytest.mark.parametrize("kw,msg", [
    (dict(b=3, t=2), "0 <= b <= t"),
    (dict(b=0, t=4), "0 <= b <= t"),
    (dict(num_heads=6, num_kv_heads=4, head_dim=16), "multiple of num_kv_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unknown rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "missing"),
    (dict(retrieval_rope="mid"), "retrieval_rope"),
    (dict(hidden_size=66, num_heads=4), "not divisible"),
])
def test_bad_configs_raise_clear_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.tiny(**kw)


def test_init_does_not_depend_on_the_attention_kernel():
    """A cuDNN-attention config initialises to the same parameters as the XLA one, also where cuDNN is absent
    (init used to trace the configured kernel under vmap, which cuDNN's batching rule refuses on a GPU)."""
    cfg = ModelConfig.tiny(num_layers=2, b=0, t=0)
    ref = init_params(cfg, jax.random.key(3))
    got = init_params(cfg.replace(attention_impl="cudnn"), jax.random.key(3))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cached_generation_equals_recomputation():
    cfg, p = _setup(seed=3)
    prompts = [[5, 17, 99, 3, 42, 8], [7, 7], list(range(30, 50))]
    got = greedy_generate(p, cfg, prompts, max_new_tokens=10)
    want = [greedy_recompute(p, cfg, q, 10) for q in prompts]
    assert got == want
    assert len(set(tuple(g) for g in got)) > 1 and any(len(set(g)) > 1 for g in got)


def test_cached_imprag_generation_equals_reading_by_recomputation():
    cfg, p = _setup(seed=4)
    rng = np.random.RandomState(7)
    pt, pm = _passages(rng, 1, 3, 6, cfg.vocab_size)
    prompt = [11, 23, 5, 77, 9]
    h = run_bottom(p, cfg, pt.reshape(3, 6), pm.reshape(3, 6)).reshape(1, 3, 6, -1)
    kv = passage_kv(p, cfg, h, pm)
    got = greedy_generate(p, cfg, [prompt], max_new_tokens=8, pkv=kv, offset=18)[0]
    seq, want = list(prompt), []
    for _ in range(8):
        lg = read(p, cfg, jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32), pt, pm).logits
        nxt = int(jnp.argmax(lg[0, -1]))
        want.append(nxt)
        seq.append(nxt)
    assert got == want


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from imprag_jax.model import ModelConfig, init_params, param_logical_axes, forward, read
from imprag_jax.model.sharding import make_mesh, tree_shardings, use_sharding, batch_sharding
assert jax.device_count() == 8
cfg = ModelConfig.tiny(init_std=0.2, num_heads=4, num_kv_heads=2, hidden_size=64, vocab_size=256)
params = init_params(cfg, jax.random.key(0))
rng = np.random.RandomState(0)
toks = jnp.asarray(rng.randint(1, 256, (4, 16)), jnp.int32); mask = jnp.ones((4, 16), jnp.int32)
pt = jnp.asarray(rng.randint(1, 256, (4, 2, 8)), jnp.int32); pm = jnp.ones((4, 2, 8), jnp.int32)
ref = np.asarray(forward(params, cfg, toks, mask)); ref_r = np.asarray(read(params, cfg, toks, mask, pt, pm).logits)
mesh = make_mesh(data=2, fsdp=2, tensor=2)
ps = tree_shardings(param_logical_axes(cfg), params, mesh)
sp = jax.device_put(params, ps)
assert sp["layers"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None), sp["layers"]["attn"]["wq"].sharding.spec
bs = batch_sharding(mesh, 2)
def f(p, t, m):
    with use_sharding(mesh):
        return forward(p, cfg, t, m)
def g(p, t, m, a, b):
    with use_sharding(mesh):
        return read(p, cfg, t, m, a, b).logits
out = jax.jit(f, in_shardings=(ps, bs, bs))(sp, jax.device_put(toks, bs), jax.device_put(mask, bs))
out_r = jax.jit(g)(sp, jax.device_put(toks, bs), jax.device_put(mask, bs), jax.device_put(pt, batch_sharding(mesh, 3)), jax.device_put(pm, batch_sharding(mesh, 3)))
print("maxdiff", np.abs(np.asarray(out) - ref).max(), np.abs(np.asarray(out_r) - ref_r).max())
np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
np.testing.assert_allclose(np.asarray(out_r), ref_r, atol=1e-4)
print("OK")
"""


def test_sharded_forward_on_8_devices_equals_single_device():
    out = run_with_devices(SHARDED, 8)
    assert "OK" in out, out
