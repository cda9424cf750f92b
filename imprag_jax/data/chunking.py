"""Passage chunking/truncation to ``l_max`` tokens and prompt truncation to ``L_q`` tokens, with counts.

Any tokenizer with ``encode(text) -> list[int]`` works (`imprag_jax.data.tokenizer.Tokenizer`, a
``tokenizers.Tokenizer`` wrapper, or a test stub). Passages get a title prefix, ``"{title}: {text}"`` by default
(``title_format=None`` turns it off). Prompts are cut from the LEFT, so the end of the prompt (``... A:``), where
ImpRAG reads the query embedding, always survives. Every function can add to a `TruncationStats`, so a caller can
report "N prompts truncated, M passages chunked".

Public API
  * ``TITLE_FORMAT = "{title}: {text}"``; ``format_passage(title, text, title_format=TITLE_FORMAT) -> str``.
  * ``TruncationStats``  -- counters; ``merge(other)``, ``as_dict()``, ``summary()``.
  * ``truncate_left(ids, max_len) -> list[int]``          -- keep the last ``max_len`` ids.
  * ``encode_prompt(tokenizer, prompt, L_q, stats=None, bos_id=None) -> list[int]``.
  * ``encode_passage(tokenizer, title, text, l_max, title_format=..., stats=None) -> list[int]`` (truncates).
  * ``chunk_passage(passage, tokenizer, l_max, title_format=..., stats=None) -> list[(Passage, ids)]`` -- splits
    a long passage at word boundaries into chunks of at most ``l_max`` tokens, each with the title prefix;
    chunk ids are ``"{id}#{i}"`` (the id is unchanged when the passage fits).
  * ``encode_passages(passages, tokenizer, l_max, mode="truncate"|"chunk", ...)`` -- iterator over
    ``(Passage, ids)``.
  * Word level (no tokenizer; used by `imprag_jax.data.prepare`): ``split_sentences(text) -> list[(start, end)]``,
    ``pack_sentences(sentences, max_words) -> list[list[(sentence_index, text)]]``,
    ``chunk_words(text, max_words) -> list[str]``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional, Sequence

from imprag_jax.data.formats import Passage

TITLE_FORMAT = "{title}: {text}"


def format_passage(title: str, text: str, title_format: Optional[str] = TITLE_FORMAT) -> str:
    """The passage as the model reads it: ``title_format`` filled in, or the bare text when the title is empty
    or ``title_format`` is None."""
    if not title_format or not (title or "").strip():
        return text
    return title_format.format(title=title.strip(), text=text)


@dataclass
class TruncationStats:
    prompts: int = 0
    prompts_truncated: int = 0
    prompt_tokens_cut: int = 0
    passages: int = 0
    passages_truncated: int = 0
    passage_tokens_cut: int = 0
    passages_chunked: int = 0
    chunks: int = 0

    def merge(self, other: "TruncationStats") -> "TruncationStats":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.prompts_truncated}/{self.prompts} prompts truncated ({self.prompt_tokens_cut} tokens cut), "
                f"{self.passages_truncated}/{self.passages} passages truncated ({self.passage_tokens_cut} tokens cut), "
                f"{self.passages_chunked}/{self.passages} passages chunked ({self.chunks} passages out)")


def truncate_left(ids: Sequence[int], max_len: int) -> list:
    """The last ``max_len`` ids (all of them when they fit)."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    ids = list(ids)
    return ids[-max_len:] if len(ids) > max_len else ids


def encode_prompt(tokenizer, prompt: str, L_q: int, stats: Optional[TruncationStats] = None,
                  bos_id: Optional[int] = None) -> list:
    """Token ids of ``prompt``, cut from the left to ``L_q`` (``bos_id``, when given, is kept in front)."""
    ids = list(tokenizer.encode(prompt))
    room = L_q - (1 if bos_id is not None else 0)
    if room <= 0:
        raise ValueError(f"L_q={L_q} leaves no room for the prompt")
    out = truncate_left(ids, room)
    if stats is not None:
        stats.prompts += 1
        if len(out) < len(ids):
            stats.prompts_truncated += 1
            stats.prompt_tokens_cut += len(ids) - len(out)
    return ([bos_id] if bos_id is not None else []) + out


def encode_passage(tokenizer, title: str, text: str, l_max: int, title_format: Optional[str] = TITLE_FORMAT,
                   stats: Optional[TruncationStats] = None) -> list:
    """Token ids of the formatted passage, truncated on the right to ``l_max``."""
    if l_max <= 0:
        raise ValueError(f"l_max must be positive, got {l_max}")
    ids = list(tokenizer.encode(format_passage(title, text, title_format)))
    if stats is not None:
        stats.passages += 1
        if len(ids) > l_max:
            stats.passages_truncated += 1
            stats.passage_tokens_cut += len(ids) - l_max
    return ids[:l_max]


