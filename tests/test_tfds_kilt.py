"""The TFDS dataset layer (imprag_jax.data.tfds_kilt): written and read without TensorFlow, and the batch pipeline
gives the same batches bit for bit from a folder's TFDS dataset as from its records/*.array_record files."""
import contextlib
import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record")
pytest.importorskip("tokenizers")
pytest.importorskip("tensorflow_datasets")

from imprag_jax.data import pipeline as P  # noqa: E402
from imprag_jax.data import tfds_kilt as K  # noqa: E402


def _copy_without_records(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("records", "tfds"))
    return dst


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _compare(plain: str, viatfds: str, cfg: P.BatchConfig, eval_tasks, steps=3, tok=None):
    tok = tok or P.load_tokenizer(plain)
    a = P.TrainBatches(plain, tok, cfg, prefetch=0)
    b = P.TrainBatches(viatfds, tok, cfg, prefetch=0)
    try:
        for step in range(steps):
            _same(a.batch(step), b.batch(step))
    finally:
        a.close()
        b.close()
    for task in eval_tasks:
        for passages in ("none", "gold", "pseudo"):
            ea = list(P.eval_batches(plain, task, "dev", tok, batch_size=16, passages=passages, k=2, limit=40))
            eb = list(P.eval_batches(viatfds, task, "dev", tok, batch_size=16, passages=passages, k=2, limit=40))
            assert len(ea) == len(eb) > 0
            for x, y in zip(ea, eb):
                _same(x, y)
        assert P.gold_counts(plain, task) == P.gold_counts(viatfds, task)
    assert not os.path.exists(os.path.join(viatfds, "records"))  # read through TFDS, no record files written


@pytest.fixture(scope="module")
def world_tfds(world_dir, tmp_path_factory):
    d = _copy_without_records(world_dir, str(tmp_path_factory.mktemp("tfds_world") / "w"))
    out = K.build(d)
    return d, out


def test_build_without_tensorflow(world_tfds, world_dir):
    d, out = world_tfds
    assert "tensorflow" not in sys.modules  # neither writing nor reading imported TensorFlow
    assert K.find_dataset(d) == out and K.find_dataset(world_dir) is None
    files = os.listdir(out)
    assert "dataset_info.json" in files and any(".array_record-" in f for f in files)
    expect = sorted((t, s) for t, s, _ in P._task_splits(d))
    assert K.task_splits(out) == expect
    # each split holds exactly the records iter_task_records yields, in file order; passages are the jsonl lines
    for task, split in expect:
        src = K.task_source(out, task, split)
        recs = list(P.iter_task_records(d, task, split))
        assert len(src) == len(recs) and [src[i] for i in range(len(src))] == recs
    with open(os.path.join(d, "passages.jsonl"), "rb") as f:
        lines = [ln.rstrip(b"\n") for ln in f if ln.strip()]
    ps = K.passage_source(out)
    assert len(ps) == len(lines) and ps[0] == lines[0] and ps[len(ps) - 1] == lines[-1]
    with pytest.raises(FileNotFoundError, match="no split"):
        K.task_source(out, "nope", "dev")


def test_world_batches_bit_identical(world_tfds, world_dir):
    d, _ = world_tfds
    cfg = P.BatchConfig(batch_size=8, free_batch_size=4, L_q=24, L_r=4, L_free=64, l_max=24, k=4,
                        tasks={"qa": 1.0, "two_hop_qa": 0.5}, free_tasks={"format": 1.0, "lm": 0.5}, cf=0.5)
    _compare(world_dir, d, cfg, eval_tasks=("qa",))


def test_file_url_and_bucket_path(world_tfds):
    d, out = world_tfds
    local = K.task_source(out, "qa", "dev")
    via_url = K.task_source("file://" + out, "qa", "dev")
    assert len(via_url) == len(local) and via_url[3] == local[3]
    # a bucket path goes through the same code (etils.epath) up to the I/O: here it stops where the storage
    # client is needed (gcsfs, not installed), or where the bucket is unreachable (no network)
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: the bucket read would try the network")
    with pytest.raises(ImportError, match="gcsfs"):
        K.task_source("gs://imprag-no-such-bucket/data/tfds/imprag_kilt/1.0.0", "qa", "dev")


