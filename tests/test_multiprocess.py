"""Multi-process training on one machine: 2 processes x 4 CPU devices over one global 8-device mesh give the
losses of the single-process 8-device run, through an orbax save and a resumed run (train.stop_at_step); the
end-of-training evaluation of the same weights on 2 processes (index on the global mesh, each process encoding
its rows) gives the single-process run's rows."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CHILD = r"""
import json, os, sys
import jax
jax.config.update("jax_num_cpu_devices", int(os.environ["IMPRAG_TEST_LOCAL_DEVICES"]))
from imprag_jax.train.distributed import maybe_initialize
maybe_initialize()  # IMPRAG_COORDINATOR / IMPRAG_NUM_PROCESSES / IMPRAG_PROCESS_ID when set
from configs import synthetic  # the child runs in the repository root
from imprag_jax.train.trainer import train
import imprag_jax.evaluation as ev


def probe(params, cfg, c, data_dir, tokenizer, **kw):
    # the final evaluation, then a direct check of the retriever it builds: random queries over the whole corpus
    import numpy as np
    from imprag_jax.data.pipeline import corpus_tokens
    from imprag_jax.infer.imprag import Retriever, passage_texts

    rows = ev_evaluate(params, cfg, c, data_dir, tokenizer, **kw)
    texts = passage_texts(data_dir)
    if ev.multi_process():
        r = Retriever.build_sharded(params, cfg, len(texts), lambda ix: corpus_tokens(data_dir, tokenizer,
                                    c.data.l_max, rows=ix), texts, mesh=ev.params_mesh(params), l_max=c.data.l_max)
    else:
        r = Retriever.build(params, cfg, *corpus_tokens(data_dir, tokenizer, c.data.l_max), texts)
    e_q = np.random.default_rng(0).normal(size=(6, r.index.D)).astype(np.float32)
    scores, ids = r.search(e_q, 10)
    t, m = r.gather(np.concatenate([ids[:, :3], -np.ones((6, 1), ids.dtype)], axis=1))
    with open(os.path.join(workdir, f"probe.p{jax.process_index()}.json"), "w") as f:
        json.dump({"n": r.n, "ids": ids.tolist(), "scores": scores.tolist(), "tokens": t.tolist(),
                   "mask": m.tolist()}, f)
    return rows


ev_evaluate, ev.evaluate = ev.evaluate, probe

world_dir, workdir, stop_at, evaluate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "eval"
c = synthetic.get_config()
c.data.dir = world_dir
c.model.update(dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, embed_scale=8.0))
c.data.update(dict(batch_size=16, free_batch_size=8, prefetch=0))
c.train.update(dict(steps=6, warmup_steps=2, log_every=1, ckpt_every=0, time_budget_s=0.0, lr=3e-3,
                    stages="warmup", stop_at_step=stop_at))  # one program: NCE over the global batch
c.eval.update(dict(modes=["imprag", "oracle"] if evaluate else [], limit=16, tasks=["qa", "fact_verification"],
                   k=[1, 5], pool=60, batch_size=8, max_new_tokens=4))  # a pool: index rows map to knowledge-source rows
