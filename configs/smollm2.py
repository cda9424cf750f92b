"""SmolLM2-135M-Instruct (GGUF from PyPI) trained as ImpRAG on the real mini-KILT (NQ + SQuAD; T-REx, SciFact,
HotpotQA held out as unseen formats). Sized for one GPU; `:smoke` runs a few steps on a CPU.

  python -m imprag_jax.train --config configs/smollm2.py --workdir runs/smollm2
  python -m imprag_jax.train --config configs/smollm2.py:smoke --workdir /tmp/smollm2_smoke

The mini-KILT is prepared from `data.source` (../shared/data) into <workdir>/data on first use.

Arguments (comma-separated, combinable):
  smoke        a few steps at toy shapes (tests)
  cpu          sized for a 2-core CPU in minutes: a `--limit`-prepared mini-KILT (set data.dir), fp32, k = 4
               passages of 64 tokens, 4 + 2 rows per step, 60 steps, 100 evaluation examples per task
  closed_book  no passages in training or evaluation (SmolLM2 fine-tuned on the same questions)
  ra_it        RA-IT: the BM25 top k in context through every layer (b = 0, t = N-1), no retrieval loss
  retriever    sized for a 2-core CPU: train the retrieval path alone (bottom group + layer b's q/k projections,
               embeddings frozen; `train.retrieval_steps`) with the multi-label NCE over 32 NQ/SQuAD questions per
               step (gold passage, in-batch negatives), s(q,p) scaled by 1/sqrt(head_dim); evaluates gold recall
               of the implicit retriever and of BM25 on NQ and SQuAD dev over a 4,000-passage pool (set data.dir)
"""
from imprag_jax.config_base import base_config
from imprag_jax.model.config import PRESETS

N_LAYERS = PRESETS["smollm2_135m"]["num_layers"]


def get_config(arg: str = ""):
    c = base_config()
    c.name = "smollm2"
    # the architecture (hidden size, layers, heads, ...) is the checkpoint's; the config sets the ImpRAG split and
    # the numerics
    c.model.update(dict(init="smollm2", b=7, t=21, dtype="bfloat16", remat="dots_no_batch",
                        score_scale="sqrt_dim"))  # raw layer-7 products (~70-100) saturate the NCE (results 3a)
    # retrieval rows: NQ and SQuAD questions; retrieval-free rows (the paper's instruction-tuning side, built from
    # the passage pool by the mini-KILT converter): SQuAD with its passage in the prompt, phrase denoising,
    # next/previous sentence generation, ~10 % plain text -- at their own length (they hold a passage)
    c.data.update(dict(kind="minikilt", batch_size=64, free_batch_size=16, L_q=64, L_r=16, L_free=224, L_free_r=32,
                       l_max=128, k=10, positives="pseudo", n_pos=5, negatives="bm25", n_neg=5,
                       random_neg_fraction=0.0, cf=0.0, cf_negatives=False, add_bos=False))
    # task weights are assigned, not passed to update(): ConfigDict.update merges dicts into the default's
    c.data.tasks = {"nq": 1.0, "squad": 1.0}
    c.data.free_tasks = {"squad_rc": 1.0, "phrase_denoising": 1.0, "sentence_generation": 1.0, "lm": 0.3}
    c.train.update(dict(steps=3000, lr=2e-5, warmup_steps=100, weight_decay=0.0, b2=0.95, lam=1.0,
                        stages="both", warmup_share=0.3, tau_t=1.0, tau_r=1.0, log_every=20, ckpt_every=500,
                        eval_every=0))
    c.eval.update(dict(tasks=["nq", "squad", "trex", "scifact", "hotpotqa"], k=[10], limit=500, max_new_tokens=16,
                       batch_size=32, modes=["imprag"], dev_tasks=["nq"], dev_limit=200))
    for a in sorted([x for x in arg.split(",") if x], key=lambda x: x not in ("smoke", "cpu", "retriever")):  # sizes first
        if a == "cpu":
            c.model.update(dict(dtype="float32", remat="none"))
            c.data.update(dict(kind="prepared", batch_size=4, free_batch_size=2, k=4, n_pos=1, n_neg=3, l_max=64,
                               L_q=48, L_r=12, L_free=160, L_free_r=24, prefetch=1))
            c.train.update(dict(steps=60, warmup_steps=6, lr=3e-5, log_every=5, ckpt_every=30, warmup_share=0.5))
            c.eval.update(dict(k=[4], limit=100, max_new_tokens=12, batch_size=20, L_q=64))
        elif a == "closed_book":
            c.name = "smollm2_closed_book"
            c.train.update(dict(closed_book=True, stages="none"))
            c.eval.update(dict(modes=["closed_book"], k=[0]))
        elif a == "ra_it":
            c.name = "smollm2_ra_it"
            c.model.update(dict(b=0, t=N_LAYERS - 1, passage_attention="joint"))
            c.train.stages = "none"
            c.data.update(dict(positives="pseudo", n_pos=c.data.k, n_neg=0))  # candidates = the BM25 top k
            c.eval.update(dict(modes=["bm25"], k=[c.data.k]))
        elif a == "retriever":
            c.name = "smollm2_retriever"
            c.model.update(dict(dtype="float32", remat="none"))
            c.data.update(dict(kind="prepared", batch_size=32, free_batch_size=0, k=1, positives="gold", n_pos=1,
                               n_neg=0, l_max=128, L_q=48, L_r=4, prefetch=1))
            # 650 steps of ~5 s on 2 quiet cores (<= 60 min); lr 3e-4 and the 1/sqrt(64) scale chosen by 60-step
            # pilots (docs/results.md section 3)
            c.train.update(dict(steps=650, retrieval_steps=650, lr=3e-4, warmup_steps=20, weight_decay=0.0,
                                log_every=25, ckpt_every=100, eval_every=217))
            c.eval.update(dict(tasks=["nq", "squad"], modes=["recall", "bm25_recall"], dev_tasks=["nq", "squad"],
                               dev_modes=["recall"], dev_limit=400, limit=400, pool=4000, batch_size=64, L_q=48))
        elif a == "smoke":
            c.model.update(dict(dtype="float32", remat="none"))
            c.data.update(dict(batch_size=2, free_batch_size=2, k=2, n_pos=1, n_neg=1, l_max=32, L_q=32, L_r=8,
                               L_free=64, L_free_r=8))
            c.train.update(dict(steps=3, warmup_steps=1, log_every=1, ckpt_every=0, warmup_share=0.34))
            c.eval.update(dict(tasks=["nq"], k=[2], limit=4, max_new_tokens=4, batch_size=4, pool=300))
        else:
            raise ValueError(f"unknown config argument {a!r} (known: smoke, cpu, closed_book, ra_it, retriever)")
    return c
