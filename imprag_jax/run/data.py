"""A run's data folder: where it is, and (for training) making it: the synthetic world is generated and the
mini-KILT prepared on first use, by function calls into `imprag_jax.data`."""
from __future__ import annotations

import json
import os

from ..data import paths
from ..model import ConfigError
from .config import RunError

KINDS = ("synthetic", "prepared", "minikilt")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fail(msg):
    raise ConfigError(msg)


def data_dir_path(c, workdir: str) -> str:
    """Where the run's data lives: data.dir, else <workdir>/data (generated worlds and prepared mini-KILTs live
    there). Nothing is checked."""
    return c.data.dir or os.path.join(workdir, "data")


def existing_data_dir(c, workdir: str) -> str:
    """The run's prepared data folder, for evaluation and inference (never generated here)."""
    d = data_dir_path(c, workdir)
    try:
        have = paths.exists(paths.join(d, "passages.jsonl"))
    except paths.StorageError as e:
        raise RunError(f"data.dir={d!r}: {e}") from None
    if not have:
        raise RunError(f"the run's data folder {d!r} has no passages.jsonl (set --config.data.dir)")
    return d


def training_data_dir(c, workdir: str) -> str:
    """The prepared data directory of a training run; for the synthetic world and the mini-KILT it is generated
    (prepared) on first use, in <workdir>/data or in an explicit data.dir that exists (a data.dir that does not
    exist is a typo, not a place to create). ConfigError for what the config gets wrong."""
    kind = c.data.kind
    if kind not in KINDS:
        _fail(f"data.kind must be synthetic, minikilt or prepared, got {kind!r}")
    d = data_dir_path(c, workdir) if kind in ("synthetic", "minikilt") else c.data.dir
    try:
        have = paths.exists(paths.join(d, "passages.jsonl")) if d else False
    except paths.StorageError as e:
        _fail(f"data.dir={d!r}: {e}")
    if c.data.dir and kind in ("synthetic", "minikilt") and not have and not os.path.isdir(c.data.dir):
        if kind == "synthetic":
            _fail(f"data.dir={c.data.dir} does not exist; leave data.dir empty to generate the synthetic world in "
                  f"{os.path.join(workdir, 'data')}, or create it with python -m imprag_jax.data.synthetic --out DIR")
        _fail(f"data.dir={c.data.dir} does not exist; leave data.dir empty to prepare the mini-KILT in "
              f"{os.path.join(workdir, 'data')}, or prepare it with python -m imprag_jax.data.prepare --source "
              f"{c.data.source} --out DIR")
    if kind == "prepared":
        if not d or not have:
            _fail(f"data.dir={d!r} is not a prepared data directory (no passages.jsonl); run "
                  "`python -m imprag_jax.data.prepare --source ../shared/data --out DIR` first")
        return d
    if kind == "minikilt":
        if not have:
            prepare_minikilt_dir(c, d)
        return d
    if not have:
        generate_world(c, d)
    else:
        check_world(c, d)
    return d


def _world_request(c) -> dict:
    return dict(seed=c.data.world_seed, n_people=c.data.people, qa_templates=c.data.qa_templates)


def generate_world(c, d: str) -> None:
    from ..data.synthetic import World, WorldConfig, write_world

    print(f"[data] generating the synthetic world (seed {c.data.world_seed}, {c.data.people} people) in {d}",
          flush=True)
    try:
        wcfg = WorldConfig(**_world_request(c))
    except ValueError as e:
        _fail(f"data: {e}")
    write_world(World.generate(wcfg), d, show_progress=True)


def check_world(c, d: str) -> None:
    """An existing world must be the one the config asks for: the seed and the question phrasings decide what a
    run trains on; another size than data.people is allowed (tests and quick runs point data.dir at small
    worlds)."""
    path = paths.join(d, "world.json")
    if not paths.exists(path):
        return
    want = _world_request(c)
    with paths.open(path) as f:
        have = json.load(f).get("config", {})
    diff = {k: (have[k], want[k]) for k in ("seed", "qa_templates") if k in have and have[k] != want[k]}
    if diff:
        _fail(f"data.dir={d} holds a synthetic world generated with "
              + ", ".join(f"{k}={a}" for k, (a, _) in diff.items()) + " but the config asks for "
              + ", ".join(f"{k}={b}" for k, (_, b) in diff.items()) + "; use another data.dir")


def prepare_minikilt_dir(c, d: str) -> None:
    """Prepare the mini-KILT from data.source (relative to the repository) into `d`, as
    `python -m imprag_jax.data.prepare --source SRC --out D --seed SEED` does."""
    from .. import cli
    from ..data.prepare import DataError, prepare_minikilt, stats_markdown

    src = c.data.source
    if not os.path.isabs(src):
        src = os.path.join(_REPO, src)
    if not os.path.isdir(src):
        _fail(f"data.source={c.data.source!r} (resolved to {src}) is not a folder with the original data files")
    print(f"[data] preparing the mini-KILT from {src} into {d}", flush=True)
    try:
        with cli.remove_if_unused(d):
            stats = prepare_minikilt(src, d, seed=int(c.seed), show_progress=cli.stderr_is_terminal())
    except (DataError, FileNotFoundError, ImportError) as e:
        _fail(f"data.source={c.data.source!r}: {cli.first_line(e)}")
    print(stats_markdown(stats), flush=True)