res = train(c, workdir)
print("RESULT", json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                            "devices": jax.device_count(), "local": jax.local_device_count(),
                            "step": res["step"], "stopped_early": res["stopped_early"]}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMPRAG_COORDINATOR", "IMPRAG_NUM_PROCESSES",
                                                                    "IMPRAG_PROCESS_ID", "SLURM_", "TPU_WORKER"))}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", IMPRAG_ROOT=ROOT, IMPRAG_TEST_LOCAL_DEVICES=str(local_devices),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(world_dir, workdir, stop_at, processes: int, timeout=300, evaluate=False):
    """Run the child on `processes` processes sharing 8 devices; returns their RESULT dicts (process order).
    Output goes to files: a pipe that nobody reads while another process is waited for would fill up and
    block its writer in the middle of a collective."""
    local = 8 // processes
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        extra = {}
        if processes > 1:
            extra = dict(IMPRAG_COORDINATOR=f"127.0.0.1:{port}", IMPRAG_NUM_PROCESSES=processes, IMPRAG_PROCESS_ID=i)
        log = open(f"{workdir}.p{i}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, world_dir, workdir, str(stop_at),
                                       "eval" if evaluate else "train"],
                                      env=_env(local, **extra), stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for p, log in zip(procs, logs):
        log.seek(0)
        outs.append((p.returncode, log.read()))
        log.close()
    for rc, out in outs:
        if rc != 0:
            raise AssertionError(f"child failed ({rc}):\n{out[-6000:]}")
    return [json.loads(line[len("RESULT "):]) for _, out in outs for line in out.splitlines()
            if line.startswith("RESULT ")]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), steps  # one writer (process 0), one row per step
    return {r["step"]: (r["loss"], r["gen_nll"], r["ret_loss"], r["stage"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from imprag_jax.data.pipeline import prepare_records
    from imprag_jax.data.synthetic import World, WorldConfig, write_world

    d = str(tmp_path_factory.mktemp("world"))
    write_world(World.generate(WorldConfig(seed=0, n_people=200, n_letters=60, n_events=30)), d)
    prepare_records(d, ["qa", "format"], ["train"])  # before the processes start: they must not race on it
    return d


@pytest.fixture(scope="module")
def single_run(world_dir, tmp_path_factory):
    """The single-process 8-device run (6 steps, then the end-of-training evaluation): its workdir."""
    d = str(tmp_path_factory.mktemp("single") / "run")
    t0 = time.time()
    single = _run(world_dir, d, 0, processes=1, evaluate=True)
    assert single[0]["devices"] == 8 and single[0]["count"] == 1 and single[0]["step"] == 6
    print(f"\n[multiprocess] single 8-device run with evaluation {time.time() - t0:.0f}s")
    return d


def _eval_rows(workdir):
    with open(os.path.join(workdir, "eval", "final.json")) as f:
        return json.load(f)["eval"]


def test_two_processes_match_one_process_through_a_checkpoint(world_dir, single_run, tmp_path):
    t1 = time.time()
    mp = str(tmp_path / "multi")
    first = _run(world_dir, mp, 3, processes=2)
    assert [r["process"] for r in first] == [0, 1]
    assert all(r["count"] == 2 and r["devices"] == 8 and r["local"] == 4 for r in first)
    assert all(r["step"] == 3 and r["stopped_early"] is True for r in first)
    assert os.path.isdir(os.path.join(mp, "checkpoints", "3"))
    second = _run(world_dir, mp, 0, processes=2)  # restores step 3 on both processes, runs to the end
    assert all(r["step"] == 6 for r in second)
    t2 = time.time()

    a, b = _losses(single_run), _losses(mp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert {a[s][3] for s in a} == {"warmup"}  # in-batch negatives gathered across the two processes
    worst = 0.0
    for s in a:
        assert a[s][3] == b[s][3]
        for x, y in zip(a[s][:3], b[s][:3]):
            worst = max(worst, abs(x - y) / max(1.0, abs(x)))
    # the same programs on the same shards; only the cross-process reductions (gloo) may sum in another order
    assert worst < 1e-5, (worst, a, b)
    print(f"\n[multiprocess] 2x4 run + resume {t2 - t1:.0f}s, max relative loss difference {worst:.2e}")


def test_two_process_evaluation_matches_one_process(world_dir, single_run, tmp_path):
    """The final evaluation of the same weights (the single run's last checkpoint, restored by 2 processes that
    have no step left to train): the index on the global 8-device mesh, each process tokenizing and encoding the
    rows of its 4 devices, every example evaluated on both; process 0 writes final.json. Same rows as the
    single-process evaluation: EM / F1 / accuracy exactly, recall to float tolerance."""
    mp = str(tmp_path / "multi_eval")
    os.makedirs(mp)
    shutil.copytree(os.path.join(single_run, "checkpoints"), os.path.join(mp, "checkpoints"))
    t0 = time.time()
    res = _run(world_dir, mp, 0, processes=2, evaluate=True)
    assert [r["process"] for r in res] == [0, 1] and all(r["step"] == 6 and r["count"] == 2 for r in res)
    a, b = _eval_rows(single_run), _eval_rows(mp)
    assert [(r["task"], r["mode"], r["k"]) for r in a] == [(r["task"], r["mode"], r["k"]) for r in b]
    assert {(r["task"], r["mode"]) for r in a} == {(t, m) for t in ("qa", "fact_verification")
                                                  for m in ("imprag", "oracle")}
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y), (x, y)
        for key in x:
            if "recall" in key and x[key] is not None:
                assert abs(x[key] - y[key]) < 1e-6, (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)  # n, n_gold, em, f1, accuracy: exactly
    assert all(r["gold_recall@10"] is not None for r in a if r["mode"] == "imprag")
    # a 6-step model's answers and recall are near zero: the retriever itself is compared directly, on random
    # queries over the whole corpus (every process's copy of the result, against the single process's)
    one = json.load(open(os.path.join(single_run, "probe.p0.json")))
    for i in range(2):
        two = json.load(open(os.path.join(mp, f"probe.p{i}.json")))
        assert two["n"] == one["n"] > 300 and two["ids"] == one["ids"]
        assert two["tokens"] == one["tokens"] and two["mask"] == one["mask"]  # the passages read
        assert max(abs(x - y) for a_, b_ in zip(one["scores"], two["scores"]) for x, y in zip(a_, b_)) < 1e-5
    assert len({i for row in one["ids"] for i in row}) > 10  # not one ranking for every query
    with open(os.path.join(mp, "metrics.jsonl")) as f:
        evals = [json.loads(x) for x in f if '"eval/' in x]
    assert len(evals) == 1  # one writer
    print(f"\n[multiprocess] 2x4 evaluation of the single run's weights {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------------- launchers
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$STUB_LOG"
{extra}
"""


def _stubs(tmp_path, **bodies):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, extra in bodies.items():
        p = bin_dir / name
        p.write_text(STUB.format(extra=extra))
        p.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(tmp_path / "calls.log"))
    return env


def test_launch_scripts_print_usage():
    for script in ("tpu_pod.sh", "gpu_slurm.sh"):
        r = subprocess.run(["bash", os.path.join(ROOT, "launch", script)], capture_output=True, text=True)
        assert r.returncode == 2 and "usage:" in r.stderr


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
    env = _stubs(tmp_path, gcloud='[[ "$4" == describe ]] && echo "10.0.0.1;10.0.0.2" || echo "ran on a worker"')
    env.update(WORKDIR="/shared/run 1", LOG_DIR=str(tmp_path / "logs"))
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "my-tpu", "us-east5-a",
                        "configs/llama3_1_8b.py:v5p-32", "--config.train.steps=5"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any(" scp " in c and "--worker=all" in c and "--zone=us-east5-a" in c for c in calls)
    assert any("--worker=all" in c and "pip install -q -e '.[data]'" in c for c in calls)
    runs = [c for c in calls if "imprag_jax.train" in c]
    assert len(runs) == 2 and {c.split("--worker=")[1].split()[0] for c in runs} == {"0", "1"}
    for c in runs:
        assert ("python -m imprag_jax.train --distributed --config configs/llama3_1_8b.py:v5p-32 "
                "--workdir /shared/run\\ 1 --config.train.steps=5") in c
    assert sorted(os.listdir(tmp_path / "logs")) == ["worker0.log", "worker1.log"]


def test_gpu_slurm_script_starts_one_process_per_node(tmp_path):
    # srun runs its command once per task with that task's SLURM_PROCID; "python" records its environment
    env = _stubs(tmp_path,
                 scontrol='echo gpu-node-07; echo gpu-node-08',
                 srun='while [[ "$1" == --* ]]; do shift; done\n'
                      'for t in 0 1; do SLURM_PROCID=$t "$@"; done',
                 python='echo "env $IMPRAG_COORDINATOR $IMPRAG_NUM_PROCESSES $IMPRAG_PROCESS_ID" >> "$STUB_LOG"')
    env.update(WORKDIR="/shared/run", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2", SLURM_JOB_ID="42",
               LOG_DIR=str(tmp_path / "logs"))
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sh"), "configs/llama3_2_3b.py:gpu8",
                        "--config.mesh.data=2"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    py = [c for c in calls if c.startswith("python ")]
    assert py == ["python -m imprag_jax.train --distributed --config configs/llama3_2_3b.py:gpu8 "
                  "--workdir /shared/run --config.mesh.data=2"] * 2
    assert [c for c in calls if c.startswith("env ")] == ["env gpu-node-07:12355 2 0", "env gpu-node-07:12355 2 1"]