def _passage_bpe(data_dir: str):
    """A byte-level BPE (vocabulary 512) trained on the folder's passages: the mini-KILT ships no tokenizer."""
    import json

    import tokenizers

    from imprag_jax.data.tokenizer import Tokenizer

    with open(os.path.join(data_dir, "passages.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(ln)["text"] for ln in f if ln.strip()][:400]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<bos>", "<eos>"]))
    return Tokenizer(bpe, bos_id=bpe.token_to_id("<bos>"), eos_id=bpe.token_to_id("<eos>"),
                     pad_id=bpe.token_to_id("<pad>"))


def test_minikilt_prepare_writes_tfds_by_default_bit_identical(shared_data, tmp_path):
    """data.prepare writes the TFDS dataset by default and ``--no_tfds`` the JSONL-only folder (the same bytes
    otherwise); the pipeline reads the first through TFDS, the second through records/, with the same batches."""
    import filecmp

    from imprag_jax.data import prepare

    a, b = str(tmp_path / "default"), str(tmp_path / "no_tfds")
    common = ["--source", shared_data, "--limit", "60", "--free_per_task", "20", "--no_progress"]
    assert prepare.main(common + ["--out", a]) == 0
    assert prepare.main(common + ["--out", b, "--no_tfds"]) == 0
    assert K.find_dataset(a) is not None and K.find_dataset(b) is None
    assert sorted(os.listdir(a)) == sorted(os.listdir(b) + ["tfds"])
    files = ["passages.jsonl", "stats.json"] + [f"tasks/{f}" for f in os.listdir(os.path.join(a, "tasks"))]
    assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files  # the JSONL layer is unchanged
    cfg = P.BatchConfig(batch_size=8, free_batch_size=4, L_q=48, L_r=8, L_free=96, l_max=48, k=4)
    _compare(b, a, cfg, eval_tasks=("nq", "hotpotqa"), steps=2, tok=_passage_bpe(a))
    assert os.path.isdir(os.path.join(b, "records"))  # the --no_tfds folder was read through its record files
    # preparing again with --no_tfds into a folder that holds a dataset removes it (it would be stale)
    assert prepare.main(common + ["--out", a, "--no_tfds"]) == 0
    assert K.find_dataset(a) is None


BUCKET = "gs://imprag-test-bucket"


@contextlib.contextmanager
def _fake_bucket(root: str, monkeypatch):
    """``gs://imprag-test-bucket/...`` served from the local folder ``root`` without a network: every etils.epath
    call on a gs:// path (the storage backend that gcsfs or tf.io.gfile provide on a pod) is redirected by
    ``etils.epath.testing.mock_epath``, and the ArrayRecord reader (which opens TFDS's record files by name) gets
    the local name of a gs:// file. Yields the list of gs:// paths read."""
    from array_record.python import array_record_data_source as ards
    from etils.epath import testing as et

    read = []

    def loc(p):  # a local path (the local folder read for comparison) passes unchanged
        s = os.fspath(p)
        if not s.startswith("gs://"):
            return s
        assert s.startswith(BUCKET + "/") or s == BUCKET, s
        read.append(s)
        return root + s[len(BUCKET):]

    def back(p):
        return BUCKET + os.fspath(p)[len(root):]

    real = ards.array_record_module.ArrayRecordReader

    def reader(path, *a, **kw):
        return real(loc(path), *a, **kw)

    monkeypatch.setattr(ards.array_record_module, "ArrayRecordReader", reader)
    def one(f, p, *a, **kw):  # open, exists, isdir, listdir, stat: the local file's answer
        return f(loc(p), *a, **kw)

    def glob(f, p):
        return [back(x) if os.fspath(p).startswith("gs://") else x for x in f(loc(p))]

    def walk(f, p, **kw):
        for r, d, fs in f(loc(p), **kw):
            yield (back(r) if os.fspath(p).startswith("gs://") else r), d, fs

    with et.mock_epath(open=one, exists=one, isdir=one, listdir=one, stat=one, glob=glob, walk=walk):
        yield read


