"""Model families. Importing this package registers every family's Module with ppzoo.registry."""
from ppzoo.models.chuxin import module as _chuxin  # noqa: F401
from ppzoo.models.recycle_gpt import module as _recycle_gpt  # noqa: F401
from ppzoo.models.moe_gpt import module as _moe_gpt  # noqa: F401
from ppzoo.models.helixfold import module as _helixfold  # noqa: F401
from ppzoo.models import ernie_vilg as _ernie_vilg  # noqa: F401
from ppzoo.models import ernie_titan as _ernie_titan  # noqa: F401
