"""Check an import against transformers: same weights, same prompts, compare the logits.

    python -m imprag_jax.convert.logit_check --random_tiny              # a random tiny Llama (GQA, llama3 rope)
    python -m imprag_jax.convert.logit_check --gguf FILE [--json OUT]   # e.g. SmolLM2-135M-Instruct.Q4_1.gguf
    python -m imprag_jax.convert.logit_check --hf_dir DIR

The imprag_jax model runs in fp32 on a left-padded batch (so the padding/position path is exercised too);
transformers' `LlamaForCausalLM` runs each prompt alone in fp32. Reported over every real token:
max |Δlogit| (absolute and relative to the largest |logit|), mean/max KL(hf ‖ imprag_jax) and the share of
positions whose argmax agrees. Exits 1 when a tolerance is exceeded, 2 when the check cannot run
(missing torch/transformers, unreadable model).
Needs torch + transformers (pip install 'imprag_jax[torch]').
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from ..model.config import ModelConfig
from . import mapping

PROMPTS = [
    "The capital of France is",
    "Question: Who wrote the novel Pride and Prejudice?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The mission was called",
    "Retrieval-augmented generation combines a language model with a search over a large corpus of passages, "
    "so that the model can",
]
# Tolerances, set from measurements (docs/convert.md): fp32 on both sides, so the differences are rounding only.
TOL_REL = 1e-4  # max |Δlogit| / max |logit| (measured: 3.4e-6 SmolLM2-135M, 1.2e-6 random tiny)
TOL_KL = 1e-6  # mean KL(hf ‖ imprag_jax) in nats (measured: ~3e-11 SmolLM2, ~3e-13 random tiny)
MIN_ARGMAX = 0.99


class MissingTorch(ImportError):
    pass


def _torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files; never reach for the hub
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingTorch("the logit check compares against PyTorch transformers, which is not installed: "
                           "pip install 'imprag_jax[torch]'") from e
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


# ---------------------------------------------------------------------------------------------------- running


def jax_logits(params, cfg: ModelConfig, seqs: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """imprag_jax fp32 logits of each sequence, run as one left-padded batch: list of [L_i, V]."""
    import jax
    import jax.numpy as jnp

    from ..model.transformer import forward

    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    L = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), L), np.int32)
    mask = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        toks[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    p = jax.tree.map(jnp.asarray, params)
    out = np.asarray(jax.jit(lambda p, t, m: forward(p, cfg, t, m))(p, toks, mask))
    return [out[i, L - len(s):] for i, s in enumerate(seqs)]


def hf_logits(model, seqs: Sequence[Sequence[int]]) -> List[np.ndarray]:
    torch, _ = _torch()
    outs = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([list(s)], dtype=torch.long)
            outs.append(model(input_ids=ids).logits[0].float().numpy())
    return outs


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict:
    """Metrics of `got` (imprag_jax) against `ref` (transformers), over all positions of all sequences."""
    r = np.concatenate([np.asarray(a, np.float64) for a in ref])
    g = np.concatenate([np.asarray(a, np.float64) for a in got])
    if r.shape != g.shape:
        raise ValueError(f"logit shapes differ: {r.shape} vs {g.shape}")
    lr, lg = _log_softmax(r), _log_softmax(g)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    d = np.abs(r - g)
    scale = float(np.abs(r).max())
    return {
        "n_sequences": len(ref), "n_positions": int(r.shape[0]), "vocab": int(r.shape[1]),
        "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "logit_scale": scale,
        "rel_max_diff": float(d.max() / max(scale, 1e-12)),
        "mean_kl": float(max(kl.mean(), 0.0)), "max_kl": float(max(kl.max(), 0.0)),
        "argmax_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()),
    }


def params_from_torch(model, cfg: ModelConfig) -> dict:
    """imprag_jax params from a transformers Llama model's state dict (via the mapping table)."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    return mapping.hf_to_params(sd.__getitem__, cfg, sd.__contains__)


# ---------------------------------------------------------------------------------------------------- sources


