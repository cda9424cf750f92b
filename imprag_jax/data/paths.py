"""The one path layer of a prepared data folder: every read of a folder's files (``passages.jsonl``, the task and
pseudo-label files, ``stats.json``, ``world.json``, ``tokenizer.json``, ``tfds/location``) goes through here, so
``data.dir`` may be a bucket path (``gs://bucket/minikilt``).

A local path (no ``scheme://``; ``file://`` is stripped) goes straight to ``os`` / ``open`` / ``glob``, exactly as
before: nothing is imported and nothing is slower. Any other path goes through ``etils.epath.Path`` (installed with
tensorflow-datasets), which reads ``gs://`` with ``gcsfs`` (or TensorFlow's ``tf.io.gfile`` where TensorFlow is
installed, which imprag_jax never needs); without one, the first read raises `StorageError` (an ``ImportError``)
whose one line says what to install. A non-local directory that a library needs on disk (a tokenizer directory:
Hugging Face tokenizers read local files only) is copied once into a local cache (`local_copy`).

Writing (records, the TFDS dataset, a generated world) stays local: a folder at a bucket path is prepared locally
and copied there; the pipeline then reads its task splits through its TFDS dataset (``tfds/imprag_kilt/...``),
whose record files the ArrayRecord reader opens by their ``gs://`` names itself (its own GCS reader).
"""
from __future__ import annotations

import glob as _glob
import hashlib
import os
from typing import IO, Optional

INSTALL = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


class StorageError(ImportError):
    """A non-local path whose storage client is not installed."""


def is_local(path) -> bool:
    """True for a plain path or a ``file://`` URL; False for ``gs://...`` and every other ``scheme://``."""
    s = os.fspath(path) if not isinstance(path, str) else path
    return "://" not in s or s.startswith("file://")


def _local(path) -> str:
    s = os.fspath(path)
    return s[len("file://"):] if s.startswith("file://") else s


def epath(path):
    """``etils.epath.Path`` of a non-local path."""
    from etils import epath as E

    return E.Path(os.fspath(path))


def _remote(fn, path, *args):
    """``fn(epath(path), *args)``, with a missing storage client as a one-line `StorageError`."""
    s = os.fspath(path)
    scheme = s.split("://", 1)[0]
    try:
        p = epath(s)
    except ImportError:
        raise StorageError(f"reading {s} needs etils.epath (pip install tensorflow-datasets)") from None
    except KeyError:  # no path class registered for the scheme
        raise StorageError(f"cannot read {s}: etils.epath has no reader for {scheme}:// (it reads gs://, s3://, "
                           "az://, hf://)") from None
    try:
        return fn(p, *args)
    except StorageError:
        raise
    except ImportError as e:
        pkg = INSTALL.get(scheme, f"the fsspec client of {scheme}://")
        raise StorageError(f"reading {s} needs {pkg} (pip install {pkg}): {str(e).strip().splitlines()[0]}") from None


def join(path, *parts: str) -> str:
    """``os.path.join`` for a local path; ``path/part/...`` (as a string) for a bucket path."""
    if is_local(path):
        return os.path.join(_local(path), *parts)
    s = os.fspath(path).rstrip("/")
    return "/".join([s, *(p.strip("/") for p in parts)])


def exists(path) -> bool:
    return os.path.exists(_local(path)) if is_local(path) else _remote(lambda p: p.exists(), path)


def isdir(path) -> bool:
    return os.path.isdir(_local(path)) if is_local(path) else _remote(lambda p: p.is_dir(), path)


def glob(folder, pattern: str) -> list:
    """Sorted paths (strings) in ``folder`` that match ``pattern`` (``*.jsonl``, ``sub/*/x.json``)."""
    if is_local(folder):
        return sorted(_glob.glob(os.path.join(_local(folder), pattern)))
    base, root = os.fspath(folder).rstrip("/"), str(epath(folder)).rstrip("/")
    found = _remote(lambda p: [str(x) for x in p.glob(pattern)], folder)
    return sorted(base + x[len(root):] for x in found if x.startswith(root + "/"))


def open(path, mode: str = "r", encoding: Optional[str] = None, newline: Optional[str] = None) -> IO:  # noqa: A001
    """The builtin ``open`` for a local path; ``epath.Path.open`` (text: UTF-8) otherwise."""
    import builtins

    if is_local(path):
        return builtins.open(_local(path), mode, encoding=encoding, newline=newline)
    mode = mode.replace("t", "")  # epath's modes: r, w, a (+ b); no newline= (bucket files are only read)
    if "b" in mode:
        return _remote(lambda p: p.open(mode), path)
    return _remote(lambda p: p.open(mode, encoding=encoding or "utf-8"), path)


def getmtime(path) -> Optional[float]:
    """Modification time of a local file; None for a bucket path (freshness checks are local only)."""
    return os.path.getmtime(_local(path)) if is_local(path) else None


def cache_root() -> str:
    """``$IMPRAG_CACHE``, else ``~/.cache/imprag_jax`` (the cache of `imprag_jax.convert.fetch`)."""
    return os.environ.get("IMPRAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imprag_jax")


def local_copy(path, names: Optional[tuple] = None) -> str:
    """A local path with the contents of ``path``: the path itself when local; for a bucket path (a file, or a
    directory's files -- only ``names`` when given, those that exist), a copy in ``{cache_root}/remote/<hash>/``,
    written once per bucket path (a changed bucket file needs the cache entry deleted)."""
    if is_local(path):
        return _local(path)
    s = os.fspath(path).rstrip("/")
    out = os.path.join(cache_root(), "remote", hashlib.sha256(s.encode()).hexdigest()[:16])
    done = os.path.join(out, ".complete")
    src = epath(s)
    is_dir = _remote(lambda p: p.is_dir(), s)
    target = out if is_dir else os.path.join(out, src.name)
    if os.path.exists(done):
        return target
    os.makedirs(out, exist_ok=True)
    files = ([x for x in _remote(lambda p: list(p.iterdir()), s) if not x.is_dir()
              and (names is None or x.name in names)] if is_dir else [src])
    for f in files:
        tmp = os.path.join(out, f".{f.name}.tmp{os.getpid()}")
        with _remote(lambda p: p.open("rb"), f) as r, _builtin_open(tmp, "wb") as w:
            while True:
                chunk = r.read(1 << 22)
                if not chunk:
                    break
                w.write(chunk)
        os.replace(tmp, os.path.join(out, f.name))
    with _builtin_open(done, "w") as w:
        w.write(s + "\n")
    return target


def _builtin_open(*a, **kw):
    import builtins

    return builtins.open(*a, **kw)


__all__ = ["StorageError", "is_local", "epath", "join", "exists", "isdir", "glob", "open", "getmtime",
           "cache_root", "local_copy"]
