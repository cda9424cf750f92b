"""ScaNN inside the jitted train step (train.index_backend = "scann"): the step's candidates come from the host
searcher through jax.pure_callback and equal a host search of the same searcher; a training run mines with it
and never mines a row's gold / answer passages; under 8 devices the sharded step mines the same candidates."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_SYNTHETIC, run_with_devices

pytest.importorskip("scann")


def _tree_searcher(emb, step=0):
    from imprag_jax.retrieval.scann_backend import ScannIndex

    # a real tree + AH + reorder searcher (not brute force), so the comparison is not trivially exact search
    return ScannIndex.build(emb, brute_force=False, num_leaves=40, num_leaves_to_search=6, reorder=60, step=step)


def test_in_step_scann_candidates_equal_host_scann_search():
    from imprag_jax.retrieval.scann_backend import publish, slot_search_in_graph, unpublish
    from imprag_jax.train.step import StepConfig, mine_from_index

    N, D, B, k, l, X = 3000, 16, 6, 4, 3, 5
    rng = np.random.RandomState(0)
    emb = rng.randn(N, D).astype(np.float32)
    e_q = rng.randn(B, D).astype(np.float32)
    idx = _tree_searcher(emb, step=7)
    publish("test:eq", idx)
    try:
        m = 3 + k + X
        f = jax.jit(lambda q, st: slot_search_in_graph("test:eq", q, m, d=D, step=st))
        s_graph, i_graph = f(jnp.asarray(e_q), jnp.int32(7))
        h_ids, h_scores = idx.searcher.search_batched(e_q, final_num_neighbors=m, leaves_to_search=6,
                                                      pre_reorder_num_neighbors=60)
        np.testing.assert_array_equal(np.asarray(i_graph), np.asarray(h_ids))
        np.testing.assert_allclose(np.asarray(s_graph), np.asarray(h_scores), rtol=1e-6)
        ref = np.argsort(-(e_q @ emb.T), axis=1)[:, :m]
        assert np.mean([len(set(a) & set(b)) for a, b in zip(np.asarray(h_ids), ref)]) < m  # approximate

        # the mining step on top of it: the first host results that are neither candidates nor excluded
        toks = np.arange(N * l, dtype=np.int32).reshape(N, l)
        own = np.asarray(h_ids)[:, [0, 5, 6, 7]].astype(np.int32)  # top-1 is the positive, 3 far negatives
        excl = np.full((B, X), -1, np.int32)
        excl[:, 0] = np.asarray(h_ids)[:, 1]  # the 2nd best passage must not be mined
        batch = {"passage_ids": jnp.asarray(own), "positives": jnp.asarray(np.tile([1, 0, 0, 0], (B, 1))),
                 "passages": jnp.asarray(toks[own]), "passage_mask": jnp.ones((B, k, l), jnp.int32),
                 "mined_exclude": jnp.asarray(excl)}
        sc = StepConfig(candidates="mixed", n_replace=2, n_index=N, index_backend="scann", scann_slot="test:eq")
        index = {"emb": jnp.asarray(emb), "tokens": jnp.asarray(toks), "mask": jnp.ones((N, l), jnp.int32),
                 "step": jnp.int32(7)}
        out, rep = jax.jit(lambda q, b, ix: mine_from_index(q, b, ix, sc))(jnp.asarray(e_q), batch, index)
        new = np.asarray(out["passage_ids"])
        for i in range(B):
            want = [int(j) for j in np.asarray(h_ids)[i] if j not in own[i] and j not in excl[i]][:2]
            assert list(new[i, 1:3]) == want and new[i, 3] == own[i, 3] and new[i, 0] == own[i, 0]
            np.testing.assert_array_equal(np.asarray(out["passages"])[i], toks[new[i]])
        assert int(rep.sum()) == 2 * B
        # a device index of another step than the published searchers: an error, not silently stale negatives
        with pytest.raises(Exception, match="no ScaNN searcher for the index of step 3"):
            jax.block_until_ready(f(jnp.asarray(e_q), jnp.int32(3)))
    finally:
        unpublish("test:eq")


def test_eval_retriever_and_training_share_the_searcher_builder(monkeypatch):
    from imprag_jax.infer.imprag import Retriever
    from imprag_jax.retrieval import scann_backend

    calls = []
    real = scann_backend.build_searcher
    monkeypatch.setattr(scann_backend, "build_searcher", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    rng = np.random.RandomState(1)
    emb = rng.randn(50, 8).astype(np.float32)
    r = Retriever.from_embeddings(emb, np.zeros((50, 2), np.int32), np.ones((50, 2), bool), backend="scann")
    _, ids = r.search(emb[:3], 5)
    from imprag_jax.retrieval.search import brute_force_numpy

    _, ref = brute_force_numpy(r.index.host_embeddings(), emb[:3], 5)  # brute force below 20k rows: exact
    assert len(calls) == 1 and np.array_equal(np.asarray(ids), ref)


@pytest.mark.slow
def test_training_mines_with_scann_and_skips_gold_and_answer_passages(world_dir, tmp_path, monkeypatch):
    from test_train import tiny_config

    from imprag_jax.train import step as step_mod
    from imprag_jax.train.trainer import train

    rows = []
    real = step_mod.mine_from_index

    def recording(e_q, batch, index, sc):
        assert sc.index_backend == "scann" and sc.scann_slot
        out, rep = real(e_q, batch, index, sc)
        jax.debug.callback(lambda *a: rows.append([np.asarray(x) for x in a]), out["passage_ids"], rep,
                           batch["mined_exclude"], batch["positives"], index["step"])
        return out, rep

    monkeypatch.setattr(step_mod, "mine_from_index", recording)
    c = tiny_config(world_dir, stages="warmup", steps=4, candidates="mixed", index_negatives=2, refresh_every=2,
                    index_backend="scann", log_grad_norms=False)
    res = train(c, str(tmp_path / "scann"))
    assert res["step"] == 4 and res["compiles_after_step_2"] == 0
    assert len(rows) == 4 and [int(r[4]) for r in rows] == [0, 0, 2, 2]  # the refreshed index's step
    n_mined = 0
    for ids, rep, excl, pos, _ in rows:
        for i in range(ids.shape[0]):
            mined = set(ids[i][rep[i]].tolist())
            n_mined += len(mined)
            assert not mined & set(excl[i][excl[i] >= 0].tolist())  # never gold nor answer-containing
            assert not rep[i][pos[i] > 0].any()  # positives are never replaced
    assert n_mined >= 4 * 8 * 1.5



@pytest.mark.slow
def test_resume_between_index_refreshes_with_scann_equals_the_uninterrupted_run(world_dir, tmp_path):
    """test_train's exact-resume test with the ScaNN backend: refreshes at steps 0, 4, 8; the run stopped at step 6
    rebuilds the ScaNN searcher from the checkpointed index (of step 4) on resume, so the step mines the same
    candidates and the losses and final parameters equal the uninterrupted run's."""
    from test_train import assert_same_run, tiny_config

    from imprag_jax.train.trainer import train

    kw = dict(stages="warmup", steps=12, candidates="mixed", index_negatives=2, refresh_every=4,
              index_backend="scann", log_grad_norms=False)
    full = train(tiny_config(world_dir, **kw), str(tmp_path / "full"))
    part = train(tiny_config(world_dir, stop_at_step=6, **kw), str(tmp_path / "resumed"))
    assert full["step"] == 12 and part["step"] == 6 and part["stopped_early"] is True
    rest = train(tiny_config(world_dir, **kw), str(tmp_path / "resumed"))
    assert rest["step"] == 12
    assert_same_run(tmp_path / "full", tmp_path / "resumed", 12)

