"""File formats of imprag_jax data: KILT task JSONL and passage JSONL (the knowledge source).

Task file, one JSON object per line (the KILT layout)::

    {"id": "nq-123", "input": "who got the first nobel prize in physics",
     "output": [{"answer": "Wilhelm Röntgen", "provenance": [{"passage_id": "nq-17", "title": "..."}]}],
     "meta": {"task_type": "qa", "fields": {"question": "..."}}}

Provenance entries name a passage of the knowledge source by ``passage_id`` (imprag_jax's converters) or a
Wikipedia page by ``wikipedia_id`` (original KILT files). ``meta.task_type`` / ``meta.fields`` are optional;
they tell `imprag_jax.data.templates` how to render the prompt.

Knowledge source, one passage per line: ``{"id", "title", "text"}`` (an optional ``wikipedia_id`` is kept
when known). The original KILT knowledge source (one Wikipedia page per line, ``{"wikipedia_id",
"wikipedia_title", "text": [paragraphs]}``) is read as passages, one per paragraph, by `iter_passages`.

Public API
  * ``DataError(ValueError)``                                   -- every malformed-input error; names ``file:line``.
  * ``Passage(id, title, text, wikipedia_id=None)``, ``Output(answer, provenance)``,
    ``Example(id, input, outputs, meta)`` (``.answers``, ``.passage_ids``, ``.wikipedia_ids``, ``.to_json()``).
  * ``iter_jsonl(path)``                                        -- ``(line_no, obj)``; ``.gz`` is read transparently.
  * ``iter_passages(path)`` / ``load_passages(path)``           -- streaming / ``dict[id, Passage]``.
  * ``iter_examples(path, allow_no_answers=False)`` / ``load_examples(path, ...)``.
  * ``write_passages(path, passages)`` / ``write_examples(path, examples)`` / ``write_jsonl(path, rows)``.
  * ``validate_examples(examples, passage_ids=None, wikipedia_ids=None, source="")`` -- duplicate ids and
    unknown provenance; returns the number of provenance entries checked.
  * ``passage_from_json(obj)`` / ``example_from_json(obj, allow_no_answers=False)`` -- one record, validated.

Writers produce canonical bytes (sorted keys off, ``ensure_ascii=False``, ``\\n`` line ends) so a converter run
twice with the same seed writes identical files.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional

from imprag_jax.data import paths


class DataError(ValueError):
    """Malformed or inconsistent data. The message names the file and line when there is one."""


def _where(source: str, line: Optional[int]) -> str:
    if source and line is not None:
        return f"{source}:{line}: "
    if source:
        return f"{source}: "
    return ""


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    wikipedia_id: Optional[str] = None

    def to_json(self) -> dict:
        d = {"id": self.id, "title": self.title, "text": self.text}
        if self.wikipedia_id is not None:
            d["wikipedia_id"] = self.wikipedia_id
        return d


@dataclass
class Output:
    answer: Optional[str]
    provenance: list = field(default_factory=list)  # list of dicts

    def to_json(self) -> dict:
        d: dict = {}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.provenance:
            d["provenance"] = list(self.provenance)
        return d


@dataclass
class Example:
    id: str
    input: str
    outputs: list  # list[Output]
    meta: dict = field(default_factory=dict)

    @property
    def answers(self) -> list:
        """Distinct non-empty answers, in file order."""
        seen, out = set(), []
        for o in self.outputs:
            if o.answer is not None and o.answer not in seen:
                seen.add(o.answer)
                out.append(o.answer)
        return out

    @property
    def provenance(self) -> list:
        return [p for o in self.outputs for p in o.provenance]

    @property
    def passage_ids(self) -> list:
        """Distinct ``passage_id`` values of the provenance, in file order."""
        return _distinct(str(p["passage_id"]) for p in self.provenance if p.get("passage_id") is not None)

    @property
    def wikipedia_ids(self) -> list:
        return _distinct(str(p["wikipedia_id"]) for p in self.provenance if p.get("wikipedia_id") is not None)

    @property
    def task_type(self) -> Optional[str]:
        return self.meta.get("task_type") if isinstance(self.meta, dict) else None

    def to_json(self) -> dict:
        d = {"id": self.id, "input": self.input, "output": [o.to_json() for o in self.outputs]}
        if self.meta:
            d["meta"] = self.meta
        return d


def _distinct(xs: Iterable[str]) -> list:
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


# ---------------------------------------------------------------------------------------------------- reading
def _open_text(path: str, mode: str = "rt", gz: Optional[bool] = None):
    gz = str(path).endswith(".gz") if gz is None else gz
    if gz:
        return gzip.open(path if paths.is_local(path) else paths.open(path, "rb"), mode, encoding="utf-8")
    return paths.open(path, mode, encoding="utf-8", newline="" if "w" in mode else None)


def iter_jsonl(path: str) -> Iterator[tuple]:
    """Yield ``(line_no, obj)`` for every non-blank line (1-based line numbers); streams the file (local or a
    bucket path, `imprag_jax.data.paths`)."""
    if not paths.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:  # some messages end in "at" ("Unterminated string starting at")
                msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
                raise DataError(f"{path}:{n}: malformed JSON ({msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _req_str(obj: Mapping, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}missing field {key!r}")
    v = obj[key]
    if isinstance(v, (int,)) and not isinstance(v, bool) and key in ("id", "wikipedia_id"):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{where}field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}field {key!r} is empty")
    return v


def passage_from_json(obj: Mapping, source: str = "", line: Optional[int] = None) -> Passage:
    """One passage record ``{"id", "title", "text"}``; raises `DataError` on an empty id or text."""
    w = _where(source, line)
    pid = _req_str(obj, "id", w)
    title = _req_str(obj, "title", w, allow_empty=True) if "title" in obj else ""
    if "text" not in obj:
        raise DataError(f"{w}missing field 'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f"{w}field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{w}passage {pid!r} is empty")
    wid = obj.get("wikipedia_id")
    return Passage(pid, title, text, None if wid is None else str(wid))


def _is_kilt_page(obj: Mapping) -> bool:
    return "wikipedia_id" in obj and isinstance(obj.get("text"), list)


def kilt_page_passages(obj: Mapping, source: str = "", line: Optional[int] = None) -> list:
    """Passages of one page of the original KILT knowledge source: one per paragraph, id ``{wikipedia_id}_{i}``.

    Paragraph 0 (the title line) and ``Section::::`` headings are skipped; the paragraph index ``i`` is KILT's,
    so a provenance ``start_paragraph_id``/``end_paragraph_id`` range maps to passage ids directly.
    """
    w = _where(source, line)
    wid = _req_str(obj, "wikipedia_id", w)
    title = obj.get("wikipedia_title") or ""
    out = []
    for i, para in enumerate(obj["text"]):
        if i == 0 or not isinstance(para, str):
            continue
        t = para.strip()
        if t.startswith("BULLET::::"):
            t = t[len("BULLET::::"):].lstrip("- ").strip()
        if not t or t.startswith("Section::::"):
            continue
        out.append(Passage(f"{wid}_{i}", title, t, wid))
    return out


def iter_passages(path: str) -> Iterator[Passage]:
    """Stream the passages of a knowledge-source file (passage JSONL, or KILT pages read per paragraph)."""
    for n, obj in iter_jsonl(path):
        if _is_kilt_page(obj):
            yield from kilt_page_passages(obj, path, n)
        else:
            yield passage_from_json(obj, path, n)


def load_passages(path: str) -> dict:
    """All passages as ``{id: Passage}`` in file order; duplicate ids raise `DataError`."""
    out: dict = {}
    for p in iter_passages(path):
        if p.id in out:
            raise DataError(f"{path}: duplicate passage id {p.id!r}")
        out[p.id] = p
    return out


def example_from_json(obj: Mapping, source: str = "", line: Optional[int] = None,
                      allow_no_answers: bool = False) -> Example:
    """One KILT task record, validated.

    An output entry may carry only provenance (as some KILT files do), but every ``answer`` present must be a
    non-empty string, and an example needs at least one answer unless ``allow_no_answers`` (hidden test sets).
    """
    w = _where(source, line)
    eid = _req_str(obj, "id", w)
    w = f"{w}example {eid!r}: "
    inp = _req_str(obj, "input", w)
    raw_out = obj.get("output", [])
    if raw_out is None:
        raw_out = []
    if not isinstance(raw_out, list):
        raise DataError(f"{w}'output' must be a list, got {type(raw_out).__name__}")
    outputs = []
    for j, o in enumerate(raw_out):
        if not isinstance(o, dict):
            raise DataError(f"{w}output[{j}] must be an object")
        ans = o.get("answer")
        if "answer" in o:
            if not isinstance(ans, str):
                raise DataError(f"{w}output[{j}].answer must be a string, got {type(ans).__name__}")
            if not ans.strip():
                raise DataError(f"{w}output[{j}].answer is empty")
        prov = o.get("provenance") or []
        if not isinstance(prov, list) or not all(isinstance(p, dict) for p in prov):
            raise DataError(f"{w}output[{j}].provenance must be a list of objects")
        for p in prov:
            if p.get("passage_id") is None and p.get("wikipedia_id") is None:
                raise DataError(f"{w}output[{j}].provenance entry names neither 'passage_id' nor 'wikipedia_id'")
        outputs.append(Output(ans, prov))
    if not allow_no_answers and not any(o.answer is not None for o in outputs):
        raise DataError(f"{w}no answer (output has no entry with a non-empty 'answer')")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{w}'meta' must be an object")
    return Example(eid, inp, outputs, meta)


def iter_examples(path: str, allow_no_answers: bool = False, check_duplicates: bool = True) -> Iterator[Example]:
    """Stream a KILT task file. Duplicate ids raise `DataError` (set of ids kept, not the examples)."""
    seen: set = set()
    for n, obj in iter_jsonl(path):
        ex = example_from_json(obj, path, n, allow_no_answers=allow_no_answers)
        if check_duplicates:
            if ex.id in seen:
                raise DataError(f"{path}:{n}: duplicate example id {ex.id!r}")
            seen.add(ex.id)
        yield ex


def load_examples(path: str, allow_no_answers: bool = False) -> list:
    return list(iter_examples(path, allow_no_answers=allow_no_answers))


def validate_examples(examples: Iterable[Example], passage_ids: Optional[Mapping | set] = None,
                      wikipedia_ids: Optional[set] = None, source: str = "") -> int:
    """Check duplicate ids and, when the knowledge-source ids are given, that provenance points at them.

    ``passage_ids`` checks ``passage_id`` provenance; ``wikipedia_ids`` checks ``wikipedia_id`` provenance
    (pass None to skip a kind, e.g. a knowledge source without page ids). Returns the number of provenance
    entries checked. Raises `DataError` on the first problem.
    """
    w = f"{source}: " if source else ""
    seen: set = set()
    checked = 0
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{w}duplicate example id {ex.id!r}")
        seen.add(ex.id)
        for p in ex.provenance:
            pid, wid = p.get("passage_id"), p.get("wikipedia_id")
            if pid is not None and passage_ids is not None:
                checked += 1
                if str(pid) not in passage_ids:
                    raise DataError(f"{w}example {ex.id!r}: provenance points at unknown passage {pid!r}")
            elif wid is not None and wikipedia_ids is not None:
                checked += 1
                if str(wid) not in wikipedia_ids:
                    raise DataError(f"{w}example {ex.id!r}: provenance points at unknown wikipedia_id {wid!r}")
    return checked


# ---------------------------------------------------------------------------------------------------- writing
def dumps(obj: Any) -> str:
    """Canonical one-line JSON used by every writer."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: str, rows: Iterable[Any]) -> int:
    """Write dicts (or objects with ``to_json``) one per line; returns the count. Parent dirs are created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    tmp = f"{path}.tmp"
    with contextlib.ExitStack() as stack:
        if str(path).endswith(".gz"):  # fixed header (no name, mtime 0): equal content gives equal bytes
            raw = stack.enter_context(open(tmp, "wb"))
            z = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
            f = stack.enter_context(io.TextIOWrapper(z, encoding="utf-8", newline=""))
        else:
            f = stack.enter_context(_open_text(tmp, "wt"))
        for r in rows:
            f.write(dumps(r.to_json() if hasattr(r, "to_json") else r))
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_passages(path: str, passages: Iterable[Passage]) -> int:
    return write_jsonl(path, passages)


def write_examples(path: str, examples: Iterable[Example]) -> int:
    return write_jsonl(path, examples)


__all__ = [
    "DataError", "Passage", "Output", "Example", "iter_jsonl", "iter_passages", "load_passages",
    "iter_examples", "load_examples", "validate_examples", "write_jsonl", "write_passages", "write_examples",
    "passage_from_json", "example_from_json", "kilt_page_passages", "dumps",
]
