"""The prepared tasks and knowledge source as a TensorFlow Datasets (TFDS) dataset, written as ArrayRecord files
and read back with random access (``as_data_source``, what ``tfds.data_source`` returns) -- no TensorFlow needed.

A prepared data folder (`imprag_jax.data.prepare`, `imprag_jax.data.synthetic`) holds ``passages.jsonl``,
``tasks/{task}.{split}.jsonl`` and ``pseudo_labels/``. `build(data_dir)` (what ``data.prepare`` runs by default,
unless ``--no_tfds``; the synthetic world is written without it) turns it into the TFDS dataset
``imprag_kilt`` under ``{data_dir}/tfds/imprag_kilt/{VERSION}/`` (``dataset_info.json``, ``features.json`` and one
``imprag_kilt-{split}.array_record-*`` file set per split). Splits:

    {task}__{split}   one JSON record per example, in task-file order: exactly the bytes
                      `imprag_jax.data.records.iter_task_records` yields (and ``records/*.array_record`` holds)
    passages          the lines of ``passages.jsonl`` (the knowledge source), in file order

Every split has one feature, ``record`` (``tfds.features.Text``; read back as UTF-8 bytes). Shuffling is off
(``DatasetInfo(disable_shuffling=True)``): record ``i`` of a split is row ``i`` of its file, which the batch
pipeline relies on. `imprag_jax.data.pipeline` reads a folder's task splits through this dataset when
`find_dataset` finds one there (or a ``tfds/location`` file names one elsewhere, `set_location`), else through the
``records/`` files; the batches are the same bit for bit. A local dataset older than the folder's task,
pseudo-label or passage files is refused (`check_fresh`): rebuild it.

`task_source` / `passage_source` / `open_dataset` take the dataset folder as a local path, a ``file://`` URL or
a bucket path (``gs://...``; reading one needs ``gcsfs``, through ``etils.epath``); `find_dataset` reads a folder
at a bucket path through `imprag_jax.data.paths` (its dataset is then a bucket path too). Writing (`build`, local
only) and reading use TFDS's ArrayRecord path, which imports no TensorFlow.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Optional

from imprag_jax.data import paths

NAME = "imprag_kilt"
PASSAGES_SPLIT = "passages"


def split_name(task: str, split: str) -> str:
    """TFDS split name of a task split (TFDS split names are ``[A-Za-z0-9_-]+``)."""
    name = f"{task}__{split}"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"task split {task}.{split} has no valid TFDS split name ({name!r})")
    return name


def _builder_class():
    import tensorflow_datasets as tfds

    from imprag_jax.data import records as P

    class ImpragKilt(tfds.core.GeneratorBasedBuilder):
        """Prepared ImpRAG task splits (one JSON record per example) and the knowledge source."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Task splits as pipeline records (records version "
                                  f"{P.RECORDS_VERSION}) and passages.jsonl."}

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # No code folder: TFDS looks there for download checksums (this builder downloads nothing), and
            # resolving it for a class inside a package needs `importlib_resources`, which is not installed.
            return None

        def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
            self._source_dir = source_dir
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=__doc__.split("\n\n")[0],
                features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
                disable_shuffling=True,  # written in key order: record i of a split is row i of its file
                metadata=tfds.core.MetadataDict(records_version=P.RECORDS_VERSION))

        def _split_generators(self, dl_manager):
            if self._source_dir is None:
                raise ValueError(f"{NAME}: build it with imprag_jax.data.tfds_kilt.build(data_dir)")
            rows = P._passage_rows(self._source_dir)[1]
            gens = {PASSAGES_SPLIT: self._generate_examples()}
            for task, split, _ in P._task_splits(self._source_dir):
                gens[split_name(task, split)] = self._generate_examples(task, split, rows)
            return gens

        def _generate_examples(self, task: Optional[str] = None, split: Optional[str] = None,
                               rows: Optional[dict] = None):
            if task is None:
                with paths.open(paths.join(self._source_dir, "passages.jsonl"), "rb") as f:
                    lines = (ln.rstrip(b"\r\n") for ln in f)
                    for i, ln in enumerate(x for x in lines if x.strip()):
                        yield i, {"record": ln}
                return
            for i, rec in enumerate(P.iter_task_records(self._source_dir, task, split, rows)):
                yield i, {"record": rec}

    return ImpragKilt


_CLASS = None