def test_prepared_folder_at_a_bucket_path_gives_the_same_batches(world_tfds, world_dir, tmp_path, monkeypatch):
    """A prepared folder (with its TFDS dataset) read at a gs:// path: every file -- passages.jsonl, the task files,
    stats.json, world.json, tokenizer.json (copied to the local cache), the TFDS dataset -- is read through
    etils.epath (a mocked gs:// backend, `_fake_bucket`), and training / evaluation batches equal the local
    folder's bit for bit. Not covered: the bytes coming from a real bucket (gcsfs; no network here)."""
    from imprag_jax import evaluation
    from imprag_jax.data import paths
    from imprag_jax.infer.imprag import passage_texts

    from imprag_jax.run.model import _pretrained_tokenizer

    d, _ = world_tfds
    monkeypatch.setenv("IMPRAG_CACHE", str(tmp_path / "cache"))
    remote = BUCKET + "/" + os.path.basename(d)
    tok_dir = os.path.join(os.path.dirname(d), "tok_dir")  # a model.tokenizer directory in the bucket
    os.makedirs(tok_dir, exist_ok=True)
    shutil.copy(os.path.join(d, "tokenizer.json"), tok_dir)
    cfg = P.BatchConfig(batch_size=8, free_batch_size=4, L_q=24, L_r=4, L_free=64, l_max=24, k=4,
                        tasks={"qa": 1.0, "two_hop_qa": 0.5}, free_tasks={"format": 1.0, "lm": 0.5}, cf=0.5,
                        query_filler=0.3)
    K._OPEN.clear()
    with _fake_bucket(os.path.dirname(d), monkeypatch) as read:
        assert not paths.is_local(remote) and paths.exists(remote + "/passages.jsonl")
        assert K.find_dataset(remote) == remote + "/tfds/imprag_kilt/1.0.0"
        tok = P.load_tokenizer(remote)
        local_tok = P.load_tokenizer(world_dir)
        assert tok.vocab_size == local_tok.vocab_size and tok.encode("who was born in") == local_tok.encode(
            "who was born in")
        assert os.path.dirname(paths.local_copy(remote + "/tokenizer.json")).startswith(str(tmp_path / "cache"))
        named = _pretrained_tokenizer(BUCKET + "/tok_dir")  # copied to the local cache, then read
        assert named is not None and named.encode("who was born in") == local_tok.encode("who was born in")
        _compare(world_dir, remote, cfg, eval_tasks=("qa",), tok=local_tok)
        assert evaluation.count_examples(remote, "qa", "dev", None) == evaluation.count_examples(
            world_dir, "qa", "dev", None)
        assert passage_texts(remote) == passage_texts(world_dir)
        assert P.corpus_tokens(remote, tok, 16)[0].tobytes() == P.corpus_tokens(world_dir, tok, 16)[0].tobytes()
    got = {p[len(remote) + 1:] for p in read if p.startswith(remote + "/")}
    for f in ("passages.jsonl", "stats.json", "world.json", "tokenizer.json", "tasks/qa.dev.jsonl",
              "tfds/imprag_kilt/1.0.0/dataset_info.json"):
        assert f in got, (f, sorted(got))
    assert BUCKET + "/tok_dir/tokenizer.json" in read
    assert any(".array_record-" in f for f in got)  # the TFDS record files, opened by their gs:// names
    assert not os.path.exists(os.path.join(d, "records"))
    K._OPEN.clear()


