"""Training methods that apply to several models. Importing this package registers their Modules and datasets."""
from ppzoo.methods import cct as _cct  # noqa: F401
from ppzoo.methods import distill as _distill  # noqa: F401
from ppzoo.methods import nebula as _nebula  # noqa: F401
