"""Load a YAML config into the typed `Config` of schema.py, and turn it back into plain YAML data.

Loading happens in three steps, each with its own kind of error message:

1. read + merge: the file and its `_base_` files are read with yaml.safe_load and deep-merged (bases first,
   in order, then the file itself). We remember which file (or override) set each key, so an error about a
   key that came from a base file can say where to go and fix it.
2. overrides: "Section.key=value" strings from the command line are written into the merged dict. The value
   is parsed as YAML, then nudged towards the schema field's type (e.g. "1e-3" -> float, "123" stays a
   string for a str field).
3. validation: the merged dict is checked against the dataclasses strictly - unknown keys and wrong types are
   errors naming the full key path, the file and the closest valid key - and then sanity-checked.
"""
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ppzoo.config.schema import (
    Config,
    DataConfig,
    DatasetSection,
    DistributedConfig,
    EngineConfig,
    GlobalConfig,
    OptimizerConfig,
)
from ppzoo.errors import ConfigError
from ppzoo.registry import DATASETS, MODULES

BASE_KEY = "_base_"
SECTION_ORDER = ("Global", "Engine", "Model", "Data", "Optimizer", "Distributed")
# Sections whose schema is fixed; Model and Data need the registries and are built by their own functions.
FIXED_SECTIONS = {
    "Global": GlobalConfig,
    "Engine": EngineConfig,
    "Optimizer": OptimizerConfig,
    "Distributed": DistributedConfig,
}
DATASET_SPLITS = ("Train", "Eval")
OVERRIDE_FORM = "Section.key=value (e.g. Engine.max_steps=20 or Optimizer.lr.max_lr=1e-3)"

KeyPath = Tuple[Union[str, int], ...]  # dict keys are str, list positions are int


# ----------------------------------------------------------------------------------------------------------
# Key paths and error context
# ----------------------------------------------------------------------------------------------------------


def _format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


class _Context:
    """What error messages need to know: the config file, and which file/override set each key."""

    def __init__(self, source: str, origins: Dict[KeyPath, str]):
        self.source = source
        self.origins = origins

    def where(self, path: KeyPath) -> str:
        """`<source>`, plus the base file or override that set the key when that is somewhere else."""
        for end in range(len(path), 0, -1):
            origin = self.origins.get(tuple(path[:end]))
            if origin is not None:
                if origin != self.source:
                    return f"{self.source} (set in {origin})"
                break
        return self.source

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(f"Config error in {self.where(path)}: {message}")


# ----------------------------------------------------------------------------------------------------------
# Step 1: reading and merging files
# ----------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if mark is not None:
            # yaml marks count from 0; editors count from 1.
            location = f" at line {mark.line + 1}, column {mark.column + 1}"
        else:
            location = ""
        raise ConfigError(f"YAML syntax error in {path}{location}: {problem}") from None
    if data is None:  # an empty file is an empty config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must contain a mapping of sections, got {type(data).__name__}")
    return data


def _record_origins(data: dict, origin: str, origins: Dict[KeyPath, str], prefix: KeyPath = ()) -> None:
    for key, value in data.items():
        path = prefix + (key,)
        origins[path] = origin
        if isinstance(value, dict):
            _record_origins(value, origin, origins, path)


def _switches_dataset(base: dict, update: dict) -> bool:
    """Whether `update` names a different dataset than `base` (e.g. a derived config's Data.Train moving from
    BuiltinCorpus to TextFiles): the base's arguments belong to the other dataset's schema."""
    return "dataset" in base and "dataset" in update and base["dataset"] != update["dataset"]


