"""The export format: a Hugging Face `LlamaForCausalLM` directory plus `imprag.json` (written by
`python -m imprag_jax.export`, read by `load_export` and `imprag_jax.torch_reader`).

The directory holds config.json, generation_config.json, model.safetensors (or shards + index above
`max_shard_bytes`), the run's tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json: the
synthetic world's word-level tokenizer, or the pretrained model's, e.g. SmolLM2's GGUF tokenizer rebuilt as a
`tokenizers` BPE) and `imprag.json`, which says how the model retrieves and reads: the layer split b/t, k, l_max,
last-token pooling, pre/post-RoPE embeddings, the score scale (`score_scale`, `score_multiplier`) and the score bias
of the reading (`score_bias`), joint/independent passage attention, the prompt offset, the passage title format and
end-of-passage token. `imprag_jax.torch_reader` runs ImpRAG from this directory with
transformers and gives the JAX model's retrieval and answers (docs/export.md has the measured parity).

Embedding scale. The synthetic models multiply token embeddings by a constant (`embed_scale = sqrt(d)`), which HF
Llama does not have. The export folds it into the weights so that the directory is an exact plain
`LlamaForCausalLM`: `model.embed_tokens.weight = embed_scale * E` (the same fp32 product the JAX model computes)
and, for a tied model, `lm_head.weight = E` (the export is then untied, `tie_word_embeddings: false`). `imprag.json`
records `embed_scale` and `embed_scale_folded: true` with the original tying, and `load_export` undoes the fold
(for tied models bit for bit: E is `lm_head.weight`). Models with `embed_scale = 1` (every Llama checkpoint) are
written unchanged and `load_hf_dir` alone reads them back exactly.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

from ..data.chunking import TITLE_FORMAT
from ..model.config import ModelConfig

META_FILE = "imprag.json"
META_VERSION = 1


class ExportError(ValueError):
    """A run or export directory that cannot be exported or read back; the message says why."""


# ---------------------------------------------------------------------------------------------------- weights


def fold_embed_scale(params: dict, cfg: ModelConfig) -> Tuple[dict, ModelConfig]:
    """(params, cfg) of an equivalent model with embed_scale 1 (plain HF Llama). Untied when the scale is folded."""
    if cfg.embed_scale == 1.0:
        return params, cfg
    emb = np.asarray(params["embed"]["embedding"], np.float32)
    out = dict(params)
    # the JAX model computes take(E) * float32(scale) in fp32: the same product, elementwise, gives the same bits
    out["embed"] = {"embedding": emb * np.float32(cfg.embed_scale)}
    if cfg.tie_embeddings:
        out["lm_head"] = {"kernel": np.ascontiguousarray(emb.T)}
    return out, cfg.replace(embed_scale=1.0, tie_embeddings=False)


def unfold_embed_scale(params: dict, meta: dict) -> dict:
    """The inverse of `fold_embed_scale` given the export's imprag.json (exact for tied models)."""
    if not meta.get("embed_scale_folded"):
        return params
    out = dict(params)
    if meta["tie_embeddings"]:
        out["embed"] = {"embedding": np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)}
        out.pop("lm_head")
    else:  # untied: E = (s*E)/s, within one rounding of the original
        out["embed"] = {"embedding": np.asarray(params["embed"]["embedding"], np.float32)
                        / np.float32(meta["embed_scale"])}
    return out


# ---------------------------------------------------------------------------------------------------- metadata


def passage_end_token(tokenizer) -> Tuple[str, int]:
    """The end-of-passage marker the data pipeline appends: `<eop>` when the vocabulary has it, else eos."""
    eop = tokenizer.token_to_id("<eop>")
    if eop is not None:
        return "<eop>", int(eop)
    return tokenizer.tok.id_to_token(tokenizer.eos_id), int(tokenizer.eos_id)


