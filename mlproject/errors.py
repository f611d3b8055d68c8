"""The job's narrow exceptions, importable without torch so the CLI can report them cheaply."""


class DataError(RuntimeError):
    """The dataset is missing, unreadable or corrupt; the message says which file and what to do."""


class HardwareError(RuntimeError):
    """The config asks for hardware this machine lacks."""
