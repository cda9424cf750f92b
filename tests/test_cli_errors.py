"""What a new user hits: every mistake and every damaged file ends in one or two lines on stderr that name the
file, key or step and what to do, exit code 2, no traceback, and nothing written (no folder created).

The entry points run as subprocesses, as a user runs them (stderr is a pipe, not a terminal)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, args, timeout=120, pre=None):
    """`python -m module args` from the repository root; `pre`: Python run first in the same process (e.g. to
    hide an installed package)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    if pre is None:
        cmd = [sys.executable, "-m", module] + list(args)
    else:
        code = (f"import runpy, sys\n{pre}\nsys.argv = [{module!r}] + {list(args)!r}\n"
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _user_error(r, *needles):
    """Exit code 2, at most 3 non-empty stderr lines, no traceback, every needle on stderr."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert len(lines) <= 3, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    return lines


# ---------------------------------------------------------------------------------------------------- configs


def test_train_misspelt_key_is_one_line_with_a_suggestion(tmp_path):
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py", "--workdir", str(wd), "--config.train.stepz=5"])
    _user_error(r, "'train.stepz'", "configs/synthetic.py", "did you mean train.steps?")
    assert not wd.exists()


def test_train_misspelt_section_is_one_line_with_a_suggestion(tmp_path):
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py", "--workdir", str(wd), "--config.trian.steps=5"])
    _user_error(r, "'trian.steps'", "did you mean train.steps?")
    assert not wd.exists()


def test_train_missing_config_file_is_one_line(tmp_path):
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/nope.py", "--workdir", str(wd)])
    _user_error(r, "configs/nope.py", "not found", "synthetic.py")
    assert not wd.exists()
    r = _run("imprag_jax.train", ["--config", "configs/sythetic.py:smoke", "--workdir", str(wd)])
    _user_error(r, "configs/sythetic.py", "did you mean configs/synthetic.py?")
    assert not wd.exists()


def test_train_unknown_config_argument_and_bad_value_are_one_line(tmp_path):
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:bogus", "--workdir", str(wd)])
    _user_error(r, "configs/synthetic.py:bogus", "unknown config argument 'bogus'")
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py", "--workdir", str(wd), "--config.train.steps=abc"])
    _user_error(r, "config.train.steps", "abc")
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py", "--workdri", str(wd)])
    _user_error(r, "workdri", "workdir")
    assert not wd.exists()


def test_train_config_error_removes_the_workdir_it_created(tmp_path):
    """The trainer creates the workdir before it validates the config: the CLI takes back what it created (the
    folder and its missing parents), and only that."""
    wd = tmp_path / "a" / "b" / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", str(wd),
                                  "--config.train.stages=sometimes"])
    _user_error(r, "train.stages must be one of")
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "existing"  # a folder that was there before is left alone
    keep.mkdir()
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", str(keep),
                                  "--config.train.stages=sometimes"])
    _user_error(r, "train.stages")
    assert keep.is_dir()


def test_train_data_dir_that_does_not_exist_is_refused(tmp_path):
    wd, typo = tmp_path / "w", tmp_path / "typo"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", str(wd),
                                  f"--config.data.dir={typo}"])
    _user_error(r, f"data.dir={typo} does not exist", "python -m imprag_jax.data.synthetic --out DIR",
                os.path.join(str(wd), "data"))
    assert not typo.exists() and not wd.exists()


def test_explicit_data_dir_that_does_not_exist_is_a_config_error(tmp_path):
    """run.training_data_dir: an explicit data.dir that does not exist is a typo, not a place to generate the world
    (or prepare the mini-KILT) in; an existing one, even empty, still is (experiments/synthetic.py creates its
    shared world folder first, see below)."""
    from imprag_jax.cli import load_config_file
    from imprag_jax.model import ConfigError
    from imprag_jax import run

    c = load_config_file(os.path.join(ROOT, "configs", "synthetic.py") + ":smoke")
    c.data.dir = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist; leave data.dir empty"):
        run.training_data_dir(c, str(tmp_path / "w"))
    assert not (tmp_path / "nope").exists()
    c.data.kind = "minikilt"
    with pytest.raises(ConfigError, match="python -m imprag_jax.data.prepare"):
        run.training_data_dir(c, str(tmp_path / "w"))
    assert not (tmp_path / "nope").exists()


def test_vocab_filler_pool_without_a_world_is_one_line(tmp_path, world_dir):
    """data.query_filler_pool='vocab' needs a synthetic world (its entity words); a prepared folder without one is
    a one-line config error before training, not a traceback from the data loader's first filled row."""
    d = tmp_path / "prepared"
    shutil.copytree(world_dir, d)
    os.remove(d / "world.json")
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", str(wd),
                                  "--config.data.kind=prepared", f"--config.data.dir={d}"])
    _user_error(r, "query_filler_pool='vocab'", "no world.json")
    assert not wd.exists()


