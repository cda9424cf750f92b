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
    assert R.parse_weights("") == {} and R.parse_weights(None) == {}
    assert R.parse_weights({"b": 2, "a": 1}) == {"b": 2.0, "a": 1.0}
    assert R.parse_list("1, 5", int) == [1, 5] and R.parse_list([10, "50"], int) == [10, 50]
    with pytest.raises(ConfigError, match="bad list item 'x'"):
        R.parse_list("1,x", int)
    with pytest.raises(ConfigError, match="bad task weight 'qa:much'"):
        R.parse_weights("qa:much")


def test_configs_are_a_package_with_real_lists():
    import configs.synthetic
    from configs import llama3_2_3b, smollm2

    c = configs.synthetic.get_config()
    assert c.eval.k == [1, 5] and c.eval.modes == ["imprag", "oracle"] and c.data.neg_ranks == [10, 50]
    assert R.parse_weights(smollm2.get_config().data.free_tasks) == {
        "squad_rc": 1.0, "phrase_denoising": 1.0, "sentence_generation": 1.0, "lm": 0.3}
    from imprag_jax.model import ModelConfig

    # the architecture numbers come from the one preset table
    assert R.model_config(llama3_2_3b.get_config()) == ModelConfig.llama3_2_3b(remat="full", score_scale="sqrt_dim")


def test_old_run_config_json_with_comma_strings_loads(tmp_path):
    """config.json of a run written when lists were comma strings (and model.preset existed) reads as the real
    lists; fields added since take their defaults; a field the code does not know is an error naming it."""
    old = json.loads(load_config("synthetic.py:smoke").to_json_best_effort())
    old["model"].update(preset="tiny", head_dim=0, prompt_offset=-1, vocab_size=0)
    old["data"].update(tasks="qa:1,two_hop_qa:0.5", free_tasks="format:1", neg_ranks=[10, 50])
    old["eval"].update(k="1,5", tasks="qa,slot_filling", modes="imprag,oracle", dev_tasks="qa", dev_modes="imprag")
    del old["eval"]["L_q"], old["train"]["retrieval_steps"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    c = R.load_run_config(str(tmp_path))
    assert c.eval.k == [1, 5] and c.eval.tasks == ["qa", "slot_filling"] and c.eval.modes == ["imprag", "oracle"]
    assert R.parse_weights(c.data.tasks) == {"qa": 1.0, "two_hop_qa": 0.5}
    assert c.eval.L_q == 0 and c.train.retrieval_steps == 0 and "preset" not in c.model
    cfg = R.model_config(c, vocab_size=50)
    assert cfg.head_dim == 32 and cfg.prompt_offset is None and cfg.vocab_size == 50
    old["train"]["query_filler"] = True
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(R.RunError, match="unknown field 'train.query_filler'"):
        R.load_run_config(str(tmp_path))


def test_pretrained_init_refuses_an_architecture_field_that_disagrees():
    """A pretrained init takes the architecture from the checkpoint: a config value that agrees (or is unset) is
    fine, one that disagrees is a one-line ConfigError naming the field and both values."""
    from imprag_jax.model import ModelConfig

    ckpt = ModelConfig.smollm2_135m()
    c = load_config("smollm2.py:smoke")
    cfg = R.model_config(c, base=ckpt)
    assert (cfg.hidden_size, cfg.num_layers, cfg.b, cfg.t, cfg.score_scale) == (576, 30, 7, 21, "sqrt_dim")
    c.model.hidden_size = 576
    assert R.model_config(c, base=ckpt).hidden_size == 576
    c.model.num_layers = 24
    with pytest.raises(ConfigError, match=r"model.num_layers=24 disagrees with the checkpoint 'smollm2' \(30\)"):
        R.model_config(c, base=ckpt)


def test_random_init_needs_the_shape_fields():
    c = load_config("smollm2.py:smoke")
    c.model.init = "random"
    with pytest.raises(ConfigError, match="model.hidden_size is not set"):
        R.model_config(c, vocab_size=64)


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


@pytest.mark.data
def test_random_init_reads_text_with_the_named_tokenizer(monkeypatch, world_dir):
    """model.tokenizer gives a random init a pretrained tokenizer (the Llama-3 smoke configs: SmolLM2's over the
    mini-KILT); unset, the data folder's; with a pretrained init, or naming nothing usable, a config error."""
    from imprag_jax.convert.fetch import smollm2_path

    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    _no_model_loading(monkeypatch)
    c = load_config("llama3_2_3b.py:smoke")
    assert c.model.init == "random" and c.model.tokenizer == "smollm2" and c.model.vocab_size is None
    tok = R.tokenizer(c, None)
    assert tok.vocab_size == 49152 and R.model_config(c, tok.vocab_size).vocab_size == 49152
    c = load_config("synthetic.py:smoke")
    assert R.tokenizer(c, world_dir).vocab_size < 49152  # the world's word-level vocabulary
    c = load_config("smollm2.py:smoke")
    c.model.tokenizer = "smollm2"
    with pytest.raises(ConfigError, match="model.tokenizer='smollm2' is for a random init"):
        R.tokenizer(c, None)
    c = load_config("synthetic.py:smoke")
    c.model.tokenizer = "no_such_tokenizer"
    with pytest.raises(ConfigError, match="expected 'smollm2', a .gguf file or a directory"):
        R.tokenizer(c, world_dir)


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
