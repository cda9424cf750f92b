"""SmolLM2-135M-Instruct (GGUF from PyPI) trained as ImpRAG on the real mini-KILT (NQ + SQuAD; T-REx, SciFact,
HotpotQA held out as unseen formats). Sized for one GPU; `:smoke` runs a few steps on a CPU.

  python -m imprag_jax.train --config configs/smollm2.py --workdir runs/smollm2
  python -m imprag_jax.train --config configs/smollm2.py:smoke --workdir /tmp/smollm2_smoke

The mini-KILT is prepared from `data.source` (../shared/data) into <workdir>/data on first use.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def get_config(arg: str = ""):
    c = base_config()
    c.name = "smollm2"
    c.model.update(dict(init="smollm2", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, b=7, t=21, dtype="bfloat16", remat="dots_no_batch", max_position=8192))
    # retrieval rows: NQ and SQuAD questions; retrieval-free rows (the paper's instruction-tuning side, built from
    # the passage pool by the mini-KILT converter): SQuAD with its passage in the prompt, phrase denoising,
    # next/previous sentence generation, ~10 % plain text -- at their own length (they hold a passage)
    c.data.update(dict(kind="minikilt", batch_size=64, free_batch_size=16, L_q=64, L_r=16, L_free=224, L_free_r=32,
                       l_max=128, k=10, tasks="nq:1,squad:1",
                       free_tasks="squad_rc:1,phrase_denoising:1,sentence_generation:1,lm:0.3",
                       positives="pseudo", n_pos=5, negatives="bm25", n_neg=5,
                       random_neg_fraction=0.0, cf=0.0, cf_negatives=False, add_bos=False))
    c.train.update(dict(steps=3000, lr=2e-5, warmup_steps=100, weight_decay=0.0, b2=0.95, lam=1.0,
                        stages="both", warmup_share=0.3, tau_t=1.0, tau_r=1.0, log_every=20, ckpt_every=500,
                        eval_every=0))
    c.eval.update(dict(tasks="nq,squad,trex,scifact,hotpotqa", k="10", limit=500, max_new_tokens=16,
                       batch_size=32, modes="imprag", dev_tasks="nq", dev_limit=200))
    for a in [x for x in arg.split(",") if x]:
        if a == "smoke":
            c.model.update(dict(dtype="float32", remat="none"))
            c.data.update(dict(batch_size=2, free_batch_size=2, k=2, n_pos=1, n_neg=1, l_max=32, L_q=32, L_r=8,
                               L_free=64, L_free_r=8))
            c.train.update(dict(steps=3, warmup_steps=1, log_every=1, ckpt_every=0, warmup_share=0.34))
            c.eval.update(dict(tasks="nq", k="2", limit=4, max_new_tokens=4, batch_size=4))
        else:
            raise ValueError(f"unknown config argument {a!r} (known: smoke)")
    return c
