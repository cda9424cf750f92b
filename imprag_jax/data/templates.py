"""Prompt templates of the ImpRAG paper (Table 1 / Table 9), one per task type.

A prompt is a template with ``{field}`` slots; the response is rendered as ``" {answer}"`` (one leading space), so
``prompt + response`` is the natural text ``"Q: ... A: answer"`` and tokenizes as it would in running text.

Task types and their fields (defaults in ``TEMPLATES``):

  ============================  ===================================  ==============================================
  task type                     fields                               template
  ============================  ===================================  ==============================================
  ``qa`` (also multi-hop QA)    question                             ``Q: {question} A:``
  ``fact_verification``         statement                            ``Is this statement true? {statement} A:``
  ``slot_filling``              entity, relation                     ``{entity} [SEP] {relation} Provide the answer …``
  ``entity_linking``            context (mention in [START] [END])   ``{context} Output the Wikipedia page title …``
  ``reading_comprehension``     context, question                    ``{context} Q: {question} A:``
  ``summarization``             context                              ``{context} Summarize this article:``
  ``phrase_denoising``          context                              ``{context} Recover the original phrases …``
  ``sentence_generation``       context, direction (next|previous)   ``{context} [SEP] {direction} sentence Generate …``
  ============================  ===================================  ==============================================

Public API
  * ``TEMPLATES``                                   -- the default ``{task_type: template}`` dict (do not mutate).
  * ``render(task_type, fields, templates=None) -> str``            -- the prompt; ``templates`` overrides/extends.
  * ``render_response(answer) -> str``                              -- ``" {answer}"``.
  * ``render_pair(task_type, fields, answer, templates=None) -> (prompt, response)``.
  * ``template_fields(template) -> list[str]``                      -- the slot names of a template.
  * ``fields_from_input(task_type, text) -> dict``                  -- fields from a KILT ``input`` string.
  * ``render_example(example, task_type=None, templates=None) -> str`` -- prompt of a `formats.Example`
    (``meta.fields`` when present, else parsed from ``input``).
  * ``merge_templates(overrides) -> dict``                          -- defaults updated with ``overrides``.
  * ``task_type_for(name) -> str | None``                           -- task type of a KILT task name
    (``KILT_TASK_TYPES``: nq/hotpotqa/triviaqa -> qa, fever -> fact_verification, trex/zsre -> slot_filling,
    aida/wned/cweb -> entity_linking).
  * ``TemplateError(ValueError)``                                   -- unknown task type / missing field.
"""
from __future__ import annotations

import string
from types import MappingProxyType
from typing import Mapping, Optional

_SF = ("{entity} [SEP] {relation} Provide the answer corresponding to the relation specified after [SEP] for the "
       "entity mentioned before [SEP] A:")
_EL = "{context} Output the Wikipedia page title of the entity mentioned between [START] and [END] in the given text A:"
_PD = "{context} Recover the original phrases marked between [START] and [END] in the given text A:"
_SG = ("{context} [SEP] {direction} sentence Generate a sentence corresponding to the relation specified after [SEP] "
       "for the context mentioned before [SEP] A:")

TEMPLATES = MappingProxyType({
    "qa": "Q: {question} A:",
    "fact_verification": "Is this statement true? {statement} A:",
    "slot_filling": _SF,
    "entity_linking": _EL,
    "reading_comprehension": "{context} Q: {question} A:",
    "summarization": "{context} Summarize this article:",
    "phrase_denoising": _PD,
    "sentence_generation": _SG,
})

# Task names of the KILT benchmark (and of imprag_jax's mini-KILT) -> task type.
KILT_TASK_TYPES = MappingProxyType({
    "nq": "qa", "nq_open": "qa", "squad": "qa", "triviaqa": "qa", "tqa": "qa", "hotpotqa": "qa", "hopo": "qa",
    "eli5": "qa", "simpleqa": "qa", "2wikimultihopqa": "qa",
    "fever": "fact_verification", "fev": "fact_verification", "scifact": "fact_verification",
    "trex": "slot_filling", "t-rex": "slot_filling", "zsre": "slot_filling", "structured_zeroshot": "slot_filling",
    "aida": "entity_linking", "aidayago2": "entity_linking", "wned": "entity_linking", "cweb": "entity_linking",
})

_SG_DIRECTIONS = ("next", "previous")


class TemplateError(ValueError):
    """Unknown task type, or a field the template needs is missing."""