def random_tiny_hf(seed: int = 0, tie: bool = False, rope_scaling: bool = True, init_std: float = 0.1,
                   vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2):
    """A random tiny transformers LlamaForCausalLM (GQA; llama3 rope scaling unless disabled) with random norm
    scales too, and its imprag_jax (cfg, params)."""
    torch, transformers = _torch()
    hf_cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=tie,
                  initializer_range=init_std, attention_bias=False, mlp_bias=False)
    if rope_scaling:
        hf_cfg["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    cfg = mapping.config_from_hf(model.config.to_dict())
    if rope_scaling and cfg.rope_scaling is None:
        raise AssertionError("the llama3 rope scaling did not survive config_from_hf")
    return model, cfg, params_from_torch(model, cfg)


def _random_seqs(vocab: int, seed: int = 0, lengths=(5, 17, 40, 64)) -> List[List[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _tokenize(tokenizer, prompts) -> List[List[int]]:
    return [tokenizer.encode(p) for p in prompts]


def _tokenizer_agreement(ours, theirs, prompts) -> dict:
    bad = [p for p in prompts if ours.encode(p) != theirs(p, add_special_tokens=False)["input_ids"]]
    return {"tokenizer_prompts": len(prompts), "tokenizer_mismatches": bad}


def check_random_tiny(seed: int = 0, **kw) -> dict:
    model, cfg, params = random_tiny_hf(seed, **kw)
    seqs = _random_seqs(cfg.vocab_size, seed)
    rep = compare(hf_logits(model, seqs), jax_logits(params, cfg, seqs))
    rep.update(source="random_tiny", config=mapping.hf_config_from_model(cfg))
    return rep


def check_hf_dir(path: str, prompts=PROMPTS) -> dict:
    torch, transformers = _torch()
    from .hf import load_hf_dir

    cfg, params, tok = load_hf_dir(path)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rep = {}
    if tok is not None:
        seqs = _tokenize(tok, prompts)
        try:
            rep.update(_tokenizer_agreement(tok, transformers.AutoTokenizer.from_pretrained(path), prompts))
        except Exception as e:  # a dir transformers cannot build a tokenizer for: logits still compare
            rep["tokenizer_error"] = repr(e)
    else:
        seqs = _random_seqs(cfg.vocab_size)
    rep.update(compare(hf_logits(model, seqs), jax_logits(params, cfg, seqs)))
    rep.update(source=f"hf_dir:{path}")
    return rep


def check_gguf(path: str, prompts=PROMPTS) -> dict:
    torch, transformers = _torch()
    from .gguf import load_gguf

    cfg, params, tok = load_gguf(path)
    d, f = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    seqs = _tokenize(tok, prompts)
    rep = _tokenizer_agreement(tok, hf_tok, prompts)
    rep.update(compare(hf_logits(model, seqs), jax_logits(params, cfg, seqs)))
    rep.update(source=f"gguf:{os.path.basename(path)}")
    return rep


def verdict(rep: dict, tol_rel: float = TOL_REL, tol_kl: float = TOL_KL, min_argmax: float = MIN_ARGMAX) -> dict:
    fails = []
    if rep["rel_max_diff"] > tol_rel:
        fails.append(f"max|Δlogit|/max|logit| = {rep['rel_max_diff']:.3g} > {tol_rel:g}")
    if rep["mean_kl"] > tol_kl:
        fails.append(f"mean KL = {rep['mean_kl']:.3g} > {tol_kl:g}")
    if rep["argmax_agreement"] < min_argmax:
        fails.append(f"argmax agreement = {rep['argmax_agreement']:.4f} < {min_argmax:g}")
    if rep.get("tokenizer_mismatches"):
        fails.append(f"tokenizer differs from transformers on {len(rep['tokenizer_mismatches'])} prompt(s)")
    rep.update(tolerances=dict(rel_max_diff=tol_rel, mean_kl=tol_kl, argmax_agreement=min_argmax),
               passed=not fails, failures=fails)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imprag_jax.convert.logit_check",
                                 description="compare imprag_jax logits with transformers on the same weights")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="a Hugging Face Llama directory")
    src.add_argument("--gguf", help="a Llama GGUF file")
    src.add_argument("--random_tiny", action="store_true", help="a random tiny Llama (GQA + llama3 rope scaling)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--tol_rel", type=float, default=TOL_REL, help="max |Δlogit| / max |logit|")
    ap.add_argument("--tol_kl", type=float, default=TOL_KL, help="mean KL(hf ‖ imprag_jax), nats")
    ap.add_argument("--min_argmax", type=float, default=MIN_ARGMAX, help="least share of agreeing argmaxes")
    ap.add_argument("--seed", type=int, default=0, help="seed of --random_tiny")
    a = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar
    t0 = time.time()
    try:
        if a.random_tiny:
            rep = check_random_tiny(a.seed)
        elif a.gguf:
            rep = check_gguf(a.gguf)
        else:
            rep = check_hf_dir(a.hf_dir)
    except (MissingTorch, FileNotFoundError, ValueError) as e:  # HFDirError / GGUFError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict(rep, a.tol_rel, a.tol_kl, a.min_argmax)
    torch, transformers = _torch()
    rep.update(seconds=round(time.time() - t0, 1), torch=torch.__version__, transformers=transformers.__version__)
    print(f"{rep['source']}: {rep['n_sequences']} sequences, {rep['n_positions']} positions, vocab {rep['vocab']}")
    print(f"  max |Δlogit| {rep['max_abs_diff']:.3g} (logit scale {rep['logit_scale']:.3g}, "
          f"relative {rep['rel_max_diff']:.3g}); mean |Δ| {rep['mean_abs_diff']:.3g}")
    print(f"  KL(hf‖jax) mean {rep['mean_kl']:.3g}, max {rep['max_kl']:.3g}; "
          f"argmax agreement {rep['argmax_agreement']:.4f}")
    if "tokenizer_mismatches" in rep:
        print(f"  tokenizer: {rep['tokenizer_prompts'] - len(rep['tokenizer_mismatches'])}/"
              f"{rep['tokenizer_prompts']} prompts tokenized identically")
    print("  PASS" if rep["passed"] else "  FAIL: " + "; ".join(rep["failures"]))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
