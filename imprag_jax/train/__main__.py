"""python -m imprag_jax.train --config configs/X.py[:arg] --workdir W [--config.a.b=v ...]"""
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py), optionally file.py:arg.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, eval/.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when the environment names "
                  "several processes).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    from imprag_jax.train.distributed import maybe_initialize

    maybe_initialize(FLAGS.distributed)
    from imprag_jax.model import ConfigError
    from imprag_jax.train.trainer import train

    try:
        train(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
