"""Multi-process start-up: `jax.distributed.initialize()` when this is one of several processes."""
import os

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "IMPRAG_NUM_PROCESSES")


def wants_distributed() -> bool:
    if os.environ.get("SLURM_NTASKS") and int(os.environ["SLURM_NTASKS"]) <= 1:
        return False
    if os.environ.get("TPU_WORKER_HOSTNAMES"):
        return len(os.environ["TPU_WORKER_HOSTNAMES"].split(",")) > 1
    return any(os.environ.get(k) for k in _ENV_HINTS)


def maybe_initialize(flag=None):
    """Initialise the multi-process runtime when asked (flag) or when the environment says so (flag None)."""
    if flag is False or (flag is None and not wants_distributed()):
        return False
    import jax

    kw = {}
    if os.environ.get("IMPRAG_COORDINATOR"):
        missing = [k for k in ("IMPRAG_NUM_PROCESSES", "IMPRAG_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise SystemExit(f"IMPRAG_COORDINATOR is set but {', '.join(missing)} is not: every process needs "
                             "IMPRAG_COORDINATOR=host:port, IMPRAG_NUM_PROCESSES=n and its own IMPRAG_PROCESS_ID")
        kw = dict(coordinator_address=os.environ["IMPRAG_COORDINATOR"],
                  num_processes=int(os.environ["IMPRAG_NUM_PROCESSES"]),
                  process_id=int(os.environ["IMPRAG_PROCESS_ID"]))
    jax.distributed.initialize(**kw)
    return True
