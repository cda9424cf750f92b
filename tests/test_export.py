"""Export to a Hugging Face directory + imprag.json, exact re-import, and the PyTorch ImpRAG reader against the JAX
model (E_q, E_p, top-k, greedy answers) on random tiny models, a trained synthetic run and SmolLM2."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import config_module


pytest.importorskip("safetensors")

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)


def _tiny(**kw):
    from imprag_jax.model import ModelConfig

    base = dict(embed_scale=8.0, init_std=0.125, rope_scaling=LLAMA3_ROPE)
    base.update(kw)
    return ModelConfig.tiny(**base)


def _params(cfg, seed=0):
    from imprag_jax.model import init_params

    p = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    # random norm scales, so a swapped or skipped norm cannot pass
    rng = np.random.default_rng(seed)
    for grp in ("input_norm", "post_attn_norm"):
        s = p["layers"][grp]["scale"]
        p["layers"][grp]["scale"] = (1 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
    return p


def _meta(cfg, k=3, l_max=12):
    from imprag_jax.convert.export import build_meta

    m = build_meta(cfg, None, k=k, l_max=l_max, L_q=20, L_r=4)
    m["stop_ids"] = [2]
    return m


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def _random_rows(rng, n, width, lo=8, hi=256, min_len=3):
    t = np.zeros((n, width), np.int32)
    m = np.zeros((n, width), np.int32)
    for i in range(n):
        L = int(rng.integers(min_len, width + 1))
        t[i, :L] = rng.integers(lo, hi, L)
        m[i, :L] = 1
    return t, m


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tie", [True, False])
def test_folded_embedding_scale_round_trips(tmp_path, tie):
    from imprag_jax.convert.hf import load_hf_dir
    from imprag_jax.convert.export import export_model, load_export

    cfg = _tiny(tie_embeddings=tie)
    p = _params(cfg)
    out = str(tmp_path / "x")
    export_model(p, cfg, None, out, _meta(cfg), max_shard_bytes=100_000)  # sharded
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["tie_word_embeddings"] is False and hf["architectures"] == ["LlamaForCausalLM"]
    meta = json.load(open(os.path.join(out, "imprag.json")))
    assert meta["embed_scale"] == 8.0 and meta["embed_scale_folded"] is True and meta["tie_embeddings"] is tie
    cfg2, p2, _, _ = load_export(out)
    assert cfg2 == cfg
    if tie:
        assert _same(p, p2)  # E comes back from lm_head.weight bit for bit
    else:
        emb, emb2 = p["embed"]["embedding"], p2["embed"]["embedding"]
        np.testing.assert_allclose(emb2, emb, rtol=2e-7, atol=0)  # (8 E) / 8: a power of two, in fact exact
        p2["embed"]["embedding"] = emb
        assert _same(p, p2)
    # the plain HF import sees the equivalent unscaled, untied model
    hcfg, hp, _ = load_hf_dir(out, b=cfg.b, t=cfg.t)
    assert hcfg.embed_scale == 1.0 and not hcfg.tie_embeddings
    np.testing.assert_array_equal(hp["embed"]["embedding"], p["embed"]["embedding"] * np.float32(8.0))


def test_unscaled_export_reimports_exactly_with_load_hf_dir(tmp_path):
    from imprag_jax.convert.hf import load_hf_dir
    from imprag_jax.convert.export import export_model

    for tie in (True, False):
        cfg = _tiny(embed_scale=1.0, tie_embeddings=tie)
        p = _params(cfg, seed=1)
        out = str(tmp_path / f"plain{tie}")
        export_model(p, cfg, None, out, _meta(cfg))
        hcfg, hp, _ = load_hf_dir(out, b=cfg.b, t=cfg.t)
        assert _same(p, hp)
        assert hcfg.tie_embeddings == tie and hcfg.rope_scaling["factor"] == 8.0


def test_bfloat16_export_rounds_once(tmp_path):
    import ml_dtypes

    from imprag_jax.convert.export import export_model, load_export

    cfg = _tiny(tie_embeddings=False, embed_scale=1.0)
    p = _params(cfg)
    out = str(tmp_path / "bf16")
    export_model(p, cfg, None, out, _meta(cfg), dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    _, p2, _, meta = load_export(out)
    assert meta["export_dtype"] == "bfloat16"
    want = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), p)
    assert _same(want, p2)


def test_errors(tmp_path):
    from imprag_jax.convert.export import ExportError, load_export
    from imprag_jax.export import main

    with pytest.raises(ExportError, match="imprag.json"):
        os.makedirs(tmp_path / "empty")
        load_export(str(tmp_path / "empty"))
    assert main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------------------------------- PyTorch


def _reader(out):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    from imprag_jax.torch_reader import TorchImpRAG

    return TorchImpRAG.from_pretrained(out)


def test_folded_export_is_a_plain_hf_llama(tmp_path):
    """transformers' own LlamaForCausalLM forward gives the JAX logits of a tied, sqrt(d)-scaled model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    from imprag_jax.convert.export import export_model
    from imprag_jax.model import forward

    cfg = _tiny(tie_embeddings=True)
    p = _params(cfg)
    out = str(tmp_path / "hf")
    export_model(p, cfg, None, out, _meta(cfg))
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(8, 256, (2, 30))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(forward(p, cfg, ids))
    assert np.abs(ref - got).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("tie,rope,attn", [(True, "pre", "joint"), (False, "post", "independent")])
