"""The run layer (imprag_jax.run): a run directory's config file, checkpoints (full state and parameters only),
data folder, tokenizer; and the one setup (train.setup.build) the trainer and compile_check share."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config

from imprag_jax import run as R
from imprag_jax.model import ConfigError


def _tiny(c, vocab=64):
    c.model.update(dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                        num_kv_heads=1, b=1, t=1))
    return c


def test_run_config_file_round_trip_and_errors(tmp_path):
    c = load_config("synthetic.py:smoke")
    with pytest.raises(R.RunError, match="does not exist"):
        R.load_run_config(str(tmp_path / "nope"))
    with pytest.raises(R.RunError, match="no config.json"):
        R.load_run_config(str(tmp_path))
    R.write_run_config(c, str(tmp_path))
    back = R.load_run_config(str(tmp_path))
    assert back.to_dict() == json.loads(c.to_json_best_effort())
    assert R.eval_ks(back) == R.eval_ks(c) and R.eval_L_q(back) == R.eval_L_q(c)


def test_parse_list_takes_strings_and_real_lists():
    assert R.parse_list(" qa, two_hop_qa,,") == ["qa", "two_hop_qa"]
    assert R.parse_list(["qa", " fv "]) == ["qa", "fv"]
    assert R.parse_list(5) == ["5"]
    assert R.parse_weights("qa:1,lm:0.5") == {"qa": 1.0, "lm": 0.5}
    assert R.parse_weights("") is None


def test_checkpoint_full_state_and_params_only_round_trip(tmp_path):
    from imprag_jax.train.setup import build
    from imprag_jax.train.state import create_state, state_shardings

    c = _tiny(load_config("synthetic.py:smoke"))
    s = build(c)
    state = create_state(s.cfg, s.tx, s.mesh, jax.random.key(3), rules=s.rules)
    wd = str(tmp_path / "run")
    assert R.checkpoint_steps(wd) == [] and R.latest_step(wd) == 0
    ck = R.Checkpoints(wd, keep=3)
    ck.save(5, state, {"step": 5}, s.cfg, "tiny")
    ck.save(9, state, {"step": 9}, s.cfg, "tiny", force=True)
    ck.close()
    assert R.checkpoint_steps(wd) == [5, 9] and R.latest_step(wd) == 9

    ck = R.Checkpoints(wd, keep=3)
    assert ck.latest_step() == 9
    shard, abstract = state_shardings(s.cfg, s.tx, s.mesh, s.rules)
    got, data_state, meta = ck.restore(9, abstract, shard)
    ck.close()
    assert data_state == {"step": 9} and meta["step"] == 9 and meta["name"] == "tiny"
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, got)
    assert all(jax.tree.leaves(same))

    params, step, cfg = R.restore_params(wd)  # parameters only, host arrays, the latest step
    assert step == 9 and cfg == s.cfg
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, np.asarray(b))), params, state["params"])
    assert all(jax.tree.leaves(same))
    assert R.restore_params(wd, 5)[1] == 5
    with pytest.raises(R.RunError, match=r"checkpoint step 7 not found .*\(have \[5, 9\]\)"):
        R.restore_params(wd, 7)
    with pytest.raises(R.RunError, match="no checkpoints"):
        R.restore_params(str(tmp_path))
    with pytest.raises(R.RunError, match="does not exist"):
        R.restore_params(str(tmp_path / "nope"))


def test_data_dir_resolution_errors(tmp_path):
    c = load_config("synthetic.py:smoke")
    wd = str(tmp_path / "w")
    assert R.data_dir_path(c, wd) == os.path.join(wd, "data")
    with pytest.raises(R.RunError, match="has no passages.jsonl"):
        R.existing_data_dir(c, wd)
    c.data.kind = "wiki"
    with pytest.raises(ConfigError, match="data.kind must be"):
        R.training_data_dir(c, wd)
    c.data.kind = "prepared"
    with pytest.raises(ConfigError, match="not a prepared data directory"):
        R.training_data_dir(c, wd)
    c.data.kind, c.data.source = "minikilt", str(tmp_path / "no_source")
    with pytest.raises(ConfigError, match="is not a folder with the original data files"):
        R.training_data_dir(c, wd)
    c.data.kind, c.data.dir = "synthetic", str(tmp_path / "typo")
    with pytest.raises(ConfigError, match="does not exist"):
        R.training_data_dir(c, wd)
    assert not os.path.exists(tmp_path / "typo") and not os.path.exists(wd)


def test_existing_world_is_found_not_regenerated(world_dir, tmp_path):
    c = load_config("synthetic.py:smoke")
    c.data.dir = world_dir
    before = os.path.getmtime(os.path.join(world_dir, "passages.jsonl"))
    assert R.training_data_dir(c, str(tmp_path)) == world_dir == R.existing_data_dir(c, str(tmp_path))
    assert os.path.getmtime(os.path.join(world_dir, "passages.jsonl")) == before


def _no_model_loading(monkeypatch):
    import imprag_jax.convert.fetch as F
    import imprag_jax.convert.gguf as G
    import imprag_jax.convert.hf as H

    def boom(*a, **k):
        raise AssertionError("the tokenizer must not load the model")

    monkeypatch.setattr(F, "resolve_model", boom)
    monkeypatch.setattr(G, "load_gguf", boom)
    monkeypatch.setattr(H, "load_hf_dir", boom)


def test_tokenizer_resolution_reads_no_weights(world_dir, tmp_path, monkeypatch):
    from imprag_jax.convert.hf import save_tokenizer
    from imprag_jax.data.pipeline import load_tokenizer

    _no_model_loading(monkeypatch)
    c = load_config("synthetic.py:smoke")
    want = load_tokenizer(world_dir)
    text = "Where was Ada Quill born? [SEP] qa <eop>"
    assert R.tokenizer(c, world_dir).encode(text) == want.encode(text)
    hf = str(tmp_path / "hf")  # a Hugging Face directory: its tokenizer.json, no weights read
    os.makedirs(hf)
    save_tokenizer(want, hf)
    c.model.init = hf
    tok = R.tokenizer(c, None)
    assert tok.encode(text) == want.encode(text) and tok.pad_id == want.pad_id
    c.model.init = str(tmp_path / "empty")  # a directory without tokenizer.json: the data folder's
    os.makedirs(c.model.init)
    assert R.tokenizer(c, world_dir).encode(text) == want.encode(text)


@pytest.mark.data
def test_smollm2_tokenizer_without_the_weights(monkeypatch):
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    _no_model_loading(monkeypatch)
    c = load_config("smollm2.py:cpu")
    tok = R.tokenizer(c, None)
    assert tok.decode(tok.encode("The capital of France is Paris.")) == "The capital of France is Paris."


def test_one_setup_for_the_trainer_and_compile_check(world_dir):
    from imprag_jax.data.pipeline import TrainBatches
    from imprag_jax.train.setup import build, config_batch_shapes, probe_batch_shapes

    c = load_config("synthetic.py:smoke")
    c.data.update(dict(dir=world_dir, prefetch=0))
    tok = R.tokenizer(c, world_dir)
    cfg = R.model_config(c, tok.vocab_size)
    s = build(c, cfg)
    assert s.cfg is cfg and s.k_read == c.data.k and s.shapes == config_batch_shapes(c, c.data.k)
    data = TrainBatches(world_dir, tok, R.batch_config(c), prefetch=0)
    try:  # the pipeline's batches have the shapes the config promises
        assert probe_batch_shapes(data.batch(0), s.k_read) == s.shapes
    finally:
        data.close()
    c.train.closed_book = True
    assert build(c, cfg).shapes["passages"][0] == (c.data.batch_size, 0, c.data.l_max)
    c.mesh.data = 64
    with pytest.raises(ConfigError):
        build(c, cfg)


def test_one_table_writer_and_the_trainers_ks():
    from imprag_jax.evaluation import markdown_table, training_ks

    rows = [{"task": "qa", "mode": "imprag", "k": 1, "n": 4, "em": 0.5, "f1": 0.75, "gold_recall@5": 1.0,
             "seconds": 3.0}]
    t = markdown_table(rows).split("\n")
    assert t[0] == "| task | mode | k | n | em | f1 | gold_recall@5 |" and t[2] == "| qa | imprag | 1 | 4 | 0.500 | 0.750 | 1.000 |"
    assert training_ks("imprag", [1, 5]) == [1, 5] and training_ks("oracle", [1, 5]) == [1]
    assert training_ks("bm25", [1, 5]) == [5] and training_ks("closed_book", [1, 5]) == [0]
