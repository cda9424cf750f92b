"""Retrieval on one device: search backends, PassageIndex save/restore, fingerprints, corpus encoding (resume),
index refresh, ScaNN.  (8-device sharding: tests/test_retrieval_sharded.py; real SmolLM2 embeddings:
tests/test_retrieval_real.py.)"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imprag_jax.model import ModelConfig, init_params, passage_embedding, query_embedding
from imprag_jax.retrieval import (IndexRefresher, PassageIndex, brute_force_numpy, config_fingerprint,
                                  default_num_bins, embedding_fingerprint, encode_corpus, recall_at_k, score_all,
                                  search)
from imprag_jax.retrieval.scann_backend import scann_available

BACKENDS = ("exact", "binned", "approx")


def one_device_mesh():
    return jax.make_mesh((1,), ("index",), devices=jax.devices()[:1])


def rand(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def rounded(x, dtype):
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny(b=1, t=2)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, l = 45, 10
    tok = rng.integers(1, cfg.vocab_size, (n, l)).astype(np.int32)
    mask = np.ones((n, l), bool)
    for i in range(n):
        mask[i, rng.integers(2, l + 1):] = False
    return cfg, params, tok, mask


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exact_equals_numpy_brute_force(dtype):
    db, q = rand(3001, 48, 1), rand(17, 48, 2)
    index = PassageIndex.create(db, mesh=one_device_mesh(), dtype=dtype)
    s, i = search(index, jnp.asarray(q), 10, backend="exact")
    rs, ri = brute_force_numpy(rounded(db, dtype), rounded(q, dtype), 10)
    assert s.dtype == jnp.float32 and i.dtype == jnp.int32 and s.shape == (17, 10)
    np.testing.assert_array_equal(np.asarray(i), ri)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-5, atol=1e-4)
    # a raw (unsharded) array gives the same
    s2, i2 = search(jnp.asarray(db), jnp.asarray(q), 10)
    np.testing.assert_array_equal(np.asarray(i2), brute_force_numpy(db, q, 10)[1])


def test_binned_and_approx_recall_on_random_embeddings():
    db, q = rand(30000, 64, 3), rand(64, 64, 4)
    index = PassageIndex.create(db, mesh=one_device_mesh(), dtype=jnp.float32)
    ref = brute_force_numpy(db, q, 10)[1]
    assert default_num_bins(30000, 10) == 512
    for b in ("binned", "approx"):
        _, i = search(index, jnp.asarray(q), 10, backend=b)
        assert recall_at_k(np.asarray(i), ref) >= 0.95, b
    # the default bins meet the design target (recall@10 >= 0.98) ...
    _, i = search(index, jnp.asarray(q), 10, backend="binned")
    assert recall_at_k(np.asarray(i), ref) >= 0.98
    # ... and few bins really approximate (and still return valid, sorted, unique ids)
    s, i = search(index, jnp.asarray(q), 10, backend="binned", num_bins=64)
    s, i = np.asarray(s), np.asarray(i)
    assert 0.5 < recall_at_k(i, ref) < 1.0
    assert (np.diff(s, axis=1) <= 0).all() and all(len(set(r)) == 10 for r in i.tolist())
    np.testing.assert_allclose(s, np.take_along_axis(q @ db.T, i, axis=1), rtol=1e-5, atol=1e-4)


def test_binned_spreads_neighbouring_rows():
    """Near-duplicate passages sit next to each other in a corpus (chunks of one article): the strided bins put
    them in different bins, so they are all found."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((200, 32)).astype(np.float32)
    db = np.repeat(centers, 50, axis=0) + 0.05 * rng.standard_normal((10000, 32)).astype(np.float32)
    q = centers[:20] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)
    ref = brute_force_numpy(db, q, 10)[1]
    _, i = search(jnp.asarray(db), jnp.asarray(q), 10, backend="binned")
    assert recall_at_k(np.asarray(i), ref) >= 0.98


