"""ppzoo: a PaddlePaddle-native zoo of large models and the methods published with them."""
from ppzoo._cpu_defaults import apply_cpu_defaults

apply_cpu_defaults()  # before anything imports paddle

__version__ = "0.1.0"
