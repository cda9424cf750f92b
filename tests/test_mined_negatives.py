"""Negatives mined from the model's own index (train.candidates index/mixed) are never the example's gold passages
nor passages that contain its answer: the pipeline lists them per row (`mined_exclude`), the step skips them."""
import json

import jax.numpy as jnp
import numpy as np


def test_mined_negatives_skip_the_rows_excluded_passages():
    from imprag_jax.train.step import StepConfig, mine_from_index

    from oracles import mining_case

    N, D, l = 16, 4, 3
    emb, e_q, order, toks = mining_case(N, D, l)
    ids = np.array([[order[0, 9], order[0, 10], order[0, 11], order[0, 12]],
                    [order[1, 9], order[1, 10], order[1, 11], order[1, 12]]], np.int32)
    # row 0 must not get its three best passages (e.g. gold not among the candidates, answer-containing); row 1
    # has nothing excluded (-1 padding)
    excl = np.array([[order[0, 0], order[0, 1], order[0, 2], -1], [-1, -1, -1, -1]], np.int32)
    batch = {"passage_ids": jnp.asarray(ids), "positives": jnp.asarray([[1, 0, 0, 0], [1, 0, 0, 0]]),
             "passages": jnp.asarray(toks[ids]), "passage_mask": jnp.ones((2, 4, l), jnp.int32),
             "mined_exclude": jnp.asarray(excl)}
    sc = StepConfig(candidates="index", n_replace=3, n_index=N)
    index = {"emb": jnp.asarray(emb), "tokens": jnp.asarray(toks), "mask": jnp.ones((N, l), jnp.int32)}
    out, rep = mine_from_index(jnp.asarray(e_q), batch, index, sc)
    new = np.asarray(out["passage_ids"])
    assert list(new[0, 1:]) == list(order[0, 3:6])  # the best passages that are not excluded
    assert list(new[1, 1:]) == list(order[1, :3])
    assert not set(new[0, 1:]) & set(excl[0]) and int(rep.sum()) == 6
    # without the list, the excluded passages would have been mined
    del batch["mined_exclude"]
    out2, _ = mine_from_index(jnp.asarray(e_q), batch, index, sc)
    assert list(np.asarray(out2["passage_ids"])[0, 1:]) == list(order[0, :3])


def test_pipeline_lists_gold_and_answer_passages_per_row(world_dir):
    from imprag_jax.data.pipeline import BatchConfig, TrainBatches, _record_path, _source
    from imprag_jax.data.pseudo_labels import answer_in_text

    cfg = BatchConfig(batch_size=8, free_batch_size=0, k=4, n_pos=1, n_neg=3, positives="pseudo",
                      mined_exclude=64, tasks={"qa": 1.0})
    data = TrainBatches(world_dir, cfg=cfg, prefetch=0)
    b = data.batch(0)
    assert b["mined_exclude"].shape == (8, 64) and b["mined_exclude"].dtype == np.int32
    src = _source(_record_path(world_dir, "qa", "train"))
    texts = [f"{t} {x}" for _, t, x in data.passages]
    n_ans = 0
    for i in range(20):
        rec = json.loads(src[i])
        row = data._row(rec, 0)
        ex = [int(r) for r in row["mined_exclude"] if r >= 0]
        want = [r for r in range(len(texts)) if answer_in_text(rec["answers"], texts[r])]
        assert set(rec["gold"]) <= set(ex), rec["id"]
        assert set(want) <= set(ex) or len(ex) == 64, rec["id"]
        assert set(ex) <= set(rec["gold"]) | set(want)
        n_ans += len(want)
    assert n_ans > 0
    assert data.answer_rows(["True", "false"]) == []  # labels of true/false tasks match no passage
    # the trainer's default: no list unless candidates are mined
    plain = TrainBatches(world_dir, cfg=BatchConfig(batch_size=8, free_batch_size=0, k=4, tasks={"qa": 1.0}),
                         prefetch=0)
    assert "mined_exclude" not in plain.batch(0)
