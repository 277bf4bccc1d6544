"""The service's config file (YAML or JSON): which models to load and the bounds on the work it accepts.

    models:
      - name: chuxin                       # the name requests use (model=...)
        checkpoint: output/chuxin_tiny     # a checkpoint or run directory written by tools/train.py
      - name: chuxin_exported
        export: exported/chuxin_tiny       # or a model directory written by tools/export.py
    limits:
      max_new_tokens: 256

A model's kind (text, vilg, folding) comes from what its checkpoint or export holds; text models serve
/generate and /codefix.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import yaml

from ppzoo.errors import ConfigError


@dataclass
class Limits:
    max_new_tokens: int = 256  # cap on a generation request's max_new_tokens
    max_prompt_chars: int = 8000  # text fields (prompt, code, FASTA) longer than this are refused (422)
    max_body_bytes: int = 2_000_000  # request bodies larger than this are refused (413)
    max_residues: int = 400  # proteins longer than this are refused (422)
    request_timeout: float = 120.0  # seconds from arrival until a request must be done (503 / error event)
    max_pending: int = 32  # requests admitted (queued + running); more are answered 429
    max_batch: int = 8  # generation requests decoded together in one batch (the decode concurrency)
    batch_window_ms: float = 15.0  # how long the first queued generation request waits for others to join
    batching: bool = True  # off: every generation request decodes alone

    def check(self, where="limits"):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "batching":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}.batching must be true or false, got {value!r}.")
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}.{f.name} must be a positive number, got {value!r}.")
        return self


@dataclass
class ModelSpec:
    name: str
    checkpoint: Optional[str] = None
    export: Optional[str] = None

    @property
    def path(self):
        return self.checkpoint or self.export


@dataclass
class ServeConfig:
    models: List[ModelSpec] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)


def parse_serve_config(data, where):
    """A ServeConfig from the parsed YAML/JSON mapping `data` (from the file `where`); ConfigError names the
    key that is wrong and how to fix it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'models' and optionally 'limits'.")
    unknown = set(data) - {"models", "limits"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: models, limits.")
    limit_names = {f.name for f in fields(Limits)}
    raw_limits = data.get("limits") or {}
    if not isinstance(raw_limits, dict) or set(raw_limits) - limit_names:
        bad = sorted(set(raw_limits) - limit_names) if isinstance(raw_limits, dict) else raw_limits
        raise ConfigError(f"{where}: limits has unknown key(s) {bad}; allowed: {', '.join(sorted(limit_names))}.")
    limits = Limits(**raw_limits).check(f"{where}: limits")
    models, names = [], set()
    for i, entry in enumerate(data.get("models") or []):
        spot = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "checkpoint", "export"}:
            raise ConfigError(f"{spot} must be a mapping with name and one of checkpoint / export, got {entry!r}.")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"{spot} needs a name (the model=... requests use).")
        if (entry.get("checkpoint") is None) == (entry.get("export") is None):
            raise ConfigError(f"{spot} ({entry['name']}) needs exactly one of checkpoint (tools/train.py output) "
                              "or export (tools/export.py output).")
        if entry["name"] in names:
            raise ConfigError(f"{spot}: the name {entry['name']!r} is used twice; model names must be unique.")
        names.add(entry["name"])
        models.append(ModelSpec(**entry))
    return ServeConfig(models=models, limits=limits)


def load_serve_config(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve config {path} does not exist (expected a YAML or JSON file with a 'models' list).")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"serve config {path} cannot be parsed: {exc}") from exc
    return parse_serve_config(data, str(path))
