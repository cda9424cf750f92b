"""python -m imprag_jax.train --config configs/X.py[:arg] --workdir W [--config.a.b=v ...]"""
import os

from absl import app, flags

from imprag_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file (configs/*.py), optionally file.py:arg; override any field with "
                    "--config.a.b=v.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, eval/.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when the environment names "
                  "several processes).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    config = cli.loaded_config()
    if config is None or FLAGS.workdir is None:
        cli.fail("--config and --workdir are required, e.g. --config configs/synthetic.py --workdir runs/synthetic")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        cli.fail(f"--workdir {FLAGS.workdir} is a file, not a folder")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    from imprag_jax.train.distributed import maybe_initialize

    maybe_initialize(FLAGS.distributed)
    from imprag_jax.model import ConfigError
    from imprag_jax.train.trainer import train

    # train() creates the workdir first: a run that fails on a user error before writing anything into it must
    # not leave an empty folder behind
    with cli.remove_if_unused(FLAGS.workdir):
        try:
            train(config, FLAGS.workdir)
        except ConfigError as e:
            cli.fail(str(e), prefix="config error")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser())
