"""Shared builder for the paper's Llama-3 settings (configs/llama3_2_3b.py, configs/llama3_1_8b.py).

The architecture fields are the released models' (config.json); point `model.init` at a local HF directory of
the checkpoint to fine-tune it (`--config.model.init=/models/Llama-3.2-3B`); "random" only serves compile checks.
Paper settings: b = 7, t = 19 (3B) / 23 (8B), k = 10 passages, top-5 pseudo-positives, hard negatives from ranks
10-50, warmup on the first 3 of 10 epochs (warmup_share 0.3). Everything else is ours and marked as such.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402

ARCH = {
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
               num_kv_heads=8, head_dim=128, rope_theta=500000.0, tie_embeddings=True, b=7, t=19,
               rope_factor=32.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, rope_theta=500000.0, tie_embeddings=False, b=7, t=23,
               rope_factor=8.0),
}

MESHES = {  # name -> (data, fsdp, tensor)
    "gpu8": (1, 8, 1),      # one node of 8 x 80 GB GPUs: fully sharded data parallel
    "v5p-32": (1, 16, 1),   # 16 chips
    "v5p-64": (2, 16, 1),   # 32 chips
    "cpu8": (1, 4, 2),      # 8 fake CPU devices (compile checks)
}


def llama3_config(size: str, arg: str):
    a = ARCH[size]
    c = base_config()
    c.name = f"llama3_{size}"
    c.model.update(dict(init="random", vocab_size=a["vocab_size"], hidden_size=a["hidden_size"],
                        intermediate_size=a["intermediate_size"], num_layers=a["num_layers"],
                        num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                        rope_theta=a["rope_theta"], tie_embeddings=a["tie_embeddings"], b=a["b"], t=a["t"],
                        dtype="bfloat16", remat="full", max_position=131072, init_std=0.02,
                        # s(q,p) = q.k / sqrt(head_dim), as attention: a pretrained model's raw layer-b products
                        # saturate the NCE (measured on SmolLM2, docs/results.md section 3a)
                        score_scale="sqrt_dim"))
    c.model.rope_scaling = dict(rope_type="llama3", factor=a["rope_factor"], low_freq_factor=1.0,
                                high_freq_factor=4.0, original_max_position_embeddings=8192)
    # data: the KILT-format training set (NQ + HotpotQA in the paper) prepared with imprag_jax.data.prepare
    c.data.update(dict(kind="prepared", batch_size=64, free_batch_size=0, L_q=256, L_r=32, l_max=128, k=10,
                       tasks="nq:1,hotpotqa:1", free_tasks="", positives="pseudo", n_pos=5, negatives="bm25",
                       n_neg=5, random_neg_fraction=0.0, cf=0.0, cf_negatives=False, add_bos=True))
    c.train.update(dict(steps=2000, lr=1e-5, warmup_steps=100, weight_decay=0.0, b2=0.95, lam=1.0, stages="both",
                        warmup_share=0.3, tau_t=1.0, tau_r=1.0, accum=1, teacher_chunks=2, log_every=10,
                        ckpt_every=200, keep=2))
    c.eval.update(dict(tasks="nq,hotpotqa,trex,scifact", k="10", limit=1000, max_new_tokens=32, batch_size=32,
                       modes="imprag"))
    mesh = "gpu8"
    for x in [x for x in arg.split(",") if x]:
        if x in MESHES:
            mesh = x
        elif x == "smoke":  # the same structure (GQA ratio, rope scaling, tying, b/t proportions), tiny, on CPU
            c.model.update(dict(vocab_size=0, hidden_size=64, intermediate_size=160, num_layers=4,
                                num_heads=a["num_heads"] // 4 if size == "8b" else 6,
                                num_kv_heads=2, head_dim=16, b=1, t=2, dtype="float32", remat="full",
                                max_position=4096))
            c.data.update(dict(kind="synthetic", people=200, batch_size=4, free_batch_size=0, L_q=64, L_r=4,
                               l_max=24, k=4, tasks="qa:1", positives="gold", n_pos=1, negatives="generator",
                               n_neg=3, cf=1.0))
            c.train.update(dict(steps=3, warmup_steps=1, log_every=1, ckpt_every=0, accum=2, warmup_share=0.34))
            c.eval.update(dict(tasks="qa", k="1", limit=8, max_new_tokens=2, batch_size=8))
            mesh = "smoke"
        else:
            raise ValueError(f"unknown config argument {x!r} (known: smoke, {', '.join(MESHES)})")
    if mesh == "smoke":
        c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    else:
        d, f, t = MESHES[mesh]
        c.mesh.update(dict(data=d, fsdp=f, tensor=t))
    return c
