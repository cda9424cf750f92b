"""Retrieval with the index rows sharded over 8 (fake CPU) devices.  The device count is fixed when JAX starts,
so the checks run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8."""
from conftest import run_with_devices

CODE = r'''
import os, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from imprag_jax.model import ModelConfig, init_params, passage_embedding, query_embedding
from imprag_jax.model.sharding import make_mesh
from imprag_jax.retrieval import PassageIndex, brute_force_numpy, encode_corpus, recall_at_k, search

assert jax.device_count() == 8
one = jax.make_mesh((1,), ("index",), devices=jax.devices()[:1])
mesh = make_mesh(data=4, fsdp=1, tensor=2)           # (data, fsdp, tensor) = (4, 1, 2)
flat = jax.make_mesh((8,), ("index",))
rng = np.random.default_rng(0)

def r(n, d):
    return rng.standard_normal((n, d)).astype(np.float32)

# 1. sharded == single device, N not a multiple of 8 (and N < k), every backend, inside jit
for n in (1003, 5):
    db, q = r(n, 32), r(11, 32)
    single = PassageIndex.create(db, mesh=one, dtype=jnp.float32)
    for m in (mesh, flat):
        sharded = PassageIndex.create(db, mesh=m, dtype=jnp.float32)
        assert sharded.num_padded % 8 == 0 and sharded.n == n
        assert sharded.embeddings.sharding.spec == P(tuple(m.axis_names), None)
        # (binned falls back to an exact top-k on shards of < 2 * num_bins rows; approx is exact on CPU)
        s1, i1 = jax.jit(lambda ix, e: search(ix, e, 7))(single, jnp.asarray(q))
        for b in ("exact", "binned", "approx"):
            f = jax.jit(lambda ix, e, b=b: search(ix, e, 7, backend=b))
            s8, i8 = f(sharded, jnp.asarray(q))
            np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1), err_msg=f"{n} {b}")
            np.testing.assert_allclose(np.asarray(s8), np.asarray(s1), rtol=1e-5, atol=1e-5)
            assert (np.asarray(i8) < n).all()
        if n < 7:
            assert (np.asarray(i8)[:, n:] == -1).all()
    # a raw host array searched over a mesh (rows padded in the graph)
    s, i = search(jnp.asarray(db), jnp.asarray(q), 7, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(i)[:, :min(n, 7)], brute_force_numpy(db, q, min(n, 7))[1])
print("sharded == single: ok")

# 2. binned with real bins on every shard keeps recall
db, q = r(40000, 32), r(32, 32)
ref = brute_force_numpy(db, q, 10)[1]
sharded = PassageIndex.create(db, mesh=mesh, dtype=jnp.bfloat16)
for b in ("binned", "approx"):
    _, i = jax.jit(lambda ix, e, b=b: search(ix, e, 10, backend=b))(sharded, jnp.asarray(q))
    rec = recall_at_k(np.asarray(i), ref)
    assert rec >= 0.95, (b, rec)
# a row-sharded raw array: its own sharding says how to split
arr = jax.device_put(jnp.asarray(db[:40000]), NamedSharding(mesh, P(("data", "tensor"), None)))
_, i = jax.jit(lambda a, e: search(a, e, 10))(arr, jnp.asarray(q))
np.testing.assert_array_equal(np.asarray(i), ref)
# under jax.set_mesh with batch-sharded queries (the train step's situation)
emesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"))
ix = PassageIndex.create(db, mesh=emesh, dtype=jnp.float32)
qs = jax.device_put(jnp.asarray(q), NamedSharding(emesh, P(("data", "fsdp"), None)))
with jax.set_mesh(emesh):
    _, i = jax.jit(lambda ix, e: search(ix, e, 10))(ix, qs)
np.testing.assert_array_equal(np.asarray(i), ref)
print("binned/approx/raw/set_mesh: ok")

# 3. encode_corpus with the batch sharded over (data, fsdp) == unsharded
cfg = ModelConfig.tiny(b=1, t=2)
params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
tok = rng.integers(1, cfg.vocab_size, (37, 9)).astype(np.int32)
mask = np.ones_like(tok, bool); mask[::3, 6:] = False
ix8 = encode_corpus(params, cfg, tok, mask, batch_size=6, mesh=mesh, dtype=jnp.float32, progress=False)
ref_e, _ = passage_embedding(params, cfg, jnp.asarray(tok), jnp.asarray(mask))
np.testing.assert_allclose(ix8.host_embeddings(), np.asarray(ref_e), rtol=1e-4, atol=1e-5)
assert ix8.embeddings.sharding.spec == P(("data", "fsdp", "tensor"), None)
E_q = query_embedding(params, cfg, jnp.asarray(tok[:4]), jnp.asarray(mask[:4]))
np.testing.assert_array_equal(np.asarray(search(ix8, E_q, 5)[1]),
                              brute_force_numpy(np.asarray(ref_e), np.asarray(E_q), 5)[1])
print("encode_corpus on a mesh: ok")

# 4. save on 8 devices, restore on 8 (direct) and on 3 (re-padded)
with tempfile.TemporaryDirectory() as d:
    ix8.save(os.path.join(d, "ix"))
    q = jnp.asarray(np.asarray(E_q))
    want = np.asarray(search(ix8, q, 5)[1])
    for m in (flat, jax.make_mesh((3,), ("index",), devices=jax.devices()[:3])):
        back = PassageIndex.restore(os.path.join(d, "ix"), mesh=m)
        assert back.n == 37 and back.num_padded % m.size == 0 and back.step == 0
        np.testing.assert_array_equal(np.asarray(search(back, q, 5)[1]), want)
        np.testing.assert_array_equal(np.asarray(back.tokens)[:37], tok)
print("save/restore across meshes: ok")
'''


