"""The per-example training/evaluation records of a prepared data folder: one JSON object per example, built from
``tasks/{task}.{split}.jsonl``, ``passages.jsonl`` and ``pseudo_labels/``. What `pipeline.prepare_records` writes
as ArrayRecord files and the TFDS builder (`imprag_jax.data.tfds_kilt`) stores; `pipeline` reads them back.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Mapping, Optional, Sequence

from imprag_jax.data import paths
from imprag_jax.data import templates as T

RECORDS_VERSION = 1


def _passage_rows(data_dir: str) -> tuple:
    """(list of (id, title, text), {id: row})."""
    from imprag_jax.data.formats import iter_passages

    ps = [(p.id, p.title, p.text) for p in iter_passages(paths.join(data_dir, "passages.jsonl"))]
    return ps, {pid: i for i, (pid, _, _) in enumerate(ps)}


def example_prompt(obj: Mapping, task: Optional[str] = None) -> str:
    """The templated prompt of a KILT record: ``meta.task_type`` (or the task name's type) with the templates of
    `imprag_jax.data.templates`; without a task type the ``input`` already is the prompt."""
    meta = obj.get("meta") or {}
    tt = meta.get("task_type") or (T.task_type_for(task) if task else None)
    if not tt:
        return obj["input"]
    fields = meta.get("fields") if isinstance(meta.get("fields"), dict) else T.fields_from_input(tt, obj["input"])
    return T.render(tt, fields)


def _task_splits(data_dir: str, tasks: Optional[Sequence[str]] = None,
                 splits: Optional[Sequence[str]] = None) -> list:
    """[(task, split, task file)] of ``tasks/*.jsonl``, filtered; a named (task, split) without a file raises."""
    todo = []
    for path in paths.glob(data_dir, "tasks/*.jsonl"):
        task, split = os.path.basename(path)[:-len(".jsonl")].rsplit(".", 1)
        if (tasks is None or task in tasks) and (splits is None or split in splits):
            todo.append((task, split, path))
    if tasks is not None:
        missing = {(t, s) for t in tasks for s in (splits or ())} - {(t, s) for t, s, _ in todo}
        if missing:
            raise FileNotFoundError(f"no task file for {sorted(missing)} in {data_dir}/tasks")
    return todo


def iter_task_records(data_dir: str, task: str, split: str, rows: Optional[dict] = None) -> Iterator[bytes]:
    """The records of one task split, in file order: each one JSON object (UTF-8 bytes) with the templated prompt,
    the answers, gold / BM25-ranked / hard-negative passages as corpus rows and the meta. ``rows`` (passage id ->
    row, `_passage_rows`) is read from ``passages.jsonl`` when not given. What `prepare_records` and the TFDS
    builder (`imprag_jax.data.tfds_kilt`) store."""
    from imprag_jax.data.formats import iter_jsonl

    path = paths.join(data_dir, "tasks", f"{task}.{split}.jsonl")
    if rows is None:
        rows = _passage_rows(data_dir)[1]
    pl_path = paths.join(data_dir, "pseudo_labels", f"{task}.{split}.jsonl")
    ranked = {}
    if paths.exists(pl_path):
        for _, obj in iter_jsonl(pl_path):
            ranked[obj["id"]] = [rows[p] for p in obj["ranked"] if p in rows]
    for n, (_, obj) in enumerate(iter_jsonl(path)):
        meta = dict(obj.get("meta") or {})
        outputs = obj.get("output") or []
        answers = [o["answer"] for o in outputs if isinstance(o.get("answer"), str) and o["answer"].strip()]
        gold = []
        for o in outputs:
            for p in o.get("provenance") or []:
                r = rows.get(str(p.get("passage_id")))
                if r is not None and r not in gold:
                    gold.append(r)
        hn = [rows[p] for p in meta.pop("hard_negatives", []) or [] if p in rows]
        kind = meta.get("kind") or "retrieval"
        rec = {"v": RECORDS_VERSION, "row": n, "task": task, "id": obj["id"], "kind": kind,
               "prompt": example_prompt(obj, task), "input": obj["input"], "answers": answers, "gold": gold,
               "ranked": ranked.get(obj["id"], []), "hard_negatives": hn, "meta": meta}
        yield json.dumps(rec, separators=(",", ":")).encode("utf-8")