def template_fields(template: str) -> list:
    """Names of the ``{slots}`` of a template, in order, without repeats."""
    out = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or not name.isidentifier():
            raise TemplateError(f"template slot {{{name}}} is not a plain field name: {template!r}")
        if name not in out:
            out.append(name)
    return out


def merge_templates(overrides: Optional[Mapping] = None) -> dict:
    """The default templates updated with ``overrides`` (a ``{task_type: template}`` dict; new types allowed)."""
    t = dict(TEMPLATES)
    if overrides:
        for k, v in overrides.items():
            if not isinstance(v, str) or not v.strip():
                raise TemplateError(f"template for {k!r} must be a non-empty string")
            template_fields(v)  # validates the slots
            t[k] = v
    return t


def _clean(v) -> str:
    return " ".join(str(v).split())


def render(task_type: str, fields: Mapping, templates: Optional[Mapping] = None) -> str:
    """The prompt for ``task_type`` with ``fields`` filled in (values whitespace-normalised).

    ``templates`` overrides/extends the defaults. Raises `TemplateError` for an unknown task type or a missing or
    empty field. Extra fields are ignored.
    """
    table = merge_templates(templates) if templates else TEMPLATES
    if task_type not in table:
        raise TemplateError(f"unknown task type {task_type!r}; known: {', '.join(sorted(table))} "
                            "(pass templates={task_type: '...'} to add one)")
    tpl = table[task_type]
    names = template_fields(tpl)
    missing = [n for n in names if n not in fields or fields[n] is None or not _clean(fields[n])]
    if missing:
        raise TemplateError(f"task type {task_type!r} needs field(s) {missing} (template {tpl!r}); "
                            f"got {sorted(fields)}")
    vals = {n: _clean(fields[n]) for n in names}
    if task_type == "sentence_generation" and "direction" in vals and vals["direction"] not in _SG_DIRECTIONS:
        raise TemplateError(f"sentence_generation direction must be one of {_SG_DIRECTIONS}, got {vals['direction']!r}")
    return tpl.format_map(vals)


def render_response(answer: str) -> str:
    """The target text: a leading space, then the answer (whitespace-normalised)."""
    a = _clean(answer)
    if not a:
        raise TemplateError("empty answer")
    return " " + a


def render_pair(task_type: str, fields: Mapping, answer: str, templates: Optional[Mapping] = None) -> tuple:
    return render(task_type, fields, templates), render_response(answer)


def fields_from_input(task_type: str, text: str) -> dict:
    """Template fields recovered from a KILT ``input`` string.

    qa -> question; fact_verification -> statement; slot_filling -> ``"entity [SEP] relation"``; entity_linking
    -> context with KILT's ``[START_ENT]``/``[END_ENT]`` written as ``[START]``/``[END]``; other types -> context.
    """
    if task_type == "qa":
        return {"question": text}
    if task_type == "fact_verification":
        return {"statement": text}
    if task_type == "slot_filling":
        if "[SEP]" not in text:
            raise TemplateError(f"slot_filling input must look like 'entity [SEP] relation', got {text[:80]!r}")
        ent, rel = text.split("[SEP]", 1)
        return {"entity": ent.strip(), "relation": rel.strip()}
    if task_type == "entity_linking":
        return {"context": text.replace("[START_ENT]", "[START]").replace("[END_ENT]", "[END]")}
    return {"context": text}


def task_type_for(name: str) -> Optional[str]:
    """Task type of a KILT / mini-KILT task name (``"nq"``, ``"trex"``, ``"fever"``, ...), or None."""
    key = name.lower().split(".")[0]
    for suffix in ("-kilt", "_kilt"):
        key = key.replace(suffix, "")
    for part in (key, key.split("-")[0], key.split("_")[0]):
        if part in KILT_TASK_TYPES:
            return KILT_TASK_TYPES[part]
    return None


def render_example(example, task_type: Optional[str] = None, templates: Optional[Mapping] = None) -> str:
    """Prompt of a `formats.Example`: uses ``meta.task_type``/``meta.fields`` when present, else ``input``."""
    meta = getattr(example, "meta", None) or {}
    tt = task_type or meta.get("task_type")
    if tt is None:
        raise TemplateError(f"example {example.id!r} has no meta.task_type; pass task_type=")
    fields = meta.get("fields") if isinstance(meta.get("fields"), dict) else None
    if fields is None:
        fields = fields_from_input(tt, example.input)
    return render(tt, fields, templates)


__all__ = ["TEMPLATES", "KILT_TASK_TYPES", "TemplateError", "template_fields", "merge_templates", "render",
           "render_response", "render_pair", "fields_from_input", "task_type_for", "render_example"]
