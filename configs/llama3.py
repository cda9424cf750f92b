"""Shared builder for the paper's Llama-3 settings (configs/llama3_2_3b.py, configs/llama3_1_8b.py).

The architecture fields are the released models' (config.json); point `model.init` at a local HF directory of
the checkpoint to fine-tune it (`--config.model.init=/models/Llama-3.2-3B`); "random" only serves compile checks.
Paper settings: b = 7, t = 19 (3B) / 23 (8B), k = 10 passages, top-5 pseudo-positives, hard negatives from ranks
10-50, warmup on the first 3 of 10 epochs (warmup_share 0.3). Everything else is ours and marked as such.
"""
from imprag_jax.config_base import base_config
from imprag_jax.model.config import PRESETS

PRESET = {"3b": "llama3_2_3b", "8b": "llama3_1_8b"}  # the architectures: imprag_jax.model.config.PRESETS

MESHES = {  # name -> (data, fsdp, tensor)
    "gpu8": (1, 8, 1),      # one node of 8 x 80 GB GPUs: fully sharded data parallel
    "v5p-32": (1, 16, 1),   # 16 chips
    "v5p-64": (2, 16, 1),   # 32 chips
    "cpu8": (1, 4, 2),      # 8 fake CPU devices (compile checks)
}


def llama3_config(size: str, arg: str):
    arch = PRESETS[PRESET[size]]
    c = base_config()
    c.name = f"llama3_{size}"
    c.model.update(dict(init="random", **arch))  # the preset's bfloat16 compute dtype too
    c.model.rope_scaling = dict(arch["rope_scaling"])
    # s(q,p) = q.k / sqrt(head_dim), as attention: a pretrained model's raw layer-b products saturate the NCE
    # (measured on SmolLM2, docs/results.md section 3a)
    c.model.update(dict(remat="full", init_std=0.02, score_scale="sqrt_dim"))
    # data: the KILT-format training set (NQ + HotpotQA in the paper) prepared with imprag_jax.data.prepare
    c.data.update(dict(kind="prepared", batch_size=64, free_batch_size=0, L_q=256, L_r=32, l_max=128, k=10,
                       positives="pseudo", n_pos=5, negatives="bm25",
                       n_neg=5, random_neg_fraction=0.0, cf=0.0, cf_negatives=False, add_bos=True))
    c.data.tasks = {"nq": 1.0, "hotpotqa": 1.0}  # assigned: ConfigDict.update would merge into the default's
    c.data.free_tasks = {}
    c.train.update(dict(steps=2000, lr=1e-5, warmup_steps=100, weight_decay=0.0, b2=0.95, lam=1.0, stages="both",
                        warmup_share=0.3, tau_t=1.0, tau_r=1.0, accum=1, teacher_chunks=2, log_every=10,
                        ckpt_every=200, keep=2))
    c.eval.update(dict(tasks=["nq", "hotpotqa", "trex", "scifact"], k=[10], limit=1000, max_new_tokens=32,
                       batch_size=32, modes=["imprag"]))
    mesh = "gpu8"
    for x in [x for x in arg.split(",") if x]:
        if x in MESHES:
            mesh = x
        elif x == "smoke":  # the same structure (GQA ratio, rope scaling, tying, b/t proportions), tiny, on CPU
            c.model.update(dict(vocab_size=None, hidden_size=64, intermediate_size=160, num_layers=4,
                                num_heads=arch["num_heads"] // 4 if size == "8b" else 6,
                                num_kv_heads=2, head_dim=16, b=1, t=2, dtype="float32", remat="full",
                                max_position=4096))
            c.data.update(dict(kind="synthetic", people=200, batch_size=4, free_batch_size=0, L_q=64, L_r=4,
                               l_max=24, k=4, positives="gold", n_pos=1, negatives="generator",
                               n_neg=3, cf=1.0))
            c.data.tasks = {"qa": 1.0}
            c.train.update(dict(steps=3, warmup_steps=1, log_every=1, ckpt_every=0, accum=2, warmup_share=0.34))
            c.eval.update(dict(tasks=["qa"], k=[1], limit=8, max_new_tokens=2, batch_size=8))
            mesh = "smoke"
        else:
            raise ValueError(f"unknown config argument {x!r} (known: smoke, {', '.join(MESHES)})")
    if mesh == "smoke":
        c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    else:
        d, f, t = MESHES[mesh]
        c.mesh.update(dict(data=d, fsdp=f, tensor=t))
    return c
