"""The performance benchmarks run on the CPU (CI sizes) and their FLOP accounting is consistent.

No timing assertions: the 2-core development machines are shared.  What is checked: the JSON schema, that the
analytic FLOP count matches the dot FLOPs XLA compiles (loop bodies counted once), that the ImpRAG warmup step
needs fewer model FLOPs than the plain-LM step on the same tokens, that the teacher's FLOPs follow the
formula, that the encoder runs b of the N layers, that the GPU script's dry run goes through, that the
library's cuDNN attention call has the right mask/bias shapes for GQA, and that the benchmark (and the model /
train code it imports) loads nothing the GPU machine lacks.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, timeout=900):
    r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    _run([sys.executable, os.path.join(BENCH, "train_step.py"), "--quick", "--json", str(out)])
    return json.loads(out.read_text())


def _bench_module():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import train_step

    return train_step


def test_train_step_quick_schema(quick):
    assert quick["schema"] == "imprag_jax.bench.train_step/1"
    assert quick["quick"] is True
    assert quick["machine"]["backend"] == "cpu"
    assert set(quick["steps"]) == {"plain_lm", "plain_lm_resp", "warmup", "distill"}
    for name, s in quick["steps"].items():
        for key in ("tokens", "step_s", "tokens_per_s", "model_flops", "impl_flops", "mfu", "compile_s",
                    "model_flops_by_component", "model_flops_by_group", "step_s_all"):
            assert key in s, (name, key)
        assert s["step_s"] > 0 and s["model_flops"] > 0 and 0 < s["mfu"]
        assert abs(sum(s["model_flops_by_component"].values()) - s["model_flops"]) <= 1e-6 * s["model_flops"]
    assert quick["peak"]["mfu_basis"] == "MFU vs measured matmul peak"
    assert quick["peak"]["measured_matmul_flops_per_s"] > 1e8
    for key in ("warmup_over_plain_lm", "warmup_over_plain_lm_resp", "distill_over_plain_lm",
                "distill_over_plain_lm_resp"):
        assert {"time", "model_flops", "impl_flops"} <= set(quick["ratios"][key])
        assert key in quick["targets"]


def test_same_tokens_and_flop_ordering(quick):
    st = quick["steps"]
    assert len({s["tokens"] for s in st.values()}) == 1  # every step processes the same tokens
    # the top layers never see the passage tokens: the warmup step needs fewer FLOPs than the plain LM step
    assert st["warmup"]["model_flops"] < st["plain_lm_resp"]["model_flops"] < st["plain_lm"]["model_flops"]
    assert st["warmup"]["model_flops"] < st["distill"]["model_flops"]
    # the teacher is forward-only: the distill step costs less than 2 x the warmup step
    assert st["distill"]["model_flops"] < 2 * st["warmup"]["model_flops"]


def test_xla_dot_flops_match_the_analytic_count(quick):
    chk = quick["xla_check"]
    assert set(chk) == {"plain_lm", "plain_lm_resp", "warmup", "distill"}
    for name, r in chk.items():
        assert "error" not in r, (name, r)
        assert abs(r["xla_dot_over_impl"] - 1.0) < 0.01, (name, r)
        # cost_analysis adds elementwise work (softmax, norms, RoPE, AdamW) on top of the dots
        assert r["xla_total_over_impl"] >= 0.99 * r["xla_dot_over_impl"], (name, r)


def test_teacher_flops_follow_the_formula():
    """teacher = passages through the middle (alone, t-b full layers + layer t's K/V) + B*k prompt copies
    through middle and top (attending to their one passage) + the response's vocabulary projection; x1."""
    ts = _bench_module()
    from imprag_jax.model import ModelConfig

    cfg = ModelConfig.smollm2_135m(dtype="float32")
    sh = ts.Shape("smollm2", B=2, k=10, L_q=64, L_r=16, l=128)
    br = ts.flops_breakdown(cfg, sh, "distill")
    d, f, H, KV, Dh, V = 576, 1536, 9, 3, 64, 49152
    lin = 2 * (d * H * Dh * 2 + 2 * d * KV * Dh + 3 * d * f)
    att = 4 * H * Dh
    B, k, L, l, r = 2, 10, 80, 128, 16
    n_mid, n_top = 21 - 7 + 1, 30 - 21 - 1
    passages = B * k * l * ((n_mid - 1) * lin + 4 * d * KV * Dh) + B * k * (n_mid - 1) * (l * (l + 1) / 2) * att
    prompts = B * k * (L * (n_mid + n_top) * lin + (n_mid + n_top) * L * (L + 1) / 2 * att + n_mid * L * l * att)
    head = B * k * r * 2 * d * V
    teacher = sum(v for key, v in br.items() if key.startswith("teacher_"))
    assert teacher == pytest.approx(passages + prompts + head, rel=1e-9)
    # and it is forward-only: x1 where the reader's parts are x3
    warm = ts.flops_breakdown(cfg, sh, "warmup")
    assert br["teacher_prompt_layers"] / warm["reader_prompt_layers"] == pytest.approx(
        k * (n_mid + n_top) / (3 * 30))


def test_plain_flops_are_six_p_tokens_plus_attention():
    ts = _bench_module()
    from imprag_jax.model import ModelConfig

    cfg = ModelConfig.smollm2_135m(dtype="float32")
    sh = ts.Shape("smollm2", B=1, k=10, L_q=64, L_r=16, l=128)
    T = 1360
    n_matmul = cfg.num_params() - cfg.vocab_size * cfg.hidden_size - cfg.hidden_size - 30 * 2 * cfg.hidden_size
    br = ts.flops_breakdown(cfg, sh, "plain_lm")
    assert br["plain_layers"] == pytest.approx(6 * n_matmul * T, rel=1e-9)  # 6 P tokens (P = matmul weights)
    assert br["plain_attention"] == pytest.approx(3 * 30 * T * (T + 1) / 2 * 4 * 9 * 64, rel=1e-9)
    assert br["lm_head"] == pytest.approx(3 * (T - 1) * 2 * 576 * 49152, rel=1e-9)


def test_encode_quick(tmp_path):
    out = tmp_path / "encode.json"
    _run([sys.executable, os.path.join(BENCH, "encode.py"), "--quick", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["schema"] == "imprag_jax.bench.encode/1"
    assert {"encode_jit", "encode_corpus", "forward_hidden", "forward_logits"} <= set(r["variants"])
    for v in r["variants"].values():
        assert v["seconds"] > 0 and v["passages_per_s"] > 0
    N, b = r["shape"]["N"], r["shape"]["b"]
    fr = r["ratios"]["encode_jit_vs_forward_hidden"]["flops_ratio"]
    assert b / N * fr == pytest.approx(1.0, rel=0.05)  # N layers vs b layers (+ one projection of one token)
    assert r["target"]["min_speedup"] == pytest.approx(0.8 * N / (b + 1))


def test_gpu_script_dry_run(tmp_path):
    variants = ("plain:B=4,T=2048,remat=dots_no_batch,attn=cudnn_causal,ce=8;"
                "warmup:B=4,Bf=4,Lf=64,Lfr=8,remat=full,attn=cudnn;distill:B=4,remat=none,attn=cudnn_causal")
    r = subprocess.run(["bash", os.path.join(BENCH, "gpu_run.sh"), "--dry-run", "--variants", variants], cwd=ROOT,
                       env=dict(_env(), OUT=str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert "imports OK" in r.stdout
    res = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert res["dry_run"] is True and len(res["variants"]) == 3
    for row in res["variants"]:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["mfu"] > 0 and np.isfinite(row["first_loss"])
    assert {"plain", "warmup", "distill"} == set(res["best"])
    # the dry run's tiny shape: 2 rows of 3 x 8 passage + 16 prompt/response tokens, plus 2 free rows of 16
    assert res["variants"][1]["shape"]["Bf"] == 2 and res["variants"][1]["tokens"] == 2 * (3 * 8 + 16) + 2 * 16
    assert res["variants"][2]["tokens"] == 2 * (3 * 8 + 16)


def test_free_row_flops_are_a_plain_step():
    """The retrieval-free rows an ImpRAG step mixes in cost what the plain decoder's response-loss step costs on
    the same rows; the rest of the step is unchanged by them."""
    ts = _bench_module()
    cfg = ts.model_config("smollm2")
    base = ts.Shape("smollm2", B=64, k=10, L_q=64, L_r=16, l=128)
    mixed = ts.Shape("smollm2", B=64, k=10, L_q=64, L_r=16, l=128, Bf=16, Lf=224, Lfr=32)
    plain = ts.Shape("smollm2", B=16, k=0, L_q=0, L_r=32, l=0, plain_T=224)
    for step in ("warmup", "distill"):
        extra = ts.flops_total(cfg, mixed, step) - ts.flops_total(cfg, base, step)
        assert extra == pytest.approx(ts.flops_total(cfg, plain, "plain_lm_resp"), rel=1e-12)
        assert mixed.tokens(step) == base.tokens(step) + 16 * 224
    for spec in ts.SMOLLM2_GPU_SUITE:
        assert ts.parse_variant(spec)["kind"] in ("warmup", "distill")


def test_gpu_suite_variants_parse():
    ts = _bench_module()
    for spec in ts.GPU_SUITE:
        v = ts.parse_variant(spec)
        assert v["kind"] in ("plain", "warmup", "distill")
        assert v.get("attn", "xla") in ("xla", "cudnn", "cudnn_causal", "cudnn_causal_all")
    with pytest.raises(ValueError, match="not valid for distill"):
        ts.parse_variant("distill:B=4,attn=cudnn_causal_all")
        assert v.get("remat", "full") in ("none", "full", "dots", "dots_no_batch")


def test_cudnn_attention_call_shapes_for_gqa(monkeypatch):
    """The library's cuDNN branch (run here through the same jax.nn.dot_product_attention call with the XLA
    implementation) equals the einsum path for GQA, with a key/value prefix mask and an additive bias."""
    import jax
    import jax.numpy as jnp

    from imprag_jax.model import layers

    orig = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: orig(*a, **dict(kw, implementation="xla")))
    B, Lq, P, H, KV, D = 2, 6, 10, 8, 2, 16
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, Lq, H, D))
    k = jax.random.normal(ks[1], (B, P + Lq, KV, D))
    v = jax.random.normal(ks[2], (B, P + Lq, KV, D))
    pm = jnp.arange(P)[None, :] < jnp.array([7, 10])[:, None]  # passage padding
    causal = jnp.tril(jnp.ones((Lq, Lq), bool))
    mask = jnp.concatenate([jnp.broadcast_to(pm[:, None, :], (B, Lq, P)),
                            jnp.broadcast_to(causal[None], (B, Lq, Lq))], axis=-1)
    bias = jnp.concatenate([jax.random.normal(ks[3], (B, 1, P)), jnp.zeros((B, 1, Lq))], axis=-1)
    for bb in (None, bias):
        a = layers.attention(q, k, v, mask, bb, impl="xla")
        c = layers.attention(q, k, v, mask, bb, impl="cudnn")
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5)


def test_causal_prototype_equals_library_path():
    """The benchmark's cudnn_causal prototype (is_causal, no dense mask) gives the library's result for the
    causal self-attention of a full batch (on a CPU it runs the same call with the XLA implementation)."""
    import jax
    import jax.numpy as jnp

    ts = _bench_module()
    from imprag_jax.model import ModelConfig, forward, init_params

    cfg = ModelConfig.tiny()
    params = init_params(cfg, jax.random.key(0))
    tok = jax.random.randint(jax.random.key(1), (2, 12), 1, cfg.vocab_size)
    ref = forward(params, cfg, tok)
    got = jax.jit(lambda p, t: forward(p, cfg.replace(attention_impl=ts.causal_attention()), t))(params, tok)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(got), atol=2e-4)