def test_torch_reader_matches_jax_on_random_tiny(tmp_path, tie, rope, attn):
    from imprag_jax.convert.export import export_model
    from imprag_jax.torch_reader import compare

    cfg = _tiny(tie_embeddings=tie, retrieval_rope=rope, passage_attention=attn)
    p = _params(cfg)
    out = str(tmp_path / "x")
    export_model(p, cfg, None, out, _meta(cfg, k=3, l_max=12))
    r = _reader(out)
    rng = np.random.default_rng(0)
    ct, cm = _random_rows(rng, 24, 12)
    pt, pm = _random_rows(rng, 6, 20, min_len=4)
    rep = compare(p, cfg, r, pt, pm, ct, cm, k=3, max_new_tokens=5, stop_ids=(2,), pad_id=0)
    assert rep["max_abs_dE_q"] < 1e-5 * max(1.0, rep["E_q_scale"])
    assert rep["max_abs_dE_p"] < 1e-5 * max(1.0, rep["E_p_scale"])
    assert rep["top10_fp32_same_order"] == 1.0 and rep["topk_fp32_same_order"] == 1.0
    assert rep["topk_bf16_vs_jax_pipeline_same_order"] == 1.0
    assert rep["answers_same_passages"] == 1.0 and rep["answers_full_pipeline"] == 1.0
    assert rep["distinct_answers"] > 1

    # the check is sensitive: reading the passages at the wrong positions, or the other rope mode, shows up
    import torch

    r.meta["prompt_offset"] = 0
    seq = [int(x) for x in pt[0][pm[0] > 0]]
    psg = [[int(x) for x in ct[i][cm[i] > 0]] for i in range(3)]
    kv = r.passage_kv(psg)
    bad = r.read_logits(seq, kv, 3).numpy()
    r.meta["prompt_offset"] = None
    good = r.read_logits(seq, kv, 3).numpy()
    assert np.abs(bad - good).max() > 1e-3
    r.meta["retrieval_rope"] = "pre" if rope == "post" else "post"
    flipped = r.query_embedding([seq]).numpy()
    r.meta["retrieval_rope"] = rope
    assert np.abs(flipped - r.query_embedding([seq]).numpy()).max() > 1e-3
    assert isinstance(kv[0][0], torch.Tensor) and kv[0][0].shape[1] == sum(map(len, psg))


def test_torch_reader_matches_jax_with_score_scale_and_score_bias(tmp_path):
    """imprag.json carries the score scale and the score bias, and the reader applies both: the same retrieval
    scores (sqrt_dim multiplier on E_q) and the same reading logits and answers with log_softmax(scores) on the
    passages' attention logits."""
    from imprag_jax.convert.export import build_meta, export_model
    from imprag_jax.torch_reader import compare

    cfg = _tiny(tie_embeddings=True, score_scale="sqrt_dim")
    p = _params(cfg, seed=3)
    meta = build_meta(cfg, None, k=3, l_max=12, L_q=20, L_r=4, score_bias=True)
    meta["stop_ids"] = [2]
    out = str(tmp_path / "x")
    export_model(p, cfg, None, out, meta)
    saved = json.load(open(os.path.join(out, "imprag.json")))
    assert saved["score_scale"] == "sqrt_dim" and saved["score_bias"] is True
    assert saved["score_multiplier"] == pytest.approx(1 / np.sqrt(cfg.head_dim))
    r = _reader(out)
    rng = np.random.default_rng(1)
    ct, cm = _random_rows(rng, 24, 12)
    pt, pm = _random_rows(rng, 6, 20, min_len=4)
    rep = compare(p, cfg, r, pt, pm, ct, cm, k=3, max_new_tokens=5, stop_ids=(2,), pad_id=0)
    assert rep["score_bias"] is True and rep["score_multiplier"] == pytest.approx(1 / np.sqrt(cfg.head_dim))
    assert rep["max_abs_dscore"] < 1e-5 * max(1.0, rep["score_scale"])
    # bf16 index on both sides: an E_q element 1e-6 apart may round to the neighbouring bf16 value
    assert rep["max_abs_dscore_pipeline"] < 1e-3 * max(1.0, rep["score_scale"])
    assert rep["topk_fp32_same_order"] == 1.0 and rep["topk_bf16_vs_jax_pipeline_same_order"] == 1.0
    assert rep["max_abs_dlogits"] < 1e-4 * max(1.0, rep["logit_scale"])
    assert rep["answers_same_passages"] == 1.0 and rep["answers_full_pipeline"] == 1.0

    # the bias matters (so a reader ignoring it would fail above): the logits move with it, and are those of the
    # JAX reading with the same bias
    import jax.numpy as jnp

    from imprag_jax.infer.imprag import score_bias
    from imprag_jax.model import read

    seq = [int(x) for x in pt[0][pm[0] > 0]]
    psg = [[int(x) for x in ct[i][cm[i] > 0]] for i in range(3)]
    scores = np.array([3.0, 0.5, -2.0], np.float32)
    kv = r.passage_kv(psg)
    with_bias = r.read_logits(seq, kv, 3, r.score_bias(scores, psg)).numpy()
    assert np.abs(with_bias - r.read_logits(seq, kv, 3).numpy()).max() > 1e-3
    jb = score_bias(jnp.asarray(scores[None]), jnp.asarray(cm[None, :3].sum(-1) > 0), 12)
    lj = np.asarray(read(p, cfg, pt[:1], pm[:1], ct[None, :3], cm[None, :3], prefix_bias=jb).logits)[0][pm[0] > 0]
    assert np.abs(with_bias - lj).max() < 1e-4 * np.abs(lj).max()
    r.meta["score_bias"] = False  # a reader told there is no bias reads plainly
    assert r._bias_for(scores, psg) is None


