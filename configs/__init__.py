"""Run configs: `get_config(arg)` of each module returns an ml_collections ConfigDict built from
`imprag_jax.config_base.base_config()` (every field with its default). Load one by path with
`--config configs/x.py[:arg]` (from any folder) or import it as `configs.x` from the repository root."""