def test_benchmark_imports_stay_lazy():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import train_step, encode; "
            "import imprag_jax.model, imprag_jax.train.step, imprag_jax.train.state; "
            "bad = [m for m in ('ml_collections', 'grain', 'gguf', 'bm25s', 'scann', 'tensorflow_datasets', "
            "'tensorflow') if m in sys.modules]; print('BAD', bad)")
    r = _run([sys.executable, "-c", code], timeout=300)
    assert "BAD []" in r.stdout, r.stdout


def test_causal_prototype_keeps_the_imprag_step_exact():
    """With the prototype patched in (joint middle group and teacher kept on the library path), the ImpRAG
    warmup and distill losses of a full batch equal the library's."""
    import jax
    import jax.numpy as jnp

    ts = _bench_module()
    from imprag_jax.model import ModelConfig, init_params
    from imprag_jax.train.step import StepConfig, loss_fn

    cfg = ModelConfig.tiny()
    sh = ts.Shape("tiny", 2, 3, 12, 4, 8)
    batch = {k: jnp.asarray(v) for k, v in ts.random_batch(sh, cfg.vocab_size).items()}
    params = init_params(cfg, jax.random.key(0))
    sc = StepConfig(r_len=4)
    for stage in ("warmup", "distill"):
        ref = loss_fn(params, cfg, sc, stage, batch, jnp.float32(0))[0]
        for dense_len in (sh.k * sh.l, None) if stage == "warmup" else (sh.k * sh.l,):
            impl = ts.causal_attention(dense_len)
            got = jax.jit(lambda p: loss_fn(p, cfg.replace(attention_impl=impl), sc, stage, batch,
                                            jnp.float32(0))[0])(params)
            np.testing.assert_allclose(float(ref), float(got), rtol=1e-5)


