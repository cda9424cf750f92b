"""Precomputed passage K/V (infer/kv_store.py): the stored path equals the recomputing one (K/V, logits,
generated tokens, evaluation predictions), compressed variants stay within stated bounds, and a store built from
other weights, or for a joint model, is refused."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, config_module
from imprag_jax.infer.imprag import Retriever, answer, read_passages
from imprag_jax.infer.kv_store import KVStoreError, build_store, open_store
from imprag_jax.kv_store import main as kv_main
from imprag_jax.model import ModelConfig, init_params
from imprag_jax.model.transformer import logits_from_hidden, prompt_offset, prompt_through, run_bottom

N, L = 96, 8


def _setup(seed=0, **kw):
    cfg = ModelConfig.tiny(init_std=0.2, passage_attention="independent", num_layers=5, b=1, t=3, **kw)
    return cfg, init_params(cfg, jax.random.key(seed))


def _corpus(seed=1, V=256):
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, V, (N, L)).astype(np.int32)
    lens = rng.randint(2, L + 1, N)
    lens[5] = 0  # an empty passage
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    return toks * mask, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg, p = _setup()
    toks, mask = _corpus()
    root = tmp_path_factory.mktemp("kv")
    stores = {}
    for name, kw in {"raw": {}, "h2o": {"h2o": 0.5}, "pq": {"pq_m": 4},
                     "raw16": {"dtype": "float16"}}.items():
        stores[name] = str(root / name)
        build_store(p, cfg, toks, mask, stores[name], shard_size=16, batch_size=16, progress=False, **kw)
    return cfg, p, toks, mask, stores


IDS = np.array([[3, 17, -1], [5, 5, 95]])  # an empty slot, an empty passage, a repeated one, the last shard


def _logits(p, cfg, pkv, k):
    prompts = jnp.asarray([[4, 9, 13, 2, 77], [8, 100, 55, 3, 3]])
    m = jnp.ones_like(prompts)
    h = prompt_through(p, cfg, run_bottom(p, cfg, prompts, m), m, pkv, prompt_offset(cfg, k, L))
    return np.asarray(logits_from_hidden(p, cfg, h))


def test_stored_kv_equals_passage_kv_and_gives_the_same_logits(tiny):
    cfg, p, toks, mask, stores = tiny
    store = open_store(stores["raw"], p, cfg)
    assert store.n == N and store.manifest["n_shards"] == 6 and store.manifest["tokens"] == mask.sum()
    safe = np.maximum(IDS, 0)
    pt, pm = toks[safe], mask[safe] * (IDS >= 0)[..., None]
    want = read_passages(p, cfg, jnp.asarray(pt), jnp.asarray(pm))
    got = store.load(IDS, cfg)
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    sel = np.asarray(want.mask)[None, :, :, None, None] * np.ones(want.k.shape, bool)
    np.testing.assert_allclose(np.asarray(got.k)[sel], np.asarray(want.k)[sel], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.v)[sel], np.asarray(want.v)[sel], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(_logits(p, cfg, got, 3), _logits(p, cfg, want, 3), atol=1e-4, rtol=1e-4)
    # float16 storage: the same within half precision
    half = open_store(stores["raw16"], p, cfg).load(IDS, cfg)
    np.testing.assert_allclose(_logits(p, cfg, half, 3), _logits(p, cfg, want, 3), atol=2e-2, rtol=2e-2)
    e_p = store.embeddings()
    ret = Retriever.build(p, cfg, toks, mask, batch_size=8)
    np.testing.assert_allclose(e_p, np.asarray(ret.index.embeddings[:N], np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("use_bias", [False, True])
def test_answer_with_the_store_generates_what_recomputation_generates(tiny, use_bias):
    cfg, p, toks, mask, stores = tiny
    store = open_store(stores["raw"], p, cfg)
    plain = Retriever.build(p, cfg, toks, mask, batch_size=8)
    stored = Retriever.from_kv_store(store, toks, mask)
    prompts = [[4, 9, 13, 2, 77, 31], [5, 6, 7], [8, 100, 55, 3, 3, 9, 10, 12]]
    t = np.zeros((3, 10), np.int32)
    m = np.zeros((3, 10), np.int32)
    for i, q in enumerate(prompts):
        t[i, :len(q)], m[i, :len(q)] = q, 1
    kw = dict(k=3, max_new_tokens=6, stop_ids=(), pad_id=0, search_k=5, use_score_bias=use_bias)
    o1, ids1, _ = answer(p, cfg, plain, t, m, **kw)
    o2, ids2, _ = answer(p, cfg, stored, t, m, **kw)
    np.testing.assert_array_equal(ids1, ids2)  # E_p from the store ranks as the encoded index does
    assert o1 == o2


def test_compressed_variants_stay_within_bounds(tiny):
    """H2O 50%: ceil(n/2) tokens per passage at their original positions; PQ (M = 4 codes of 8 bits per 16-dim head vector): K/V reconstruction
    error < 35% of the vectors' norm; logits within 30% (PQ) / 75% (H2O) relative L2 of the uncompressed store's,
    and closer to them than reading other passages is."""
    cfg, p, toks, mask, stores = tiny
    raw = open_store(stores["raw"], p, cfg)
    ref = raw.load(IDS, cfg)
    ref_logits = _logits(p, cfg, ref, 3)
    h2o = open_store(stores["h2o"], p, cfg)
    n = mask.sum(1)
    assert h2o.manifest["tokens"] == int(np.sum(np.where(n > 0, np.ceil(n / 2), 0)))
    g = h2o.load(IDS, cfg)
    W = h2o.slot_width
    assert W == 4 and g.mask.shape == (2, 3 * W)  # the longest passage (8 tokens) keeps 4
    gm, rm = np.asarray(g.mask), np.asarray(ref.mask)
    for r in range(2):
        for j in range(3):
            i = IDS[r, j]
            want = 0 if i < 0 else int(np.ceil(n[i] / 2))
            assert gm[r, j * W:(j + 1) * W].sum() == want
    # a kept token carries its original key: it equals the uncompressed key at the same slot position
    sh = h2o._shard(1)
    kept = sh["pos"][sh["offsets"][17 - 16]:sh["offsets"][17 - 16 + 1]]
    np.testing.assert_allclose(np.asarray(g.k)[:, 0, W:W + len(kept)], np.asarray(ref.k)[:, 0, L + kept],
                               atol=1e-5)
    pq = open_store(stores["pq"], p, cfg).load(IDS, cfg)
    sel = rm[None, :, :, None]
    for a, b in ((pq.k, ref.k), (pq.v, ref.v)):
        a, b = np.asarray(a), np.asarray(b)
        err = np.linalg.norm((a - b) * sel[..., None]) / np.linalg.norm(b * sel[..., None])
        assert err < 0.35, err
    # logits (relative L2 to the uncompressed store's; this random init_std = 0.2 model is very sensitive: reading
    # three other passages moves them by 0.86): PQ 0.23, H2O 50% 0.61 when written
    def rel(pkv):
        return np.linalg.norm(_logits(p, cfg, pkv, 3) - ref_logits) / np.linalg.norm(ref_logits)

    other = rel(raw.load(np.array([[30, 40, 50], [60, 70, 80]]), cfg))
    assert rel(pq) < 0.3 and rel(g) < 0.75 and max(rel(pq), rel(g)) < other
    sizes = {k: json.load(open(os.path.join(v, "manifest.json")))["kv_bytes_per_passage"] for k, v in stores.items()}
    assert sizes["pq"] < sizes["raw"] / 8 and sizes["h2o"] < 0.6 * sizes["raw"] and sizes["raw16"] < 0.52 * sizes["raw"]


def test_a_store_from_other_weights_or_for_a_joint_model_is_refused(tiny, tmp_path):
    cfg, p, toks, mask, stores = tiny
    _, p2 = _setup(seed=1)
    with pytest.raises(KVStoreError, match="other weights"):
        open_store(stores["raw"], p2, cfg)
    joint = cfg.replace(passage_attention="joint")
    with pytest.raises(KVStoreError, match="independent"):
        build_store(p, joint, toks, mask, str(tmp_path / "j"), progress=False)
    with pytest.raises(KVStoreError, match="independent"):
        open_store(stores["raw"], p, joint)
    with pytest.raises(KVStoreError, match="no passage K/V store"):
        open_store(str(tmp_path / "none"))
    with pytest.raises(KVStoreError, match="l_max"):
        Retriever.from_kv_store(open_store(stores["raw"]), toks[:, :4], mask[:, :4])
    with pytest.raises(KVStoreError, match="pq_m"):
        build_store(p, cfg, toks, mask, str(tmp_path / "q"), pq_m=5, progress=False)


def _files(d):
    return sorted(os.path.relpath(os.path.join(dp, f), d) for dp, _, fs in os.walk(d) for f in fs)


@pytest.mark.parametrize("kind", ["raw", "pq"])
def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(tiny, tmp_path, monkeypatch, kind):
    """An exception after 2 of 6 shards (the third written but not yet renamed) leaves no manifest (the folder is
    not a store); the same call again computes only the 4 missing shards (and, with PQ, does not retrain the
    codec), and every array equals the uninterrupted build's byte for byte; other options are refused."""
    from imprag_jax.infer import kv_store as KS

    cfg, p, toks, mask, stores = tiny
    kw = {"raw": {}, "pq": {"pq_m": 4}}[kind]
    out = str(tmp_path / "kv")
    commit = KS._commit_shard
    calls = {"commit": 0, "batch": 0, "pq": 0}

    def failing_commit(tmp, final):
        if calls["commit"] == 2:
            raise KeyboardInterrupt
        calls["commit"] += 1
        commit(tmp, final)

    run_batch, train_pq = KS._run_batch, KS._train_pq

    def counting_batch(*a, **k):
        calls["batch"] += 1
        return run_batch(*a, **k)

    def counting_pq(*a, **k):
        calls["pq"] += 1
        return train_pq(*a, **k)

    monkeypatch.setattr(KS, "_run_batch", counting_batch)
    monkeypatch.setattr(KS, "_train_pq", counting_pq)
    monkeypatch.setattr(KS, "_commit_shard", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        build_store(p, cfg, toks, mask, out, shard_size=16, batch_size=16, progress=False, **kw)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000", "00001", "00002.tmp"]
    with pytest.raises(KVStoreError, match="no passage K/V store"):
        open_store(out)
    with pytest.raises(KVStoreError, match="unfinished build"):  # other options into the same folder
        build_store(p, cfg, toks, mask, out, shard_size=16, batch_size=16, progress=False, dtype="float16", **kw)
    with pytest.raises(KVStoreError, match="unfinished build"):  # other weights
        build_store(_setup(seed=1)[1], cfg, toks, mask, out, shard_size=16, batch_size=16, progress=False, **kw)
    monkeypatch.setattr(KS, "_commit_shard", commit)
    calls.update(batch=0, pq=0)
    build_store(p, cfg, toks, mask, out, shard_size=16, batch_size=16, progress=False, **kw)
    assert calls["batch"] == 4 and calls["pq"] == 0  # shards 2..5 only (one batch each); the codec was kept
    ref = stores[kind]
    assert _files(out) == _files(ref) and "build_state.json" not in _files(out)
    for f in _files(ref):
        if f.endswith(".npy"):
            with open(os.path.join(out, f), "rb") as a, open(os.path.join(ref, f), "rb") as b:
                assert a.read() == b.read(), f
    m1, m2 = (json.load(open(os.path.join(d, "manifest.json"))) for d in (out, ref))
    for m in (m1, m2):
        m.pop("build_seconds"), m.pop("pq_train_seconds")
    assert m1 == m2
    store = open_store(out, p, cfg)
    np.testing.assert_array_equal(np.asarray(store.load(IDS, cfg).v), np.asarray(open_store(ref).load(IDS, cfg).v))
    with pytest.raises(KVStoreError, match="already holds a store"):
        build_store(p, cfg, toks, mask, out, shard_size=16, batch_size=16, progress=False, **kw)
    build_store(p, cfg, toks, mask, out, shard_size=32, batch_size=16, progress=False, overwrite=True, **kw)
    assert open_store(out).manifest["n_shards"] == 3 and sorted(os.listdir(os.path.join(out, "shards"))) == \
        ["00000", "00001", "00002"]


# ------------------------------------------------------------------------------------------------ on a run
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, world_dir):
    """12 steps of configs/synthetic.py:smoke (independent passage attention), checkpoints at 6 and 12."""
    from imprag_jax.train.trainer import train

    c = config_module("synthetic").get_config("smoke")
    c.data.dir = world_dir
    c.data.prefetch = 0
    c.train.update(dict(ckpt_every=6, stages="warmup"))
    c.eval.modes = []
    wd = str(tmp_path_factory.mktemp("kvrun") / "run")
    train(c, wd)
    return wd


