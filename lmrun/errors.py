"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class LmrunError(Exception):
    """Base class: bad input, an invalid config or a corrupt file. Printed as one line."""


class ConfigError(LmrunError):
    """A config key has a value that is not allowed (raised before anything runs)."""


class DataError(LmrunError):
    """An input file is missing, empty, unreadable or not valid UTF-8."""


class FormatError(LmrunError):
    """A file (vocab, merges, checkpoint, artifact) is malformed or corrupt."""


def check(key: str, value, ok: bool, allowed: str) -> None:
    """Raise ConfigError('key=value: expected allowed') unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {allowed}")


def check_choice(key: str, value, choices: list[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    check(key, value, value in choices, "one of " + ", ".join(choices))