# ---------------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, world_dir):
    from imprag_jax.train.trainer import train

    world = world_dir
    c = config_module("synthetic").get_config()
    c.data.dir = world
    c.model.update(dict(b=1, t=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, embed_scale=8.0,
                        init_std=0.125))
    c.data.update(dict(batch_size=8, free_batch_size=2, L_q=64, prefetch=0))
    c.train.update(dict(steps=12, warmup_steps=2, log_every=4, ckpt_every=6, time_budget_s=0.0, lr=3e-3,
                        stages="warmup"))
    c.eval.update(dict(modes=[], limit=16, k=[2]))
    wd = str(tmp_path_factory.mktemp("run"))
    train(c, wd)
    return wd, world


@pytest.mark.slow
def test_export_cli_on_a_trained_run(trained_run, tmp_path):
    from imprag_jax.data.pipeline import corpus_tokens, eval_batches, load_tokenizer
    from imprag_jax.convert.export import load_export
    from imprag_jax.export import main
    from imprag_jax.run import restore_params
    from imprag_jax.torch_reader import compare

    wd, world = trained_run
    out = str(tmp_path / "hf")
    assert main(["--workdir", wd, "--out", out, "--step", "6"]) == 0
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "imprag.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    meta = json.load(open(os.path.join(out, "imprag.json")))
    assert (meta["b"], meta["t"], meta["k"], meta["k_train"], meta["l_max"]) == (1, 2, 2, 4, 24)
    assert meta["pooling"] == "last_token" and meta["retrieval_rope"] == "pre"
    assert meta["passage_end"] == "<eop>" and meta["title_format"] == "{title}: {text}"
    assert meta["source"]["step"] == 6 and meta["embed_scale_folded"]
    params, step, cfg = restore_params(wd, 6)
    cfg2, p2, tok2, _ = load_export(out)
    assert step == 6 and cfg2 == cfg and _same(params, p2)
    tok = load_tokenizer(world)
    text = "Where was Ada Quill born? [SEP] qa <eop>"
    assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert main(["--workdir", wd, "--out", str(tmp_path / "latest")]) == 0
    assert json.load(open(tmp_path / "latest" / "imprag.json"))["source"]["step"] == 12

    r = _reader(out)
    ct, cm = corpus_tokens(world, tok, meta["l_max"])
    b = next(iter(eval_batches(world, "qa", "dev", tok, batch_size=12, L_q=64, limit=12)))
    rep = compare(params, cfg, r, b["tokens"], b["mask"], ct, cm, k=2, max_new_tokens=3, stop_ids=tok.stop_ids,
                  pad_id=tok.pad_id)
    assert rep["max_abs_dE_q"] < 1e-5 * max(1.0, rep["E_q_scale"])
    assert rep["max_abs_dE_p"] < 1e-5 * max(1.0, rep["E_p_scale"])
    assert rep["topk_fp32_same_order"] == 1.0 and rep["topk_bf16_vs_jax_pipeline_same_order"] == 1.0
    assert rep["answers_same_passages"] == 1.0 and rep["answers_full_pipeline"] == 1.0


@pytest.mark.data
def test_smollm2_export_and_reader(tmp_path):
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    from imprag_jax.torch_reader import smollm2_check

    rep = smollm2_check(str(tmp_path / "smol"), k=2, max_new_tokens=3, n_questions=3, log=None)
    assert len(os.listdir(tmp_path / "smol")) >= 8  # sharded weights + index + tokenizer + imprag.json
    assert rep["max_abs_dE_q"] < 1e-5 * rep["E_q_scale"] and rep["max_abs_dE_p"] < 1e-5 * rep["E_p_scale"]
    assert rep["topk_fp32_same_order"] == 1.0 and rep["answers_full_pipeline"] == 1.0