def test_sharded_retrieval_on_8_devices():
    out = run_with_devices(CODE, n=8, timeout=400)
    for line in ("sharded == single: ok", "binned/approx/raw/set_mesh: ok", "encode_corpus on a mesh: ok",
                 "save/restore across meshes: ok"):
        assert line in out


# both programs: a tiny model, 37 rows of 9 random tokens (every third one shorter), a 4 x 2 mesh
SHARDED_ROWS = r'''
import jax, jax.numpy as jnp, numpy as np
from imprag_jax.model import ModelConfig, init_params
from imprag_jax.model.sharding import make_mesh
from imprag_jax.retrieval import IndexRefresher, encode_corpus
from imprag_jax.retrieval.encode import encode_corpus_sharded, local_index_rows, put_local_rows
from imprag_jax.infer.imprag import Retriever

mesh = make_mesh(data=4, fsdp=1, tensor=2)
cfg = ModelConfig.tiny(b=1, t=2)
params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
rng = np.random.default_rng(0)
tok = rng.integers(1, cfg.vocab_size, (37, 9)).astype(np.int32)
mask = np.ones_like(tok, np.int32); mask[::3, 6:] = 0
asked = []
'''


SHARDED_BUILD = SHARDED_ROWS + r'''

def rows_tokens(ix):
    asked.append(np.asarray(ix))
    return tok[ix], mask[ix]

# one process holds every row: it tokenizes all 37 (not the 3 padding rows), in order
np.testing.assert_array_equal(local_index_rows(37, mesh), np.arange(37))
ix = encode_corpus_sharded(params, cfg, 37, rows_tokens, mesh=mesh, l_max=9, batch_size=12, dtype=jnp.float32)
ref = encode_corpus(params, cfg, tok, mask, batch_size=6, mesh=mesh, dtype=jnp.float32, progress=False)
assert len(asked) == 1 and (asked[0] == np.arange(37)).all()
assert ix.n == 37 and ix.num_padded == 40 and ix.embeddings.sharding.spec == ref.embeddings.sharding.spec
np.testing.assert_allclose(ix.host_embeddings(), ref.host_embeddings(), rtol=1e-5, atol=1e-6)
assert not np.asarray(ix.embeddings)[37:].any()  # zero padding rows
np.testing.assert_array_equal(np.asarray(ix.tokens)[:37], tok)

# the retriever over a pool: ids are knowledge-source rows, passages come from the device tokens
pool = np.array([0, 3, 4, 10, 11, 20, 29, 36])
a = Retriever.build(params, cfg, tok, mask, rows=pool)
b = Retriever.build_sharded(params, cfg, 37, lambda r: (tok[r], mask[r]), mesh=mesh, l_max=9, rows=pool)
assert b.tokens is None and b.l_max == 9 and b.n == 8
q = rng.standard_normal((5, ix.D)).astype(np.float32)
(sa, ia), (sb, ib) = a.search(q, 10), b.search(q, 10)
np.testing.assert_array_equal(ia, ib)
np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5)
assert set(ib[ib >= 0].tolist()) <= set(pool.tolist()) and (ib[:, 8:] == -1).all()
for x, y in zip(a.gather(ib), b.gather(ib)):
    np.testing.assert_array_equal(x, y)
print("sharded build: ok")
'''


