"""One evaluation, used by the trainer (dev curve, final evaluation) and by `python -m imprag_jax.evaluate`.

`evaluate` gives the result rows of a set of tasks and modes for given parameters (answers: EM / F1 / true-false
accuracy; retrieval: answer and gold recall@k); `run` evaluates a run directory's checkpoint and writes
report.json / report.md / report.png; `markdown_table` is the one table writer (final.md and report.md).

Modes: imprag (retrieve with the model's own E_q, read the top k), closed_book (no passages), oracle (the first
k gold passages), bm25 (the stored BM25 top k), and retrieval only (no generation, over eval.pool passages):
recall (the model's), bm25_recall.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Callable, Optional, Sequence

from . import cli
from . import run as R


def _fmt(v):
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


COLUMNS = ["task", "mode", "k", "n", "em", "f1", "accuracy", "answer_recall@1", "answer_recall@5", "answer_recall@10",
           "pool", "with gold", "gold_recall@1", "gold_recall@5", "gold_recall@10", "gold_recall@20",
           "chance_gold_recall@5"]
NOT_MEASURED = "n/a"  # a metric a row computes but cannot measure (gold recall with no example that has gold)


def _cell(r, c):
    if c == "with gold":  # gold recall and oracle answers are over these examples
        return f"{r['n_gold']}/{r['n']}" if r.get("n_gold") is not None else ""
    if c in r and r[c] is None:
        return NOT_MEASURED
    return _fmt(r.get(c))


def markdown_table(rows) -> str:
    """The result table. A column is shown when some row computes it (gold recall with no gold passage in a task is
    "n/a", not a dropped column); "with gold" is examples with a gold passage / examples."""
    cols = [c for c in COLUMNS if any(_cell(r, c) != "" for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def check_oracle(data_dir: str, tasks, modes, split: str, limit) -> None:
    """`NoGoldError` (one line) when oracle reading is asked of a task none of whose examples has a gold passage."""
    if "oracle" not in modes:
        return
    from .infer.imprag import NoGoldError, gold_counts

    for t in tasks:
        n, n_gold = gold_counts(data_dir, t, split, limit)
        if n and not n_gold:
            raise NoGoldError(f"mode 'oracle' reads the gold passages, but none of the {n} examples of {t}.{split} "
                              "has one (its provenance names no passage of the knowledge source); drop oracle for "
                              "this task")


def _score(r):
    """The answer metric of a row: accuracy for true/false tasks, else EM."""
    return r["accuracy"] if r.get("accuracy") is not None else r.get("em")


def _recall(r, kk):
    v = r.get(f"answer_recall@{kk}")
    return v if v is not None else r.get(f"gold_recall@{kk}")


def plot_report(rows, path: str, title: str = "") -> None:
    """Two panels: the answer metric per task (one bar per mode/k), retrieval recall@1/5/10 per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    series = list(dict.fromkeys((r["mode"], r["k"]) for r in rows))
    cmaps = {"imprag": "Blues", "oracle": "Greens", "closed_book": "Greys", "bm25": "Oranges"}

    def color(mode, j, n):
        return plt.get_cmap(cmaps.get(mode, "Purples"))(0.35 + 0.5 * (j + 1) / max(n, 1))

    def shade(mode, k, ks):
        return color(mode, ks.index(k), len(ks))

    ks_of = {m: [k for mm, k in series if mm == m] for m in dict.fromkeys(m for m, _ in series)}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(tasks) + 4), 4.2))
    x = np.arange(len(tasks))
    w = 0.8 / max(1, len(series))
    ax = axes[0]
    for j, (mode, k) in enumerate(series):
        vals = []
        for t in tasks:
            r = next((r for r in rows if r["task"] == t and r["mode"] == mode and r["k"] == k), None)
            vals.append(np.nan if r is None or _score(r) is None else _score(r))
        ax.bar(x + (j - (len(series) - 1) / 2) * w, vals, w, color=shade(mode, k, ks_of[mode]),
               label=f"{mode}" + (f" k={k}" if mode != "closed_book" else ""))
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("EM (accuracy for true/false tasks)")
    ax.set_title("answers")
    ax.legend(fontsize=7)
    ax = axes[1]
    rec = [(m, kk) for m in ("imprag", "bm25") for kk in (1, 5, 10)
           if any(r["mode"] == m and _recall(r, kk) is not None for r in rows)]
    w = 0.8 / max(1, len(rec))
    for j, (m, kk) in enumerate(rec):
        vals = []
        for t in tasks:
            r = next((r for r in rows if r["task"] == t and r["mode"] == m and _recall(r, kk) is not None), None)
            vals.append(np.nan if r is None else _recall(r, kk))
        ax.bar(x + (j - (len(rec) - 1) / 2) * w, vals, w, color=color(m, (1, 5, 10).index(kk), 3),
               label=f"{'ImpRAG' if m == 'imprag' else 'BM25'} @{kk}")
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall@k (answer in passage; gold for true/false)")
    ax.set_title("retrieval")
    if rec:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def count_examples(data_dir: str, task: str, split: str, limit) -> int:
    from .data import paths

    with paths.open(paths.join(data_dir, "tasks", f"{task}.{split}.jsonl")) as f:
        n = sum(1 for line in f if line.strip())
    return n if not limit else min(n, limit)


