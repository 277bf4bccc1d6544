"""Tests for ppzoo.config.loader: `_base_` merging, overrides, strict validation and batch resolution.

Pure Python: a test-only module and dataset are registered here, so no model code or paddle is needed.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pytest
import yaml

from ppzoo.config import config_to_dict, load_config, resolve_parallel_and_batch
from ppzoo.config.schema import Config, DatasetSection
from ppzoo.errors import ConfigError
from ppzoo.registry import register_dataset, register_module


@dataclass
class _TestRopeConfig:
    theta: float = 10000.0
    scaling: Optional[str] = None


@dataclass
class _TestModuleConfig:
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.0
    layer_sizes: List[int] = field(default_factory=lambda: [64, 64])
    extra: Dict[str, Any] = field(default_factory=dict)
    rope: _TestRopeConfig = field(default_factory=_TestRopeConfig)
    window: Optional[int] = None


@register_module("_TestModule")
class _TestModule:
    config_class = _TestModuleConfig


@dataclass
class _TestOtherModuleConfig:
    width: int = 8


@register_module("_TestOtherModule")
class _TestOtherModule:
    config_class = _TestOtherModuleConfig


@dataclass
class _TestDatasetConfig:
    path: str = ""
    max_chars: Optional[int] = None


@register_dataset("_TestDataset")
class _TestDataset:
    config_class = _TestDatasetConfig


MINIMAL = "Model:\n  module: _TestModule\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------
# Reading files and _base_
# --------------------------------------------------------------------------------------------------------


def test_minimal_config_uses_schema_defaults(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    cfg = load_config(path)
    assert cfg.model_module == "_TestModule"
    assert cfg.Model == _TestModuleConfig()
    assert cfg.Engine.max_steps == 100
    assert cfg.Data.Train is None and cfg.Data.Eval is None
    assert cfg.source == str(path)


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL + "Engine:\nOptimizer:\n"))
    assert cfg.Engine.max_steps == 100
    assert cfg.Optimizer.lr.max_lr == pytest.approx(3e-4)


def test_base_inheritance_three_levels_relative_to_each_file(tmp_path):
    write(
        tmp_path / "configs" / "base" / "defaults.yaml",
        MINIMAL
        + "Engine:\n  max_steps: 10\n  logging_freq: 5\n  mix_precision:\n    enable: true\n    dtype: float16\n"
        "Optimizer:\n  lr:\n    max_lr: 1.0e-3\n    warmup_steps: 7\n",
    )
    write(
        tmp_path / "configs" / "models" / "mid.yaml",
        "_base_: ../base/defaults.yaml\n"
        "Model:\n  hidden_size: 128\n  layer_sizes: [1, 2, 3]\n"
        "Engine:\n  mix_precision:\n    dtype: bfloat16\n",
    )
    top = write(
        tmp_path / "experiments" / "run1" / "top.yaml",
        "_base_: ../../configs/models/mid.yaml\n"
        "Model:\n  layer_sizes: [9]\n"
        "Engine:\n  max_steps: 30\n"
        "Optimizer:\n  lr:\n    max_lr: 5.0e-4\n",
    )
    cfg = load_config(top)
    # Each level's keys survive unless a later level sets the same key.
    assert cfg.Engine.max_steps == 30
    assert cfg.Engine.logging_freq == 5
    assert cfg.Engine.mix_precision.enable is True
    assert cfg.Engine.mix_precision.dtype == "bfloat16"
    assert cfg.Optimizer.lr.max_lr == pytest.approx(5e-4)
    assert cfg.Optimizer.lr.warmup_steps == 7
    assert cfg.Model.hidden_size == 128
    # Lists are replaced, not merged.
    assert cfg.Model.layer_sizes == [9]
    assert cfg.source == str(top)


@dataclass
class _TestOtherDatasetConfig:
    files: List[str] = field(default_factory=list)


@register_dataset("_TestOtherDataset")
class _TestOtherDataset:
    config_class = _TestOtherDatasetConfig


def test_derived_config_switching_dataset_does_not_inherit_its_arguments(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "Data:\n  Train:\n    dataset: _TestDataset\n    path: a.txt\n"
          "    max_chars: 100\n  Eval:\n    dataset: _TestDataset\n    path: b.txt\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\nData:\n  Train:\n    dataset: _TestOtherDataset\n"
                "    files: [c.txt]\n  Eval:\n    dataset: _TestDataset\n    max_chars: 5\n")
    cfg = load_config(top)
    # Another dataset: the base's path/max_chars belong to _TestDataset's schema and are not carried over.
    assert cfg.Data.Train == DatasetSection("_TestOtherDataset", _TestOtherDatasetConfig(files=["c.txt"]))
    # The same dataset: its arguments merge as usual.
    assert cfg.Data.Eval == DatasetSection("_TestDataset", _TestDatasetConfig(path="b.txt", max_chars=5))


def test_list_of_bases_merged_in_order_then_the_file(tmp_path):
    write(tmp_path / "a.yaml", MINIMAL + "Engine:\n  max_steps: 1\n  logging_freq: 1\n  eval_iters: 1\n")
    write(tmp_path / "b.yaml", "Engine:\n  max_steps: 2\n  logging_freq: 2\n")
    top = write(tmp_path / "sub" / "top.yaml", "_base_: [../a.yaml, ../b.yaml]\nEngine:\n  max_steps: 3\n")
    cfg = load_config(top)
    assert (cfg.Engine.max_steps, cfg.Engine.logging_freq, cfg.Engine.eval_iters) == (3, 2, 1)


def test_base_cycle_names_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n" + MINIMAL)
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    message = error_of(tmp_path / "a.yaml")
    assert "cycle" in message
    assert message.count("a.yaml") == 2 and "b.yaml" in message


def test_base_including_itself_is_a_cycle(tmp_path):
    message = error_of(write(tmp_path / "self.yaml", "_base_: ./self.yaml\n"))
    assert "cycle" in message and "self.yaml" in message


def test_missing_base_names_the_referencing_file(tmp_path):
    top = write(tmp_path / "exp" / "top.yaml", "_base_: ../nowhere.yaml\n" + MINIMAL)
    message = error_of(top)
    assert "nowhere.yaml" in message
    assert str(top) in message


def test_base_must_be_path_or_list_of_paths(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", "_base_: 3\n" + MINIMAL))
    assert "_base_" in message and "c.yaml" in message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = error_of(missing)
    assert "not found" in message and str(missing) in message


def test_yaml_syntax_error_reports_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", "Global:\n  seed: 1\n\tdevice: cpu\n")
    message = error_of(path)
    assert str(path) in message
    assert "line 3, column 1" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = error_of(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert "mapping" in message and "list.yaml" in message


# --------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------


def test_overrides_convert_to_field_types(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        MINIMAL + "  window: 16\nData:\n  Train:\n    dataset: _TestDataset\n    max_chars: 5\n",
    )
    cfg = load_config(
        path,
        [
            "Engine.max_steps=20",
            "Optimizer.lr.max_lr=1e-3",  # YAML alone would read this as a string
            "Optimizer.weight_decay=0",  # int for a float field
            "Engine.mix_precision.enable=true",
            "Model.hidden_size=128",
            "Model.window=null",
            "Model.rope.theta=5e5",
            "Data.Train.max_chars=1000",
            "Engine.output_dir=123",  # a str field keeps the text as typed
            "Global.micro_batch_size=4",
        ],
    )
    assert cfg.Engine.max_steps == 20 and type(cfg.Engine.max_steps) is int
    assert cfg.Optimizer.lr.max_lr == pytest.approx(1e-3) and type(cfg.Optimizer.lr.max_lr) is float
    assert cfg.Optimizer.weight_decay == 0.0 and type(cfg.Optimizer.weight_decay) is float
    assert cfg.Engine.mix_precision.enable is True
    assert cfg.Model.hidden_size == 128
    assert cfg.Model.window is None
    assert cfg.Model.rope.theta == pytest.approx(5e5)
    assert cfg.Data.Train.args.max_chars == 1000
    assert cfg.Engine.output_dir == "123"
    assert cfg.Global.micro_batch_size == 4


def test_override_can_set_list_and_create_missing_section(tmp_path):
    cfg = load_config(
        write(tmp_path / "c.yaml", MINIMAL),
        ["Model.layer_sizes=[1, 2]", "Distributed.dp_degree=2", "Data.Eval.dataset=_TestDataset"],
    )
    assert cfg.Model.layer_sizes == [1, 2]
    assert cfg.Distributed.dp_degree == 2
    assert cfg.Data.Eval == DatasetSection(dataset="_TestDataset", args=_TestDatasetConfig())


def test_later_override_wins(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL), ["Engine.max_steps=5", "Engine.max_steps=6"])
    assert cfg.Engine.max_steps == 6


@pytest.mark.parametrize("override", ["Engine.max_steps", "=5", "max_steps=5", "Engine.=5", "Engine..x=1"])
def test_malformed_override_shows_expected_form(tmp_path, override):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL), [override])
    assert repr(override) in message
    assert "Section.key=value" in message


def test_override_of_unknown_key_is_reported_with_suggestion(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL), ["Engine.max_step=20"])
    assert "`Engine.max_step`" in message
    assert "did you mean `Engine.max_steps`?" in message
    assert "override `Engine.max_step=20`" in message


def test_override_with_wrong_type_is_reported(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL), ["Engine.max_steps=many"])
    assert "`Engine.max_steps` must be an int" in message and "'many'" in message


def test_override_inside_a_scalar_is_an_error(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL + "Engine:\n  max_steps: 3\n"), ["Engine.max_steps.x=1"])
    assert "`Engine.max_steps`" in message and "cannot set" in message


def test_override_creating_a_mapping_where_a_scalar_belongs_is_a_type_error(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL), ["Engine.max_steps.x=1"])
    assert "`Engine.max_steps` must be an int" in message
    assert "override `Engine.max_steps.x=1`" in message


# --------------------------------------------------------------------------------------------------------
# Validation: unknown keys, wrong types, registries
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, suggestion",
    [  # `text` is appended to MINIMAL, so indented lines continue its Model section
        ("Engin:\n  max_steps: 3\n", "Engin", "Engine"),
        ("Engine:\n  max_step: 3\n", "Engine.max_step", "Engine.max_steps"),
        ("Engine:\n  mix_precision:\n    enabel: true\n", "Engine.mix_precision.enabel", "Engine.mix_precision.enable"),
        ("Optimizer:\n  lr:\n    max_rl: 0.1\n", "Optimizer.lr.max_rl", "Optimizer.lr.max_lr"),
        ("  hiden_size: 3\n", "Model.hiden_size", "Model.hidden_size"),
        ("  rope:\n    theat: 3.0\n", "Model.rope.theat", "Model.rope.theta"),
        (
            "Data:\n  Train:\n    dataset: _TestDataset\n    max_char: 3\n",
            "Data.Train.max_char",
            "Data.Train.max_chars",
        ),
    ],
)
def test_unknown_key_names_path_file_and_closest_key(tmp_path, text, key, suggestion):
    path = write(tmp_path / "config.yaml", MINIMAL + text)
    message = error_of(path)
    assert f"`{key}`" in message
    assert str(path) in message
    assert f"did you mean `{suggestion}`?" in message


def test_unknown_key_lists_valid_keys(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL + "Distributed:\n  zz_top: 1\n"))
    assert "`Distributed.zz_top`" in message
    assert "did you mean" not in message  # nothing is close
    assert "dp_degree" in message and "sharding_stage" in message


def test_unknown_model_key_lists_module_config_keys(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL + "  colour: red\n"))
    assert "`Model.colour`" in message
    assert "module" in message and "hidden_size" in message and "layer_sizes" in message


def test_unknown_key_from_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", MINIMAL + "Engine:\n  max_step: 3\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\n")
    message = error_of(top)
    assert str(top) in message and str(base) in message
    assert "`Engine.max_step`" in message


@pytest.mark.parametrize(
    "text, key, expected, received",
    [
        ("Engine:\n  max_steps: abc\n", "Engine.max_steps", "an int", "'abc'"),
        ("Engine:\n  max_steps: true\n", "Engine.max_steps", "an int", "True"),  # bool is not an int
        ("Engine:\n  max_steps: 2.5\n", "Engine.max_steps", "an int", "2.5"),
        ("Engine:\n  recompute: 1\n", "Engine.recompute", "a bool", "1"),
        ("Global:\n  device: 3\n", "Global.device", "a string", "3"),
        ("Optimizer:\n  weight_decay: lots\n", "Optimizer.weight_decay", "a float", "'lots'"),
        ("Engine:\n  mix_precision: yes\n", "Engine.mix_precision", "a mapping", "True"),
        ("Engine: 5\n", "Engine", "a mapping", "5"),
        ("Global:\n  micro_batch_size: x\n", "Global.micro_batch_size", "an int or null", "'x'"),
    ],
)
def test_wrong_type_names_path_expected_type_and_value(tmp_path, text, key, expected, received):
    path = write(tmp_path / "c.yaml", MINIMAL + text)
    message = error_of(path)
    assert f"`{key}` must be {expected}" in message
    assert received in message
    assert str(path) in message


def test_wrong_type_inside_list_names_the_position(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL + "  layer_sizes: [1, two]\n"))
    assert "`Model.layer_sizes[1]` must be an int" in message and "'two'" in message


def test_lenient_conversions(tmp_path):
    # int for float, exponent strings for float (YAML 1.1 reads 3e-4 as a string), None for Optional,
    # any mapping for a Dict[str, Any] field.
    text = (
        MINIMAL
        + "  dropout: 0\n  window: null\n  extra: {a: [1, 2], b: {c: d}}\n"
        + "Optimizer:\n  beta1: 1\n  lr:\n    max_lr: 3e-4\n"
    )
    cfg = load_config(write(tmp_path / "c.yaml", text))
    assert cfg.Model.dropout == 0.0 and type(cfg.Model.dropout) is float
    assert cfg.Model.window is None
    assert cfg.Model.extra == {"a": [1, 2], "b": {"c": "d"}}
    assert cfg.Optimizer.beta1 == 1.0 and type(cfg.Optimizer.beta1) is float
    assert cfg.Optimizer.lr.max_lr == pytest.approx(3e-4)


def test_unknown_module_lists_valid_modules(tmp_path):
    path = write(tmp_path / "c.yaml", "Model:\n  module: _TestModul\n")
    message = error_of(path)
    assert "'_TestModul'" in message
    assert "_TestModule" in message and "_TestOtherModule" in message
    assert "Model.module" in message and str(path) in message


def test_model_section_and_module_key_are_required(tmp_path):
    assert "`Model` section is missing" in error_of(write(tmp_path / "a.yaml", "Engine:\n  max_steps: 3\n"))
    message = error_of(write(tmp_path / "b.yaml", "Model:\n  hidden_size: 3\n"))
    assert "`Model.module` is missing" in message and "_TestModule" in message


def test_other_module_gets_its_own_schema(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "Model:\n  module: _TestOtherModule\n  width: 3\n"))
    assert cfg.model_module == "_TestOtherModule"
    assert cfg.Model == _TestOtherModuleConfig(width=3)
    message = error_of(write(tmp_path / "d.yaml", "Model:\n  module: _TestOtherModule\n  hidden_size: 3\n"))
    assert "`Model.hidden_size`" in message and "width" in message


def test_datasets_are_validated_into_their_config_class(tmp_path):
    text = (
        MINIMAL
        + "Data:\n  seq_len: 32\n  Train:\n    dataset: _TestDataset\n    path: train.txt\n    max_chars: 100\n"
        + "  Eval:\n    dataset: _TestDataset\n"
    )
    cfg = load_config(write(tmp_path / "c.yaml", text))
    assert cfg.Data.seq_len == 32
    assert cfg.Data.Train == DatasetSection("_TestDataset", _TestDatasetConfig(path="train.txt", max_chars=100))
    assert cfg.Data.Eval == DatasetSection("_TestDataset", _TestDatasetConfig())


def test_dataset_name_is_required_and_must_be_registered(tmp_path):
    message = error_of(write(tmp_path / "a.yaml", MINIMAL + "Data:\n  Train:\n    path: x\n"))
    assert "`Data.Train.dataset` is missing" in message and "_TestDataset" in message
    message = error_of(write(tmp_path / "b.yaml", MINIMAL + "Data:\n  Eval:\n    dataset: _TestDatset\n"))
    assert "'_TestDatset'" in message and "_TestDataset" in message and "Data.Eval.dataset" in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("Global:\n  global_batch_size: 0\n", "Global.global_batch_size"),
        ("Global:\n  micro_batch_size: -1\n", "Global.micro_batch_size"),
        ("Engine:\n  accumulate_steps: 0\n", "Engine.accumulate_steps"),
        ("Engine:\n  max_steps: 0\n", "Engine.max_steps"),
        ("Engine:\n  keep_last: 0\n", "Engine.keep_last"),
        ("Global:\n  device: tpu\n", "Global.device"),
        ("Engine:\n  mix_precision:\n    dtype: float8\n", "Engine.mix_precision.dtype"),
        ("Distributed:\n  mp_degree: 0\n", "Distributed.mp_degree"),
        ("Distributed:\n  ep_degree: 0\n", "Distributed.ep_degree"),
    ],
)
def test_sanity_checks(tmp_path, text, key):
    message = error_of(write(tmp_path / "c.yaml", MINIMAL + text))
    assert f"`{key}`" in message and "must be" in message


# --------------------------------------------------------------------------------------------------------
# config_to_dict
# --------------------------------------------------------------------------------------------------------


def test_config_to_dict_round_trips_through_yaml(tmp_path):
    text = (
        MINIMAL
        + "  hidden_size: 96\n  layer_sizes: [3, 4]\n  extra: {k: [1, 2]}\n  rope:\n    scaling: linear\n"
        + "Global:\n  micro_batch_size: 2\n"
        + "Engine:\n  max_steps: 7\n  mix_precision:\n    enable: true\n"
        + "Optimizer:\n  lr:\n    max_lr: 3e-4\n    decay_steps: 50\n"
        + "Data:\n  Train:\n    dataset: _TestDataset\n    max_chars: 10\n"
        + "Distributed:\n  dp_degree: 2\n"
    )
    original = load_config(write(tmp_path / "original.yaml", text))
    as_dict = config_to_dict(original)

    assert as_dict["Model"]["module"] == "_TestModule" and as_dict["Model"]["hidden_size"] == 96
    assert as_dict["Data"]["Train"] == {"dataset": "_TestDataset", "path": "", "max_chars": 10}
    assert "Eval" not in as_dict["Data"]
    assert "source" not in as_dict and "model_module" not in as_dict

    dumped = write(tmp_path / "dumped.yaml", yaml.safe_dump(as_dict))
    reloaded = load_config(dumped)
    assert reloaded == dataclasses.replace(original, source=str(dumped))


def test_config_to_dict_of_defaults_round_trips(tmp_path):
    original = load_config(write(tmp_path / "original.yaml", MINIMAL))
    dumped = write(tmp_path / "dumped.yaml", yaml.safe_dump(config_to_dict(original)))
    assert load_config(dumped) == dataclasses.replace(original, source=str(dumped))


# --------------------------------------------------------------------------------------------------------
# resolve_parallel_and_batch
# --------------------------------------------------------------------------------------------------------


def make_config(global_batch=8, micro=None, accumulate=None, **degrees):
    cfg = Config()
    cfg.Global.global_batch_size = global_batch
    cfg.Global.micro_batch_size = micro
    cfg.Engine.accumulate_steps = accumulate
    for key, value in degrees.items():
        setattr(cfg.Distributed, key, value)
    return cfg


def test_resolve_defaults_to_no_accumulation():
    cfg = resolve_parallel_and_batch(make_config(global_batch=16, dp_degree=2, sharding_degree=2), world_size=4)
    assert (cfg.Global.micro_batch_size, cfg.Engine.accumulate_steps) == (4, 1)


def test_resolve_derives_accumulate_from_micro():
    cfg = resolve_parallel_and_batch(make_config(global_batch=32, micro=4, dp_degree=2), world_size=2)
    assert (cfg.Global.micro_batch_size, cfg.Engine.accumulate_steps) == (4, 4)


def test_resolve_derives_micro_from_accumulate():
    cfg = resolve_parallel_and_batch(make_config(global_batch=32, accumulate=2, dp_degree=4), world_size=4)
    assert (cfg.Global.micro_batch_size, cfg.Engine.accumulate_steps) == (4, 2)


def test_resolve_accepts_consistent_triple_and_ignores_model_parallel_in_width():
    cfg = make_config(global_batch=16, micro=2, accumulate=4, dp_degree=2, mp_degree=2, pp_degree=2)
    resolve_parallel_and_batch(cfg, world_size=8)
    assert (cfg.Global.micro_batch_size, cfg.Engine.accumulate_steps) == (2, 4)


def test_resolve_rejects_inconsistent_triple_with_numbers():
    with pytest.raises(ConfigError) as info:
        resolve_parallel_and_batch(make_config(global_batch=16, micro=2, accumulate=2, dp_degree=2), world_size=2)
    message = str(info.value)
    assert "global_batch_size=16" in message and "= 8" in message
    assert "set global_batch_size=8" in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(global_batch=10, dp_degree=4), "multiple of 4"),  # micro would be 2.5
        (dict(global_batch=12, micro=5), "multiple of 5"),  # accumulate would be 2.4
        (dict(global_batch=12, accumulate=5), "multiple of 5"),  # micro would be 2.4
        (dict(global_batch=4, micro=8), "multiple of 8"),  # accumulate would be 0.5
    ],
)
def test_resolve_rejects_non_integer_results(kwargs, fragment):
    cfg = make_config(**kwargs)
    with pytest.raises(ConfigError) as info:
        resolve_parallel_and_batch(cfg, world_size=cfg.Distributed.dp_degree)
    assert fragment in str(info.value)
    assert f"global_batch_size={kwargs['global_batch']}" in str(info.value)


def test_resolve_world_size_mismatch_names_the_numbers_and_fix():
    with pytest.raises(ConfigError) as info:
        resolve_parallel_and_batch(make_config(dp_degree=2), world_size=4)
    message = str(info.value)
    assert "dp=2 x mp=1 x pp=1 x sharding=1 = 2" in message
    assert "4 processes" in message
    assert "set Distributed.dp_degree=4" in message and "launch 2 processes" in message


def test_resolve_world_size_mismatch_without_integer_dp_fix():
    with pytest.raises(ConfigError) as info:
        resolve_parallel_and_batch(make_config(mp_degree=2), world_size=3)
    message = str(info.value)
    assert "= 2 but the job has 3 processes" in message and "dp_degree=" not in message


def test_resolve_ep_degree_must_divide_world_size():
    with pytest.raises(ConfigError) as info:
        resolve_parallel_and_batch(make_config(dp_degree=2, ep_degree=4), world_size=2)
    assert "ep_degree=4" in str(info.value) and "(2)" in str(info.value)