@pytest.mark.slow
def test_build_cli_and_evaluation_with_the_store_on_the_synthetic_world(smoke_run, tmp_path, capsys):
    """The build command on a run; evaluation reading the store predicts exactly what recomputation predicts
    (EM equal), with H2O 50% within 0.15 EM of it; a store from another checkpoint is refused (exit 2)."""
    from imprag_jax.evaluation import run

    out = str(tmp_path / "kv")
    kv_main(["build", "--workdir", smoke_run, "--out", out])
    assert "passages" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        kv_main(["build", "--workdir", smoke_run, "--out", out])
    assert e.value.code == 2 and "already holds a store" in capsys.readouterr().err
    kw = dict(tasks="qa", modes="imprag", ks="1,5", limit=24, plot=False, progress=False, predictions=True)
    base = run(None, smoke_run, out_dir=str(tmp_path / "e0"), **kw)
    stored = run(None, smoke_run, out_dir=str(tmp_path / "e1"), kv_store=out, **kw)
    p0 = [json.loads(x) for x in open(tmp_path / "e0" / "predictions.jsonl")]
    p1 = [json.loads(x) for x in open(tmp_path / "e1" / "predictions.jsonl")]
    assert [x["prediction"] for x in p0] == [x["prediction"] for x in p1]
    assert [x["retrieved"] for x in p0] == [x["retrieved"] for x in p1]
    assert [r["em"] for r in base["rows"]] == [r["em"] for r in stored["rows"]]
    h2o = str(tmp_path / "kv_h2o")
    kv_main(["build", "--workdir", smoke_run, "--out", h2o, "--h2o", "0.5"])
    half = run(None, smoke_run, out_dir=str(tmp_path / "e2"), kv_store=h2o, **kw)
    for a, b in zip(base["rows"], half["rows"]):
        assert abs(a["em"] - b["em"]) <= 0.15
    old = str(tmp_path / "kv6")
    kv_main(["build", "--workdir", smoke_run, "--out", old, "--checkpoint", "6"])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "imprag_jax.evaluate", "--workdir", smoke_run, "--kv_store", old,
                        "--tasks", "qa", "--limit", "4", "--out", str(tmp_path / "e3")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "other weights" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_with_the_store_prints_what_recomputation_prints(smoke_run, tmp_path, capsys, monkeypatch):
    """The build command interrupted (Ctrl-C after one shard) exits 130 saying how to resume, and the same command
    then finishes the store. `python -m imprag_jax.generate --workdir RUN --kv_store DIR`: the same retrieved
    passages and answers as without the store (scores to 2e-2: the stored E_p are the encoded ones to float
    tolerance); a store of another checkpoint is refused in one line (exit 2)."""
    from imprag_jax.generate import main as gen_main
    from imprag_jax.infer import kv_store as KS
    from imprag_jax.run.session import ImpRAGSession

    out = str(tmp_path / "kv")
    build = ["build", "--workdir", smoke_run, "--out", out, "--shard_size", "16"]
    commit = KS._commit_shard

    def interrupt_after_one(tmp, final):
        if os.path.basename(final) != "00000":
            raise KeyboardInterrupt
        commit(tmp, final)

    monkeypatch.setattr(KS, "_commit_shard", interrupt_after_one)
    with pytest.raises(SystemExit) as e:
        kv_main(build)
    assert e.value.code == 130 and "run the same command again to resume" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "manifest.json")) and os.path.isdir(os.path.join(out, "shards", "00000"))
    monkeypatch.setattr(KS, "_commit_shard", commit)
    kv_main(build)
    assert "resuming: 1 of" in capsys.readouterr().err
    assert open_store(out).manifest["n_shards"] > 1
    prompts = ["Where was Peimim Makik born ?", "Who employs Peimim Makik ?", "Q: Where was Stavu Stauzouk born? A:"]
    args = ["--workdir", smoke_run, "--k", "3", "--show", "4", "--max_new_tokens", "6", *prompts]

    def lines(text):  # the score column aside: "  [rank]    score  title: text"
        return [re.sub(r"^(  \[\d+\]) +-?[\d.]+", r"\1", ln) for ln in text.splitlines()]

    gen_main(args)
    plain = capsys.readouterr().out
    gen_main(args + ["--kv_store", out])
    stored = capsys.readouterr().out
    assert plain.count("answer:") == 3 and lines(plain) == lines(stored)
    s0 = ImpRAGSession.from_workdir(smoke_run)
    s1 = ImpRAGSession.from_workdir(smoke_run, kv_store=out)
    assert s1.kv_store is not None and s0.kv_store is None
    r0, r1 = s0.ask(prompts, k=3, max_new_tokens=6), s1.ask(prompts, k=3, max_new_tokens=6)
    assert s1.retriever.kv_store is s1.kv_store
    for a, b in zip(r0, r1):
        assert a["answer"] == b["answer"] and a["ids"] == b["ids"]
        np.testing.assert_allclose([p[1] for p in a["passages"]], [p[1] for p in b["passages"]], atol=2e-2, rtol=2e-2)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "imprag_jax.generate", "--workdir", smoke_run, "--step", "6",
                        "--kv_store", out, "hello"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "other weights" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
