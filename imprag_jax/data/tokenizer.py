"""One tokenizer interface for every model imprag_jax reads.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library; no transformers needed) and knows the special
ids the rest of the code needs (bos, eos, pad) and, when the model has one, a chat template.

Loaders:
  * `Tokenizer.from_dir(path)`       -- a Hugging Face model directory (tokenizer.json [+ tokenizer_config.json]).
  * `Tokenizer.from_file(path)`      -- a bare tokenizer.json.
  * `imprag_jax.convert.gguf.load_gguf_tokenizer(path)` -- the tokenizer stored in a GGUF file's metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class Tokenizer:
    tok: "object"  # tokenizers.Tokenizer
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: int = 0
    chat_template: Optional[str] = None
    extra_stop_ids: tuple = field(default_factory=tuple)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str, **special) -> "Tokenizer":
        import tokenizers

        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls._with_specials(tokenizers.Tokenizer.from_file(path), **special)

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; imprag_jax reads the fast-tokenizer file that Hugging Face "
                "model directories ship")
        cfg = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                cfg = json.load(f)
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(tj)

        def _tok_id(v):
            if v is None:
                return None
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v)

        bos, eos, pad = (_tok_id(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        gen = os.path.join(path, "generation_config.json")
        stops = ()
        if os.path.exists(gen):
            with open(gen) as f:
                g = json.load(f)
            e = g.get("eos_token_id")
            stops = tuple(e) if isinstance(e, list) else ((e,) if e is not None else ())
            if eos is None and stops:
                eos = stops[0]
            if bos is None:
                bos = g.get("bos_token_id")
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else (eos or 0),
                   chat_template=cfg.get("chat_template"), extra_stop_ids=stops)

    @classmethod
    def _with_specials(cls, tok, bos: str | None = None, eos: str | None = None, pad: str | None = None,
                       chat_template: str | None = None) -> "Tokenizer":
        ids = {k: (tok.token_to_id(v) if v is not None else None) for k, v in
               dict(bos=bos, eos=eos, pad=pad).items()}
        for k, v in dict(bos=bos, eos=eos, pad=pad).items():
            if v is not None and ids[k] is None:
                raise ValueError(f"special token {v!r} ({k}) is not in the tokenizer's vocabulary")
        return cls(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"] if ids["pad"] is not None else 0,
                   chat_template=chat_template)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple:
        s = set(self.extra_stop_ids)
        if self.eos_id is not None:
            s.add(self.eos_id)
        return tuple(sorted(s))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def apply_chat_template(self, user_message: str, add_generation_prompt: bool = True) -> str:
        """Render one user turn with the model's chat template (jinja2); the plain text when there is none."""
        if not self.chat_template:
            return user_message
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        tpl = env.from_string(self.chat_template)
        return tpl.render(messages=[{"role": "user", "content": user_message}],
                          add_generation_prompt=add_generation_prompt,
                          bos_token=self.tok.id_to_token(self.bos_id) if self.bos_id is not None else "",
                          eos_token=self.tok.id_to_token(self.eos_id) if self.eos_id is not None else "")
