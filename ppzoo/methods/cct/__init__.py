"""CCT (code comparison tuning): error injection, comparison data, the token-level loss and the Module."""
from ppzoo.methods.cct import data as _data  # noqa: F401  (registers the CodeInstructions dataset)
from ppzoo.methods.cct import module as _module  # noqa: F401  (registers the CCT module)
from ppzoo.methods.cct.inject import BUG_TYPES, Edit, Variant, inject, normalize
from ppzoo.methods.cct.losses import ranking_accuracy, token_hinge_loss

__all__ = ["BUG_TYPES", "Edit", "Variant", "inject", "normalize", "ranking_accuracy", "token_hinge_loss"]
