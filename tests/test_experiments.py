"""The experiment runners: every row names real config arguments and keys; the report builds its table."""
import json
import os
import sys

import pytest

from conftest import ROOT



def _check_overrides(c, overrides):
    import copy

    from imprag_jax.config_base import set_value

    c = copy.deepcopy(c)  # the caller checks the config as the row's file builds it
    for o in overrides:
        assert o.startswith("--config.") and "=" in o, o
        path, _ = o[len("--config."):].split("=", 1)
        node = c
        for part in path.split("."):
            assert part in node, f"{o}: no config key {path}"
            node = node[part]
        set_value(c, path, o.split("=", 1)[1])  # the value parses as the command line's would


@pytest.fixture(scope="module")
def runners():
    import importlib.util

    mods = {}
    for name in ("synthetic", "smollm2", "report", "lm_drift", "layout_nll", "query_probe"):
        spec = importlib.util.spec_from_file_location(f"exp_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
        m = importlib.util.module_from_spec(spec)
        sys.modules[f"exp_{name}"] = m
        spec.loader.exec_module(m)
        mods[name] = m
    return mods


def _config(file, args):
    import importlib

    return importlib.import_module(f"configs.{file}").get_config(args)


def test_every_row_builds_its_config_and_overrides_existing_keys(runners, tmp_path):
    syn, sm = runners["synthetic"], runners["smollm2"]
    for row, (args, overrides, _) in syn.ROWS.items():
        c = _config("synthetic", args)
        _check_overrides(c, overrides + syn.EVAL)
        cmd = syn.row_command(row, 0, 1800, str(tmp_path), str(tmp_path / "world"))
        assert "--config.train.steps=1800" in cmd and "--config.seed=0" in cmd
        if any("qa_templates" in o for o in overrides):  # another world, another directory
            assert any(x.endswith("world_q3") for x in cmd)
    for row, (args, zero_shot, extra, data, _) in sm.ROWS.items():
        c = _config("smollm2", args)
        _check_overrides(c, [x.replace("{retriever}", "R") for x in extra])
        if args == "retriever":  # the retrieval path alone, on the whole mini-KILT
            assert c.train.retrieval_steps == c.train.steps and data == "full"
            assert c.model.score_scale == "sqrt_dim" and c.eval.pool >= 3000
        else:
            assert c.data.batch_size == 4 and c.data.L_free == 160  # the cpu sizes
        if any("init_from" in x for x in extra):  # starts from the retriever row's run beside it
            cmd = sm.row_command(row, str(tmp_path / "d"), str(tmp_path / row), 0)
            assert f"--config.train.init_from={tmp_path / 'retriever'}" in cmd
        cmd = sm.row_command(row, str(tmp_path / "d"), str(tmp_path / row), 0)
        assert ("--checkpoint" in cmd) == zero_shot
        cmd = sm.row_command(row, str(tmp_path / "d"), str(tmp_path / row), 50, seed=1)
        assert "--config.seed=1" in cmd
        if not zero_shot:
            assert "--config.train.steps=50" in cmd
            assert ("--config.train.retrieval_steps=50" in cmd) == (args == "retriever")


def test_report_table_means_and_spreads(runners, tmp_path):
    rep = runners["report"]
    ev = lambda em, r5: [{"task": "qa", "mode": "imprag", "k": 1, "em": em, "gold_recall@5": r5},  # noqa: E731
                         {"task": "qa", "mode": "imprag", "k": 5, "em": 0.0, "gold_recall@5": r5}]
    lines = [dict(row="warmup_only", seed=s, steps=1800, train_seconds=100.0, eval=ev(em, 1.0))
             for s, em in ((0, 0.9), (1, 0.7))]
    lines.append(dict(row="closed_book", seed=0, steps=1800, train_seconds=50.0,
                      eval=[{"task": "qa", "mode": "closed_book", "k": 0, "em": 0.03}]))
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    runs = rep.load(str(tmp_path))
    table = rep.table(runs)
    assert "| closed_book | 1 | 1800 | 0.030 | – |" in table
    assert "| warmup_only | 2 | 1800 | 0.800 (0.700–0.900) | 1.000 (1.000–1.000) |" in table  # k = 1 is read
    assert table.index("closed_book") < table.index("warmup_only")  # the runner's row order


def test_a_finished_run_is_recorded_once(runners, tmp_path):
    syn = runners["synthetic"]
    final = tmp_path / "warmup_only" / "seed3" / "eval" / "final.json"
    final.parent.mkdir(parents=True)
    final.write_text(json.dumps({"step": 7, "train_seconds": 1.5, "eval": [{"task": "qa"}],
                                 "metrics": {"gen_nll": 0.5, "lr": 1e-3}}))
    for _ in range(2):  # "already done": recorded the first time only
        assert syn.main(["warmup_only", "--seed", "3", "--out", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "results.jsonl")]
    assert len(lines) == 1 and lines[0]["row"] == "warmup_only" and lines[0]["seed"] == 3
    assert lines[0]["final_metrics"] == {"gen_nll": 0.5} and lines[0]["steps"] == 7
    assert lines[0]["command"] == "python experiments/synthetic.py warmup_only --seed=3 --steps=1800"
    assert syn.main(["nope"]) == 2 and syn.main(["--list"]) == 0


def test_report_f1_columns_and_row_selection(runners, tmp_path):
    rep = runners["report"]
    ev = lambda em, f1: [{"task": "nq", "mode": "imprag", "k": 4, "em": em, "f1": f1, "gold_recall@5": 0.5}]  # noqa: E731
    lines = [dict(row=r, seed=0, steps=60, train_seconds=10.0, eval=ev(em, f1))
             for r, em, f1 in (("ra_it_full", 0.2, 0.3), ("imprag_distill_r", 0.1, 0.25), ("retriever", 0.0, 0.0))]
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    old = rep.TASKS
    rep.TASKS = rep.SMOLLM2_TASKS
    try:
        runs = rep.load(str(tmp_path))
        table = rep.table(runs, ["imprag_distill_r", "ra_it_full"], f1=True)
        assert "| NQ (seen) EM | NQ (seen) F1 | NQ (seen) R@5 |" in table
        assert "| imprag_distill_r | 1 | 60 | 0.100 | 0.250 | 0.500 |" in table
        assert "retriever" not in table and table.index("imprag_distill_r") < table.index("ra_it_full")
        with pytest.raises(ValueError, match="no results for row"):
            rep.table(runs, ["nope"])
        assert rep.main(["--smollm2", "--out", str(tmp_path), "--rows", "nope"]) == 2
    finally:
        rep.TASKS = old


def test_lm_drift_pretrained_beats_a_perturbed_model(runners, tmp_path):
    """The plain-LM NLL of SmolLM2 on real text is low, and moving its bottom layers (as a retrieval stage does)
    raises it -- what experiments/lm_drift.py reports for a run."""
    import jax
    import numpy as np
    from imprag_jax.convert import fetch

    if fetch.smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    ld = runners["lm_drift"]
    (tmp_path / "passages.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in (
        "Paris is the capital and most populous city of France, with an estimated population of two million.",
        "The Nile is a major north-flowing river in northeastern Africa and flows into the Mediterranean Sea.",
        "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide.")) + "\n")
    texts = ld.sample_passages(str(tmp_path), 3, every=1)
    assert len(texts) == 3
    cfg, params, tok = fetch.resolve_model("smollm2")
    base = ld.lm_nll(params, cfg, tok, texts, 32)
    assert 0.5 < base < 5.0  # a pretrained LM on plain English
    rng = np.random.default_rng(0)
    layers = params["layers"]
    noisy = jax.tree.map(lambda x: x, params)
    noisy["layers"] = jax.tree.map(
        lambda w: w + (0.5 * np.std(np.asarray(w)) * rng.standard_normal(w.shape)).astype(np.asarray(w).dtype)
        if np.ndim(w) >= 2 else w, layers)
    assert ld.lm_nll(noisy, cfg, tok, texts, 32) > base + 0.3
    with pytest.raises(FileNotFoundError, match="passages.jsonl"):
        ld.sample_passages(str(tmp_path / "nope"), 3)
    assert ld.main(["--data", str(tmp_path / "nope")]) == 2  # user mistakes: one line, exit 2
    assert ld.main(["--data", str(tmp_path), str(tmp_path / "no_run")]) == 2


