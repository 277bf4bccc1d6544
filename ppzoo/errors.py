"""User-facing errors.

A PpzooError is a problem with the user's input (config, data, checkpoint, request) that the user can fix.
Tools catch it and print its message as one paragraph with a non-zero exit, instead of a traceback. Bugs in
ppzoo itself are not PpzooErrors and keep their traceback.
"""


class PpzooError(Exception):
    """An error in the user's input; the message says what is wrong and how to fix it."""


class ConfigError(PpzooError):
    pass


class DataError(PpzooError):
    pass


class CheckpointError(PpzooError):
    pass