SHARDED = TINY_SYNTHETIC + r"""
from imprag_jax.retrieval import scann_backend
from imprag_jax.retrieval.scann_backend import ScannIndex, publish
from imprag_jax.train import step as step_mod
from imprag_jax.train.state import index_specs
from imprag_jax.retrieval.index import padded_rows
c.data.update(dict(batch_size=8, free_batch_size=0, prefetch=0))
bcfg = dataclasses.replace(run.batch_config(c), mined_exclude=64)
data = TrainBatches("WORLD", tok, bcfg, prefetch=0)
batches = [data.batch(i) for i in range(2)]
ctoks, cmask = corpus_tokens("WORLD", tok, bcfg.l_max)
N, D = len(ctoks), cfg.retrieval_dim
emb = np.random.RandomState(0).randn(N, D).astype(np.float32)
searchers = {"brute": ScannIndex.build(emb, brute_force=True, step=5),
             "tree": ScannIndex.build(emb, brute_force=False, num_leaves=30, num_leaves_to_search=8, reorder=100,
                                      step=5)}
sc = dataclasses.replace(config_lib.step_config(c), candidates="mixed", n_replace=2, n_index=N,
                         index_backend="scann", scann_slot="test:sharded")
shapes = {k: (batches[0][k].shape, batches[0][k].dtype) for k in step_keys(batches[0])}
tx, _ = make_optimizer(2e-3, 10, 1)
rec, srch = [], []
real_mine, real_search = step_mod.mine_from_index, scann_backend.slot_search_in_graph
def mine(e_q, batch, index, sc):
    out, rep = real_mine(e_q, batch, index, sc)
    jax.debug.callback(lambda *a: rec.append([np.asarray(x) for x in a]), out["passage_ids"], rep, batch["mined_exclude"])
    return out, rep
def search(slot, q, k, **kw):
    s, i = real_search(slot, q, k, **kw)
    jax.debug.callback(lambda *a: srch.append([np.asarray(x) for x in a]), q, i)
    return s, i
step_mod.mine_from_index, scann_backend.slot_search_in_graph = mine, search
out = {}
for name, mesh in [("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(data=2, fsdp=2, tensor=2))]:
    ia = index_specs(padded_rows(N, mesh), D, bcfg.l_max, mesh, dtype=jnp.float32)
    pad = lambda x: np.concatenate([x, np.zeros((ia["emb"].shape[0] - N,) + x.shape[1:], x.dtype)])
    index = {"emb": jax.device_put(pad(emb), ia["emb"].sharding),
             "tokens": jax.device_put(pad(ctoks.astype(np.int32)), ia["tokens"].sharding),
             "mask": jax.device_put(pad(cmask.astype(np.int32)), ia["mask"].sharding),
             "step": jax.device_put(np.int32(5), ia["step"].sharding)}
    step, sh = compile_step(cfg, sc, "warmup", tx, mesh, shapes, index_abstract=ia)
    for kind, idx in searchers.items():  # the compiled step looks the searcher up when it runs: no recompilation
        publish("test:sharded", idx)
        state = create_state(cfg, tx, mesh, jax.random.key(0))
        rec.clear(); srch.clear()
        losses = []
        for b in batches:
            state, m = step(state, {k: jax.device_put(b[k], sh["batch"][k]) for k in step_keys(b)}, jnp.float32(0),
                            index)
            losses.append(float(m["loss"]))
        jax.effects_barrier()
        assert len(rec) == len(srch) == 2, (len(rec), len(srch))
        for q, ids in srch:  # the callback searched every shard's queries, as a host search of them does
            assert q.shape == (8, D)
            np.testing.assert_array_equal(ids, idx.search(q, ids.shape[1])[1])
        out[(name, kind)] = (list(rec), losses, [q for q, _ in srch])
for kind in searchers:
    (r1, l1, q1), (r8, l8, q8) = out[("one", kind)], out[("eight", kind)]
    for a, b in zip(q1, q8):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    n = 0
    for a, b in zip(r1, r8):
        if kind == "brute":  # exact scores: the same candidates; the tree's AH lookup tables are quantized, so
            # the ~1e-7 query differences of a sharded matmul may swap candidates at its reorder boundary
            np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])
        for r in (a, b):
            for i in range(r[0].shape[0]):
                assert not set(r[0][i][r[1][i]].tolist()) & set(r[2][i][r[2][i] >= 0].tolist())
        n += int(a[1].sum())
    assert n >= 2 * 8, n
    if kind == "brute":
        assert max(abs(x - y) for x, y in zip(l1, l8)) < 1e-4, (l1, l8)
    print(kind, "mined", n, "losses", l1, l8)
print("OK")
"""


@pytest.mark.slow
def test_sharded_step_with_scann_callback_mines_the_same_candidates(world_dir):
    out = run_with_devices(SHARDED.replace("WORLD", world_dir), 8,
                           timeout=900)
    assert "OK" in out, out


def test_index_backend_config_is_checked():
    from conftest import config_module

    from imprag_jax.model import ConfigError
    from imprag_jax.train import config_lib

    c = config_module("synthetic").get_config()
    assert c.train.index_backend == "exact"
    c.train.update(dict(candidates="mixed", index_backend="faiss"))
    with pytest.raises(ConfigError, match="train.index_backend must be one of"):
        config_lib.step_config(c)
    c.train.index_backend = "scann"
    config_lib.step_config(c)
