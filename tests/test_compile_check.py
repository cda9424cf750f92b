"""compile_check: the train step of a small config compiles on 8 fake devices with abstract parameters, and the
memory analysis it prints agrees with the arithmetic (arguments = sharded parameters + AdamW state + batch)."""
import json
import os
import subprocess
import sys


from conftest import ROOT


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "imprag_jax.compile_check"] + args, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_config_on_8_fake_devices(tmp_path):
    out = str(tmp_path / "rep.json")
    # the llama3 smoke structure (GQA 6/2, llama3 rope, tied, b/t) on a (data 2, fsdp 2, tensor 2) mesh
    r = _run(["--config", "configs/llama3_2_3b.py:smoke", "--devices", "8", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--batch", "8", "--json", out])
    assert r.returncode == 0, r.stderr[-4000:]
    rep = json.load(open(out))
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert rep["backend"] == "cpu"
    ar = rep["arithmetic"]
    P = rep["model"]["params"]
    # every big tensor is split over fsdp x tensor = 4; the replicated norm scales add a little
    assert ar["param_shards"] == 4
    assert ar["param_bytes_formula"] <= ar["param_bytes"] <= 1.1 * ar["param_bytes_formula"]
    assert abs(ar["opt_bytes"] - 2 * ar["param_bytes"]) <= 64  # mu + nu (+ counters)
    assert ar["param_bytes_formula"] == 4.0 * P / 4
    for stage in ("warmup", "distill"):
        st = rep["stages"][stage]
        mem = st["memory"]
        # XLA's argument buffers are exactly the sharded state + batch + the ramp scalar
        assert st["argument_minus_arithmetic"] == 0, st
        # the state is donated: the new state aliases the old one
        assert mem["alias"] >= ar["param_bytes"] + ar["opt_bytes"]
        assert mem["temp"] > 0 and st["peak_bytes"] >= mem["argument"] + mem["temp"]
        est = st["temp_estimate"]["total"]
        assert 0.2 * mem["temp"] < est < 5 * mem["temp"], (est, mem["temp"])
    assert "distill" in r.stdout and "peak" in r.stdout


def test_mesh_that_does_not_match_the_devices_is_a_clean_error():
    r = _run(["--config", "configs/llama3_2_3b.py:gpu8", "--devices", "4", "--stages", "warmup"], timeout=120)
    assert r.returncode == 2
    assert "did you start every host?" in r.stderr and "Traceback" not in r.stderr
