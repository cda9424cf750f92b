"""Which words of slot filling's prompt keep the implicit query from finding the person: gold recall of the model's
own E_q for the slot-filling dev prompts rewritten word group by word group, with what the top-1 passage is when it
misses (docs/results.md section 1b).

    python experiments/query_probe.py RUN_DIR [--limit 400] [--out probe.json]

RUN_DIR is a trained synthetic run (`python -m imprag_jax.train --config configs/synthetic.py ...` or an
`experiments/synthetic.py` row). Variants of `{entity} [SEP] {relation} Provide the answer ... A:`:

  full            the evaluated prompt (its recall is the evaluation's slot_filling recall)
  no_instruction  `{entity} [SEP] {relation} A:`
  entity_sep      `{entity} [SEP] A:`
  entity          `{entity} A:`
  qa              `Q: Where was {entity} born? A:` (a trained QA phrasing)
  rel:<name>      `{entity} [SEP] <name> A:` for each relation name of the world, and for each of its words

Top-1 of a miss: `same_entity` (another passage naming the person: a letter, an event), `other_bio` (someone
else's biography), `other`. Chance recall@1 is 1 / passages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def variants(entity: str, relation: str, relations: Sequence[str]) -> Dict[str, str]:
    from imprag_jax.data.templates import render

    out = {"full": render("slot_filling", {"entity": entity, "relation": relation}),
           "no_instruction": f"{entity} [SEP] {relation} A:", "entity_sep": f"{entity} [SEP] A:",
           "entity": f"{entity} A:", "qa": f"Q: Where was {entity} born? A:"}
    names = list(dict.fromkeys(list(relations) + [w for r in relations for w in r.split()]))
    out.update({f"rel:{r}": f"{entity} [SEP] {r} A:" for r in names})
    return out


def probe(params, cfg, tok, data_dir: str, *, l_max: int, L_q: int = 64, add_bos: bool = True, limit: int = 400,
          batch_size: int = 64) -> Dict[str, Dict]:
    """{variant: {recall@1, recall@5, top1_same_entity, top1_other_bio, top1_other, n}} over the first `limit`
    slot-filling dev examples, every passage of the run's knowledge source in the index."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imprag_jax.data.chunking import encode_prompt
    from imprag_jax.data.pipeline import corpus_tokens
    from imprag_jax.data.synthetic import RELATIONS
    from imprag_jax.model.transformer import query_embedding
    from imprag_jax.retrieval import encode_corpus

    toks, mask = corpus_tokens(data_dir, tok, l_max)
    emb = np.asarray(encode_corpus(params, cfg, toks, mask, batch_size=batch_size, keep_tokens=False,
                                   progress=False).embeddings, np.float32)[:len(toks)]
    with open(os.path.join(data_dir, "passages.jsonl")) as f:
        passages = [json.loads(line) for line in f]
    row_of = {p["id"]: i for i, p in enumerate(passages)}
    with open(os.path.join(data_dir, "tasks", "slot_filling.dev.jsonl")) as f:
        exs = [json.loads(line) for line in f][:limit]
    ents = [e["input"].split(" [SEP] ")[0] for e in exs]
    gold = [{row_of[p["passage_id"]] for o in e["output"] for p in o.get("provenance", [])} for e in exs]
    per = [variants(x, e["input"].split(" [SEP] ", 1)[1], list(RELATIONS.values())) for x, e in zip(ents, exs)]
    e_q = jax.jit(lambda t, m: query_embedding(params, cfg, t, m))
    bos = tok.bos_id if add_bos else None
    out = {}
    for name in per[0]:
        t = np.full((len(exs), L_q), tok.pad_id, np.int32)
        m = np.zeros((len(exs), L_q), np.int32)
        for i, v in enumerate(per):
            ids = encode_prompt(tok, v[name], L_q, bos_id=bos)
            t[i, :len(ids)], m[i, :len(ids)] = ids, 1
        q = np.concatenate([np.asarray(e_q(jnp.asarray(t[s:s + batch_size]), jnp.asarray(m[s:s + batch_size])))
                            for s in range(0, len(exs), batch_size)])
        top = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :5]
        r1 = r5 = same = bio = other = 0
        for i, row in enumerate(top):
            r1 += int(row[0]) in gold[i]
            r5 += any(int(j) in gold[i] for j in row)
            if int(row[0]) in gold[i]:
                continue
            p = passages[int(row[0])]
            if ents[i] in f"{p['title']} {p['text']}":
                same += 1
            elif p["id"].startswith("bio-"):
                bio += 1
            else:
                other += 1
        n = len(exs)
        out[name] = {"recall@1": r1 / n, "recall@5": r5 / n, "top1_same_entity": same / n, "top1_other_bio": bio / n,
                     "top1_other": other / n, "n": n}
    return out


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    from imprag_jax.run import RunError
    from imprag_jax.run.session import ImpRAGSession

    try:
        s = ImpRAGSession.from_workdir(a.run_dir)
    except (RunError, FileNotFoundError) as e:
        print(f"query_probe: {e}", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(s.data_dir, "tasks", "slot_filling.dev.jsonl")):
        print(f"query_probe: {s.data_dir} has no slot_filling dev split (a synthetic world's run is needed)",
              file=sys.stderr)
        return 2
    rows = probe(s.params, s.cfg, s.tok, s.data_dir, l_max=s.c.data.l_max, L_q=int(s.c.eval.L_q),
                 add_bos=bool(s.c.data.add_bos), limit=a.limit)
    n_pass = sum(1 for _ in open(os.path.join(s.data_dir, "passages.jsonl")))
    print(f"{a.run_dir} (step {s.step}); {n_pass} passages, chance recall@1 {1 / n_pass:.4f}")
    print(f"{'variant':24s} R@1    R@5    miss: same-entity other-bio other")
    for k, r in rows.items():
        print(f"{k:24s} {r['recall@1']:.3f}  {r['recall@5']:.3f}  {r['top1_same_entity']:.3f}       "
              f"{r['top1_other_bio']:.3f}     {r['top1_other']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"run": a.run_dir, "step": s.step, "passages": n_pass, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