def test_experiment_runner_creates_its_world_folder_before_training(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp_synthetic_cli", os.path.join(ROOT, "experiments",
                                                                                    "synthetic.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    seen = {}

    def call(cmd, cwd=None):
        d = next(x.split("=", 1)[1] for x in cmd if x.startswith("--config.data.dir="))
        seen["world_exists"] = os.path.isdir(d)
        return 1

    monkeypatch.setattr(m.subprocess, "call", call)
    assert m.main(["long_questions", "--out", str(tmp_path)]) == 1
    assert seen["world_exists"]  # the trainer would refuse a data.dir that does not exist


def test_evaluate_config_errors_are_one_line(tmp_path):
    r = _run("imprag_jax.evaluate", ["--workdir", str(tmp_path), "--config", "configs/synthetic.py:smoke",
                                     "--config.eval.limt=3"])
    _user_error(r, "'eval.limt'", "did you mean eval.limit?")
    r = _run("imprag_jax.evaluate", ["--workdir", str(tmp_path), "--config", "configs/nope.py"])
    _user_error(r, "configs/nope.py", "not found")
    r = _run("imprag_jax.evaluate", ["--workdir", str(tmp_path), "--config.eval.limit=3"])
    _user_error(r, "--config.eval.limit", "--config FILE")
    r = _run("imprag_jax.evaluate", [])
    _user_error(r, "--workdir is required")
    assert os.listdir(tmp_path) == []


def test_compile_check_config_errors_are_one_line():
    r = _run("imprag_jax.compile_check", ["--config", "configs/nope.py"])
    _user_error(r, "configs/nope.py", "not found")
    r = _run("imprag_jax.compile_check", ["--config", "configs/llama3_2_3b.py:smoke", "--config.model.remot=dots"])
    _user_error(r, "'model.remot'", "did you mean model.remat?")
    r = _run("imprag_jax.compile_check", ["--config", "configs/llama3_2_3b.py:smoke", "--config.model.layers.x=1"])
    _user_error(r, "'model.layers.x'")
    r = _run("imprag_jax.compile_check", ["--config", "configs/llama3_2_3b.py:smoke", "--set", "model.remat=dots"])
    _user_error(r, "--set is gone", "--config.a.b=v")


def test_config_file_with_an_unknown_field_is_a_one_line_error(tmp_path):
    """A config file that adds a field the base config does not have (a typo in a config, not on the command
    line) fails at load with the field and the closest real one, for train and compile_check alike."""
    cfg = tmp_path / "typo.py"
    cfg.write_text("from configs.synthetic import get_config as base\n\n\ndef get_config(arg=''):\n"
                   "    c = base('smoke')\n    c.train.stepz = 5\n    return c\n")
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", str(cfg), "--workdir", str(wd)])
    _user_error(r, "unknown field 'train.stepz'", "did you mean train.steps?")
    assert not wd.exists()
    r = _run("imprag_jax.compile_check", ["--config", str(cfg)])
    _user_error(r, "unknown field 'train.stepz'")


def test_overrides_parse_lists_and_weights_from_comma_strings():
    from imprag_jax import cli

    spec = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"
    c = cli.load_config_file(spec, [("eval.k", "1,5"), ("eval.tasks", "qa, two_hop_qa"), ("data.tasks",
                                    "qa:1,two_hop_qa:0.5"), ("train.score_bias", None), ("data.neg_ranks", "5,20")])
    assert c.eval.k == [1, 5] and c.eval.tasks == ["qa", "two_hop_qa"] and c.data.neg_ranks == [5, 20]
    assert c.train.score_bias is True
    from imprag_jax.run import batch_config

    assert batch_config(c).tasks == {"qa": 1.0, "two_hop_qa": 0.5}  # in the order given
    with pytest.raises(cli.UserError, match="eval.k"):
        cli.load_config_file(spec, [("eval.k", "1,five")])
    with pytest.raises(cli.UserError, match="train.steps='many'"):
        cli.load_config_file(spec, [("train.steps", "many")])
    with pytest.raises(AttributeError):  # locked: a field set later that the config does not have
        c.train.stepz = 3


def test_argparse_usage_errors_are_one_line(tmp_path):
    r = _run("imprag_jax.generate", ["hello"])
    _user_error(r, "--model", "--workdir", "--help")
    r = _run("imprag_jax.export", ["--workdir", str(tmp_path)])
    _user_error(r, "--out")
    r = _run("imprag_jax.generate", ["--model", str(tmp_path / "nomodel"), "hi"])
    _user_error(r, "nomodel")


def test_cli_helpers():
    from imprag_jax import cli

    assert cli.config_argv(["p", "--config", "a.py:x", "--config.train.steps=3", "--noconfig.b.c", "--workdir=w"]) \
        == ("a.py:x", ["train.steps", "b.c"])
    assert cli.config_argv(["p", "--config=b.py", "--config.x", "1"]) == ("b.py", ["x"])
    assert cli.split_config_argv(["p", "--config=b.py", "--config.x", "1", "--config.y", "--noconfig.z", "--k=2"]) \
        == ("b.py", [("x", "1"), ("y", None), ("z", "false")], ["p", "--k=2"])
    import ml_collections

    c = ml_collections.ConfigDict({"train": {"steps": 1, "stages": "both"}, "model": {"b": 1}})
    cli.check_key(c, "train.steps", "f.py")
    with pytest.raises(cli.UserError, match=r"no key 'train.step' in f.py \(did you mean train.steps\?\)"):
        cli.check_key(c, "train.step", "f.py")
    with pytest.raises(cli.UserError, match="train.steps is a value, not a section"):
        cli.check_key(c, "train.steps.x", "f.py")


def test_remove_if_unused_takes_back_only_empty_new_folders(tmp_path):
    from imprag_jax import cli

    new = tmp_path / "a" / "b"
    with pytest.raises(SystemExit):
        with cli.remove_if_unused(str(new)):
            os.makedirs(new)
            sys.exit(2)
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with cli.remove_if_unused(str(new)):
            os.makedirs(new)
            (new / "f").write_text("x")
            raise RuntimeError
    assert (new / "f").exists()  # something was written: kept
    with cli.remove_if_unused(str(tmp_path / "ok")):
        os.makedirs(tmp_path / "ok")
    assert (tmp_path / "ok").is_dir()  # success: kept


# ---------------------------------------------------------------------------------------------------- prepare


def _kilt_files(tmp_path):
    kn = tmp_path / "kn.jsonl"
    kn.write_text('{"id": "p1", "title": "A", "text": "hello world"}\n')
    good = '{"id": "q1", "input": "who?", "output": [{"answer": "x"}]}\n'
    files = {"malformed": good + '{"id": "q2", "input": \n',
             "unterminated": good + '{"id": "q2", "input": "no end\n',
             "nofield": good + '{"id": "q2", "output": [{"answer": "x"}]}\n'}
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    return str(kn)


@pytest.mark.parametrize("name,needle", [("malformed", "malformed JSON"), ("unterminated", "malformed JSON"),
                                         ("nofield", "missing field 'input'"), ("missing", "no such file")])
def test_prepare_bad_kilt_file_is_one_line(tmp_path, name, needle):
    kn = _kilt_files(tmp_path)
    out = tmp_path / "out"
    f = str(tmp_path / f"{name}.jsonl")
    r = _run("imprag_jax.data.prepare", ["--kilt_task", f"nq={f}", "--kilt_knowledge", kn, "--out", str(out),
                                         "--no_pseudo_labels"])
    lines = _user_error(r, f, needle)
    assert len(lines) == 1
    if name != "missing":
        assert f"{f}:2:" in r.stderr and "fix or remove that line" in r.stderr
    else:
        assert "check the path" in r.stderr
    assert "at at" not in r.stderr  # json's "... starting at" + " at column N"
    assert not out.exists()


def test_prepare_without_tensorflow_datasets_says_so_before_any_work(tmp_path):
    """The TFDS dataset is prepare's default: without tensorflow-datasets that is one line naming the package and
    --no_tfds, before anything is written; --no_tfds then writes the JSONL-only folder."""
    kn = _kilt_files(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "good.jsonl").write_text('{"id": "q1", "input": "who?", "output": [{"answer": "x"}]}\n')
    args = ["--kilt_task", f"nq={tmp_path / 'good.jsonl'}", "--kilt_knowledge", kn, "--out", str(out),
            "--no_pseudo_labels"]
    r = _run("imprag_jax.data.prepare", args, pre="sys.modules['tensorflow_datasets'] = None")
    lines = _user_error(r, "tensorflow-datasets", "--no_tfds")
    assert len(lines) == 1 and not out.exists()
    r = _run("imprag_jax.data.prepare", args + ["--no_tfds"], pre="sys.modules['tensorflow_datasets'] = None")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "passages.jsonl").is_file() and not (out / "tfds").exists()


