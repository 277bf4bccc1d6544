"""Config loading: YAML files with `_base_` inheritance and command-line overrides, validated into dataclasses."""
from ppzoo.config.loader import config_from_dict, config_to_dict, load_config, resolve_parallel_and_batch
from ppzoo.config.schema import Config

__all__ = ["Config", "config_from_dict", "config_to_dict", "load_config", "resolve_parallel_and_batch"]
