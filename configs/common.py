"""Shared config skeleton: every field a run can set, with its default. Configs fill in what differs.

The returned ConfigDict is locked by the entry point, so a misspelt `--config.x.y=...` is an error.
"""
import ml_collections as mlc

from imprag_jax.model.sharding import DEFAULT_RULES


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = "run"
    c.seed = 0
    # model: every imprag_jax.model.ModelConfig field; `init` = "random" | "smollm2" | an HF dir | a .gguf file
    c.model = mlc.ConfigDict(dict(
        init="random", preset="tiny", vocab_size=0,  # vocab_size 0 = the tokenizer's size
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=0,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True, embed_scale=1.0, b=1, t=2,
        retrieval_rope="pre", score_scale="raw", retrieval_pool="last", passage_attention="joint", prompt_offset=-1, dtype="float32", param_dtype="float32",
        remat="none", attention_impl="xla", init_std=0.02, max_position=4096))
    c.model.rope_scaling = None  # or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", ...}
    c.data = mlc.ConfigDict(dict(
        kind="synthetic",  # "synthetic" / "minikilt": built into <workdir>/data on first use | "prepared": data.dir
        dir="", source="../shared/data", people=1000, world_seed=0, qa_templates=2,
        batch_size=32, free_batch_size=8, L_q=64, L_r=4, L_free=0, L_free_r=0, l_max=24, k=4,
        tasks="qa:1", free_tasks="format:1", positives="gold", n_pos=1, negatives="generator", n_neg=3,
        neg_ranks=(10, 50), random_neg_fraction=0.25, cf=1.0, cf_negatives=True, add_bos=True, prefetch=2,
        query_filler=0.0, query_filler_max=24, query_filler_pool="unseen", query_filler_gen=True))  # query_filler: share of retrieval rows with filler words (pipeline)
    c.train = mlc.ConfigDict(dict(
        steps=4000, lr=2e-3, warmup_steps=150, end_lr_ratio=0.05, weight_decay=0.01, b1=0.9, b2=0.98,
        clip=1.0, accum=1,
        lam=1.0, stages="both", warmup_share=0.3, tau_t=1.0, tau_r=1.0, nce_reduction="sum",
        score_bias=False, score_bias_grad=False, score_bias_ramp=500, teacher_chunks=1, teacher_len=0,
        candidates="pseudo", refresh_every=500, index_negatives=2,
        index_backend="exact",  # search that mines index/mixed candidates: exact | binned | scann (host, pure_callback)
        retrieval_steps=0, log_grad_norms=True, init_from="",
        closed_book=False, time_budget_s=0.0, stop_at_step=0,
        log_every=50, ckpt_every=1000, keep=3, eval_every=0))
    c.eval = mlc.ConfigDict(dict(
        tasks="qa,two_hop_qa,slot_filling,fact_verification,entity_linking", split="dev", k="1,5", limit=400,
        max_new_tokens=4, batch_size=128, modes="imprag,oracle", dev_tasks="qa", dev_limit=200, dev_modes="imprag",
        pool=0, L_q=0,
        backend="exact", score_bias=False))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = [list(r) for r in DEFAULT_RULES]
    return c
