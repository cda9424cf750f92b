"""Greedy generation from the command line.

  python -m imprag_jax.generate --model smollm2 "What is the capital of France?"   # plain LM (chat template)
  echo "prompt" | python -m imprag_jax.generate --model path/to/hf_dir
  python -m imprag_jax.generate --workdir runs/synthetic "Q: Where was Stavu Stauzouk born? A:"   # ImpRAG
  python -m imprag_jax.generate --workdir runs/synthetic --template qa "Where was Stavu Stauzouk born?"
  python -m imprag_jax.generate --workdir runs/synthetic --template fact_verification --k 4 < statements.txt
  python -m imprag_jax.generate --workdir runs/synthetic --kv_store runs/synthetic/kv "Q: Where was Stavu Stauzouk born? A:"

With --model the prompt goes through the model's chat template when it has one (--raw to skip it). With --workdir
the trained ImpRAG model of that run retrieves from its knowledge source with its own bottom layers (E_q), prints
the retrieved passages (rank, score, title, text) and answers reading the top k (two-stage inference; prompts are
answered in batches). Prompts are used as given; `--template TYPE` wraps each in the training template of that
task type (qa, fact_verification, slot_filling ("entity [SEP] relation"), entity_linking, ...).
`--kv_store DIR` (a model with independent passage attention): the index's E_p and the read passages' middle-group
K/V come from a store built by `python -m imprag_jax.kv_store build` for the same checkpoint, so no passage
runs through the model (the answers are those of recomputation; a store of other weights is refused in one line).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import cli


def _prompts(args):
    if args.prompt:
        return list(args.prompt)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run_plain(args):
    import jax

    from .convert.fetch import FetchError, resolve_model
    from .model.decode import greedy_generate

    try:
        cfg, params, tok = resolve_model(args.model)
    except (ValueError, OSError, FetchError) as e:  # not a model directory / .gguf, a damaged file, no download
        cli.fail(f"cannot load --model {args.model}: {cli.first_line(e)}")
    params = jax.tree.map(jax.numpy.asarray, params)
    prompts = _prompts(args)
    texts = [p if args.raw else tok.apply_chat_template(p) for p in prompts]
    ids = [tok.encode(t, add_bos=not tok.chat_template and tok.bos_id is not None) for t in texts]
    t0 = time.time()
    outs = greedy_generate(params, cfg, ids, max_new_tokens=args.max_new_tokens or 32, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id)
    dt = time.time() - t0
    for p, o in zip(prompts, outs):
        print(f"> {p}\n{tok.decode(o).strip()}\n")
    n = sum(len(o) for o in outs)
    print(f"[{n} tokens in {dt:.1f}s including compilation]", file=sys.stderr)


def run_imprag(args):
    from .data import templates as T
    from .run import RunError
    from .run.session import ImpRAGSession

    prompts = _prompts(args)
    try:
        if args.template:
            prompts = [T.render(args.template, T.fields_from_input(args.template, p)) for p in prompts]
        sess = ImpRAGSession.from_workdir(args.workdir, step=args.step, step_flag="--step", kv_store=args.kv_store)
        if args.kv_store:
            sess.build_retriever()  # a store of another corpus is refused here, before any prompt
    except (RunError, T.TemplateError) as e:
        cli.fail(str(e))
    t0 = time.time()
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        for p, res in zip(chunk, sess.ask(chunk, k=args.k, max_new_tokens=args.max_new_tokens, show=args.show)):
            print(f"> {p}")
            for rank, (title, score, text) in enumerate(res["passages"], 1):
                print(f"  [{rank}] {score:8.3f}  {title}: {text[:100]}")
            print(f"answer: {res['answer']}\n", flush=True)
    print(f"[{len(prompts)} prompt(s), checkpoint step {sess.step}, k={res['k']}, {time.time() - t0:.1f}s including "
          "indexing and compilation]", file=sys.stderr)


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m imprag_jax.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="smollm2 | an HF directory | a .gguf file (plain LM)")
    src.add_argument("--workdir", help="a training run directory (ImpRAG: retrieve, then read)")
    ap.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="new tokens (default: 32 with --model, the run's eval.max_new_tokens with --workdir)")
    ap.add_argument("--template", default=None, help="--workdir: wrap each prompt in this task type's template")
    ap.add_argument("--batch_size", type=int, default=16, help="--workdir: prompts answered together")
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--k", type=int, default=None, help="passages to read (default: the run's eval k)")
    ap.add_argument("--show", type=int, default=5, help="retrieved passages to print")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--kv_store", default=None,
                    help="--workdir: read passages' K/V and E_p from this store (python -m imprag_jax.kv_store "
                         "build; independent passage attention only)")
    args = ap.parse_args(argv)
    if args.kv_store and not args.workdir:
        ap.error("--kv_store needs --workdir (a trained ImpRAG run)")
    if args.model:
        run_plain(args)
    else:
        run_imprag(args)


if __name__ == "__main__":
    main()
