"""Multi-process training on one machine: 2 processes x 4 CPU devices over one global 8-device mesh give the
losses of the single-process 8-device run, through an orbax save and a resumed run (train.stop_at_step); the
end-of-training evaluation of the same weights on 2 processes (index on the global mesh, each process encoding
its rows) gives the single-process run's rows, and so does `python -m imprag_jax.evaluate` on 2 processes (recall
mode included); negatives mined from the model's own index (each process encoding its share at every refresh)
give the single-process run's index and losses, and a 2-process run stopped between refreshes and resumed equals
the uninterrupted one."""
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
train_kw = json.loads(sys.argv[5])  # more train.* settings (mined candidates)
c = synthetic.get_config()
c.data.dir = world_dir
c.model.update(dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, embed_scale=8.0))
c.data.update(dict(batch_size=16, free_batch_size=8, prefetch=0))
c.train.update(dict(steps=6, warmup_steps=2, log_every=1, ckpt_every=0, time_budget_s=0.0, lr=3e-3,
                    stages="warmup", stop_at_step=stop_at))  # one program: NCE over the global batch
c.train.update(train_kw)
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


def _start(argv, processes: int, log_prefix: str, **extra_env):
    """Start `argv` on `processes` processes sharing 8 CPU devices (the IMPRAG_* variables the launch scripts set);
    (processes, their log files). Output goes to files: a pipe that nobody reads while another process is waited
    for would fill up and block its writer in the middle of a collective."""
    local = 8 // processes
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        extra = dict(extra_env)
        if processes > 1:
            extra.update(IMPRAG_COORDINATOR=f"127.0.0.1:{port}", IMPRAG_NUM_PROCESSES=processes, IMPRAG_PROCESS_ID=i)
        log = open(f"{log_prefix}.p{i}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=_env(local, **extra), stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs, logs


def _wait(procs, logs, timeout):
    """[(return code, output)] of every process, in order (all killed at the deadline)."""
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
    return outs


def _run(world_dir, workdir, stop_at, processes: int, timeout=300, evaluate=False, **train_kw):
    """Run the child on `processes` processes sharing 8 devices; returns their RESULT dicts (process order)."""
    procs, logs = _start([sys.executable, "-c", CHILD, world_dir, workdir, str(stop_at),
                          "eval" if evaluate else "train", json.dumps(train_kw)], processes, workdir)
    outs = _wait(procs, logs, timeout)
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
        top = max(abs(x) for row in one["scores"] for x in row)
        diff = max(abs(x - y) for a_, b_ in zip(one["scores"], two["scores"]) for x, y in zip(a_, b_))
        print(f"\n[multiprocess] probe scores up to {top:.3g}, largest difference {diff:.3g}")
        # the index holds bf16 E_p: an fp32 value encoded on the other mesh may round to the neighbouring bf16
        # value (as in training's refresh), moving a score by ~3e-5 of the largest (measured 1.6e-4 at 5.6)
        assert diff < 1e-4 * max(1.0, top), (diff, top)
    assert len({i for row in one["ids"] for i in row}) > 10  # not one ranking for every query
    with open(os.path.join(mp, "metrics.jsonl")) as f:
        evals = [json.loads(x) for x in f if '"eval/' in x]
    assert len(evals) == 1  # one writer
    print(f"\n[multiprocess] 2x4 evaluation of the single run's weights {time.time() - t0:.0f}s")


def _evaluate_cli(workdir, out, processes: int, *flags, timeout=300):
    """`python -m imprag_jax.evaluate` on `processes` processes (8 CPU devices in all): the outputs per process."""
    argv = [sys.executable, "-m", "imprag_jax.evaluate", f"--workdir={workdir}", f"--out={out}", *flags]
    procs, logs = _start(argv, processes, out, JAX_NUM_CPU_DEVICES=8 // processes)
    outs = _wait(procs, logs, timeout)
    for rc, text in outs:
        if rc != 0:
            raise AssertionError(f"evaluate failed ({rc}):\n{text[-6000:]}")
    return [text for _, text in outs]


def test_evaluate_cli_on_two_processes_matches_one_process(single_run, tmp_path):
    """`python -m imprag_jax.evaluate` started on 2 processes (IMPRAG_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
    as the launch scripts set them) evaluates the single run's checkpoint with the index on the global mesh (each
    process encoding its share of the pool, also for the retrieval-only recall modes) and process 0 alone writes
    the report: its rows equal those of the same command on one process."""
    flags = ["--tasks=qa,fact_verification", "--modes=recall,bm25_recall,imprag,oracle", "--k=1,5", "--limit=16",
             "--noplot", "--predictions"]
    t0 = time.time()
    one = _evaluate_cli(single_run, str(tmp_path / "one"), 1, *flags)
    t1 = time.time()
    two = _evaluate_cli(single_run, str(tmp_path / "two"), 2, *flags)
    t2 = time.time()
    assert "wrote " in one[0] and "wrote " in two[0] and "(2 processes)" in two[0]
    assert "wrote " not in two[1]  # process 1 prints no report and writes nothing
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one")) == \
        ["predictions.jsonl", "report.json", "report.md"]
    a = json.load(open(tmp_path / "one" / "report.json"))["rows"]
    b = json.load(open(tmp_path / "two" / "report.json"))["rows"]
    assert [(r["task"], r["mode"], r["k"]) for r in a] == [(r["task"], r["mode"], r["k"]) for r in b]
    assert {(r["task"], r["mode"]) for r in a} == {(t, m) for t in ("qa", "fact_verification")
                                                  for m in ("recall", "bm25_recall", "imprag", "oracle")}
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y), (x, y)
        for key in x:
            if key == "seconds":
                continue
            if "recall" in key and x[key] is not None:
                assert abs(x[key] - y[key]) < 1e-6, (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)  # n, n_gold, pool, em, f1, accuracy: exactly
    rec = [r for r in a if r["mode"] == "recall"]
    assert all(r["pool"] == 60 and r["gold_recall@20"] is not None for r in rec)
    assert any(r["gold_recall@20"] > 0 for r in rec)  # 20 of 60 passages: not all-zero recall on both sides
    pa = (tmp_path / "one" / "predictions.jsonl").read_text()
    pb = (tmp_path / "two" / "predictions.jsonl").read_text()
    assert pa == pb and pa
    print(f"\n[multiprocess] evaluate CLI: 1 process {t1 - t0:.0f}s, 2 processes {t2 - t1:.0f}s")


def test_evaluate_cli_multi_process_user_errors_are_one_line(single_run, tmp_path):
    """What a multi-process evaluation cannot do is a one-line error (exit code 2) on every process, before the
    checkpoint is read: a passage K/V store, the host ScaNN backend."""
    for flag, words in (("--kv_store=" + str(tmp_path), "single-process"), ("--backend=scann", "device backend")):
        argv = [sys.executable, "-m", "imprag_jax.evaluate", f"--workdir={single_run}", "--modes=imprag", flag]
        outs = _wait(*_start(argv, 2, str(tmp_path / flag[2:6]), JAX_NUM_CPU_DEVICES=4), 120)
        for rc, text in outs:
            assert rc == 2 and words in text and "Traceback" not in text, text[-3000:]


def test_train_multi_process_scann_mining_is_a_one_line_config_error(tmp_path):
    """Mining with the host ScaNN searcher needs one host's copy of the whole index: with several processes it is a
    config error (exit code 2, no traceback) before any data or model work, on every process."""
    argv = [sys.executable, "-m", "imprag_jax.train", "--config", os.path.join(ROOT, "configs", "synthetic.py"),
            "--workdir", str(tmp_path / "run"), "--config.train.candidates=mixed", "--config.train.index_backend=scann"]
    for rc, text in _wait(*_start(argv, 2, str(tmp_path / "scann"), JAX_NUM_CPU_DEVICES=4), 120):
        assert rc == 2 and "config error: train.index_backend='scann'" in text and "multi-process" in text, text
        assert "Traceback" not in text
    assert not os.path.exists(tmp_path / "run")  # nothing left behind


MINED = dict(candidates="mixed", index_negatives=2, refresh_every=2)  # refreshes at steps 0, 2 and 4 of 6


def _ckpt_index(workdir, step):
    """(embeddings [n, D] float32, index metadata) saved with checkpoint `step`."""
    import jax
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from imprag_jax import run as R

    ck = R.Checkpoints(workdir, 10)
    try:
        import orbax.checkpoint as ocp

        meta = ck.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["index"]
        emb, info = ck.restore_index(step, jax.ShapeDtypeStruct((meta["num_padded"], meta["d"]), np.float32,
                                                                sharding=SingleDeviceSharding(jax.devices()[0])))
    finally:
        ck.close()
    return np.asarray(emb, np.float32)[: info["n"]], info


@pytest.fixture(scope="module")
def mined_runs(world_dir, tmp_path_factory):
    """Negatives mined from the model's own index: the single-process 8-device run and the 2-process run (each
    process tokenizing and encoding its share of the corpus at every refresh), 6 steps each: their workdirs."""
    base = tmp_path_factory.mktemp("mined")
    t0 = time.time()
    one = str(base / "one")
    assert _run(world_dir, one, 0, processes=1, **MINED)[0]["step"] == 6
    t1 = time.time()
    two = str(base / "two")
    assert [r["step"] for r in _run(world_dir, two, 0, processes=2, **MINED)] == [6, 6]
    print(f"\n[multiprocess] mined candidates: 1 process {t1 - t0:.0f}s, 2 processes {time.time() - t1:.0f}s")
    return one, two


def test_two_process_index_refresh_matches_one_process(mined_runs):
    """The index the 2-process run mines from (the refresh of step 4, saved with the last checkpoint) equals the
    single process's, and so do the losses of every step (mined negatives in every step after the first refresh)."""
    import numpy as np

    one, two = mined_runs
    (ea, ia), (eb, ib) = _ckpt_index(one, 6), _ckpt_index(two, 6)
    assert ia["step"] == ib["step"] == 4 and ia["n"] == ib["n"] > 300 and ia["config_hash"] == ib["config_hash"]
    assert np.abs(ea).sum() > 0
    # bf16 embeddings of parameters within 1e-5 of each other: equal but for rare differences in the last bits
    np.testing.assert_allclose(ea, eb, rtol=2 ** -6, atol=1e-6)
    assert (ea != eb).mean() < 1e-2, (ea != eb).sum()
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    worst = max(abs(x - y) / max(1.0, abs(x)) for s in a for x, y in zip(a[s][:3], b[s][:3]))
    assert worst < 1e-5, (worst, a, b)
    rows = [json.loads(x) for x in open(os.path.join(two, "metrics.jsonl"))]
    assert all(r["mined_per_example"] > 1.5 for r in rows if "mined_per_example" in r)
    assert sum("mined_per_example" in r for r in rows) == 6


def test_two_process_resume_between_refreshes_equals_the_uninterrupted_run(world_dir, mined_runs, tmp_path):
    """2 processes stopped at step 3 (index of step 2 in the checkpoint, restored with each process's own token
    rows) and resumed: the losses, the final parameters and the final index equal the uninterrupted 2-process
    run's exactly."""
    import numpy as np

    from imprag_jax import run as R

    _, two = mined_runs
    d = str(tmp_path / "resumed")
    t0 = time.time()
    assert all(r["step"] == 3 and r["stopped_early"] for r in _run(world_dir, d, 3, processes=2, **MINED))
    assert _ckpt_index(d, 3)[1]["step"] == 2
    assert [r["step"] for r in _run(world_dir, d, 0, processes=2, **MINED)] == [6, 6]
    a, b = _losses(two), _losses(d)
    assert a == b, (a, b)
    pa, sa, _ = R.restore_params(two)
    pb, sb, _ = R.restore_params(d)
    assert sa == sb == 6
    import jax

    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    np.testing.assert_array_equal(_ckpt_index(two, 6)[0], _ckpt_index(d, 6)[0])
    print(f"\n[multiprocess] 2 processes stopped at 3 and resumed {time.time() - t0:.0f}s")


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


def test_launch_scripts_start_the_evaluation_with_entry_evaluate(tmp_path):
    """ENTRY=evaluate: the same processes and coordinator variables, `python -m imprag_jax.evaluate` in place of the
    trainer (test_evaluate_cli_on_two_processes_matches_one_process runs that command on 2 processes)."""
    env = _stubs(tmp_path, scontrol='echo gpu-node-07; echo gpu-node-08',
                 srun='while [[ "$1" == --* ]]; do shift; done\nfor t in 0 1; do SLURM_PROCID=$t "$@"; done',
                 python='echo "env $IMPRAG_COORDINATOR $IMPRAG_NUM_PROCESSES $IMPRAG_PROCESS_ID" >> "$STUB_LOG"',
                 gcloud='[[ "$4" == describe ]] && echo "10.0.0.1;10.0.0.2" || echo "ran on a worker"')
    env.update(WORKDIR="/shared/run", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2", SLURM_JOB_ID="42",
               LOG_DIR=str(tmp_path / "logs"), ENTRY="evaluate")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sh"), "configs/llama3_2_3b.py:gpu8",
                        "--config.mesh.data=2", "--tasks=nq,squad"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c for c in calls if c.startswith("python ")] == [
        "python -m imprag_jax.evaluate --distributed --config configs/llama3_2_3b.py:gpu8 --workdir /shared/run "
        "--config.mesh.data=2 --tasks=nq,squad"] * 2
    assert [c for c in calls if c.startswith("env ")] == ["env gpu-node-07:12355 2 0", "env gpu-node-07:12355 2 1"]
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "my-tpu", "us-east5-a",
                        "configs/llama3_1_8b.py:v5p-32", "--tasks=nq"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    runs = [c for c in (tmp_path / "calls.log").read_text().splitlines() if "python -m imprag_jax." in c
            and c.startswith("gcloud")]
    assert len(runs) == 2 and all("python -m imprag_jax.evaluate --distributed --config configs/llama3_1_8b.py:v5p-32 "
                                  "--workdir /shared/run --tasks=nq" in c for c in runs)
    env["ENTRY"] = "export"
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sh"), "configs/x.py"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ENTRY must be train or evaluate" in r.stderr
