"""Model families. Importing this package registers every family's Module with ppzoo.registry."""
from ppzoo.models.chuxin import module as _chuxin  # noqa: F401