def test_tail_rows_and_small_index():
    db, q = rand(1000 + 77, 16, 6), rand(5, 16, 7)
    ref = brute_force_numpy(db, q, 10)[1]
    # rows past the last full bin are candidates too
    _, i = search(jnp.asarray(db), jnp.asarray(q), 10, backend="binned", num_bins=128)
    assert recall_at_k(np.asarray(i), ref) >= 0.9
    # N < k: -inf / -1 past the end
    small = PassageIndex.create(db[:4], mesh=one_device_mesh(), dtype=jnp.float32)
    for b in BACKENDS:
        s, i = search(small, jnp.asarray(q), 6, backend=b)
        s, i = np.asarray(s), np.asarray(i)
        np.testing.assert_array_equal(i[:, :4], brute_force_numpy(db[:4], q, 4)[1])
        assert (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_inside_jit(backend):
    db, q = rand(2000, 32, 8), rand(9, 32, 9)
    index = PassageIndex.create(db, mesh=one_device_mesh(), dtype=jnp.bfloat16, step=3, config_hash="abc")

    @jax.jit
    def step(index, E_q):
        s, i = search(index, E_q * 1.0, 5, backend=backend, query_fingerprint="abc")
        return s, i, index.step + 1

    s, i, st = step(index, jnp.asarray(q))
    ref = brute_force_numpy(rounded(db, jnp.bfloat16), rounded(q, jnp.bfloat16), 5)[1]
    assert recall_at_k(np.asarray(i), ref) >= 0.95 and int(st) == 4
    # a refreshed index (new step, same shapes) does not retrace
    step(index.replace(step=7), jnp.asarray(q))
    assert step._cache_size() == 1


def test_search_refuses_mismatches():
    index = PassageIndex.create(rand(50, 16, 0), mesh=one_device_mesh(), config_hash=config_fingerprint({"b": 7}))
    with pytest.raises(ValueError, match="dimension"):
        search(index, jnp.zeros((2, 24)), 3)
    with pytest.raises(ValueError, match="fingerprint"):
        search(index, jnp.zeros((2, 16)), 3, query_fingerprint=config_fingerprint({"b": 6}))
    with pytest.raises(ValueError, match="backend"):
        search(index, jnp.zeros((2, 16)), 3, backend="nope")
    search(index, jnp.zeros((2, 16)), 3, query_fingerprint=config_fingerprint({"b": 7}))


def test_fingerprints_are_stable():
    assert config_fingerprint({"b": 7, "retrieval_rope": "pre"}) == config_fingerprint({"retrieval_rope": "pre",
                                                                                       "b": 7})
    assert config_fingerprint({"b": 7}) != config_fingerprint({"b": 8})
    cfg = ModelConfig.tiny(b=1, t=2)
    assert embedding_fingerprint(cfg) == embedding_fingerprint(ModelConfig.tiny(b=1, t=3, remat="full"))
    assert embedding_fingerprint(cfg) != embedding_fingerprint(cfg.replace(retrieval_rope="post"))
    assert embedding_fingerprint(cfg) != embedding_fingerprint(cfg.replace(b=2))


def test_score_all():
    db, q = rand(100, 8, 1), rand(3, 8, 2)
    index = PassageIndex.create(db, mesh=one_device_mesh(), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(score_all(index, jnp.asarray(q)))[:, :100], q @ db.T, rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------- save / restore
def test_save_restore_round_trip(tmp_path):
    db = rand(37, 16, 11)
    tok = np.arange(37 * 5, dtype=np.int32).reshape(37, 5)
    mask = tok % 3 != 0
    index = PassageIndex.create(db, tok, mask, step=12, config_hash="feed", mesh=one_device_mesh())
    index.save(str(tmp_path / "idx"))
    meta = json.load(open(tmp_path / "idx" / "index.json"))
    assert meta["step"] == 12 and meta["n"] == 37 and meta["d"] == 16 and meta["dtype"] == "bfloat16"
    back = PassageIndex.restore(str(tmp_path / "idx"))
    assert (back.n, back.D, back.step, back.config_hash, back.dtype) == (37, 16, 12, "feed", jnp.bfloat16)
    np.testing.assert_array_equal(back.host_embeddings(), index.host_embeddings())
    np.testing.assert_array_equal(np.asarray(back.tokens)[:37], tok)
    np.testing.assert_array_equal(np.asarray(back.mask)[:37], mask)
    q = jnp.asarray(rand(3, 16, 12))
    np.testing.assert_array_equal(np.asarray(search(back, q, 4)[1]), np.asarray(search(index, q, 4)[1]))
    # without tokens, fp32
    PassageIndex.create(db, dtype=jnp.float32).save(str(tmp_path / "idx2"))
    back2 = PassageIndex.restore(str(tmp_path / "idx2"))
    assert back2.tokens is None and back2.dtype == jnp.float32
    np.testing.assert_array_equal(back2.host_embeddings(), db)
    with pytest.raises(FileNotFoundError):
        PassageIndex.restore(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------------------------- encoding
def test_encode_corpus_matches_the_model(tiny):
    cfg, params, tok, mask = tiny
    stats = {}
    index = encode_corpus(params, cfg, tok, mask, batch_size=8, step=5, dtype=jnp.float32, progress=False,
                          stats=stats)
    ref, _ = passage_embedding(params, cfg, jnp.asarray(tok), jnp.asarray(mask))
    assert index.D == cfg.num_kv_heads * cfg.head_dim and index.n == len(tok) and index.step == 5
    assert index.config_hash == embedding_fingerprint(cfg)
    np.testing.assert_allclose(index.host_embeddings(), np.asarray(ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(index.tokens)[: len(tok)], tok)
    assert stats["encoded"] == len(tok) and stats["passages_per_s"] > 0
    # retrieve a passage with its own prompt embedding: shapes and fingerprint line up end to end
    E_q = query_embedding(params, cfg, jnp.asarray(tok[:3]), jnp.asarray(mask[:3]))
    s, i = search(index, E_q, 4, query_fingerprint=embedding_fingerprint(cfg))
    assert i.shape == (3, 4)


def test_encode_corpus_resumes_after_interruption(tiny, tmp_path):
    cfg, params, tok, mask = tiny
    chunk_dir = str(tmp_path / "chunks")

    class Interrupted(Exception):
        pass

    def stop_after_two(c, done):
        if c == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        encode_corpus(params, cfg, tok, mask, batch_size=4, chunk_dir=chunk_dir, chunk_size=8, progress=False,
                      on_chunk=stop_after_two)
    assert sorted(f for f in os.listdir(chunk_dir) if f.endswith(".npy")) == ["chunk_000000.npy",
                                                                              "chunk_000001.npy"]
    stats = {}
    resumed = encode_corpus(params, cfg, tok, mask, batch_size=4, chunk_dir=chunk_dir, chunk_size=8,
                            progress=False, dtype=jnp.float32, stats=stats)
    assert stats["resumed_chunks"] == 2 and stats["encoded"] == len(tok) - 16
    clean = encode_corpus(params, cfg, tok, mask, batch_size=4, progress=False, dtype=jnp.float32)
    np.testing.assert_allclose(resumed.host_embeddings(), clean.host_embeddings(), rtol=1e-6, atol=1e-6)
    # a finished run is all resumed; a new step makes the chunks stale
    stats = {}
    encode_corpus(params, cfg, tok, mask, batch_size=4, chunk_dir=chunk_dir, chunk_size=8, progress=False,
                  stats=stats)
    assert stats["encoded"] == 0
    stats = {}
    encode_corpus(params, cfg, tok, mask, batch_size=4, chunk_dir=chunk_dir, chunk_size=8, progress=False,
                  step=1, stats=stats)
    assert stats["encoded"] == len(tok) and stats["resumed_chunks"] == 0


def test_refresh_after_parameter_update(tiny, tmp_path):
    cfg, params, tok, mask = tiny
    r = IndexRefresher(10, cfg=cfg, tokens=tok, mask=mask, batch_size=16, progress=False,
                       save_dir=str(tmp_path / "idx"))
    first = r.maybe_refresh(0, params)
    assert first is not None and first.step == 0 and r.last_step == 0
    assert r.maybe_refresh(5, params) is None
    new_params = jax.tree.map(lambda x: x * 1.1, params)
    second = r.maybe_refresh(10, new_params)
    assert second is not None and second.step == 10 and r.index is second
    assert not np.allclose(first.host_embeddings(), second.host_embeddings())
    back = IndexRefresher.latest_saved(str(tmp_path / "idx"))
    assert back.step == 10 and len(os.listdir(tmp_path / "idx")) == 1
    np.testing.assert_array_equal(back.host_embeddings(), second.host_embeddings())


# -------------------------------------------------------------------------------------------------- ScaNN
@pytest.mark.skipif(not scann_available(), reason="scann not installed (pip install 'imprag_jax[scann]')")
def test_scann_build_search_serialize(tmp_path):
    from imprag_jax.retrieval.scann_backend import ScannIndex

    rng = np.random.default_rng(0)
    centers = 3 * rng.standard_normal((64, 32)).astype(np.float32)
    db = centers[rng.integers(0, 64, 6000)] + rng.standard_normal((6000, 32)).astype(np.float32)
    q = centers[rng.integers(0, 64, 40)] + rng.standard_normal((40, 32)).astype(np.float32)
    ref = brute_force_numpy(db, q, 10)[1]
    assert ScannIndex.build(db[:3000]).params["brute_force"]  # small corpora: exact brute force by default
    idx = ScannIndex.build(db, brute_force=False, config_hash="h", step=3)
    assert not idx.params["brute_force"] and idx.params["num_leaves"] == round(6000 ** 0.5)
    assert idx.params["num_leaves_to_search"] == 16
    s, i = idx.search(q, 10)
    assert s.dtype == np.float32 and i.dtype == np.int32 and recall_at_k(i, ref) >= 0.9
    idx.serialize(str(tmp_path / "sc"))
    back = ScannIndex.load(str(tmp_path / "sc"))
    assert (back.step, back.config_hash, back.n) == (3, "h", 6000)
    np.testing.assert_array_equal(back.search(q, 10)[1], i)
    s2, i2 = jax.jit(lambda e: back.search_in_graph(e, 10))(jnp.asarray(q))
    assert s2.dtype == jnp.float32 and i2.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(i2), i)
    with pytest.raises(ValueError, match="fingerprint"):
        back.search(q, 10, query_fingerprint="other")
    # tiny corpora are brute force; k > N pads
    small = ScannIndex.build(db[:20])
    s, i = small.search(q[:2], 25)
    assert small.params["brute_force"] and (i[:, 20:] == -1).all() and np.isneginf(s[:, 20:]).all()
    np.testing.assert_array_equal(i[:, :20], brute_force_numpy(db[:20], q[:2], 20)[1])