def _deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`: mappings merge key by key, anything else replaces. Neither input is modified.

    A mapping that switches to another dataset replaces the base's mapping instead of inheriting its
    arguments, which the other dataset would reject as unknown keys (and a derived file could not remove)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _switches_dataset(merged[key], value):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _base_paths(data: dict, path: Path) -> List[str]:
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return []
    if isinstance(bases, str):
        return [bases]
    if isinstance(bases, list) and all(isinstance(item, str) for item in bases):
        return bases
    raise ConfigError(f"{BASE_KEY} in {path} must be a path or a list of paths, got {bases!r}")


def _load_merged(path: Path, chain: List[Path], origins: Dict[KeyPath, str]) -> dict:
    """Read `path` and its bases recursively; `chain` holds the files currently being read, for cycles.

    Origins are recorded in merge order (bases, then the file), so for every key that survives the merge
    the last recorded origin is the file whose value won - the same rule the deep merge follows.
    """
    data = _read_yaml(path)
    merged: dict = {}
    for base in _base_paths(data, path):
        base_path = path.parent / base
        if base_path.resolve() in [p.resolve() for p in chain]:
            cycle = " -> ".join(str(p) for p in chain + [base_path])
            raise ConfigError(f"{BASE_KEY} files include each other in a cycle: {cycle}")
        if not base_path.is_file():
            raise ConfigError(f"{BASE_KEY} file {base!r} referenced by {path} not found (looked for {base_path})")
        merged = _deep_merge(merged, _load_merged(base_path, chain + [base_path], origins))
    _record_origins(data, str(path), origins)
    return _deep_merge(merged, data)


# ----------------------------------------------------------------------------------------------------------
# Type helpers shared by overrides and validation
# ----------------------------------------------------------------------------------------------------------


def _field_types(cls) -> Dict[str, Any]:
    """Field name -> type for the fields a config dataclass can be given, with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _without_none(tp):
    """Optional[X] -> X; other types unchanged."""
    if typing.get_origin(tp) is Union:
        others = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return tp


def _describe_type(tp) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, tuple) or tp in (list, tuple):
        element = args[0] if args else Any
        return "a list" if element is Any else f"a list of {_describe_type(element)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    names = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe_value(value) -> str:
    return f"{value!r} ({'null' if value is None else type(value).__name__})"


# ----------------------------------------------------------------------------------------------------------
# Step 2: overrides
# ----------------------------------------------------------------------------------------------------------


def _parse_override(text: str) -> Tuple[List[str], str]:
    key, sep, value = str(text).partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or any(not part.strip() for part in parts):
        raise ConfigError(f"Malformed override {text!r}: expected the form {OVERRIDE_FORM}")
    return [part.strip() for part in parts], value.strip()


def _registered_config_class(registry, name):
    """The config_class of a registered name, or None when the name is not (yet) known."""
    if isinstance(name, str) and name in registry:
        return getattr(registry.get(name), "config_class", None)
    return None


def _override_target_type(parts: List[str], merged: dict):
    """The schema type of the field an override sets, or None when the key is unknown.

    An unknown key is not an error here: validation reports it later, with a suggestion.
    """
    section, rest = parts[0], parts[1:]
    if section == "Model":
        if rest == ["module"]:
            return str
        model = merged.get("Model")
        cls = _registered_config_class(MODULES, model.get("module") if isinstance(model, dict) else None)
    elif section == "Data":
        if rest[0] in DATASET_SPLITS and len(rest) > 1:
            if rest[1:] == ["dataset"]:
                return str
            data = merged.get("Data")
            split = data.get(rest[0]) if isinstance(data, dict) else None
            cls = _registered_config_class(DATASETS, split.get("dataset") if isinstance(split, dict) else None)
            rest = rest[1:]
        else:
            cls = DataConfig
    else:
        cls = FIXED_SECTIONS.get(section)

    tp = cls
    for part in rest:
        tp = _without_none(tp)
        if not dataclasses.is_dataclass(tp):
            # Inside a Dict/Any field every key is allowed and untyped.
            return Any if (tp is Any or tp is dict or typing.get_origin(tp) is dict) else None
        tp = _field_types(tp).get(part)
        if tp is None:
            return None
    return tp


def _parse_override_value(raw: str, target):
    """Parse with YAML, then follow the target type where YAML's guess differs from what the field needs."""
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw  # e.g. "a: b: c"; a plain string is the only sensible reading
    wanted = _without_none(target)
    if wanted is str:
        if raw == "":
            return ""
        if value is not None and not isinstance(value, (str, list, dict)):
            # YAML reads "123", "yes" or "2024-01-01" as non-strings; a str field wants the text as typed.
            return raw
    if wanted is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set_in(merged: dict, parts: List[str], value, text: str) -> None:
    node = merged
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # a missing or empty (`Section:`) section becomes a mapping
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"Override {text!r} cannot set a key inside `{where}`, which is {_describe_value(child)}")
        else:
            child = node[part] = dict(child)  # copy: merged dicts may share structure with their sources
        node = child
    node[parts[-1]] = value


def _apply_overrides(merged: dict, overrides, origins: Dict[KeyPath, str]) -> dict:
    if isinstance(overrides, str):  # a single override passed without a list
        overrides = [overrides]
    merged = dict(merged)
    for text in overrides:
        parts, raw = _parse_override(text)
        value = _parse_override_value(raw, _override_target_type(parts, merged))
        _set_in(merged, parts, value, text)
        path, origin = tuple(parts), f"override `{text}`"
        for end in range(1, len(path)):  # sections the override created come from no file
            origins.setdefault(path[:end], origin)
        origins[path] = origin
        if isinstance(value, dict):
            _record_origins(value, origin, origins, path)
    return merged


# ----------------------------------------------------------------------------------------------------------
# Step 3: validation
# ----------------------------------------------------------------------------------------------------------


class _TypeMismatch(Exception):
    """Internal: a value does not fit a type; the caller turns it into a ConfigError with the key path."""


def _unknown_key_error(ctx: _Context, path: KeyPath, valid: List[str]) -> ConfigError:
    key = str(path[-1])
    parent = _format_path(path[:-1])
    full = _format_path(path[:-1] + (key,))
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean `{_format_path(path[:-1] + (close[0],))}`?" if close else "."
    if parent:
        listing = f"Valid keys under `{parent}`: {', '.join(valid) or '(none)'}."
        return ctx.error(path, f"unknown key `{full}`{hint} {listing}")
    return ctx.error(path, f"unknown top-level section `{full}`{hint} Valid sections: {', '.join(valid)}.")


def _convert(value, tp, path: KeyPath, ctx: _Context):
    """Check `value` against `tp` and return it in the field's type (int -> float, dict -> dataclass, ...)."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for alternative in (arg for arg in args if arg is not type(None)):
            try:
                return _convert(value, alternative, path, ctx)
            except _TypeMismatch:
                continue
        raise _TypeMismatch(tp)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _TypeMismatch(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _TypeMismatch(tp)
        return _build_dataclass(tp, value, path, ctx)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch(tp)
    if tp is int:
        # bool is a subclass of int, but `true` where a count is expected is a mistake.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch(tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # "3e-4": YAML 1.1 reads exponents without a dot as strings
            try:
                return float(value)
            except ValueError:
                pass
        raise _TypeMismatch(tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _TypeMismatch(tp)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _TypeMismatch(tp)
            element_types = list(args)
        else:
            element_types = [args[0] if args else Any] * len(value)
        items = [_convert_field(item, t, path + (i,), ctx) for i, (item, t) in enumerate(zip(value, element_types))]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {key: _convert_field(item, value_type, path + (key,), ctx) for key, item in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _TypeMismatch(tp)
    return value  # an annotation we do not understand: accept rather than reject valid configs


def _convert_field(value, tp, path: KeyPath, ctx: _Context):
    """_convert, with a type mismatch turned into a ConfigError naming the key path."""
    try:
        return _convert(value, tp, path, ctx)
    except _TypeMismatch:
        raise ctx.error(
            path, f"`{_format_path(path)}` must be {_describe_type(tp)}, got {_describe_value(value)}"
        ) from None


def _build_dataclass(cls, data: dict, path: KeyPath, ctx: _Context, skip=()):
    """Validate the mapping `data` into `cls`; keys in `skip` are allowed here but handled by the caller."""
    types = _field_types(cls)
    valid = list(types) + [key for key in skip if key not in types]
    kwargs = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in types:
            raise _unknown_key_error(ctx, path + (key,), valid)
        kwargs[key] = _convert_field(value, types[key], path + (key,), ctx)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs and name not in skip:
            raise ctx.error(path, f"`{_format_path(path + (name,))}` is required but missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a config_class's own __post_init__ checks
        raise ctx.error(path, f"invalid `{_format_path(path)}`: {exc}") from None


def _section_mapping(value, path: KeyPath, ctx: _Context) -> dict:
    if value is None:  # `Engine:` with nothing under it means all defaults
        return {}
    if not isinstance(value, dict):
        raise ctx.error(path, f"`{_format_path(path)}` must be a mapping of keys, got {_describe_value(value)}")
    return value


def _config_class_of(registry, name, path: KeyPath, ctx: _Context):
    where = f"{_format_path(path)} in {ctx.where(path)}"
    if not isinstance(name, str):
        raise ctx.error(path, f"`{_format_path(path)}` must be a registered name, got {_describe_value(name)}")
    registered = registry.get(name, where=where)
    config_class = getattr(registered, "config_class", None)
    if not dataclasses.is_dataclass(config_class):
        # Not the user's fault: whoever registered the class forgot its schema.
        raise TypeError(f"registered {registry.kind} {name!r} has no `config_class` dataclass")
    return config_class


def _build_model(value, ctx: _Context):
    path: KeyPath = ("Model",)
    if value is None:
        raise ctx.error(path, "the `Model` section is missing; it needs at least `module: <registered module>`")
    data = _section_mapping(value, path, ctx)
    if "module" not in data:
        raise ctx.error(path, f"`Model.module` is missing; valid modules: {', '.join(MODULES.names()) or '(none)'}")
    name = data["module"]
    config_class = _config_class_of(MODULES, name, path + ("module",), ctx)
    return name, _build_dataclass(config_class, data, path, ctx, skip=("module",))


def _build_dataset_section(value, path: KeyPath, ctx: _Context) -> Optional[DatasetSection]:
    if value is None:
        return None
    data = _section_mapping(value, path, ctx)
    if "dataset" not in data:
        valid = ", ".join(DATASETS.names()) or "(none)"
        raise ctx.error(path, f"`{_format_path(path + ('dataset',))}` is missing; valid datasets: {valid}")
    name = data["dataset"]
    config_class = _config_class_of(DATASETS, name, path + ("dataset",), ctx)
    args = _build_dataclass(config_class, data, path, ctx, skip=("dataset",))
    return DatasetSection(dataset=name, args=args)


def _build_data(value, ctx: _Context) -> DataConfig:
    path: KeyPath = ("Data",)
    data = _section_mapping(value, path, ctx)
    config = _build_dataclass(DataConfig, data, path, ctx, skip=DATASET_SPLITS)
    for split in DATASET_SPLITS:
        setattr(config, split, _build_dataset_section(data.get(split), path + (split,), ctx))
    return config


def _build_config(merged: dict, ctx: _Context) -> Config:
    for key in merged:
        if key not in SECTION_ORDER:
            raise _unknown_key_error(ctx, (key,), list(SECTION_ORDER))
    sections = {
        name: _build_dataclass(cls, _section_mapping(merged.get(name), (name,), ctx), (name,), ctx)
        for name, cls in FIXED_SECTIONS.items()
    }
    module_name, model = _build_model(merged.get("Model"), ctx)
    return Config(
        Model=model,
        model_module=module_name,
        Data=_build_data(merged.get("Data"), ctx),
        source=ctx.source,
        **sections,
    )


def _check_sanity(cfg: Config, ctx: _Context) -> None:
    def require(ok: bool, key: str, rule: str, value) -> None:
        if not ok:
            path = tuple(key.split("."))
            raise ctx.error(path, f"`{key}` {rule}, got {value!r}")

    glob, engine, dist = cfg.Global, cfg.Engine, cfg.Distributed
    require(glob.device in ("auto", "cpu", "gpu"), "Global.device", "must be one of auto, cpu, gpu", glob.device)
    require(glob.global_batch_size > 0, "Global.global_batch_size", "must be > 0", glob.global_batch_size)
    derivable = {"Global.micro_batch_size": glob.micro_batch_size, "Engine.accumulate_steps": engine.accumulate_steps}
    for key, value in derivable.items():
        require(value is None or value > 0, key, "must be > 0 (or null to derive it)", value)
    require(engine.max_steps > 0, "Engine.max_steps", "must be > 0", engine.max_steps)
    require(engine.keep_last >= 1, "Engine.keep_last", "must be >= 1", engine.keep_last)
    require(engine.logging_freq >= 1, "Engine.logging_freq", "must be >= 1", engine.logging_freq)
    for key in ("eval_freq", "eval_iters", "save_steps"):
        require(getattr(engine, key) >= 0, f"Engine.{key}", "must be >= 0", getattr(engine, key))
    precision = engine.mix_precision
    require(
        precision.dtype in ("bfloat16", "float16"),
        "Engine.mix_precision.dtype",
        "must be bfloat16 or float16",
        precision.dtype,
    )
    require(precision.level in ("O1", "O2"), "Engine.mix_precision.level", "must be O1 or O2", precision.level)
    require(cfg.Data.seq_len > 0, "Data.seq_len", "must be > 0", cfg.Data.seq_len)
    require(cfg.Data.num_workers >= 0, "Data.num_workers", "must be >= 0", cfg.Data.num_workers)
    for key in ("dp_degree", "mp_degree", "pp_degree", "sharding_degree", "ep_degree"):
        require(getattr(dist, key) >= 1, f"Distributed.{key}", "must be >= 1", getattr(dist, key))
    require(dist.sharding_stage in (1, 2, 3), "Distributed.sharding_stage", "must be 1, 2 or 3", dist.sharding_stage)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def load_config(path, overrides=()) -> Config:
    """Read, merge (`_base_`), override and validate a YAML config file. Every user mistake is a ConfigError."""
    path = Path(path)
    origins: Dict[KeyPath, str] = {}
    merged = _load_merged(path, [path], origins)
    return _validated(merged, str(path), overrides, origins)


def config_from_dict(data: dict, source: str = "<dict>", overrides=()) -> Config:
    """Validate an already-merged config dict (e.g. the one a checkpoint stores) like load_config does."""
    import copy

    return _validated(copy.deepcopy(data), source, overrides, {})


def _validated(merged: dict, source: str, overrides, origins: Dict[KeyPath, str]) -> Config:
    merged = _apply_overrides(merged, overrides, origins)
    ctx = _Context(source, origins)
    cfg = _build_config(merged, ctx)
    _check_sanity(cfg, ctx)
    cfg.source = source
    return cfg


def _plain(value):
    """Dataclasses, tuples and nested containers -> dicts, lists and scalars that yaml.safe_dump accepts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """The inverse of load_config: a dict in the YAML file's shape (no `_base_`; `source` is not included)."""
    result = {name: _plain(getattr(cfg, name)) for name in FIXED_SECTIONS}
    model = {"module": cfg.model_module}
    if cfg.Model is not None:
        model.update(_plain(cfg.Model))
    result["Model"] = model
    data = {key: value for key, value in _plain(cfg.Data).items() if key not in DATASET_SPLITS}
    for split in DATASET_SPLITS:
        section = getattr(cfg.Data, split)
        if section is not None:
            args = _plain(section.args) if section.args is not None else {}
            data[split] = {"dataset": section.dataset, **args}
    result["Data"] = data
    return {name: result[name] for name in SECTION_ORDER}


def resolve_parallel_and_batch(cfg: Config, world_size: int) -> Config:
    """Check the parallel degrees against the job size and fill in micro_batch_size / accumulate_steps.

    global_batch_size = micro_batch_size * accumulate_steps * dp_degree * sharding_degree; whichever of micro
    and accumulate is unset is derived (both unset: accumulate_steps = 1). Mutates and returns `cfg`.
    """
    where = f" ({cfg.source})" if cfg.source else ""
    dist = cfg.Distributed
    dp, mp, pp, sharding = dist.dp_degree, dist.mp_degree, dist.pp_degree, dist.sharding_degree
    product = dp * mp * pp * sharding
    if product != world_size:
        others = mp * pp * sharding
        fix = f"set Distributed.dp_degree={world_size // others} or " if world_size % others == 0 else ""
        raise ConfigError(
            f"Distributed degrees dp={dp} x mp={mp} x pp={pp} x sharding={sharding} = {product} but the job has "
            f"{world_size} processes; {fix}launch {product} processes{where}"
        )
    if world_size % dist.ep_degree != 0:
        raise ConfigError(
            f"Distributed.ep_degree={dist.ep_degree} must divide the number of processes ({world_size}){where}"
        )

    width = dp * sharding  # each data-parallel and sharding rank sees a different slice of the batch
    total = cfg.Global.global_batch_size
    micro, accumulate = cfg.Global.micro_batch_size, cfg.Engine.accumulate_steps
    equation = "global_batch_size = micro_batch_size x accumulate_steps x dp_degree x sharding_degree"

    if micro is None and accumulate is None:
        accumulate = 1
    if micro is None:
        if total % (accumulate * width) != 0:
            raise ConfigError(
                f"Global.global_batch_size={total} is not divisible by accumulate_steps={accumulate} x "
                f"dp*sharding={width} = {accumulate * width}, so micro_batch_size would not be an integer "
                f"({equation}); set global_batch_size to a multiple of {accumulate * width}{where}"
            )
        micro = total // (accumulate * width)
    elif accumulate is None:
        if total % (micro * width) != 0:
            raise ConfigError(
                f"Global.global_batch_size={total} is not divisible by micro_batch_size={micro} x "
                f"dp*sharding={width} = {micro * width}, so accumulate_steps would not be an integer "
                f"({equation}); set global_batch_size to a multiple of {micro * width} or change "
                f"micro_batch_size{where}"
            )
        accumulate = total // (micro * width)
    elif micro * accumulate * width != total:
        raise ConfigError(
            f"Global.global_batch_size={total} but micro_batch_size={micro} x accumulate_steps={accumulate} x "
            f"dp*sharding={width} = {micro * accumulate * width} ({equation}); set global_batch_size="
            f"{micro * accumulate * width}, or leave micro_batch_size or accumulate_steps unset to derive it{where}"
        )

    cfg.Global.micro_batch_size = micro
    cfg.Engine.accumulate_steps = accumulate
    return cfg
