"""Name -> class registries for modules, datasets, optimizers and LR schedules.

Configs name things by string; the registry maps the string to the registered object. Nothing is ever
`eval`-ed. An unknown name is a ConfigError that lists the valid names and the closest one.
"""
import difflib

from ppzoo.errors import ConfigError


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name=None):
        def decorator(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name, where=""):
        if name in self._items:
            return self._items[name]
        valid = sorted(self._items)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        place = f" (in {where})" if where else ""
        raise ConfigError(
            f"Unknown {self.kind} {name!r}{place}.{hint} Valid names: {', '.join(valid) or '(none registered)'}."
        )

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items


MODULES = Registry("module")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
LR_SCHEDULES = Registry("lr schedule")

register_module = MODULES.register
register_dataset = DATASETS.register
register_optimizer = OPTIMIZERS.register
register_lr_schedule = LR_SCHEDULES.register
