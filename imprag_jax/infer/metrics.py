"""Answer metrics (KILT/SQuAD normalisation) and retrieval recall as the paper defines it."""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD / KILT normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Iterable[str]) -> float:
    def f1(pred, gold):
        pt, gt = normalize_answer(pred).split(), normalize_answer(gold).split()
        if not pt or not gt:
            return float(pt == gt)
        common = collections.Counter(pt) & collections.Counter(gt)
        same = sum(common.values())
        if same == 0:
            return 0.0
        prec, rec = same / len(pt), same / len(gt)
        return 2 * prec * rec / (prec + rec)

    return max((f1(prediction, a) for a in answers), default=0.0)


_TRUE = {"true", "yes", "supports", "support"}
_FALSE = {"false", "no", "refutes", "refute"}


def true_false(s: str):
    w = normalize_answer(s).split()
    if not w:
        return None
    return True if w[0] in _TRUE else (False if w[0] in _FALSE else None)


def accuracy_true_false(prediction: str, answers: Iterable[str]) -> float:
    """Accuracy for true/false tasks: the first word of the prediction decides (True/Yes vs False/No)."""
    p = true_false(prediction)
    return float(p is not None and any(true_false(a) == p for a in answers))


def answer_in_passages(passage_texts: Sequence[str], answers: Iterable[str], k: int) -> float:
    """The paper's retrieval recall: some answer occurs (normalised, as a substring) in the top-k passages."""
    norm = [normalize_answer(a) for a in answers if normalize_answer(a)]
    if not norm:
        return 0.0
    return float(any(any(a in normalize_answer(t) for a in norm) for t in passage_texts[:k]))


def gold_in_topk(retrieved_ids: Sequence[int], gold_ids: Iterable[int], k: int) -> float:
    gold = {int(g) for g in gold_ids if int(g) >= 0}
    return float(bool(gold) and any(int(r) in gold for r in retrieved_ids[:k]))
