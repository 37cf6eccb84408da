"""What every config section is made of: the field helper, the error, and the check."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad config value: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        from pipeline.redact import redact

        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(redact(f"config error: {field_name} = {value!r}: {allowed}"))


def setting(default, help: str, **kw):
    """A config field: its default and its documentation (metadata["help"]; "flag": a short CLI alias)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)
