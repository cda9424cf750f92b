"""The run layer: everything about a run directory and the config that made it.

    <workdir>/config.json      the config (`load_run_config`, `write_run_config`)
    <workdir>/checkpoints/     train state, data state and model config per step (`Checkpoints`,
                               `restore_params`, `checkpoint_steps`)
    <workdir>/data/ or data.dir  the run's data folder (`training_data_dir` generates or prepares it,
                               `existing_data_dir` only finds it)
    tokenizer and initial model  `tokenizer`, `load_model`
    a trained run for inference  `run.session.ImpRAGSession`

Above model/, data/, convert/, retrieval/ and infer/; below train/, evaluation, export and the command-line modules.
"""
from .checkpoint import (Checkpoints, checkpoint_steps, damaged_checkpoint, latest_step, quiet_failed_restore,
                         restore_params)
from .config import (RunError, batch_config, eval_ks, eval_L_q, load_run_config, model_config, parse_list,
                     parse_weights, write_run_config)
from .data import data_dir_path, existing_data_dir, training_data_dir
from .model import load_model, tokenizer

__all__ = ["Checkpoints", "RunError", "batch_config", "checkpoint_steps", "damaged_checkpoint", "data_dir_path",
           "eval_L_q", "eval_ks", "existing_data_dir", "latest_step", "load_model", "load_run_config",
           "model_config", "parse_list", "parse_weights", "quiet_failed_restore", "restore_params", "tokenizer",
           "training_data_dir", "write_run_config"]