def chunk_passage(passage: Passage, tokenizer, l_max: int, title_format: Optional[str] = TITLE_FORMAT,
                  stats: Optional[TruncationStats] = None) -> list:
    """Split ``passage`` at word boundaries into chunks whose formatted text (title prefix included) is at most
    ``l_max`` tokens. Returns ``[(Passage, ids), ...]``; a passage that fits comes back unchanged (same id),
    otherwise the chunks are ``"{id}#0"``, ``"{id}#1"``, ... Every chunk is a real passage whose ``text`` re-encodes
    to the returned ids. A single word longer than ``l_max`` tokens is cut (counted as truncated)."""
    if l_max <= 0:
        raise ValueError(f"l_max must be positive, got {l_max}")
    enc = lambda t: list(tokenizer.encode(format_passage(passage.title, t, title_format)))  # noqa: E731
    ids = enc(passage.text)
    if stats is not None:
        stats.passages += 1
    if len(ids) <= l_max:
        if stats is not None:
            stats.chunks += 1
        return [(passage, ids)]
    words = passage.text.split()
    # First guess from the average tokens per word, then shrink/grow to the largest prefix that fits.
    per_word = max(len(ids) / max(len(words), 1), 1e-6)
    pieces, start = [], 0
    while start < len(words):
        guess = max(1, int(l_max / per_word))
        n = min(guess, len(words) - start)
        cur = enc(" ".join(words[start:start + n]))
        while len(cur) > l_max and n > 1:
            n = max(1, min(n - 1, int(n * l_max / len(cur))))
            cur = enc(" ".join(words[start:start + n]))
        while start + n < len(words):  # grow while it still fits (the guess may be short)
            nxt = enc(" ".join(words[start:start + n + 1]))
            if len(nxt) > l_max:
                break
            n, cur = n + 1, nxt
        if len(cur) > l_max:  # one word alone is too long
            if stats is not None:
                stats.passages_truncated += 1
                stats.passage_tokens_cut += len(cur) - l_max
            cur = cur[:l_max]
        pieces.append((" ".join(words[start:start + n]), cur))
        start += n
    out = [(Passage(f"{passage.id}#{i}", passage.title, t, passage.wikipedia_id), c)
           for i, (t, c) in enumerate(pieces)]
    if stats is not None:
        stats.passages_chunked += 1
        stats.chunks += len(out)
    return out


def encode_passages(passages: Iterable[Passage], tokenizer, l_max: int, mode: str = "truncate",
                    title_format: Optional[str] = TITLE_FORMAT,
                    stats: Optional[TruncationStats] = None) -> Iterator[tuple]:
    """``(Passage, ids)`` for each passage: ``mode="truncate"`` keeps the first ``l_max`` tokens,
    ``mode="chunk"`` splits long passages (see `chunk_passage`)."""
    if mode not in ("truncate", "chunk"):
        raise ValueError(f"mode must be 'truncate' or 'chunk', got {mode!r}")
    for p in passages:
        if mode == "truncate":
            yield p, encode_passage(tokenizer, p.title, p.text, l_max, title_format, stats)
        else:
            yield from chunk_passage(p, tokenizer, l_max, title_format, stats)


# ------------------------------------------------------------------------------------------------- word level
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace and a capital,
# digit or opening quote/bracket. Good enough to pack chunks; an abbreviation only makes a chunk boundary finer.
_SENT_END = re.compile(r"(?<=[.!?])([\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list:
    """Character spans ``(start, end)`` of the sentences of ``text`` (surrounding whitespace excluded)."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.start() + len(m.group(1))
        if text[start:end].strip():
            spans.append(_strip_span(text, start, end))
        start = m.end()
    if text[start:].strip():
        spans.append(_strip_span(text, start, len(text)))
    return spans


def _strip_span(text: str, s: int, e: int) -> tuple:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def pack_sentences(sentences: Sequence[str], max_words: int) -> list:
    """Greedily pack whole sentences into chunks of at most ``max_words`` words.

    Returns a list of chunks, each a list of ``(sentence_index, text)`` pieces; a sentence longer than
    ``max_words`` is split into word windows (its pieces share the index). ``max_words <= 0`` packs everything into
    one chunk. Empty sentences are dropped.
    """
    if max_words <= 0:
        return [[(i, " ".join(s.split())) for i, s in enumerate(sentences) if s.split()]] if any(
            s.split() for s in sentences) else []
    chunks, cur, cur_n = [], [], 0
    for i, s in enumerate(sentences):
        words = s.split()
        if not words:
            continue
        pieces = [words[j:j + max_words] for j in range(0, len(words), max_words)]
        for piece in pieces:
            if cur and cur_n + len(piece) > max_words:
                chunks.append(cur)
                cur, cur_n = [], 0
            cur.append((i, " ".join(piece)))
            cur_n += len(piece)
    if cur:
        chunks.append(cur)
    return chunks


def chunk_words(text: str, max_words: int) -> list:
    """``text`` split into chunks of at most ``max_words`` words, at sentence boundaries where possible."""
    sents = [text[s:e] for s, e in split_sentences(text)]
    return [" ".join(t for _, t in c) for c in pack_sentences(sents, max_words)]


__all__ = ["TITLE_FORMAT", "format_passage", "TruncationStats", "truncate_left", "encode_prompt", "encode_passage",
           "chunk_passage", "encode_passages", "split_sentences", "pack_sentences", "chunk_words"]
