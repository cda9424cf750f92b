"""Training: sharded == single device, loss falls, warmup raises recall, self-distillation moves P_R toward P_T,
exact resume, no recompilation, config errors, the CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, TINY_SYNTHETIC, config_module, run_with_devices

pytestmark = pytest.mark.slow


def tiny_config(world_dir, **train):
    # the step without the query filler (`:no_filler`), as these tests were written; the default's query pass is
    # covered by test_query_tokens_feed_e_q_only, test_score_scale_*, the smoke-config runs and the data tests.
    # (The full-suite XLA crash once blamed on the filler was the process's memory-map limit: see conftest.)
    c = config_module("synthetic").get_config("no_filler")
    c.data.dir = world_dir
    c.model.update(dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, embed_scale=8.0,
                        init_std=0.125))
    c.data.update(dict(batch_size=8, free_batch_size=2, prefetch=0))
    c.train.update(dict(steps=16, warmup_steps=2, log_every=1, ckpt_every=0, time_budget_s=0.0, lr=3e-3))
    c.train.update(train)
    c.eval.update(dict(modes=[], limit=64))
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(dir_a, dir_b, steps: int):
    """Two finished runs logged the same loss at every step 1..steps and end in bit-identical parameters."""
    from imprag_jax import run as R

    a, b = _losses(str(dir_a)), _losses(str(dir_b))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert a[s] == b[s], (s, a[s], b[s])  # bit-exact on CPU
    pa, sa, _ = R.restore_params(str(dir_a))
    pb, sb, _ = R.restore_params(str(dir_b))
    assert sa == sb == steps
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_resume_reproduces_the_uninterrupted_run_exactly_and_never_recompiles(world_dir, tmp_path):
    from imprag_jax.train.trainer import train

    c = tiny_config(world_dir, stages="both", warmup_share=0.5)
    full = train(c, str(tmp_path / "full"))
    assert full["compiles_after_step_2"] == 0
    a = _losses(str(tmp_path / "full"))
    assert sorted(a) == list(range(1, 17))
    assert np.mean([a[s] for s in range(13, 17)]) < np.mean([a[s] for s in range(1, 5)]) - 0.5  # it learns

    c2 = tiny_config(world_dir, stages="both", warmup_share=0.5, stop_at_step=7)
    part = train(c2, str(tmp_path / "resumed"))
    assert part["step"] == 7 and part["stopped_early"] is True
    c3 = tiny_config(world_dir, stages="both", warmup_share=0.5)
    rest = train(c3, str(tmp_path / "resumed"))
    assert rest["step"] == 16
    b = _losses(str(tmp_path / "resumed"))
    for s in range(1, 17):
        assert a[s] == b[s], (s, a[s], b[s])  # bit-exact on CPU


def test_warmup_raises_recall(world_dir, tmp_path):
    from imprag_jax.data.pipeline import corpus_tokens, load_tokenizer
    from imprag_jax.infer.imprag import Retriever, evaluate_task
    from imprag_jax.model import init_params
    from imprag_jax import run
    from imprag_jax.train.trainer import train

    c = tiny_config(world_dir, stages="warmup", steps=300, log_every=50, lr=3e-3, warmup_steps=20)
    c.data.update(dict(batch_size=16, free_batch_size=0))
    res = train(c, str(tmp_path / "w"))
    tok = load_tokenizer(world_dir)
    cfg = run.model_config(c, tok.vocab_size)
    toks, mask = corpus_tokens(world_dir, tok, c.data.l_max)

    def recall(params):
        r = Retriever.build(params, cfg, toks, mask)
        out = evaluate_task(params, cfg, world_dir, "qa", tok, r, k=1, L_q=c.data.L_q, l_max=c.data.l_max,
                            max_new_tokens=1, limit=128)
        return out["gold_recall@5"]

    import orbax.checkpoint as ocp

    before = recall(init_params(cfg, jax.random.key(c.seed)))
    mngr = ocp.CheckpointManager(str(tmp_path / "w" / "checkpoints"), item_names=("state", "data", "meta"))
    state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    after = recall(state["params"])
    assert after > before + 0.3, (before, after)


def _fixed_batch(world_dir, c):
    from imprag_jax.data.pipeline import TrainBatches, load_tokenizer
    from imprag_jax import run

    tok = load_tokenizer(world_dir)
    data = TrainBatches(world_dir, tok, run.batch_config(c), prefetch=0)
    b = data.batch(0)
    data.close()
    return tok, b


def test_self_distillation_moves_p_r_toward_p_t(world_dir):
    """Same init, same batch: with the KL term (lambda > 0) P_R ends much closer to the (moving) P_T than without.

    tau_t = 1: with a sharp teacher (tau_t = 0.05) the reader memorising this one batch (gen NLL 7 -> 0.3 in 20
    steps) flips P_T's argmax from step to step, and the KL measures the chase, not the direction.
    """
    from imprag_jax.model.sharding import make_mesh
    from imprag_jax import run
    from imprag_jax.train import config_lib
    from imprag_jax.train.state import compile_step, create_state
    from imprag_jax.train.step import make_optimizer, step_keys

    c = tiny_config(world_dir, score_bias=False, teacher_len=0)  # plain reader: P_R only enters via the KL
    c.model.update(dict(passage_attention="joint", init_std=128 ** -0.5))
    tok, b = _fixed_batch(world_dir, c)
    cfg = run.model_config(c, tok.vocab_size)
    tx, _ = make_optimizer(3e-3, 100, 1)
    mesh = make_mesh()
    shapes = {k: (b[k].shape, b[k].dtype) for k in step_keys(b)}
    final = {}
    for lam in (0.0, 10.0):
        sc = dataclasses.replace(config_lib.step_config(c), lam=lam, tau_t=1.0)
        step, _ = compile_step(cfg, sc, "distill", tx, mesh, shapes)
        state = create_state(cfg, tx, mesh, jax.random.key(0))
        kls = []
        for _ in range(20):
            state, m = step(state, b, jnp.float32(0))
            kls.append(float(m["kl"]))
        final[lam] = np.mean(kls[-4:])
    assert final[0.0] > 0.02 and final[10.0] < 0.3 * final[0.0], final


SHARDED = TINY_SYNTHETIC + r"""
c.data.update(dict(batch_size=12, free_batch_size=4, prefetch=0))
# the step without the query filler: with its extra bottom pass (query_tokens) this 8-fake-device program on 2 cores
# ended in XLA's CPU collective-rendezvous termination in 3 of 4 runs, the last after 676 s, past the 600 s wait
# (conftest.run_with_devices), so a hang rather than slowness; without it, it has always passed. Open: the
# query-pass step on 8 CPU devices (the split itself is tested in test_query_tokens_feed_e_q_only)
c.data.update(dict(query_filler=0.0, query_filler_pool="unseen", query_filler_split=False, L_query=0))
sc = config_lib.step_config(c)
data = TrainBatches("WORLD", tok, run.batch_config(c), prefetch=0)
batches = [data.batch(i) for i in range(2)]
shapes = {k: (batches[0][k].shape, batches[0][k].dtype) for k in step_keys(batches[0])}
tx, _ = make_optimizer(2e-3, 10, 1)
out = {}
for name, mesh in [("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(data=2, fsdp=2, tensor=2))]:
    for stage in ("warmup", "distill"):
        step, sh = compile_step(cfg, sc, stage, tx, mesh, shapes)
        state = create_state(cfg, tx, mesh, jax.random.key(0))
        ms = []
        for b in batches:
            state, m = step(state, {k: jax.device_put(b[k], sh["batch"][k]) for k in step_keys(b)}, jnp.float32(0))
            ms.append({k: float(v) for k, v in m.items()})
        out[(name, stage)] = (ms, jax.device_get(state["params"]))
for stage in ("warmup", "distill"):
    (m1, p1), (m8, p8) = out[("one", stage)], out[("eight", stage)]
    for a, b in zip(m1, m8):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4 * max(1, abs(a[k])), (stage, k, a[k], b[k])
    d = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(stage, "max param diff", d, "loss", m1[-1]["loss"], m8[-1]["loss"])
    assert d < 1e-5, d
print("OK")
"""


def test_sharded_step_on_8_devices_equals_single_device(world_dir):
    out = run_with_devices(SHARDED.replace("WORLD", world_dir), 8,
                           timeout=900)
    assert "OK" in out, out


def _cli(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "imprag_jax.train"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("override,msg", [
    ("--config.train.nope=1", "nope"),
    ("--config.train.stages=sometimes", "train.stages must be one of"),
    ("--config.model.b=4", "0 <= b <= t"),
    ("--config.data.kind=prepared", "not a prepared data directory"),
    ("--config.data.qa_templates=4", "qa_templates must be 1, 2 or 3"),
])
def test_cli_rejects_bad_configs_with_clear_errors(override, msg, tmp_path):
    r = _cli(["--config", "configs/synthetic.py:smoke", "--workdir", str(tmp_path / "w"), override], timeout=300)
    assert r.returncode != 0
    assert msg in r.stderr + r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr


def test_existing_world_with_another_config_is_refused(world_dir, tmp_path):
    from imprag_jax.model import ConfigError
    from imprag_jax import run

    c = tiny_config(world_dir)  # world_dir was generated with 200 people (allowed) and 2 QA phrasings
    assert run.training_data_dir(c, str(tmp_path)) == world_dir
    c.data.qa_templates = 3
    with pytest.raises(ConfigError, match="qa_templates=2 but the config asks for qa_templates=3"):
        run.training_data_dir(c, str(tmp_path))


def test_synthetic_smoke_config_runs_end_to_end(tmp_path):
    r = _cli(["--config", "configs/synthetic.py:smoke", "--workdir", str(tmp_path / "s")], timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.load(open(tmp_path / "s" / "eval" / "final.json"))
    assert res["step"] == 12 and {row["task"] for row in res["eval"]} == {"qa", "slot_filling"}
    assert os.path.exists(tmp_path / "s" / "checkpoints")


def test_mined_candidates_replace_negatives_with_the_best_new_passages():
    from imprag_jax.train.step import StepConfig, mine_from_index

    from oracles import mining_case

    N, D, l = 12, 4, 3
    emb, e_q, order, toks = mining_case(N, D, l)
    ids = np.array([[order[0, 0], order[0, 5], order[0, 7], order[0, 9]],
                    [order[1, 3], order[1, 1], order[1, 8], order[1, 2]]], np.int32)
    batch = {"passage_ids": jnp.asarray(ids), "positives": jnp.asarray([[1, 0, 0, 0], [0, 1, 0, 0]]),
             "passages": jnp.asarray(toks[ids]),
             "passage_mask": jnp.ones((2, 4, l), jnp.int32)}
    sc = StepConfig(candidates="mixed", n_replace=2, n_index=N)
    out, rep = mine_from_index(jnp.asarray(e_q), batch, {"emb": jnp.asarray(emb), "tokens": jnp.asarray(toks),
                                                         "mask": jnp.ones((N, l), jnp.int32)}, sc)
    new = np.asarray(out["passage_ids"])
    for i in range(2):
        best = [j for j in order[i] if j not in ids[i]][:2]
        negs = [s for s in range(4) if batch["positives"][i, s] == 0]
        assert list(new[i, negs[:2]]) == best  # the first two negative slots get the two best new passages
        assert list(new[i, negs[2:]]) == list(ids[i, negs[2:]])
        pos = [s for s in range(4) if batch["positives"][i, s] == 1]
        assert list(new[i, pos]) == list(ids[i, pos])
        np.testing.assert_array_equal(np.asarray(out["passages"])[i], toks[new[i]])
    assert int(rep.sum()) == 4


def test_training_with_candidates_from_the_models_own_index(world_dir, tmp_path):
    from imprag_jax.train.trainer import train

    c = tiny_config(world_dir, stages="warmup", steps=6, candidates="mixed", index_negatives=2, refresh_every=3)
    res = train(c, str(tmp_path / "idx"))
    assert res["step"] == 6 and res["compiles_after_step_2"] == 0
    rows = [json.loads(x) for x in open(tmp_path / "idx" / "metrics.jsonl")]
    assert all(r["mined_per_example"] > 1.5 for r in rows if "mined_per_example" in r)


def test_resume_between_index_refreshes_mines_from_the_checkpointed_index(world_dir, tmp_path):
    """Negatives mined from the model's own index (refreshed at steps 0, 4, 8): a run stopped at step 6 keeps the
    index of step 4 in its checkpoint and the resumed run mines from it (not from one encoded with the parameters
    of step 6), so its losses and final parameters equal the uninterrupted run's."""
    from imprag_jax import run as R
    from imprag_jax.train.trainer import train

    kw = dict(stages="warmup", steps=12, candidates="mixed", index_negatives=2, refresh_every=4)
    full = train(tiny_config(world_dir, **kw), str(tmp_path / "full"))
    assert full["step"] == 12
    part = train(tiny_config(world_dir, stop_at_step=6, **kw), str(tmp_path / "resumed"))
    assert part["step"] == 6 and part["stopped_early"] is True
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(R.checkpoint.checkpoint_dir(str(tmp_path / "resumed")), item_names=R.checkpoint.ITEMS)
    meta = mngr.restore(6, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    mngr.close()
    assert meta["index"]["step"] == 4 and meta["index"]["config_hash"]  # the index of the last refresh
    rest = train(tiny_config(world_dir, **kw), str(tmp_path / "resumed"))
    assert rest["step"] == 12
    assert_same_run(tmp_path / "full", tmp_path / "resumed", 12)


def test_llama3_smoke_configs_train_and_evaluate_on_the_minikilt(tmp_path, shared_data):
    """The paper-scale configs' structure (GQA ratio, llama3 rope scaling, tied/untied, remat, accumulation) and
    data (NQ + SQuAD retrieval rows, retrieval-free rows) at toy size on the CPU: the 3B smoke prepares the
    mini-KILT in its workdir, the 8B smoke reads that folder; both end with a row per evaluation task, the
    unseen formats included (the 8B only those, to save time)."""
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not fetched (python -m imprag_jax.convert.fetch smollm2): the smoke's tokenizer")
    data, unseen = None, ["hotpotqa", "trex", "scifact"]
    for config, tasks in (("llama3_2_3b.py:smoke", ["nq", "squad"] + unseen), ("llama3_1_8b.py:smoke", unseen)):
        wd = tmp_path / config.split(".")[0]
        where = [f"--config.data.dir={data}"] if data else [f"--config.data.source={shared_data}"]
        r = _cli(["--config", f"configs/{config}", "--workdir", str(wd), "--config.eval.tasks=" + ",".join(tasks)]
                 + where, timeout=900)
        assert r.returncode == 0, (config, r.stdout[-3000:], r.stderr[-3000:])
        data = data or wd / "data"
        assert (data / "passages.jsonl").is_file()
        rows = [json.loads(x) for x in open(wd / "metrics.jsonl")]
        train_rows = [x for x in rows if "loss" in x]
        assert [x["stage"] for x in train_rows] == ["warmup", "distill", "distill"]
        assert all(np.isfinite(x["loss"]) and x["gen_nll"] > 0 for x in train_rows)
        cfg = json.load(open(wd / "config.json"))
        assert cfg["model"]["tokenizer"] == "smollm2" and cfg["data"]["free_batch_size"] > 0
        res = json.load(open(wd / "eval" / "final.json"))
        assert res["step"] == 3
        final = {x["task"]: x for x in res["eval"] if x["mode"] == "imprag"}
        assert list(final) == tasks
        for task in unseen:
            assert final[task]["n"] == 4 and final[task]["k"] == 4
        assert "accuracy" in final["scifact"] and "em" in final["hotpotqa"]


def test_smollm2_smoke_config_runs(tmp_path, shared_data):
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not fetched (python -m imprag_jax.convert.fetch smollm2)")
    r = _cli(["--config", "configs/smollm2.py:smoke", "--workdir", str(tmp_path / "w"),
              f"--config.data.source={shared_data}"], timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.load(open(tmp_path / "w" / "eval" / "final.json"))
    assert res["step"] == 3 and res["eval"][0]["task"] == "nq"


# ------------------------------------------------------------------------------ score scale and training health


def _tiny_setup(world_dir, **model):
    from imprag_jax.model import init_params
    from imprag_jax import run
    from imprag_jax.train import config_lib

    c = tiny_config(world_dir, score_bias=False, teacher_len=0)
    c.model.update(model)
    tok, b = _fixed_batch(world_dir, c)
    cfg = run.model_config(c, tok.vocab_size)
    params = init_params(cfg, jax.random.key(1))
    sc = config_lib.step_config(c)
    batch = {k: jnp.asarray(b[k]) for k in b if not isinstance(b[k], list)}
    return c, cfg, sc, params, batch


@pytest.mark.parametrize("stage", ["warmup", "distill"])
def test_score_scale_multiplies_every_score_and_scale_one_is_today(world_dir, stage):
    """At scale 1 ("1.0") the NCE and KL are today's ("raw"); at "sqrt_dim" they are the raw losses of the scores
    divided by sqrt(head_dim), and top-k rankings do not change."""
    from imprag_jax.model.transformer import query_embedding
    from imprag_jax.train import losses
    from imprag_jax.train.step import loss_fn, teacher_loglik

    c, cfg, sc, params, batch = _tiny_setup(world_dir)
    key = "nce" if stage == "warmup" else "kl"
    raw = loss_fn(params, cfg, sc, stage, batch, jnp.float32(0))[1]
    one = loss_fn(params, cfg.replace(score_scale="1.0"), sc, stage, batch, jnp.float32(0))[1]
    assert float(raw[key]) == float(one[key])
    scaled_cfg = cfg.replace(score_scale="sqrt_dim")
    assert scaled_cfg.score_multiplier == 1.0 / np.sqrt(cfg.head_dim)
    scaled = loss_fn(params, scaled_cfg, sc, stage, batch, jnp.float32(0))[1]
    # E_q's prompt: its own copy under data.query_filler_split (the synthetic default), else the reader's
    qt, qm = ((batch["query_tokens"], batch["query_mask"]) if "query_tokens" in batch
              else (batch["tokens"], batch["prompt_mask"]))
    e_raw = query_embedding(params, cfg, qt, qm)
    e_scaled = query_embedding(params, scaled_cfg, qt, qm)
    np.testing.assert_allclose(np.asarray(e_scaled), np.asarray(e_raw) / np.sqrt(cfg.head_dim), rtol=1e-6)
    # the scaled loss by hand from the raw embeddings
    from imprag_jax.model.transformer import passage_embedding, run_bottom

    B, k, L = batch["passages"].shape
    e_p, h_p = passage_embedding(params, cfg, batch["passages"].reshape(B * k, L),
                                 batch["passage_mask"].reshape(B * k, L))
    e_p = e_p.reshape(B, k, -1)
    valid = (batch["passage_mask"].sum(-1) > 0) & (batch["passage_ids"] >= 0)
    m = 1.0 / np.sqrt(cfg.head_dim)
    if stage == "warmup":
        want, _ = losses.multilabel_nce(e_raw * m, e_p, batch["positives"], batch["passage_ids"],
                                        valid.astype(jnp.int32), valid.any(-1), sc.nce_reduction)
    else:
        h_q = run_bottom(params, cfg, batch["tokens"], batch["mask"])
        t_ll = teacher_loglik(params, cfg, sc, h_q, batch["mask"], batch["tokens"], batch["loss_mask"],
                              h_p.reshape(B, k, L, -1), batch["passage_mask"])
        s = jnp.einsum("bd,bkd->bk", e_raw * m, e_p)
        want, _, _ = losses.self_distillation_kl(t_ll, s, valid, valid.any(-1), sc.tau_t, sc.tau_r)
    np.testing.assert_allclose(float(scaled[key]), float(want), rtol=2e-5)
    assert float(scaled[key]) != float(raw[key])


def test_per_loss_gradient_norms_equal_separate_gradients(world_dir):
    """`loss_grad_norms` (what the trainer logs) equals the norms of jax.grad of J_gen and of J_ret taken
    separately; their lam-weighted sum is the step's gradient."""
    import optax

    from imprag_jax.train.step import loss_fn, loss_grad_norms

    c, cfg, sc, params, batch = _tiny_setup(world_dir, score_scale="sqrt_dim")
    for stage in ("warmup", "distill"):  # each gradient jitted whole: one compile instead of one per primitive
        got = jax.jit(lambda p: loss_grad_norms({"params": p}, batch, jnp.float32(0), cfg=cfg, sc=sc,
                                                stage=stage))(params)
        f = lambda p: loss_fn(p, cfg, sc, stage, batch, jnp.float32(0))
        g_gen = jax.jit(jax.grad(lambda p: f(p)[1]["gen_nll"]))(params)
        g_ret = jax.jit(jax.grad(lambda p: f(p)[1]["ret_loss"]))(params)
        np.testing.assert_allclose(float(got["grad_norm_gen"]), float(optax.tree.norm(g_gen)), rtol=1e-5)
        np.testing.assert_allclose(float(got["grad_norm_ret"]), float(optax.tree.norm(g_ret)), rtol=1e-5)
        assert float(got["grad_norm_ret"]) > 0 and float(got["grad_norm_gen"]) > 0
        g_tot = jax.jit(jax.grad(lambda p: f(p)[0]))(params)
        g_sum = jax.tree.map(lambda a, b: a + sc.lam * b, g_gen, g_ret)
        d = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_tot), jax.tree.leaves(g_sum)))
        assert d < 1e-5, d


def test_retrieval_stage_trains_only_the_retrieval_path(world_dir):
    """stage "retrieval": gradient reaches layers [0, b) and layer b's q/k projections only (embeddings frozen,
    nothing above layer b); its loss is the NCE, with no generation loss."""
    from imprag_jax.train.step import loss_fn

    c, cfg, sc, params, batch = _tiny_setup(world_dir, score_scale="sqrt_dim")
    (loss, m), g = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg, sc, "retrieval", batch, jnp.float32(0)),
                                              has_aux=True))(params)
    assert float(m["gen_nll"]) == 0.0 and float(loss) == float(m["nce"]) > 0
    assert float(jnp.abs(g["embed"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(g["final_norm"]["scale"]).max()) == 0.0
    b = cfg.b
    flat = jax.tree_util.tree_flatten_with_path(g["layers"])[0]
    for path, leaf in flat:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        below = float(jnp.abs(leaf[:b]).max())
        at_b = float(jnp.abs(leaf[b]).max())
        above = float(jnp.abs(leaf[b + 1:]).max())
        assert above == 0.0, name
        assert below > 0.0, name
        if name.endswith("wq") or name.endswith("wk") or "input_norm" in name:
            assert at_b > 0.0, name
        else:
            assert at_b == 0.0, name


def test_time_budget_is_reported_in_the_final_table(world_dir, tmp_path):
    from imprag_jax.train.trainer import train

    c = tiny_config(world_dir, time_budget_s=1e-6)
    res = train(c, str(tmp_path / "b"))
    assert res["stopped_early"] == "budget" and res["step"] < c.train.steps
    with open(tmp_path / "b" / "eval" / "final.md") as f:
        text = f.read()
    assert "WARNING" in text and f"step {res['step']} of {c.train.steps}" in text


def test_two_runs_with_the_same_seed_give_identical_metrics(world_dir, tmp_path):
    """A whole run (training, health metrics, final evaluation) is a function of the config and the seed: only
    the timing fields differ."""
    from imprag_jax.train.trainer import train

    timing = {"steps_per_s", "tokens_per_s", "elapsed_s"}
    out = []
    for name in ("a", "b"):
        c = tiny_config(world_dir, steps=8, log_every=4, stages="both", warmup_share=0.5)
        c.eval.update(dict(modes=["imprag"], k=[1], limit=16, tasks=["qa"]))
        res = train(c, str(tmp_path / name))
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows = [{k: v for k, v in json.loads(x).items() if k not in timing} for x in f]
        out.append((rows, res["eval"]))
    assert out[0] == out[1]
    assert any("grad_norm_ret" in r and "ret_chance" in r and "clip_fraction" in r for r in out[0][0])


def test_init_from_starts_a_run_from_another_runs_parameters(world_dir, tmp_path):
    from imprag_jax.run import restore_params
    from imprag_jax.model import ConfigError
    from imprag_jax.train.trainer import train

    a = tiny_config(world_dir, steps=4, log_every=2)
    train(a, str(tmp_path / "a"))
    pa, _, _ = restore_params(str(tmp_path / "a"))
    b = tiny_config(world_dir, steps=1, log_every=1, lr=1e-12, warmup_steps=1, init_from=str(tmp_path / "a"))
    train(b, str(tmp_path / "b"))
    pb, _, _ = restore_params(str(tmp_path / "b"))
    d = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    assert d < 1e-6, d  # one step at lr 1e-12 away from run a's weights (a fresh init is ~0.1 away)
    bad = tiny_config(world_dir, steps=1, init_from=str(tmp_path / "a"))
    bad.model.hidden_size = 32
    with pytest.raises(ConfigError, match="another architecture"):
        train(bad, str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="init_from"):
        train(tiny_config(world_dir, steps=1, init_from=str(tmp_path / "nope")), str(tmp_path / "d"))


def test_query_tokens_feed_e_q_only(world_dir):
    """QUERY_KEYS (data.query_filler_split): query tokens equal to the prompt give exactly the step without them;
    other query tokens change the retrieval loss and scores, never the generation loss."""
    from imprag_jax.train.step import loss_fn

    c, cfg, sc, params, batch = _tiny_setup(world_dir, score_scale="sqrt_dim")
    batch = {k: v for k, v in batch.items() if not k.startswith("query_")}  # the synthetic default carries them
    Lq = int(batch["prompt_mask"].sum(1).max())
    same = dict(batch, query_tokens=batch["tokens"][:, :Lq], query_mask=batch["prompt_mask"][:, :Lq])
    base = loss_fn(params, cfg, sc, "warmup", batch, jnp.float32(0))[1]
    got = loss_fn(params, cfg, sc, "warmup", same, jnp.float32(0))[1]
    for k in ("nce", "gen_nll", "score_mean"):
        np.testing.assert_allclose(float(got[k]), float(base[k]), rtol=1e-6, err_msg=k)
    other = dict(same, query_tokens=jnp.roll(same["query_tokens"], 1, axis=0),
                 query_mask=jnp.roll(same["query_mask"], 1, axis=0))
    moved = loss_fn(params, cfg, sc, "warmup", other, jnp.float32(0))[1]
    assert float(moved["gen_nll"]) == float(base["gen_nll"])
    assert abs(float(moved["nce"]) - float(base["nce"])) > 1e-4