def build_meta(cfg: ModelConfig, tokenizer, *, k: int, l_max: int, L_q: int, L_r: int, add_bos: bool = True,
               title_format: Optional[str] = TITLE_FORMAT, k_train: Optional[int] = None,
               source: Optional[dict] = None, score_bias: bool = False) -> dict:
    """The contents of imprag.json: everything a reader needs besides the Llama weights. `k` is the number of
    passages read at inference (the run's first evaluation k), `k_train` the candidates per training example,
    `score_bias` whether reading adds log_softmax of the retrieval scores to the passages' attention logits (the
    run's eval.score_bias)."""
    eop_tok, eop_id = passage_end_token(tokenizer) if tokenizer is not None else (None, None)
    return {
        "imprag_version": META_VERSION,
        "b": cfg.b, "t": cfg.t, "num_layers": cfg.num_layers,
        "bottom_layers": list(range(cfg.b)),  # run on prompt and passages alone; layer b's q/k give E_q/E_p
        "middle_layers": list(range(cfg.b, cfg.t + 1)),  # the prompt also attends to the passages' K/V
        "top_layers": list(range(cfg.t + 1, cfg.num_layers)),  # prompt only
        "k": k, "k_train": k_train if k_train is not None else k, "l_max": l_max, "L_q": L_q, "L_r": L_r,
        "pooling": "last_token" if cfg.retrieval_pool == "last" else "mean",
        "retrieval_rope": cfg.retrieval_rope,
        "retrieval_dim": cfg.retrieval_dim,
        "query_embedding": "layer b: input_layernorm -> q_proj of the prompt's last token, "
                           + ("before RoPE" if cfg.retrieval_rope == "pre" else "RoPE at its own position")
                           + ", query heads averaged within each GQA group -> [num_key_value_heads * head_dim]",
        "passage_embedding": "layer b: input_layernorm -> k_proj of the passage's last token (the end marker), "
                             + ("before RoPE" if cfg.retrieval_rope == "pre" else "RoPE at its own position")
                             + "; each passage alone through layers [0, b) at positions 0..len-1",
        "score": "dot product times score_multiplier (applied to E_q), no normalisation",
        "score_scale": cfg.score_scale,
        "score_multiplier": cfg.score_multiplier,
        "score_bias": bool(score_bias),
        "score_bias_rule": "when score_bias: in layers b..t every attention logit of the prompt onto a token of "
                           "passage j (after the 1/sqrt(head_dim) scaling) gets + log_softmax_j(s(q, p_j)) over the "
                           "k passages read, s the retrieval scores above (score_multiplier included)",
        "passage_attention": cfg.passage_attention,
        "passage_positions": "passage j of k at slot positions j*l_max + i in layers b..t",
        "prompt_offset": cfg.prompt_offset,
        "prompt_offset_rule": "prompt positions in layers b..N-1 start at prompt_offset, or k*l_max when it is null",
        "embed_scale": cfg.embed_scale,
        "embed_scale_folded": cfg.embed_scale != 1.0,
        "tie_embeddings": cfg.tie_embeddings,
        "title_format": title_format,
        "passage_end": eop_tok, "passage_end_id": eop_id,
        "passage_truncation": "text tokens cut on the right to l_max - 1, then the end marker; no bos",
        "prompt_truncation": "cut on the left to L_q tokens (bos kept in front when add_bos)",
        "add_bos": bool(add_bos),
        "bos_id": None if tokenizer is None else tokenizer.bos_id,
        "eos_id": None if tokenizer is None else tokenizer.eos_id,
        "pad_id": None if tokenizer is None else tokenizer.pad_id,
        "stop_ids": [] if tokenizer is None else [int(s) for s in tokenizer.stop_ids],
        "model_config": cfg.to_dict(),
        "source": source or {},
    }


def export_model(params, cfg: ModelConfig, tokenizer, out: str, meta: dict, *, dtype: str = "float32",
                 max_shard_bytes: Optional[int] = None) -> str:
    """Write the HF directory (weights with the embedding scale folded) and imprag.json."""
    from .hf import DEFAULT_SHARD_BYTES, save_hf_dir

    hf_params, hf_cfg = fold_embed_scale(jax_to_numpy(params), cfg)
    save_hf_dir(hf_params, hf_cfg, tokenizer, out, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
                dtype=dtype)
    meta = dict(meta, export_dtype=dtype)
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a), tree)


def load_export(path: str):
    """(ModelConfig, params, Tokenizer or None, meta) of an export: exactly the exported run's parameters and
    model config (b, t, embedding scale, tying) when the export was fp32."""
    from ..data.tokenizer import Tokenizer
    from .hf import load_hf_params, read_hf_config

    mp = os.path.join(path, META_FILE)
    if not os.path.isfile(mp):
        raise ExportError(f"{path} has no {META_FILE}: not an imprag_jax export (load it with load_hf_dir)")
    with open(mp) as f:
        meta = json.load(f)
    read_hf_config(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    hf_cfg = cfg.replace(embed_scale=1.0, tie_embeddings=False) if meta.get("embed_scale_folded") else cfg
    params = unfold_embed_scale(load_hf_params(path, hf_cfg), meta)
    tok = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return cfg, params, tok, meta
