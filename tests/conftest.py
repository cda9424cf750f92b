import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("IMPRAG_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def run_with_devices(code: str, n: int = 8, timeout: int = 300) -> str:
    """Run `code` in a fresh Python with `n` fake CPU devices (the device count is fixed at JAX start-up)."""
    import subprocess

    env = dict(os.environ)
    # The n device threads meet at every collective; XLA aborts the process when one arrives more than 40 s late,
    # which a loaded 2-core machine can cause (seen once in a full-suite run): wait up to 10 minutes instead.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"subprocess failed ({r.returncode}):\nSTDOUT:\n{r.stdout[-4000:]}\nSTDERR:\n{r.stderr[-6000:]}")
    return r.stdout


def _memory_map_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _memory_map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


@pytest.fixture(autouse=True)
def _bounded_compile_caches():
    """Every op run eagerly (jax.grad of an unjitted loss compiles each primitive on its own) keeps its compiled
    code in JAX's caches, a few memory maps each, for the life of the process (measured: 2,500 -> 24,000 maps in
    test_train's eager-gradient tests; 25,000 small jitted functions in a loop stayed at ~560). One pytest process
    running the whole suite reached Linux's limit on memory maps per process (vm.max_map_count, 65,530 by default)
    and XLA crashed in the next compile ("LLVM compilation error: Cannot allocate memory", then SIGSEGV: reproduced
    in a script of eager ops with the limit lowered to 8,000). After any test that leaves more than a quarter of the
    limit, drop the caches: later tests recompile what they need, nothing else changes."""
    yield
    limit = _memory_map_limit()
    if limit and _memory_map_count() > limit // 4:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set IMPRAG_SHARED_DATA)")
    return SHARED_DATA


def config_module(name: str):
    """The module configs.<name> (configs/ is a package; pytest runs from the repository root), e.g.
    config_module("synthetic").get_config("smoke")."""
    import importlib

    return importlib.import_module(f"configs.{name}")


def load_config(spec: str):
    """configs/<file>.py[:arg] -> its locked ConfigDict, loaded by file path as --config does."""
    from imprag_jax import cli

    return cli.load_config_file(os.path.join(ROOT, "configs", spec))


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """A small synthetic world (200 people), generated once per session; tests only read it (the record files
    the pipeline caches in it are the same for every reader)."""
    from imprag_jax.data.synthetic import World, WorldConfig, write_world

    d = str(tmp_path_factory.mktemp("world"))
    write_world(World.generate(WorldConfig(seed=0, n_people=200, n_letters=60, n_events=30)), d)
    return d


def pytest_collection_modifyitems(config, items):
    """A test that asks for the real data folder is a `data` test (markers are registered in pytest.ini)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


# The start of a subprocess script (`run_with_devices`) on a tiny model of the synthetic config over the world at
# "WORLD" (replace it with the folder): `c`, `tok`, `cfg`; the script sets the batch sizes it needs.
TINY_SYNTHETIC = r"""
import dataclasses, sys, jax, jax.numpy as jnp, numpy as np
from configs import synthetic
from imprag_jax import run
from imprag_jax.data.pipeline import TrainBatches, corpus_tokens, load_tokenizer
from imprag_jax.model.sharding import make_mesh
from imprag_jax.train import config_lib
from imprag_jax.train.state import compile_step, create_state
from imprag_jax.train.step import make_optimizer, step_keys
assert jax.device_count() == 8
c = synthetic.get_config()
c.data.dir = "WORLD"
c.model.update(dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, embed_scale=8.0))
tok = load_tokenizer("WORLD")
cfg = run.model_config(c, tok.vocab_size)
"""
