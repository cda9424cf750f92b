"""The SmolLM2 retriever recipe (`configs/smollm2.py:retriever`) end to end at toy sizes: the retrieval-path stage
trains on the real mini-KILT with the health metrics logged, the recall curve starts at step 0, and the final
retrieval-only evaluation (the model's recall and BM25's over the same pool) equals `python -m imprag_jax.evaluate
--modes recall,bm25_recall` on the same checkpoint. Needs the SmolLM2 GGUF, the shared data and bm25s; skips
without them."""
import json
import os

import pytest

from conftest import SHARED_DATA

pytestmark = [pytest.mark.data, pytest.mark.slow]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    if not os.path.isfile(os.path.join(SHARED_DATA, "nq_open", "nq-open-oracle.jsonl.gz")):
        pytest.skip(f"real data not found at {SHARED_DATA} (set IMPRAG_SHARED_DATA)")
    pytest.importorskip("bm25s")
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    from imprag_jax.data.prepare import prepare_minikilt
    from imprag_jax.train.trainer import train

    data = str(tmp_path_factory.mktemp("mk"))
    prepare_minikilt(SHARED_DATA, data, seed=0, limit=60, show_progress=False, free_per_task=20)
    from configs import smollm2

    c = smollm2.get_config("retriever")
    c.data.update(dict(dir=data, batch_size=4, l_max=32, L_q=32))
    c.train.update(dict(steps=3, retrieval_steps=3, log_every=1, eval_every=2, ckpt_every=0, warmup_steps=1))
    c.eval.update(dict(pool=200, limit=8, dev_limit=8, L_q=32, batch_size=8))
    wd = str(tmp_path_factory.mktemp("run"))
    res = train(c, wd)
    return c, wd, res


def test_recipe_trains_the_retrieval_path_with_health_metrics(recipe_run):
    c, wd, res = recipe_run
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert r["stage"] == "retrieval" and r["gen_nll"] == 0.0 and r["grad_norm_gen"] == 0.0
        assert r["grad_norm_ret"] > 0 and r["ret_chance"] > 0 and 0 <= r["clip_fraction"] <= 1
        assert 0 < r["inbatch_top1_chance"] < 1 and 0 <= r["inbatch_top1_is_pos"] <= 1
    dev_steps = sorted({r["step"] for r in rows if any(k.startswith("dev/") for k in r)})
    assert dev_steps == [0, 2]  # the curve starts at the initial weights


def test_final_recall_rows_and_the_evaluate_cli_agree(recipe_run):
    from imprag_jax.evaluation import run

    c, wd, res = recipe_run
    final = {(r["task"], r["mode"]): r for r in res["eval"]}
    assert set(final) == {(t, m) for t in ("nq", "squad") for m in ("recall", "bm25_recall")}
    for r in final.values():
        assert r["pool"] == 200 and r["n"] == 8
        assert 0.0 <= r["gold_recall@5"] <= r["gold_recall@20"] <= 1.0
        assert abs(r["chance_gold_recall@5"] - 5 / 200) < 0.02
    # BM25 over 200 passages finds most gold passages of NQ (its questions share words with their passage)
    assert final[("nq", "bm25_recall")]["gold_recall@20"] >= 0.5
    rep = run(None, wd, modes="recall,bm25_recall", plot=False, progress=False, out_dir=os.path.join(wd, "ev"))
    again = {(r["task"], r["mode"]): r for r in rep["rows"]}
    for key, r in final.items():
        for m in ("gold_recall@1", "gold_recall@5", "gold_recall@20"):
            assert again[key][m] == pytest.approx(r[m], abs=1e-9), (key, m)