@pytest.mark.slow
def test_training_from_a_bucket_data_dir_equals_training_from_the_local_folder(world_tfds, tmp_path, monkeypatch):
    """``data.dir=gs://...`` end to end through `train` (the data folder check, the world check, the tokenizer,
    the batches, the corpus of the index refresher): the same losses as from the local folder."""
    import json

    from test_train import tiny_config

    from imprag_jax.train.trainer import train

    d, _ = world_tfds
    monkeypatch.setenv("IMPRAG_CACHE", str(tmp_path / "cache"))
    kw = dict(stages="warmup", steps=3, candidates="mixed", index_negatives=2, refresh_every=2)
    local = train(tiny_config(d, **kw), str(tmp_path / "local"))
    K._OPEN.clear()
    with _fake_bucket(os.path.dirname(d), monkeypatch) as read:
        remote = train(tiny_config(BUCKET + "/" + os.path.basename(d), **kw), str(tmp_path / "bucket"))
    K._OPEN.clear()
    assert local["step"] == remote["step"] == 3 and any(p.endswith("/passages.jsonl") for p in read)

    def losses(w):
        return [r["loss"] for r in map(json.loads, open(tmp_path / w / "metrics.jsonl")) if "loss" in r]

    assert len(losses("local")) == 3 and losses("local") == losses("bucket")


def test_bucket_path_without_storage_client_is_a_one_line_error(tmp_path):
    from imprag_jax import run as R
    from imprag_jax.data import paths
    from imprag_jax.run.model import _pretrained_tokenizer

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: the bucket read would try the network")
    where = "gs://imprag-no-such-bucket/minikilt"
    with pytest.raises(paths.StorageError, match=r"needs gcsfs \(pip install gcsfs\)") as e:
        paths.exists(where + "/passages.jsonl")
    assert "\n" not in str(e.value)

    class C:  # the config fields existing_data_dir reads
        class data:
            dir = where

    with pytest.raises(R.RunError, match=r"data.dir='gs://imprag-no-such-bucket/minikilt': reading .* needs gcsfs"):
        R.existing_data_dir(C, str(tmp_path))
    with pytest.raises(R.RunError, match="tokenizer directory .* needs gcsfs"):
        _pretrained_tokenizer(where + "/tokenizer")


def test_location_file_points_the_pipeline_elsewhere(world_tfds, world_dir, tmp_path):
    d, out = world_tfds
    e = _copy_without_records(world_dir, str(tmp_path / "pointer"))
    cfg = P.BatchConfig(batch_size=8, free_batch_size=0, L_q=24, L_r=4, l_max=24, k=4, tasks={"qa": 1.0})
    K.set_location(e, "file://" + out)  # the dataset of another folder, as a URL
    assert K.find_dataset(e) == "file://" + out
    _compare(world_dir, e, cfg, eval_tasks=("qa",), steps=2)
    # a bucket path: the pipeline takes it and stops only at the I/O (no gcsfs here, no network)
    if importlib.util.find_spec("gcsfs") is None:
        K.set_location(e, "gs://imprag-no-such-bucket/data/tfds/imprag_kilt/1.0.0")
        with pytest.raises(ImportError, match="gcsfs"):
            P.TrainBatches(e, P.load_tokenizer(e), cfg, prefetch=0)
    K.set_location(e, None)
    assert K.find_dataset(e) is None


def test_stale_dataset_is_refused(world_dir, tmp_path):
    e = _copy_without_records(world_dir, str(tmp_path / "stale"))
    out = K.build(e)
    task = os.path.join(e, "tasks", "qa.dev.jsonl")
    t0 = os.path.getmtime(task)
    t = os.path.getmtime(os.path.join(out, "dataset_info.json")) + 10
    os.utime(task, (t, t))  # the task file changed after the dataset was written
    with pytest.raises(ValueError, match="older than"):
        P.gold_counts(e, "qa")
    os.utime(task, (t0, t0))
    K.build(e)  # rebuilt: read again
    assert P.gold_counts(e, "qa") == P.gold_counts(world_dir, "qa")
