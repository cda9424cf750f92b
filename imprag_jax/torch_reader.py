"""ImpRAG in PyTorch, on top of a transformers `LlamaForCausalLM` loaded from an imprag_jax export.

    from imprag_jax.torch_reader import TorchImpRAG
    r = TorchImpRAG.from_pretrained("hf_dir")                 # config.json + safetensors + imprag.json
    E = r.encode(corpus)                                      # [N, D] passage embeddings (lists of token ids)
    out = r.answer(prompt_ids, E, corpus, k=r.meta["k"], max_new_tokens=8)   # {"ids", "scores", "output"}

It proves an export is usable outside JAX. The code runs plain torch ops over the weights of the HF modules
(q_proj, k_proj, v_proj, o_proj, the SwiGLU projections, the RMSNorm weights, the embedding and lm_head) and takes
the rotary cos/sin from the model's own `rotary_emb` (so the rope scaling comes from config.json). It follows
imprag.json:

* E_q: the prompt runs through layers [0, b) at positions 0..len-1; at layer b, input_layernorm -> q_proj of the
  last token (pre-RoPE, or rotated at its own position for `retrieval_rope: post`), the query heads averaged within
  each GQA group -> [num_key_value_heads * head_dim]. E_p: the same with k_proj on each passage alone.
* Retrieval: dot products (E_q carries `score_multiplier`, the model's score_scale), top k.
* Reading: the k passages run through layers b..t in slots (passage j at positions j*l_max + i), joint causal
  attention over their concatenation (or independent), and each middle layer's rotated K/V is kept. The prompt
  runs through layers b..t at positions from `prompt_offset` (k*l_max) attending in one softmax over
  [passage K/V ; its own causal K/V], then through the top layers alone (passages never reach them). With
  `score_bias` (imprag.json), the attention logits onto passage j's tokens get + log_softmax_j of the retrieval
  scores of the k passages read, in every middle layer (`generate(..., scores=)`, `answer`).
* Greedy decoding recomputes the sequence every token (simple and exact; the models it checks are small).

`compare(...)` runs the same prompts and corpus through this reader and the JAX model and reports max |ΔE_q|,
max |ΔE_p|, top-k agreement and greedy-answer agreement (docs/export.md).

    python -m imprag_jax.torch_reader --export hf_dir [--workdir run] [--tasks qa --n 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

NEG = -1e30


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError("the PyTorch reader needs torch and transformers: pip install 'imprag_jax[torch]'") from e
    return torch


class TorchImpRAG:
    """Retrieval (E_q / E_p at layer b) and reading (passage K/V in the middle layers) over HF Llama weights."""

    def __init__(self, model, meta: dict, tokenizer=None):
        torch = _torch()
        self.torch = torch
        self.model = model.eval()
        self.meta = meta
        c = model.config
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError("the reader expects Llama without attention/MLP biases")
        self.H, self.KV = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.G = self.H // self.KV
        self.N = c.num_hidden_layers
        self.b, self.t = int(meta["b"]), int(meta["t"])
        if not 0 <= self.b <= self.t < self.N:
            raise ValueError(f"imprag.json's b={self.b}, t={self.t} do not fit {self.N} layers")
        self.eps = c.rms_norm_eps
        # folded scales are already in embed_tokens (see imprag_jax.export); an unfolded one is applied here
        self.embed_scale = 1.0 if meta.get("embed_scale_folded", True) else float(meta.get("embed_scale", 1.0))
        self.layers = model.model.layers
        self.rotary = model.model.rotary_emb
        self.tokenizer = tokenizer
        self.l_max = int(meta["l_max"])

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32") -> "TorchImpRAG":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch = _torch()
        from transformers import LlamaForCausalLM

        mp = os.path.join(path, "imprag.json")
        if not os.path.isfile(mp):
            raise FileNotFoundError(f"{path} has no imprag.json (export it with python -m imprag_jax.export)")
        with open(mp) as f:
            meta = json.load(f)
        model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        tok = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from .data.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(path)
        return cls(model, meta, tok)

    # ------------------------------------------------------------------ building blocks
    def _norm(self, x, weight):
        torch = self.torch
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * y.to(x.dtype)

    def _rope(self, x, pos):
        """x [B, L, heads, D], pos [B, L] (long): rotate-half RoPE with the model's rotary cos/sin."""
        cos, sin = self.rotary(x, pos)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _proj(self, x, lin, heads):
        B, L, _ = x.shape
        return self.torch.nn.functional.linear(x, lin.weight).view(B, L, heads, self.D)

    def embed(self, ids):
        x = self.torch.nn.functional.embedding(ids, self.model.model.embed_tokens.weight)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def attend(self, q, k, v, mask, bias=None):
        """q [B, Lq, H, D]; k, v [B, Lk, KV, D]; mask bool [B, Lq, Lk]; bias: optional fp32 [B, Lq, Lk] added to
        the scaled logits -> [B, Lq, H*D] (one softmax, fp32)."""
        torch = self.torch
        B, Lq = q.shape[:2]
        qg = q.reshape(B, Lq, self.KV, self.G, self.D)
        logits = torch.einsum("bqhgd,bkhd->bhgqk", qg.float(), k.float()) / math.sqrt(self.D)
        if bias is not None:
            logits = logits + bias.float()[:, None, None]
        logits = logits.masked_fill(~mask[:, None, None], NEG)
        p = torch.softmax(logits, dim=-1).to(v.dtype)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, v)
        return o.reshape(B, Lq, self.H * self.D).to(q.dtype)

    def layer(self, i: int, x, pos, mask, prefix=None, prefix_bias=None):
        """Decoder layer i. prefix = (k, v, prefix_mask [B, Lq, P]) of the passages: keys before the own keys;
        prefix_bias: optional [P] attention bias on those keys (the score bias). Returns (new x, (rotated k, v))."""
        F = self.torch.nn.functional
        lay = self.layers[i]
        a = lay.self_attn
        h = self._norm(x, lay.input_layernorm.weight)
        q = self._rope(self._proj(h, a.q_proj, self.H), pos)
        k = self._rope(self._proj(h, a.k_proj, self.KV), pos)
        v = self._proj(h, a.v_proj, self.KV)
        kk, vv, m, bias = k, v, mask, None
        if prefix is not None:
            pk, pv, pm = prefix
            kk = self.torch.cat([pk, k], dim=1)
            vv = self.torch.cat([pv, v], dim=1)
            m = self.torch.cat([pm, mask], dim=-1)
            if prefix_bias is not None:
                B, Lq = x.shape[:2]
                bias = self.torch.cat([prefix_bias.float()[None, None].expand(B, Lq, -1),
                                       self.torch.zeros((B, Lq, k.shape[1]))], dim=-1)
        x = x + F.linear(self.attend(q, kk, vv, m, bias), a.o_proj.weight)
        h = self._norm(x, lay.post_attention_layernorm.weight)
        mlp = lay.mlp
        x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                         mlp.down_proj.weight)
        return x, (k, v)

    def logits_from_hidden(self, h):
        h = self._norm(h, self.model.model.norm.weight)
        return self.torch.nn.functional.linear(h, self.model.lm_head.weight).float()

    def _batch(self, seqs: Sequence[Sequence[int]]):
        torch = self.torch
        L = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), L), dtype=torch.long)
        valid = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            valid[i, :len(s)] = True
        pos = torch.arange(L)[None].expand(len(seqs), L)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & valid[:, None, :]
        return ids, valid, pos, causal

    # ------------------------------------------------------------------ retrieval
    def bottom(self, seqs: Sequence[Sequence[int]]):
        """Right-padded batch through layers [0, b): (hidden at the input of layer b, lengths, positions)."""
        ids, valid, pos, causal = self._batch(seqs)
        x = self.embed(ids)
        for i in range(self.b):
            x, _ = self.layer(i, x, pos, causal)
        return x, valid.sum(-1) - 1, pos

    def _retrieval(self, seqs, kind: str):
        torch = self.torch
        x, last, pos = self.bottom(seqs)
        rows = torch.arange(len(seqs))
        mean = self.meta.get("pooling", "last_token") == "mean"
        h = x if mean else x[rows, last][:, None]  # [B, L or 1, d]
        lay = self.layers[self.b]
        h = self._norm(h, lay.input_layernorm.weight)
        proj, heads = (lay.self_attn.q_proj, self.H) if kind == "q" else (lay.self_attn.k_proj, self.KV)
        s = self._proj(h, proj, heads)
        post = self.meta.get("retrieval_rope", "pre") == "post"
        if mean:
            if post:
                s = self._rope(s, pos)
            w = (torch.arange(x.shape[1])[None] <= last[:, None]).to(s.dtype)  # right-padded rows
            s = (s.float() * w[:, :, None, None]).sum(1) / w.sum(1).clamp(min=1)[:, None, None]
        else:
            if post:
                s = self._rope(s, last[:, None])
            s = s[:, 0].float()
        if kind == "q":
            s = s.reshape(len(seqs), self.KV, self.G, self.D).mean(dim=2) * float(self.meta.get("score_multiplier", 1.0))
        return s.reshape(len(seqs), self.KV * self.D)

    def query_embedding(self, prompts: Sequence[Sequence[int]]):
        with self.torch.no_grad():
            return self._retrieval(prompts, "q")

    def passage_embedding(self, passages: Sequence[Sequence[int]]):
        with self.torch.no_grad():
            return self._retrieval(passages, "k")

    def encode(self, passages: Sequence[Sequence[int]], batch_size: int = 128):
        """E_p of a corpus (lists of token ids, each already ending with the end-of-passage token) -> [N, D]."""
        out = [self.passage_embedding(passages[i:i + batch_size]) for i in range(0, len(passages), batch_size)]
        return self.torch.cat(out, 0)

    def search(self, e_q, E, k: int, index_dtype: str = "float32"):
        """Top-k by dot product. index_dtype "bfloat16" rounds E_q and E_p like the JAX index (fp32 sums)."""
        torch = self.torch
        if index_dtype == "bfloat16":
            e_q, E = e_q.to(torch.bfloat16).float(), E.to(torch.bfloat16).float()
        s = e_q.float() @ E.float().T
        v, i = torch.topk(s, min(k, E.shape[0]), dim=-1)
        return v, i

    # ------------------------------------------------------------------ reading
    def passage_kv(self, passages: Sequence[Sequence[int]]):
        """The k passages of one prompt through layers b..t in slots: [(k, v)] per middle layer ([1, P, KV, D])."""
        torch = self.torch
        for p in passages:
            if len(p) > self.l_max:
                raise ValueError(f"a passage has {len(p)} tokens, more than l_max={self.l_max}")
        h, _, _ = self.bottom(passages)  # each alone at positions 0..len-1
        xs, pos, seg = [], [], []
        for j, p in enumerate(passages):
            xs.append(h[j, :len(p)])
            pos.extend(j * self.l_max + i for i in range(len(p)))
            seg.extend([j] * len(p))
        x = torch.cat(xs, 0)[None]
        P = x.shape[1]
        pos = torch.as_tensor(pos, dtype=torch.long)[None]
        mask = torch.tril(torch.ones(P, P, dtype=torch.bool))
        if self.meta.get("passage_attention", "joint") == "independent":
            seg = torch.as_tensor(seg)
            mask = mask & (seg[:, None] == seg[None, :])
        kv = []
        for i in range(self.b, self.t + 1):
            x, (k, v) = self.layer(i, x, pos, mask[None])
            kv.append((k, v))
        return kv

    def score_bias(self, scores, passages: Sequence[Sequence[int]]):
        """The attention bias [P] on the concatenated passage tokens: log_softmax over the k passages' retrieval
        scores, repeated over each passage's tokens (JAX: `infer.imprag.score_bias`)."""
        torch = self.torch
        g = torch.log_softmax(torch.tensor(np.asarray(scores, np.float32)).reshape(-1)[:len(passages)], dim=-1)
        return torch.repeat_interleave(g, torch.as_tensor([len(p) for p in passages]))

    def _bias_for(self, scores, passages):
        if scores is None or not len(passages) or not self.meta.get("score_bias", False):
            return None
        return self.score_bias(scores, passages)

    def prompt_offset(self, k: int) -> int:
        po = self.meta.get("prompt_offset")
        return int(po) if po is not None else k * self.l_max

    def read_logits(self, seq: Sequence[int], kv=None, k: int = 0, bias=None):
        """Logits [L, V] of one sequence reading the passages' K/V (kv=None: the plain decoder); bias: the score
        bias [P] of the passages (`score_bias`), None for none."""
        torch = self.torch
        with torch.no_grad():
            x, _, pos = self.bottom([seq])
            L = len(seq)
            causal = torch.tril(torch.ones(L, L, dtype=torch.bool))[None]
            if kv is None:
                for i in range(self.b, self.N):
                    x, _ = self.layer(i, x, pos, causal)
                return self.logits_from_hidden(x)[0]
            pos = pos + self.prompt_offset(k)
            for n, i in enumerate(range(self.b, self.t + 1)):
                pk, pv = kv[n]
                pm = torch.ones((1, L, pk.shape[1]), dtype=torch.bool)
                x, _ = self.layer(i, x, pos, causal, prefix=(pk, pv, pm), prefix_bias=bias)
            for i in range(self.t + 1, self.N):
                x, _ = self.layer(i, x, pos, causal)
            return self.logits_from_hidden(x)[0]

    def generate(self, prompt: Sequence[int], passages: Sequence[Sequence[int]] = (), max_new_tokens: int = 8,
                 stop_ids: Optional[Sequence[int]] = None, scores=None) -> List[int]:
        """Greedy continuation of `prompt` reading `passages` (none: closed book); the stop token is dropped.
        scores: the passages' retrieval scores, read as the score bias when imprag.json has score_bias."""
        stop = set(self.meta.get("stop_ids", []) if stop_ids is None else stop_ids)
        with self.torch.no_grad():
            kv = self.passage_kv(passages) if len(passages) else None
        bias = self._bias_for(scores, passages)
        seq, out = list(prompt), []
        for _ in range(max_new_tokens):
            nxt = int(self.read_logits(seq, kv, len(passages), bias)[-1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
        return out

    def answer(self, prompt: Sequence[int], E, corpus: Sequence[Sequence[int]], k: Optional[int] = None,
               max_new_tokens: int = 8, index_dtype: str = "float32") -> Dict:
        """Two-stage ImpRAG: E_q -> top-k of E -> greedy answer reading those passages."""
        k = int(self.meta["k"]) if k is None else k
        e_q = self.query_embedding([prompt])
        scores, ids = self.search(e_q, E, k, index_dtype)
        ids = [int(i) for i in ids[0]]
        out = self.generate(prompt, [corpus[i] for i in ids], max_new_tokens, scores=scores[0])
        return {"ids": ids, "scores": [float(s) for s in scores[0]], "output": out}

    # ------------------------------------------------------------------ text helpers
    def encode_prompt(self, text: str) -> List[int]:
        ids = self.tokenizer.encode(text)
        room = int(self.meta["L_q"]) - (1 if self.meta.get("add_bos") and self.meta.get("bos_id") is not None else 0)
        ids = ids[-room:] if len(ids) > room else ids
        return ([self.meta["bos_id"]] if self.meta.get("add_bos") and self.meta.get("bos_id") is not None else []) \
            + list(ids)

    def encode_passage(self, title: str, text: str) -> List[int]:
        fmt = self.meta.get("title_format")
        s = fmt.format(title=title.strip(), text=text) if fmt and (title or "").strip() else text
        return self.tokenizer.encode(s)[: self.l_max - 1] + [int(self.meta["passage_end_id"])]


# ---------------------------------------------------------------------------------------------------- parity


def _rows(tokens, mask) -> List[List[int]]:
    return [list(map(int, t[m > 0])) for t, m in zip(np.asarray(tokens), np.asarray(mask))]


def compare(params, cfg, reader: TorchImpRAG, prompt_tokens, prompt_mask, corpus_tokens, corpus_mask, *, k: int,
            max_new_tokens: int = 8, stop_ids=(), pad_id: int = 0, log=None, n_examples: int = 3) -> Dict:
    """Run the JAX model (params, cfg) and the PyTorch reader on the same prompts ([Q, L] right-padded) and corpus
    ([N, l_max]); returns the parity numbers. JAX side: `query_embedding`, `passage_embedding`, and the deployed
    two-stage pipeline `infer.imprag.answer` (bf16 index, exact search, cached greedy decoding), with the score bias
    when imprag.json has score_bias (both sides read the same passages with their own retrieval scores)."""
    import jax
    import jax.numpy as jnp

    from .infer.imprag import Retriever, answer, score_bias
    from .model import passage_embedding, query_embedding

    torch = reader.torch
    log = log or (lambda *a: None)
    t0 = time.time()
    qe = jax.jit(query_embedding, static_argnums=1)
    pe = jax.jit(lambda p, c, t, m: passage_embedding(p, c, t, m)[0], static_argnums=1)
    jparams = jax.tree.map(jnp.asarray, params)
    eq_j = np.asarray(qe(jparams, cfg, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)))
    ep_j = np.concatenate([np.asarray(pe(jparams, cfg, jnp.asarray(corpus_tokens[i:i + 256]),
                                         jnp.asarray(corpus_mask[i:i + 256])))
                           for i in range(0, len(corpus_tokens), 256)])
    retr = Retriever.build(jparams, cfg, corpus_tokens, corpus_mask)
    use_bias = bool(reader.meta.get("score_bias", False))
    outs_j, ids_j, scores_j = answer(jparams, cfg, retr, prompt_tokens, prompt_mask, k=k,
                                     max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, search_k=k,
                                     use_score_bias=use_bias)
    scores_j = np.asarray(scores_j, np.float32)
    t_jax = time.time() - t0
    log(f"[parity] JAX side: {len(eq_j)} prompts, {len(ep_j)} passages in {t_jax:.1f}s")

    t0 = time.time()
    prompts, corpus = _rows(prompt_tokens, prompt_mask), _rows(corpus_tokens, corpus_mask)
    eq_t = reader.query_embedding(prompts).numpy()
    ep_t = reader.encode(corpus).numpy()
    E = torch.as_tensor(ep_t)
    _, ids_t32 = reader.search(torch.as_tensor(eq_t), E, k, "float32")
    sc_t16, ids_t16 = reader.search(torch.as_tensor(eq_t), E, k, "bfloat16")
    ids_t32, ids_t16, sc_t16 = ids_t32.numpy(), ids_t16.numpy(), sc_t16.numpy()
    # JAX top-k over its own fp32 embeddings (the reference for the fp32 torch search)
    n_rank = min(10, len(corpus_tokens))
    rank_j = np.argsort(-(eq_j @ ep_j.T), axis=1, kind="stable")[:, :n_rank]
    _, rank_t = reader.search(torch.as_tensor(eq_t), torch.as_tensor(ep_t), n_rank, "float32")
    rank_t = rank_t.numpy()
    ids_j32 = rank_j[:, :k]
    outs_t = [reader.generate(p, [corpus[int(i)] for i in ids_j[q, :k]], max_new_tokens, stop_ids,
                              scores=scores_j[q, :k]) for q, p in enumerate(prompts)]
    # the full torch pipeline: its own retrieval (bf16 index like JAX's) and scores, its own reading
    outs_tp = [reader.generate(p, [corpus[int(i)] for i in ids_t16[q]], max_new_tokens, stop_ids,
                               scores=sc_t16[q]) for q, p in enumerate(prompts)]
    # the reading itself: logits over every prompt position with the same k passages on both sides
    from .model import read

    sel = np.asarray(ids_j)[:, :k]
    pas, pasm = np.asarray(corpus_tokens)[np.maximum(sel, 0)], np.asarray(corpus_mask)[np.maximum(sel, 0)]
    bias_j = None
    if use_bias:  # the JAX pipeline's scores of those passages, as its reading adds them
        bias_j = score_bias(jnp.asarray(scores_j[:, :k]), jnp.asarray(pasm.sum(-1) > 0), pas.shape[-1])
    lj = np.asarray(jax.jit(lambda p, t, m, pt, pm, b: read(p, cfg, t, m, pt, pm, prefix_bias=b).logits)(
        jparams, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jnp.asarray(pas), jnp.asarray(pasm), bias_j))
    dlog, lscale = 0.0, 0.0
    for q, p in enumerate(prompts):
        psg = [corpus[int(i)] for i in sel[q]]
        kv = reader.passage_kv(psg)
        lt = reader.read_logits(p, kv, k, reader._bias_for(scores_j[q, :k], psg)).numpy()
        ref = lj[q][np.asarray(prompt_mask[q]) > 0]
        dlog, lscale = max(dlog, float(np.abs(lt - ref).max())), max(lscale, float(np.abs(ref).max()))
    t_torch = time.time() - t0
    log(f"[parity] PyTorch side in {t_torch:.1f}s")

    # first-token logits of the reading (same passages on both sides)
    def scale(a):
        return float(np.max(np.abs(a))) if a.size else 0.0

    same_set = [set(map(int, a)) == set(map(int, b)) for a, b in zip(ids_t32, ids_j32)]
    rep = {
        "prompts": len(prompts), "passages": len(corpus), "k": k, "max_new_tokens": max_new_tokens,
        "max_abs_dE_q": float(np.max(np.abs(eq_t - eq_j))), "E_q_scale": scale(eq_j),
        "max_abs_dE_p": float(np.max(np.abs(ep_t - ep_j))), "E_p_scale": scale(ep_j),
        "max_abs_dscore": float(np.max(np.abs(eq_t @ ep_t.T - eq_j @ ep_j.T))),
        "score_scale": scale(eq_j @ ep_j.T),
        "score_multiplier": float(reader.meta.get("score_multiplier", 1.0)), "score_bias": use_bias,
        # the scores of the k passages read, torch bf16 search vs the JAX pipeline (same order checked below)
        "max_abs_dscore_pipeline": float(np.max(np.abs(sc_t16 - scores_j[:, :sc_t16.shape[1]]))),
        "topk_fp32_same_set": float(np.mean(same_set)),
        "topk_fp32_same_order": float(np.mean([list(a) == list(b) for a, b in zip(ids_t32, ids_j32)])),
        "max_abs_dlogits": dlog, "logit_scale": lscale,
        "top10_fp32_same_order": float(np.mean([list(a) == list(b) for a, b in zip(rank_t, rank_j)])),
        "topk_bf16_vs_jax_pipeline_same_order": float(np.mean([list(a) == list(map(int, b[:k]))
                                                               for a, b in zip(ids_t16, ids_j)])),
        "answers_same_passages": float(np.mean([a == list(b) for a, b in zip(outs_t, outs_j)])),
        "answers_full_pipeline": float(np.mean([a == list(b) for a, b in zip(outs_tp, outs_j)])),
        "distinct_answers": len({tuple(b) for b in outs_j}),
        "distinct_top1": len({int(r[0]) for r in ids_j}),
        "jax_seconds": t_jax, "torch_seconds": t_torch,
        "examples": [{"jax_ids": list(map(int, ids_j[q, :k])), "torch_ids": list(map(int, ids_t16[q])),
                      "jax_answer": list(outs_j[q]), "torch_answer": outs_tp[q]} for q in range(min(n_examples, len(prompts)))],
    }
    return rep


# a small hand-written corpus for checking a pretrained model (SmolLM2) without any data set
DEMO_CORPUS = (
    ("Paris", "Paris is the capital and largest city of France, on the river Seine."),
    ("Berlin", "Berlin is the capital of Germany and its most populous city."),
    ("Mount Everest", "Mount Everest, in the Himalayas, is Earth's highest mountain above sea level, 8,849 metres."),
    ("Pacific Ocean", "The Pacific Ocean is the largest and deepest of the world's five oceanic divisions."),
    ("Water", "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees Celsius."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
    ("Leonardo da Vinci", "Leonardo da Vinci was an Italian polymath who painted the Mona Lisa."),
    ("Python", "Python is a programming language created by Guido van Rossum and first released in 1991."),
    ("Tokyo", "Tokyo is the capital of Japan and one of the most populous metropolitan areas in the world."),
    ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of water."),
    ("Photosynthesis", "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Shakespeare", "William Shakespeare was an English playwright who wrote Hamlet and Romeo and Juliet."),
)
DEMO_QUESTIONS = (
    "Question: What is the capital of France?\nAnswer:",
    "Question: Which is the highest mountain on Earth?\nAnswer:",
    "Question: Who painted the Mona Lisa?\nAnswer:",
    "Question: At what temperature does water boil?\nAnswer:",
    "Question: Which planet is the largest in the Solar System?\nAnswer:",
    "Question: Who created the Python programming language?\nAnswer:",
    "Question: What is the capital of Japan?\nAnswer:",
    "Question: Who wrote Hamlet?\nAnswer:",
)


def _pad(rows: Sequence[Sequence[int]], width: int, pad_id: int):
    t = np.full((len(rows), width), pad_id, np.int32)
    m = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        t[i, :len(r)], m[i, :len(r)] = r, 1
    return t, m


def smollm2_check(out: str, k: int = 2, l_max: int = 32, max_new_tokens: int = 8, b: int = 7, t: int = 21,
                  max_shard_bytes: int = 256 * 2 ** 20, n_questions: Optional[int] = None, log=print) -> Dict:
    """Export SmolLM2-135M-Instruct (from the cached GGUF) with imprag.json and compare this reader with the JAX
    model on DEMO_CORPUS / DEMO_QUESTIONS. The JAX side uses the GGUF weights, the reader the export."""
    from .convert.fetch import resolve_model, smollm2_path
    from .convert.export import build_meta, export_model

    if smollm2_path() is None:
        raise FileNotFoundError("SmolLM2 is not cached: python -m imprag_jax.convert.fetch smollm2")
    cfg, params, tok = resolve_model("smollm2", b=b, t=t)
    meta = build_meta(cfg, tok, k=k, l_max=l_max, L_q=64, L_r=max_new_tokens, add_bos=False,
                      source={"model_init": "smollm2"})
    export_model(params, cfg, tok, out, meta, max_shard_bytes=max_shard_bytes)
    reader = TorchImpRAG.from_pretrained(out)
    corpus = [reader.encode_passage(ti, tx) for ti, tx in DEMO_CORPUS]
    questions = DEMO_QUESTIONS[:n_questions] if n_questions else DEMO_QUESTIONS
    prompts = [reader.encode_prompt(q) for q in questions]
    ct, cm = _pad(corpus, l_max, tok.pad_id)
    pt, pm = _pad(prompts, max(map(len, prompts)), tok.pad_id)
    rep = compare(params, cfg, reader, pt, pm, ct, cm, k=k, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids,
                  pad_id=tok.pad_id, log=log, n_examples=len(prompts))
    rep["examples_text"] = [{"question": q, "retrieved": [DEMO_CORPUS[i][0] for i in ex["torch_ids"]],
                             "jax": tok.decode(ex["jax_answer"]), "torch": tok.decode(ex["torch_answer"])}
                            for q, ex in zip(questions, rep["examples"])]
    return rep


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imprag_jax.torch_reader", description="JAX vs PyTorch ImpRAG parity")
    ap.add_argument("--export", required=True, help="directory written by python -m imprag_jax.export (with "
                    "--smollm2: where to write SmolLM2's export)")
    ap.add_argument("--smollm2", action="store_true", help="export SmolLM2 from the cached GGUF and check it on a "
                    "built-in corpus")
    ap.add_argument("--workdir", default="", help="JAX side from this run's checkpoint (default: the export itself)")
    ap.add_argument("--data", default="", help="data directory (default: the run's)")
    ap.add_argument("--tasks", default="qa")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--n", type=int, default=64, help="prompts per task")
    ap.add_argument("--k", type=int, default=0, help="passages read (default: imprag.json's k)")
    ap.add_argument("--max_new_tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small models on "
                    "a busy machine)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.threads:
        _torch().set_num_threads(a.threads)

    if a.smollm2:
        rep = smollm2_check(a.export, k=a.k or 2, max_new_tokens=a.max_new_tokens)
        print(json.dumps({kk: v for kk, v in rep.items() if kk != "examples"}, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"smollm2": rep}, f, indent=2)
        return 0

    from .data.pipeline import corpus_tokens, eval_batches
    from .convert.export import load_export

    reader = TorchImpRAG.from_pretrained(a.export)
    meta = reader.meta
    if a.workdir:
        from .run import restore_params

        params, _, cfg = restore_params(a.workdir, meta.get("source", {}).get("step"))
    else:
        cfg, params, _, _ = load_export(a.export)
    data = a.data or os.path.join(meta.get("source", {}).get("workdir", ""), "data")
    tok = reader.tokenizer
    ctoks, cmask = corpus_tokens(data, tok, int(meta["l_max"]))
    k = a.k or int(meta["k"])
    reps = {}
    for task in [x for x in a.tasks.split(",") if x]:
        b = next(iter(eval_batches(data, task, a.split, tok, batch_size=a.n, L_q=int(meta["L_q"]),
                                   limit=a.n, add_bos=bool(meta.get("add_bos", True)))))
        keep = b["valid"] > 0
        rep = compare(params, cfg, reader, b["tokens"][keep], b["mask"][keep], ctoks, cmask, k=k,
                      max_new_tokens=a.max_new_tokens, stop_ids=tuple(meta["stop_ids"]), pad_id=int(meta["pad_id"]),
                      log=print)
        reps[task] = rep
        print(json.dumps({kk: v for kk, v in rep.items() if kk != "examples"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reps, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