def test_layout_nll_reads_a_made_up_fact_in_context(runners, tmp_path):
    """experiments/layout_nll.py: SmolLM2 with a passage stating a made-up fact in context gives the answer a far
    lower NLL than without it (the tool measures reading); user mistakes exit 2 in one line."""
    import numpy as np
    from imprag_jax.convert import fetch

    ln = runners["layout_nll"]
    assert ln.main(["--data", str(tmp_path / "nope")]) == 2
    if fetch.smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    cfg, params, tok = fetch.resolve_model("smollm2")
    cfg = cfg.replace(b=7, t=21, passage_attention="joint")
    rows = [("Q: What is the capital of Zorbania? A:", " Quexlotown", "Zorbania: The capital of Zorbania is Quexlotown."),
            ("Q: Who invented the glimmerphone? A:", " Talia Brunsk",
             "Glimmerphone: The glimmerphone was invented by Talia Brunsk in 1931.")]
    L, P = 24, 24
    b = {k: np.zeros((len(rows), L), np.int32) for k in ("tokens", "mask", "prompt_mask", "loss_mask")}
    b["passages"], b["passage_mask"] = np.zeros((len(rows), 1, P), np.int32), np.zeros((len(rows), 1, P), np.int32)
    for i, (q, a, passage) in enumerate(rows):
        qi, ai, pi = tok.encode(q), tok.encode(a) + [tok.eos_id], tok.encode(passage)
        n = len(qi) + len(ai)
        b["tokens"][i, :n], b["mask"][i, :n] = qi + ai, 1
        b["prompt_mask"][i, :len(qi)], b["loss_mask"][i, len(qi):n] = 1, 1
        b["passages"][i, 0, :len(pi)], b["passage_mask"][i, 0, :len(pi)] = pi, 1
    cb, _ = ln.layout_scores(params, cfg, b, "closed_book")
    ctx, hit = ln.layout_scores(params, cfg, b, "in_context")
    assert ctx < cb - 2.0 and 0.0 <= hit <= 1.0  # measured: 2.72 vs 11.44 nats per answer token
    assert np.isfinite(ln.layout_scores(params, cfg, b, "imprag")[0])


