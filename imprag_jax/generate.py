"""Greedy generation from the command line.

  python -m imprag_jax.generate --model smollm2 "What is the capital of France?"   # plain LM (chat template)
  echo "prompt" | python -m imprag_jax.generate --model path/to/hf_dir
  python -m imprag_jax.generate --workdir runs/synthetic "Q: Where was Stavu Stauzouk born ? A:"   # ImpRAG

With --model the prompt goes through the model's chat template when it has one (--raw to skip it). With --workdir
the trained ImpRAG model of that run retrieves from its knowledge source with its own bottom layers, prints the
retrieved passages with their scores, and answers reading the top k.
"""
from __future__ import annotations

import argparse
import sys
import time


def _prompts(args):
    if args.prompt:
        return list(args.prompt)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run_plain(args):
    import jax

    from .convert.fetch import resolve_model
    from .infer.generate import greedy_generate

    cfg, params, tok = resolve_model(args.model)
    params = jax.tree.map(jax.numpy.asarray, params)
    prompts = _prompts(args)
    texts = [p if args.raw else tok.apply_chat_template(p) for p in prompts]
    ids = [tok.encode(t, add_bos=not tok.chat_template and tok.bos_id is not None) for t in texts]
    t0 = time.time()
    outs = greedy_generate(params, cfg, ids, max_new_tokens=args.max_new_tokens, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id)
    dt = time.time() - t0
    for p, o in zip(prompts, outs):
        print(f"> {p}\n{tok.decode(o).strip()}\n")
    n = sum(len(o) for o in outs)
    print(f"[{n} tokens in {dt:.1f}s including compilation]", file=sys.stderr)


def run_imprag(args):
    from .infer.session import ImpRAGSession

    sess = ImpRAGSession.from_workdir(args.workdir, step=args.step)
    for p in _prompts(args):
        res = sess.ask([p], k=args.k, max_new_tokens=args.max_new_tokens, show=args.show)[0]
        print(f"> {p}")
        for rank, (title, score, text) in enumerate(res["passages"], 1):
            print(f"  [{rank}] {score:8.3f}  {title}: {text[:100]}")
        print(f"answer: {res['answer']}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="smollm2 | an HF directory | a .gguf file (plain LM)")
    src.add_argument("--workdir", help="a training run directory (ImpRAG: retrieve, then read)")
    ap.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--k", type=int, default=None, help="passages to read (default: the run's eval k)")
    ap.add_argument("--show", type=int, default=5, help="retrieved passages to print")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = ap.parse_args(argv)
    if args.model:
        run_plain(args)
    else:
        run_imprag(args)


if __name__ == "__main__":
    main()