def test_mined_step_quick_schema(tmp_path):
    pytest.importorskip("scann")
    out = tmp_path / "mined_step.json"
    _run([sys.executable, os.path.join(BENCH, "mined_step.py"), "--quick", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["schema"] == "imprag_jax.bench.mined_step/1" and res["quick"] is True
    (c,) = res["corpora"]
    assert c["n"] == 600 and c["m"] == 70
    assert set(c["variants"]) == {"none", "exact", "binned", "scann"}
    for v in c["variants"].values():
        assert v["step_s"] > 0 and len(v["step_s_all"]) == 2
    assert c["ratios_vs_exact"]["exact"] == 1.0 and set(c["search_s"]) == {"exact", "binned", "scann"}
    assert c["recall@70_vs_exact"]["scann"] == 1.0  # brute force below 20k rows


def test_query_split_step_quick_schema(tmp_path):
    out = tmp_path / "query_split_step.json"
    _run([sys.executable, os.path.join(BENCH, "query_split_step.py"), "--quick", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["schema"] == "imprag_jax.bench.query_split_step/1" and res["quick"] is True
    assert set(res["variants"]) == {"default", "split"} and res["shapes"]["split"]["query_tokens"] == [32, 40]
    assert all(v["step_s"] > 0 and len(v["step_s_all"]) == 2 for v in res["variants"].values())
    assert res["split_over_default"] > 0