def builder_class():
    """The ``tfds.core.GeneratorBasedBuilder`` subclass (``imprag_kilt``), defined on first use (it registers
    itself with TFDS)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _builder_class()
    return _CLASS


def build(data_dir: str, out_dir: Optional[str] = None, show_progress: bool = False) -> str:
    """Write the TFDS dataset of the prepared folder ``data_dir`` under ``out_dir`` (default
    ``{data_dir}/tfds``), replacing an existing one; returns the dataset folder (``.../imprag_kilt/1.0.0``)."""
    import shutil

    import tensorflow_datasets as tfds

    tfds.display_progress_bar(show_progress)
    root = out_dir or os.path.join(data_dir, "tfds")
    b = builder_class()(source_dir=data_dir, data_dir=root, file_format="array_record")
    if os.path.isdir(str(b.data_dir)):
        shutil.rmtree(str(b.data_dir))
    _OPEN.clear()
    with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keeps an empty folder out of root
        b.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    return str(b.data_dir)


LOCATION_FILE = "location"


def find_dataset(data_dir: str) -> Optional[str]:
    """The TFDS dataset folder of a prepared folder, or None: the path named in ``{data_dir}/tfds/location`` (one
    line, e.g. ``gs://bucket/imprag/tfds/imprag_kilt/1.0.0``; see `set_location`) when that file exists, else
    ``{data_dir}/tfds/imprag_kilt/<newest version>`` when it holds a finished dataset."""
    loc = paths.join(data_dir, "tfds", LOCATION_FILE)
    if paths.exists(loc):
        with paths.open(loc, encoding="utf-8") as f:
            where = f.read().strip()
        if not where:
            raise ValueError(f"{loc} is empty; it should name a TFDS dataset folder (or delete it)")
        return where
    infos = [p for p in paths.glob(data_dir, f"tfds/{NAME}/*/dataset_info.json")
             if re.fullmatch(r"\d+\.\d+\.\d+", os.path.basename(os.path.dirname(p)))]  # not incomplete.*
    if not infos:
        return None
    return os.path.dirname(max(infos, key=lambda p: tuple(map(int, os.path.basename(os.path.dirname(p)).split(".")))))


def set_location(data_dir: str, dataset_dir: Optional[str]) -> None:
    """Point a prepared folder at a TFDS dataset folder elsewhere (a bucket copy of ``{data_dir}/tfds/imprag_kilt/
    1.0.0``): the pipeline then reads the task splits from there. ``None`` removes the pointer."""
    loc = os.path.join(data_dir, "tfds", LOCATION_FILE)
    if dataset_dir is None:
        if os.path.exists(loc):
            os.remove(loc)
        return
    os.makedirs(os.path.dirname(loc), exist_ok=True)
    with open(loc, "w", encoding="utf-8") as f:
        f.write(str(dataset_dir).strip() + "\n")


def check_fresh(data_dir: str, dataset_dir: str) -> None:
    """Raise ValueError when the local dataset folder ``dataset_dir`` is older than ``data_dir``'s task,
    pseudo-label or passage files, or was written for another records version (a bucket path is not checked)."""
    import json

    from imprag_jax.data.records import RECORDS_VERSION

    info = os.path.join(str(dataset_dir), "dataset_info.json")
    if not paths.is_local(data_dir) or not os.path.exists(info):
        return
    srcs = (paths.glob(data_dir, "tasks/*.jsonl") + paths.glob(data_dir, "pseudo_labels/*.jsonl")
            + [os.path.join(data_dir, "passages.jsonl")])
    newest = max((os.path.getmtime(p) for p in srcs if os.path.exists(p)), default=0.0)
    if os.path.getmtime(info) < newest:
        raise ValueError(f"{dataset_dir} is older than the task / passage files of {data_dir}; rebuild it "
                         f"(imprag_jax.data.tfds_kilt.build) or delete {os.path.join(data_dir, 'tfds')}")
    meta = os.path.join(str(dataset_dir), "metadata.json")
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            v = json.load(f).get("records_version")
        if v is not None and v != RECORDS_VERSION:
            raise ValueError(f"{dataset_dir} holds records version {v}, this code reads {RECORDS_VERSION}; rebuild "
                             "it (imprag_jax.data.tfds_kilt.build)")


def _path(dataset_dir: str):
    from etils import epath

    s = str(dataset_dir)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return epath.Path(s)


_OPEN: dict = {}


def open_dataset(dataset_dir: str):
    """The read-only TFDS builder of a dataset folder (local, ``file://`` or ``gs://``), cached per folder."""
    import tensorflow_datasets as tfds

    key = str(dataset_dir)
    if key not in _OPEN:
        if not paths.is_local(key):
            paths.exists(key)  # a missing storage client: one line naming it (paths.StorageError)
        _OPEN[key] = tfds.builder_from_directory(_path(dataset_dir))
    return _OPEN[key]


class RecordSource:
    """Random-access source of one split's ``record`` bytes (``len``, ``[i]``), for ``grain.MapDataset.source``."""

    def __init__(self, data_source):
        self._ds = data_source

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> bytes:
        return self._ds[i]["record"]

    def __getitems__(self, idx) -> list:
        return [r["record"] for r in self._ds.__getitems__(list(idx))]

    def __repr__(self) -> str:
        return f"RecordSource({self._ds!r})"


def _split_source(dataset_dir: str, name: str) -> RecordSource:
    b = open_dataset(dataset_dir)
    if name not in b.info.splits:
        raise FileNotFoundError(f"{dataset_dir}: no split {name!r} (splits: {sorted(b.info.splits)})")
    return RecordSource(b.as_data_source(split=name))


def task_source(dataset_dir: str, task: str, split: str) -> RecordSource:
    """A task split's JSON records (bytes, in file order) from a TFDS dataset folder."""
    return _split_source(dataset_dir, split_name(task, split))


def passage_source(dataset_dir: str) -> RecordSource:
    """The knowledge source: ``passages.jsonl``'s lines (bytes, in file order)."""
    return _split_source(dataset_dir, PASSAGES_SPLIT)


def task_splits(dataset_dir: str) -> list:
    """[(task, split)] stored in a TFDS dataset folder."""
    return sorted(tuple(n.rsplit("__", 1)) for n in open_dataset(dataset_dir).info.splits if "__" in n)


__all__ = ["NAME", "PASSAGES_SPLIT", "LOCATION_FILE", "split_name", "builder_class", "build", "find_dataset",
           "set_location", "check_fresh", "open_dataset",
           "RecordSource", "task_source", "passage_source", "task_splits"]