def test_query_probe_full_prompt_is_the_evaluated_one(runners, world_dir, tmp_path):
    """experiments/query_probe.py: its `full` variant is the prompt the evaluation reads (same text) and its recall
    is the evaluation's slot-filling gold recall for the same weights; every variant's top-1 is a hit or one kind of
    miss; a folder without a run is a one-line error (exit 2)."""
    import jax
    import numpy as np
    from imprag_jax.data.pipeline import corpus_tokens, eval_batches, load_tokenizer
    from imprag_jax.infer.imprag import passage_texts
    from imprag_jax.infer.recall import recall_rows
    from imprag_jax.model import ModelConfig, init_params

    qp = runners["query_probe"]
    tok = load_tokenizer(world_dir)
    b = next(eval_batches(world_dir, "slot_filling", "dev", tok, batch_size=8, L_q=64, limit=8))
    for i, prompt in enumerate(b["prompts"]):
        entity, relation = prompt.split(" [SEP] ")[0], prompt.split(" [SEP] ")[1].split(" Provide")[0]
        v = qp.variants(entity, relation, ["place of birth", "employer"])
        assert v["full"] == prompt and v["rel:place of birth"] == f"{entity} [SEP] place of birth A:"
        assert "rel:birth" in v and "rel:employer" in v
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size, b=1, t=2)
    params = init_params(cfg, jax.random.key(0))
    rows = qp.probe(params, cfg, tok, world_dir, l_max=32, L_q=64, limit=40)
    toks, mask = corpus_tokens(world_dir, tok, 32)
    ref = recall_rows(params, cfg, world_dir, ["slot_filling"], tok, corpus=(toks, mask),
                      texts=passage_texts(world_dir), modes=("recall",), L_q=64, limit=40)[0]
    assert rows["full"]["n"] == ref["n"] == 40
    np.testing.assert_allclose([rows["full"]["recall@1"], rows["full"]["recall@5"]],
                               [ref["gold_recall@1"], ref["gold_recall@5"]])
    for r in rows.values():
        assert abs(r["recall@1"] + r["top1_same_entity"] + r["top1_other_bio"] + r["top1_other"] - 1) < 1e-9
    assert qp.main([str(tmp_path / "no_run")]) == 2


def test_default_row_is_the_adopted_row_and_old_rows_keep_their_recipe(runners):
    """Row `default` (configs/synthetic.py as it stands) builds the same config as the filler row it adopted, so
    that row's seeds are the default's; every other row starts from `no_filler` (E_q reads the reader's prompt),
    the recipe its recorded results were run with."""
    from imprag_jax.config_base import set_value

    syn = runners["synthetic"]

    def built(row):
        args, overrides, _ = syn.ROWS[row]
        c = _config("synthetic", args)
        for o in overrides:
            path, v = o[len("--config."):].split("=", 1)
            set_value(c, path, v)
        return c.to_dict()

    default = built("default")
    assert default["data"]["query_filler"] == 0.5 and default["data"]["query_filler_split"]
    assert built(syn.ADOPTED) == default
    old = built("b1_t3")
    assert old["data"]["query_filler"] == 0.0 and not old["data"]["query_filler_split"]
    assert {k: v for k, v in old.items() if k != "data"} == {k: v for k, v in default.items() if k != "data"}
    for row, (args, _, _) in syn.ROWS.items():
        assert row == "default" or "no_filler" in args.split(",") or args in ("closed_book", "ra_it"), row
    for base in ("closed_book", "ra_it"):  # the baselines train no retriever: no filler
        assert _config("synthetic", base).data.query_filler == 0.0