def training_ks(mode: str, ks: Sequence[int]) -> list:
    """The trainer's choice of k per mode: every k for imprag, 1 for oracle, the largest for bm25."""
    return {"imprag": list(ks), "oracle": [1], "closed_book": [0]}.get(mode, [max(ks)])


def multi_process() -> bool:
    """Whether this is one of several processes (jax.distributed): the evaluation then builds its index on the
    global mesh from each process's share of the corpus and evaluates every example identically on every
    process (see docs/architecture.md, "Multi-host evaluation")."""
    import jax

    return jax.process_count() > 1


def params_mesh(params):
    """The mesh the parameters live on (the training mesh), else a 1-D mesh over every device."""
    import jax
    from jax.sharding import NamedSharding

    from .retrieval.index import default_mesh

    for x in jax.tree.leaves(params):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            return sh.mesh
    return default_mesh()


def replicated(params):
    """Host parameters (every process holds the same copy) as global arrays replicated over every device of a
    multi-process run: the mesh `params_mesh` then finds, which the index is built on."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from .retrieval.index import default_mesh

    rep = NamedSharding(default_mesh(), PartitionSpec())

    def put(x):
        h = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(h.shape, rep, lambda idx: h[idx])

    return jax.tree.map(put, params)


def evaluate(params, cfg, c, data_dir: str, tokenizer, *, tasks, modes, ks, limit, step: int, split=None,
             batch_size=None, max_new_tokens=None, backend=None, corpus=None, ks_for: Optional[Callable] = None,
             timed: bool = False, bar=None, predictions=None, progress: bool = False, kv_store=None):
    """Result rows for every task x mode (x k) with parameters `params` (config `c` gives the data settings and
    the eval defaults). `kv_store`: an opened `infer.kv_store.KVStore` (checked against `params`): imprag
    retrieves over its E_p and loads the passages' K/V from it. `ks`: the passages read, for every mode, or per
    mode as `ks_for(mode, ks)` says (`training_ks`); `progress`: a bar while the corpus is encoded (on a
    terminal). Retrieval-only rows come first, then one row per task, mode and k; with `timed`, each row
    has the seconds its pass took (the rows are otherwise a function of the parameters and the config). `corpus`: the tokenized passages when the caller has them; `bar`: a tqdm bar to advance."""
    from .data.pipeline import corpus_tokens
    from .infer.imprag import Retriever, evaluate_modes, passage_texts
    from .infer.recall import MODES as RECALL_MODES

    E = c.eval
    split = split or E.split
    batch_size = int(batch_size or E.batch_size)
    max_new_tokens = int(max_new_tokens or E.max_new_tokens)
    L_q, add_bos, pool, seed = R.eval_L_q(c), bool(c.data.add_bos), int(E.pool), int(c.seed)
    tasks = list(tasks)
    sharded = multi_process()  # the index on the global mesh, each process tokenizing and encoding its rows
    if corpus is None and not sharded and any(m in ("imprag",) + tuple(RECALL_MODES) for m in modes):
        corpus = corpus_tokens(data_dir, tokenizer, c.data.l_max)

    def tokenize(rows):  # several processes: the passage rows of this process's devices only
        return corpus_tokens(data_dir, tokenizer, c.data.l_max, rows=rows)
    rows = []
    rec_modes = [m for m in modes if m in RECALL_MODES]
    if rec_modes:  # retrieval only: the model's and BM25's recall over the same pool (eval.pool), no generation
        from .infer.recall import recall_rows

        t1 = time.time()
        texts = passage_texts(data_dir)
        shard = dict(tokenize=tokenize, n_passages=len(texts), l_max=int(c.data.l_max),
                     mesh=params_mesh(params)) if sharded else {}
        rec = recall_rows(params, cfg, data_dir, tasks, tokenizer, corpus=None if sharded else corpus, texts=texts,
                          modes=rec_modes, split=split, limit=limit, L_q=L_q, add_bos=add_bos, pool=pool, seed=seed,
                          batch_size=batch_size, progress=progress, **shard)
        for r in rec if timed else ():
            r["seconds"] = round(time.time() - t1, 2)
        rows += rec
        if bar is not None:
            bar.update(sum(count_examples(data_dir, t, split, limit) for t in tasks) * len(rec_modes))
    retriever = None
    if "imprag" in modes:
        texts = passage_texts(data_dir)
        pool_sel = None
        if pool > 0:  # the index holds a pool with every evaluated question's gold passage
            from .infer.recall import eval_gold, pool_rows

            pool_sel = pool_rows(len(texts), eval_gold(data_dir, tasks, tokenizer, split=split, limit=limit,
                                                       L_q=L_q, add_bos=add_bos), pool, seed)
        if kv_store is not None:
            from .infer.kv_store import KVStoreError

            if sharded:
                raise R.RunError("reading from a passage K/V store is single-process: run the evaluation on one host")
            toks, mask = corpus
            try:
                retriever = Retriever.from_kv_store(kv_store, toks, mask, texts, step=step,
                                                    backend=backend or E.backend, rows=pool_sel)
            except KVStoreError as e:  # a store of another corpus (passage count, l_max)
                raise R.RunError(str(e)) from None
        elif sharded:
            retriever = Retriever.build_sharded(params, cfg, len(texts), tokenize, texts, mesh=params_mesh(params),
                                                l_max=int(c.data.l_max), step=step, backend=backend or E.backend,
                                                rows=pool_sel)
        else:
            toks, mask = corpus
            retriever = Retriever.build(params, cfg, toks, mask, texts, step=step, backend=backend or E.backend,
                                        rows=pool_sel, progress=progress)
    for task in tasks:
        for mode in [m for m in modes if m not in RECALL_MODES]:  # every k of a mode in one pass over the data
            if bar is not None:
                bar.set_postfix(task=task, mode=mode)
            t1 = time.time()
            rs = evaluate_modes(params, cfg, data_dir, task, tokenizer, retriever, mode=mode,
                                ks=ks_for(mode, ks) if ks_for else ks, split=split,
                                L_q=L_q, l_max=c.data.l_max, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                limit=limit, use_score_bias=bool(E.score_bias), add_bos=add_bos,
                                progress=None if bar is None else bar.update, predictions=predictions)
            for r in rs if timed else ():
                r["seconds"] = round(time.time() - t1, 2)
            rows.extend(rs)
    return rows


def run(c, workdir: str, *, tasks=None, modes=None, ks=None, limit=None, split=None, step=None, batch_size=None,
        max_new_tokens=None, backend=None, out_dir=None, predictions=False, plot=True, progress=True,
        kv_store: Optional[str] = None) -> dict:
    """Evaluate the run in `workdir` (config `c`, or its config.json when None); write the report; return it.
    kv_store: a passage K/V store folder (`python -m imprag_jax.kv_store build`) to read passages from.

    Several processes (jax.distributed; every process calls it with the same arguments): the parameters are
    replicated over the global mesh, the index is built there from each process's share of the corpus, every
    example is evaluated on every process, and only process 0 writes the report (report["written"] says whether
    this process did)."""
    from tqdm import tqdm

    from .data.pipeline import available_tasks
    from .infer.imprag import MODES
    from .infer.recall import MODES as RECALL_MODES

    if not os.path.isdir(workdir):
        raise R.RunError(f"workdir {workdir!r} does not exist")
    c = c if c is not None else R.load_run_config(workdir)
    E = c.eval
    split = split or E.split
    tasks = R.parse_list(tasks if tasks is not None else E.tasks)  # flags: comma strings
    modes = R.parse_list(modes if modes is not None else E.modes) or ["imprag"]
    ks = R.parse_list(ks if ks is not None else E.k, int) or [1]
    limit = E.limit if limit is None else limit
    limit = int(limit) if limit else None
    bad = [m for m in modes if m not in MODES + RECALL_MODES]
    if bad or not modes:
        raise R.RunError(f"unknown mode(s) {bad or modes}; choose from {', '.join(MODES + RECALL_MODES)}")
    if multi_process():  # before the checkpoint is read: the things one host's copy of the corpus is needed for
        if kv_store:
            raise R.RunError("reading from a passage K/V store (--kv_store) is single-process: run the evaluation "
                             "on one host")
        if "imprag" in modes and (backend or E.backend) == "scann":
            raise R.RunError("the scann backend searches one host's copy of the index; a multi-process "
                             "evaluation uses a device backend (--backend exact, binned or approx)")
    if step is not None and int(step) == 0:  # the initial weights of the config (a pretrained model, untrained)
        if c.model.init == "random":
            raise R.RunError("--checkpoint 0 evaluates the config's initial weights, but model.init is 'random'")
        cfg, params, _ = R.load_model(c, None)
        step = 0
    else:
        params, step, cfg = R.restore_params(workdir, step)
    data_dir = R.existing_data_dir(c, workdir)
    have = available_tasks(data_dir, split)
    missing = [t for t in tasks if t not in have]
    if missing or not tasks:
        raise R.RunError(f"task(s) {missing or tasks} have no {split} split in {data_dir} "
                         f"(available: {', '.join(have)})")
    from .infer.imprag import NoGoldError

    try:  # before any evaluation
        check_oracle(data_dir, tasks, modes, split, limit)
    except NoGoldError as e:
        raise R.RunError(str(e)) from None
    tok = R.tokenizer(c, data_dir)
    import jax

    params = replicated(params) if multi_process() else jax.tree.map(jax.numpy.asarray, params)
    writer = jax.process_index() == 0  # one writer of the report (several processes evaluate the same examples)
    from .run.session import open_kv_store

    store = open_kv_store(kv_store, params, cfg)
    t0 = time.time()
    total = sum(count_examples(data_dir, t, split, limit) for t in tasks) * len(modes)
    bar = tqdm(total=total, desc="evaluate", unit="ex", dynamic_ncols=True, mininterval=1.0,
               disable=not progress or not writer or not cli.stderr_is_terminal())  # none in a redirected log
    preds = [] if predictions else None
    rows = evaluate(params, cfg, c, data_dir, tok, tasks=tasks, modes=modes, ks=ks, limit=limit, step=step,
                    split=split, batch_size=batch_size, max_new_tokens=max_new_tokens, backend=backend, timed=True,
                    bar=bar, predictions=preds, progress=progress and writer and cli.stderr_is_terminal(),
                    kv_store=store)
    bar.close()
    max_new = int(max_new_tokens or E.max_new_tokens)
    report = {"workdir": os.path.abspath(workdir), "name": c.name, "step": step, "split": split, "limit": limit,
              "tasks": tasks, "modes": modes, "k": ks, "max_new_tokens": max_new,
              "model": {"num_layers": cfg.num_layers, "b": cfg.b, "t": cfg.t, "hidden_size": cfg.hidden_size},
              "backend": (backend or E.backend) if "imprag" in modes else None,
              "kv_store": os.path.abspath(kv_store) if kv_store else None,
              "seconds": round(time.time() - t0, 2),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    table = markdown_table(rows)
    if not writer:
        report.update(table=table, png=None, written=False)
        _leave_together()
        return report
    out_dir = out_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"# {c.name}: evaluation at step {step}\n\n"
                f"split `{split}`, {limit or 'all'} examples per task, greedy decoding of up to "
                f"{max_new} tokens; {report['seconds']:.0f}s; {report['date']}\n\n{table}\n\n"
                "EM / F1: KILT (SQuAD) normalisation, best over the aliases; accuracy: true/false tasks (first word "
                "of the answer). answer_recall@k: an answer occurs (normalised) in the top-k passages (the paper's "
                "retrieval recall); gold_recall@k: a gold provenance passage is in the top k, over the examples "
                "that have one (with gold: those / all; n/a: none has one); oracle rows answer those examples "
                "only. Recall is that of the model's own retrieval (imprag) or of the stored BM25 ranking "
                "(bm25).\n")
    if preds is not None:
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
    report["png"] = None
    if plot:  # last: the table is written whatever happens here
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            report["png_skipped"] = ("report.png skipped: matplotlib is not installed (pip install matplotlib adds "
                                     "it; --noplot silences this)")
        else:
            report["png"] = os.path.join(out_dir, "report.png")
            plot_report(rows, report["png"], f"{c.name}, step {step}")
    report.update(table=table, written=True)
    _leave_together()
    return report


def _leave_together():
    """Several processes: wait for process 0's report (a process that exits first breaks the runtime's shutdown
    barrier)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("imprag_jax:evaluated")
