from ppzoo.core.engine import Engine, load_module_weights, resolve_device
from ppzoo.core.module import Module

__all__ = ["Engine", "Module", "load_module_weights", "resolve_device"]