def test_data_dir_in_a_bucket_without_gcsfs_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: the bucket read would try the network")
    wd = tmp_path / "w"
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", str(wd),
                                  "--config.data.kind=prepared", "--config.data.dir=gs://imprag-no-such-bucket/kilt"])
    _user_error(r, "data.dir='gs://imprag-no-such-bucket/kilt'", "needs gcsfs (pip install gcsfs)")
    assert not wd.exists()  # evaluation's data folder check: tests/test_tfds_kilt.py


# ---------------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A 12-step synthetic run (checkpoints 8 and 12), trained once through the CLI with stderr redirected."""
    wd = str(tmp_path_factory.mktemp("cli") / "smoke")
    r = _run("imprag_jax.train", ["--config", "configs/synthetic.py:smoke", "--workdir", wd,
                                  "--config.eval.limit=4", "--config.eval.tasks=qa"], timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["12", "8"]
    return wd, r


@pytest.mark.slow
def test_redirected_training_log_has_no_bars_and_no_bm25s_chatter(smoke_run):
    _, r = smoke_run
    log = r.stdout + r.stderr
    assert "generating the synthetic world" in log  # BM25 pseudo-labels were computed in this run
    assert "Building index from IDs" not in log  # bm25s' logger (INFO/DEBUG through absl)
    assert "BM25 retrieval" not in log and "batch/s" not in log and "it/s" not in log  # no tqdm bars


def _value_ranges(state_dir):
    """{array chunk key: (data file, offset, length)} of an orbax OCDBT checkpoint item (e.g. <step>/state)."""
    import tensorstore as ts

    out = {}
    for sub in sorted(os.listdir(state_dir)):
        if not sub.startswith("ocdbt.process_"):
            continue
        base = ts.KvStore.open({"driver": "file", "path": os.path.join(state_dir, sub) + "/"}).result()
        stack = [ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]]
        while stack:
            for e in ts.ocdbt.dump(base, stack.pop()).result()["entries"]:
                if str(e.get("location", "")).startswith("btreenode::"):  # a child node of a deeper tree
                    stack.append(e["location"])
                v = e.get("indirect_value")
                if v:
                    f, off, n = v.split("::", 1)[1].rsplit(":", 2)
                    out[e["key"].decode()] = (os.path.join(state_dir, sub, f), int(off), int(n))
    return out