def test_sharded_index_build_matches_encode_corpus():
    """`encode_corpus_sharded` (each process encodes the rows its devices hold) and `Retriever.build_sharded`
    (device-resident tokens) give what `encode_corpus` / `Retriever.build` give, here on one process of 8 devices
    (tests/test_multiprocess.py runs them on 2 processes)."""
    assert "sharded build: ok" in run_with_devices(SHARDED_BUILD, n=8, timeout=300)


SHARDED_REFRESH = SHARDED_ROWS + r'''

def tokenize(rows):
    asked.append(np.asarray(rows))
    return tok[rows], mask[rows]

# put_local_rows: a process's rows (here all of them) as a global padded array, zeros past n
x = put_local_rows(37, local_index_rows(37, mesh), tok, mesh)
assert x.shape == (40, 9) and (np.asarray(x)[:37] == tok).all() and not np.asarray(x)[37:].any()

kw = dict(batch_size=16, mesh=mesh, index_mesh=mesh, keep_tokens=True, dtype=jnp.float32)
full = IndexRefresher(2, cfg=cfg, tokens=tok, mask=mask, progress=False, **kw)
shard = IndexRefresher(2, cfg=cfg, n=37, l_max=9, tokenize=tokenize, **kw)
a, b = full.maybe_refresh(0, params), shard.maybe_refresh(0, params)
assert b.n == 37 and b.num_padded == a.num_padded and b.config_hash == a.config_hash and int(b.step) == 0
assert b.embeddings.sharding == a.embeddings.sharding
np.testing.assert_allclose(np.asarray(b.embeddings), np.asarray(a.embeddings), rtol=1e-5, atol=1e-6)
for u, v in ((a.tokens, b.tokens), (a.mask, b.mask)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
assert shard.maybe_refresh(1, params) is None and shard.maybe_refresh(2, params) is not None
assert len(asked) == 1  # tokenized once, re-encoded at every refresh

# resume from checkpointed embeddings: the same index (tokens from the process's own rows), then the schedule
r = IndexRefresher(2, cfg=cfg, n=37, l_max=9, tokenize=tokenize, **kw)
assert r.resume(b.embeddings, 0, b.config_hash) and r.last_step == 0 and not r.due(1) and r.due(2)
for u, v in ((r.index.embeddings, b.embeddings), (r.index.tokens, b.tokens), (r.index.mask, b.mask)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
assert not r.resume(b.embeddings, 0, "another model")
try:
    IndexRefresher(2, cfg=cfg, tokens=tok, mask=mask, tokenize=tokenize, n=37, l_max=9, mesh=mesh)
except ValueError as e:
    assert "either" in str(e)
else:
    raise AssertionError("tokens and tokenize together")
print("sharded refresh: ok")
'''


def test_sharded_index_refresh_matches_the_whole_corpus_refresh():
    """`IndexRefresher` in its multi-process form (each process tokenizing, once, and encoding the rows its devices
    hold) gives the index of the whole-corpus refresher, and resumes a checkpointed index with the same token rows;
    here on one process of 8 devices (tests/test_multiprocess.py trains with it on 2 processes)."""
    assert "sharded refresh: ok" in run_with_devices(SHARDED_REFRESH, n=8, timeout=300)
