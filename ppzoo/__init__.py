"""ppzoo: a PaddlePaddle-native zoo of large models and the methods published with them."""
from ppzoo._cpu_defaults import apply_cpu_defaults, import_paddle_quietly

apply_cpu_defaults()  # before anything imports paddle
import_paddle_quietly()

# Registration happens on import: datasets, optimizers and schedules, then every model family.
from ppzoo import data as _data  # noqa: E402,F401
from ppzoo.config import config_to_dict, load_config  # noqa: E402
from ppzoo.core import Engine, Module, load_module_weights  # noqa: E402
from ppzoo import models as _models  # noqa: E402,F401
from ppzoo import methods as _methods  # noqa: E402,F401  (methods build on the models)
from ppzoo.errors import PpzooError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Engine", "Module", "PpzooError", "config_to_dict", "load_config", "load_module_weights"]
