"""Does a config fit? Compile its train step on fake devices with abstract parameters and print per-device memory.

    python -m imprag_jax.compile_check --config configs/llama3_1_8b.py:gpu8
    python -m imprag_jax.compile_check --config configs/llama3_2_3b.py:v5p-32 --devices 16 --json out.json
    python -m imprag_jax.compile_check --config configs/llama3_2_3b.py:smoke --devices 8 --config.model.remat=dots

N fake CPU devices are made with `--xla_force_host_platform_device_count` (set before JAX starts), the config's
mesh is laid over them, and the train step of each retrieval stage (warmup = NCE, distill = KL with the teacher)
is lowered and compiled with `ShapeDtypeStruct` parameters, optimizer state and batch: nothing is allocated, so an
8B model compiles on a laptop. For each stage it prints XLA's per-device memory analysis (arguments = parameters +
optimizer state + batch, temporaries = activations and workspace) next to the arithmetic it should agree with:

    parameters   sum over tensors of 4 bytes x elements / (product of the mesh axes the tensor is sharded over)
    optimizer    AdamW mu + nu: twice the parameter bytes (+ the step counters)
    temporaries  remat "full": each scanned layer keeps its input hidden states [tokens, d] (compute dtype) for the
                 backward pass, plus the middle group's passage K/V; one layer's transients; fp32 gradients
                 (sharded like the parameters); FSDP-gathered weights (`temp_estimate` lists the terms)

XLA:CPU is not the GPU/TPU compiler: it may keep bf16 matmuls in fp32, fuse differently and schedule buffers
differently, so its temporaries are an estimate of the accelerator's (see docs/scaling.md).
`--layers N` (with `--b`, `--t`) compiles a reduced-depth variant: layers are scanned, so memory per layer is
linear in the depth and a few shallow compiles extrapolate to the full model (docs/scaling.md does this).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict

GIB = 2 ** 30


def _set_devices(n: int):
    """Fake CPU devices; must run before JAX initialises its backend."""
    if "jax" in sys.modules:
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", n)
        except Exception as e:  # the backend is already up
            raise SystemExit(f"compile_check: JAX was initialised before --devices could be applied ({e})")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def sharded_bytes(tree, shardings) -> float:
    """Per-device bytes of a tree of ShapeDtypeStructs under NamedShardings (the largest shard of each leaf)."""
    import jax

    total = 0.0
    for a, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = sh.shard_shape(a.shape)
        total += math.prod(shard) * a.dtype.itemsize
    return total


def temp_estimate(cfg, c, mesh_shape: Dict[str, int], stage: str, param_bytes: float) -> Dict[str, float]:
    """A first-order model of XLA's per-device temporaries, to read next to its memory analysis.

    saved_layer_inputs  remat "full": every scanned layer keeps its input hidden states [tokens, d] (compute dtype)
                        for the backward pass: the prompt through all N layers, the passages through bottom and
                        middle, plus the passage K/V that every middle layer of the prompt reads
    layer_transients    one layer recomputed in the backward pass: SwiGLU activations of the passage stream and
                        the fp32 logits/probabilities of the joint passage attention
    vocab_logits        fp32 logits and log-softmax of the r_len response positions
    gradients           fp32, sharded like the parameters
    gathered_weights    FSDP all-gathers: one layer in the compute dtype (x2, forward and backward in flight) and
                        the vocabulary matrices in fp32 with their full-size gradient before the reduce-scatter
    teacher_transients  distill only: the B*k prompt copies of one middle/top layer (no gradient, nothing saved)
    """
    dt = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    rows = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    B = c.data.batch_size
    Bd = max(1.0, B / rows) / max(1, c.train.accum)
    L = c.data.L_q + c.data.L_r
    Bf = c.data.free_batch_size  # retrieval-free rows: the prompt stream only, at their own length
    L = L + (Bf / max(B, 1)) * (c.data.L_free or L)
    P = c.data.k * c.data.l_max
    d, N, nm = cfg.hidden_size, cfg.num_layers, cfg.n_middle
    kvd = cfg.num_kv_heads * cfg.head_dim
    tensor = mesh_shape.get("tensor", 1)
    prompt_tok, pass_tok = Bd * L, Bd * P
    saved = prompt_tok * N * d * dt
    saved += pass_tok * (cfg.b + nm) * d * dt
    saved += pass_tok * nm * 2 * kvd * dt
    mlp = pass_tok * cfg.intermediate_size * dt * 3 / tensor
    attn = Bd * cfg.num_heads / tensor * P * P * 4 * 2
    head = Bd * c.data.L_r * cfg.vocab_size * 4 * 2 / tensor
    layer_params = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    n_vocab_mats = 1 if cfg.tie_embeddings else 2
    gathered = 2 * layer_params * dt / tensor + n_vocab_mats * cfg.vocab_size * d * 4 * 2 / tensor
    out = {"saved_layer_inputs": saved, "layer_transients": mlp + attn, "vocab_logits": head,
           "gradients": param_bytes, "gathered_weights": gathered}
    if stage == "distill":
        tch = Bd * c.data.k / max(1, c.train.teacher_chunks)
        out["teacher_transients"] = (tch * L * d * dt * 4 + tch * cfg.num_heads / tensor * L * (c.data.l_max + L) * 4
                                     + tch * c.data.L_r * cfg.vocab_size * 4 / tensor)
    out["total"] = sum(out.values())
    return out


def check(c, stages=("warmup", "distill"), log=print) -> dict:
    """Compile each stage of config `c` on the current (fake) devices; returns the report dict."""
    import jax

    from .train.setup import build
    from .train.state import batch_specs, compile_step, memory_report, state_shardings

    s = build(c)  # the trainer's setup, with the batch shapes computed from the config
    cfg, sc, tx, mesh, rules, shapes, k_read = s.cfg, s.sc, s.tx, s.mesh, s.rules, s.shapes, s.k_read
    T = c.train
    s_shard, s_abs = state_shardings(cfg, tx, mesh, rules)
    P = cfg.num_params()
    n_dev = mesh.devices.size
    n_shard = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1)  # parameter shards (data axis replicates)
    param_b = sharded_bytes(s_abs["params"], s_shard["params"])
    opt_b = sharded_bytes(s_abs["opt_state"], s_shard["opt_state"])
    b_abs, b_shard = batch_specs(shapes, mesh, rules)
    batch_b = sharded_bytes(b_abs, b_shard) + 4  # + the score-bias ramp scalar (fp32, replicated)
    rep = {"config": c.name, "devices": n_dev, "mesh": {k: int(v) for k, v in mesh.shape.items()},
           "backend": jax.default_backend(), "jax": jax.__version__,
           "model": {"params": P, "num_layers": cfg.num_layers, "b": cfg.b, "t": cfg.t, "hidden": cfg.hidden_size,
                     "vocab": cfg.vocab_size, "tie_embeddings": cfg.tie_embeddings, "dtype": cfg.dtype,
                     "remat": cfg.remat},
           "batch": {"global": shapes["tokens"][0][0], "L": shapes["tokens"][0][1], "k": k_read,
                     "l_max": c.data.l_max, "accum": T.accum, "teacher_chunks": T.teacher_chunks,
                     "free": shapes["free_tokens"][0][0] if "free_tokens" in shapes else 0,
                     "L_free": shapes["free_tokens"][0][1] if "free_tokens" in shapes else 0},
           "arithmetic": {"param_bytes": param_b, "opt_bytes": opt_b, "batch_bytes": batch_b,
                          "param_shards": n_shard, "param_bytes_formula": 4.0 * P / n_shard,
                          "opt_bytes_formula": 8.0 * P / n_shard},
           "stages": {}}
    log(f"[compile_check] {c.name}: {P / 1e9:.3f}B params, {cfg.num_layers} layers (b={cfg.b}, t={cfg.t}), "
        f"mesh {dict(mesh.shape)} on {n_dev} {jax.default_backend()} devices; global batch "
        f"{rep['batch']['global']} x {rep['batch']['L']} tokens + {k_read} x {c.data.l_max} passage tokens"
        + (f", {rep['batch']['free']} retrieval-free rows x {rep['batch']['L_free']} tokens"
           if rep["batch"]["free"] else ""))
    log(f"[compile_check] arithmetic per device: parameters {param_b / GIB:.3f} GiB (4P/{n_shard} = "
        f"{4 * P / n_shard / GIB:.3f}), AdamW state {opt_b / GIB:.3f} GiB (8P/{n_shard} = "
        f"{8 * P / n_shard / GIB:.3f}), batch {batch_b / 2**20:.2f} MiB")
    for stage in stages:
        t0 = time.time()
        compiled, _ = compile_step(cfg, sc, stage, tx, mesh, shapes, rules)
        secs = time.time() - t0
        mem = memory_report(compiled)
        act = temp_estimate(cfg, c, dict(mesh.shape), stage, param_b)
        arg, tmp = mem.get("argument", float("nan")), mem.get("temp", float("nan"))
        peak = arg + tmp + mem.get("output", 0.0) - mem.get("alias", 0.0)
        st = {"compile_seconds": secs, "memory": mem, "peak_bytes": peak, "temp_estimate": act,
              "argument_minus_arithmetic": arg - (param_b + opt_b + batch_b)}
        rep["stages"][stage] = st
        log(f"[compile_check] {stage}: compiled in {secs:.1f}s; per device: arguments {arg / GIB:.3f} GiB "
            f"(arithmetic {(param_b + opt_b + batch_b) / GIB:.3f}), temporaries {tmp / GIB:.3f} GiB "
            f"(estimate {act['total'] / GIB:.3f}), outputs {mem.get('output', 0) / GIB:.3f} GiB "
            f"(aliased {mem.get('alias', 0) / GIB:.3f}), peak {peak / GIB:.3f} GiB = {peak / 1e9:.1f} GB")
    return rep


def main(argv=None) -> int:
    from . import cli
    from .cli import ArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(x == "--set" or x.startswith("--set=") for x in argv):
        cli.fail("--set is gone: override a field with --config.a.b=v (e.g. --config.model.remat=dots), as every "
                 "command does", prefix="compile_check: error")
    c, rest = cli.config_from_argv(["compile_check"] + argv, prefix="compile_check: config error")
    ap = ArgumentParser(prog="python -m imprag_jax.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=c is None,
                    help="configs/x.py[:arg]; override any field with --config.a.b=v")
    ap.add_argument("--devices", type=int, default=0, help="fake CPU devices (default: the mesh's size, or 8)")
    ap.add_argument("--stages", default="warmup,distill")
    ap.add_argument("--batch", type=int, default=0, help="data.batch_size (global retrieval rows)")
    ap.add_argument("--accum", type=int, default=0, help="train.accum")
    ap.add_argument("--layers", type=int, default=0, help="reduced depth (use with --b/--t) for per-layer scaling")
    ap.add_argument("--b", type=int, default=-1)
    ap.add_argument("--t", type=int, default=-1)
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary when the config gives none (= a tokenizer's)")
    ap.add_argument("--json", default="", help="write the report here")
    a = ap.parse_args(rest[1:])
    if a.batch:
        c.data.batch_size = a.batch
    if a.accum:
        c.train.accum = a.accum
    if a.layers:
        c.model.num_layers = a.layers
    if a.b >= 0:
        c.model.b = a.b
    if a.t >= 0:
        c.model.t = a.t
    if not c.model.vocab_size:
        c.model.vocab_size = a.vocab
    n = a.devices
    if not n:
        sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
        n = math.prod(sizes) if -1 not in sizes else 8
    _set_devices(n)
    from .model import ConfigError

    try:
        rep = check(c, tuple(s for s in a.stages.split(",") if s))
    except (ConfigError, ValueError) as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    rep["command"] = "python -m imprag_jax.compile_check " + " ".join(argv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
