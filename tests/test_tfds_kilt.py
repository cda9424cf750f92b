"""The TFDS dataset layer (imprag_jax.data.tfds_kilt): written and read without TensorFlow, and the batch pipeline
gives the same batches bit for bit from a folder's TFDS dataset as from its records/*.array_record files."""
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


def test_minikilt_prepare_tfds_bit_identical(shared_data, tmp_path):
    from imprag_jax.data import prepare

    a = str(tmp_path / "with_tfds")
    assert prepare.main(["--source", shared_data, "--out", a, "--limit", "60", "--free_per_task", "20",
                         "--no_progress", "--tfds"]) == 0
    assert K.find_dataset(a) is not None
    b = _copy_without_records(a, str(tmp_path / "plain"))
    cfg = P.BatchConfig(batch_size=8, free_batch_size=4, L_q=48, L_r=8, L_free=96, l_max=48, k=4)
    _compare(b, a, cfg, eval_tasks=("nq", "hotpotqa"), steps=2, tok=_passage_bpe(a))


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
