"""Shared builder for the paper's Llama-3 settings (configs/llama3_2_3b.py, configs/llama3_1_8b.py).

The architecture fields are the released models' (config.json); point `model.init` at a local HF directory of
the checkpoint to fine-tune it (`--config.model.init=/models/Llama-3.2-3B`, which brings its tokenizer);
"random" only serves compile checks and the smoke.
Paper settings: b = 7, t = 19 (3B) / 23 (8B), k = 10 passages, top-5 pseudo-positives, hard negatives from ranks
10-50, warmup on the first 3 of 10 epochs (warmup_share 0.3), retrieval-free instruction rows beside the
retrieval rows (App. D). Everything else is ours and marked as such.

Data: the mini-KILT `python -m imprag_jax.data.prepare` builds, prepared from `data.source` (../shared/data) into
<workdir>/data on first use (or an already prepared folder: --config.data.dir=DIR). The paper's seen training tasks
are NQ and HotpotQA; the mini-KILT has HotpotQA only as a dev set (an unseen task), so the seen tasks here are NQ
and SQuAD, as in configs/smollm2.py. With your own KILT HotpotQA training file (README, "Your own KILT data"),
prepare it beside NQ and train on the paper's pair:
  --config.data.kind=prepared --config.data.dir=DIR --config.data.tasks=nq:1,hotpotqa:1
(a KILT-prepared folder has no retrieval-free tasks: add --config.data.free_batch_size=0, and name its dev tasks
in --config.eval.tasks).

Arguments (comma-separated): a mesh (gpu8 | v5p-32 | v5p-64 | cpu8) and/or smoke (the same structure at toy
sizes, trained and evaluated on the CPU on the mini-KILT; needs ../shared/data and the cached SmolLM2 tokenizer).
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
    # data: retrieval rows from the seen tasks (the paper's NQ + HotpotQA -> the mini-KILT's NQ + SQuAD, see above)
    c.data.update(dict(kind="minikilt", batch_size=64, L_q=256, L_r=32, l_max=128, k=10,
                       positives="pseudo", n_pos=5, negatives="bm25",
                       n_neg=5, random_neg_fraction=0.0, cf=0.0, cf_negatives=False, add_bos=True))
    c.data.tasks = {"nq": 1.0, "squad": 1.0}  # assigned: ConfigDict.update would merge into the default's
    # retrieval-free rows (App. D: reading comprehension, phrase denoising, sentence generation, ~10 % plain
    # Wikipedia text), the ones the mini-KILT converter builds from its passage pool: SQuAD with its passage in the
    # prompt, phrase denoising, next/previous sentence generation, and plain text (lm, 0.3 of 3.3 = ~9 % of these
    # rows). Ours: 16 of them per step beside the 64 retrieval rows (as configs/smollm2.py), and their length:
    # 320 tokens, room for a 100-word passage plus the question (phrase denoising's prompts reach ~260 tokens at
    # the 99th percentile with SmolLM2's tokenizer; Llama-3's larger vocabulary should need fewer) and 64 response
    # tokens (a generated sentence; plain-text rows use all 320)
    c.data.update(dict(free_batch_size=16, L_free=320, L_free_r=64))
    c.data.free_tasks = {"squad_rc": 1.0, "phrase_denoising": 1.0, "sentence_generation": 1.0, "lm": 0.3}
    c.train.update(dict(steps=2000, lr=1e-5, warmup_steps=100, weight_decay=0.0, b2=0.95, lam=1.0, stages="both",
                        warmup_share=0.3, tau_t=1.0, tau_r=1.0, accum=1, teacher_chunks=2, log_every=10,
                        ckpt_every=200, keep=2))
    # seen tasks' dev splits, then the unseen formats (multi-hop QA, slot filling, fact verification)
    c.eval.update(dict(tasks=["nq", "squad", "hotpotqa", "trex", "scifact"], k=[10], limit=1000,
                       max_new_tokens=32, batch_size=32, modes=["imprag"], dev_tasks=["nq"], dev_limit=200))
    mesh = "gpu8"
    for x in [x for x in arg.split(",") if x]:
        if x in MESHES:
            mesh = x
        elif x == "smoke":  # the same structure (GQA ratio, rope scaling, tying, b/t proportions), tiny, on CPU
            # random weights over SmolLM2's tokenizer (the cached GGUF: offline; the mini-KILT has no vocabulary of
            # its own), the vocabulary its size (49,152)
            c.model.update(dict(vocab_size=None, tokenizer="smollm2", hidden_size=64, intermediate_size=160,
                                num_layers=4, num_heads=arch["num_heads"] // 4 if size == "8b" else 6,
                                num_kv_heads=2, head_dim=16, b=1, t=2, dtype="float32", remat="full",
                                max_position=4096))
            # the whole mini-KILT (~20 s to prepare), the same tasks and row kinds as above at toy lengths
            c.data.update(dict(batch_size=4, free_batch_size=2, L_q=64, L_r=8, l_max=48, k=4, n_pos=2, n_neg=2,
                               L_free=96, L_free_r=16))
            c.train.update(dict(steps=3, warmup_steps=1, log_every=1, ckpt_every=0, accum=2, warmup_share=0.34))
            # every task, a few questions each, retrieving from a 300-passage pool that holds their gold passages
            c.eval.update(dict(k=[4], limit=4, max_new_tokens=4, batch_size=8, pool=300, dev_limit=4))
            mesh = "smoke"
        else:
            raise ValueError(f"unknown config argument {x!r} (known: smoke, {', '.join(MESHES)})")
    if mesh == "smoke":
        c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    else:
        d, f, t = MESHES[mesh]
        c.mesh.update(dict(data=d, fsdp=f, tensor=t))
    return c