def _damage(run_dir, step, prefix):
    """Overwrite (with zeros) the stored bytes of every array under `prefix` ("params", "opt_state")."""
    ranges = {k: v for k, v in _value_ranges(os.path.join(run_dir, "checkpoints", str(step), "state")).items()
              if k.startswith(prefix + ".")}
    assert ranges, f"no {prefix} arrays found in the checkpoint"
    for f, off, n in ranges.values():
        with open(f, "r+b") as fh:
            fh.seek(off)
            fh.write(b"\0" * n)
    return sorted(ranges)


def _copy(run_dir, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.slow
def test_evaluation_reads_only_the_params_so_damaged_optimizer_state_does_not_matter(smoke_run, tmp_path):
    wd = _copy(smoke_run[0], tmp_path)
    damaged = _damage(wd, 12, "opt_state")
    assert any(".mu." in k for k in damaged) and any(".nu." in k for k in damaged)
    r = _run("imprag_jax.evaluate", ["--workdir", wd, "--tasks", "qa", "--limit", "2", "--modes", "closed_book",
                                     "--noplot", "--out", str(tmp_path / "eval")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 12" in r.stdout and "| qa | closed_book |" in r.stdout
    assert "ex/s" not in r.stderr  # stderr is a pipe: no progress bar


@pytest.mark.slow
def test_damaged_checkpoint_is_one_line_naming_it_and_the_others(smoke_run, tmp_path):
    wd = _copy(smoke_run[0], tmp_path)
    _damage(wd, 12, "params")
    ck = os.path.join(os.path.abspath(wd), "checkpoints")
    r = _run("imprag_jax.evaluate", ["--workdir", wd, "--tasks", "qa", "--limit", "2", "--noplot"])
    lines = _user_error(r, f"checkpoint 12 in {ck} is damaged", "--checkpoint N (have [8])")
    assert len(lines) == 1
    assert not os.path.exists(os.path.join(wd, "eval", "report.json"))
    r = _run("imprag_jax.generate", ["--workdir", wd, "Where was Ann born?"])
    _user_error(r, "checkpoint 12", "damaged", "--step N (have [8])")
    out = tmp_path / "export" / "hf"
    r = _run("imprag_jax.export", ["--workdir", wd, "--out", str(out)])
    _user_error(r, "checkpoint 12", "damaged", "--step N (have [8])")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_evaluate_without_matplotlib_writes_the_table_and_skips_the_png(smoke_run, tmp_path):
    out = tmp_path / "eval"
    r = _run("imprag_jax.evaluate", ["--workdir", smoke_run[0], "--tasks", "qa", "--limit", "2", "--modes",
                                     "closed_book", "--out", str(out)], pre="sys.modules['matplotlib'] = None")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| qa | closed_book |" in r.stdout and "report.png" not in r.stdout
    assert (out / "report.md").exists() and (out / "report.json").exists() and not (out / "report.png").exists()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "report.png skipped" in lines[0] and "pip install matplotlib" in lines[0], r.stderr


def test_export_without_safetensors_says_so_before_any_work(tmp_path):
    out = tmp_path / "hf"
    # the workdir does not exist either: the missing package is reported first, before the run is looked at
    r = _run("imprag_jax.export", ["--workdir", str(tmp_path / "norun"), "--out", str(out)],
             pre="sys.modules['safetensors'] = None")
    lines = _user_error(r, "safetensors", 'pip install -e ".[torch]"')
    assert len(lines) == 1 and not out.exists()
