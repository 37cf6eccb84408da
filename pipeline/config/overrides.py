"""Overrides: a mapping of dotted config paths to values, {"optim.lr": 3e-4, "model.freeze_depth": 2}.

It is the one way anything changes a config: a search space (whose values may be distributions), a
trial's sample, an experiment row, a recipe and a search's pick (best.json's "overrides") are all
overrides, applied by Config.with_overrides and checked by the same validation as a config file."""

from __future__ import annotations

import math
import numbers
import re

from pipeline.config.fields import ConfigError

# A distribution is a one-key mapping {kind: arguments}, read as Ray Tune's function of that name:
# loguniform/uniform [lower, upper], randint [lower, upper) (upper excluded), choice [values...].
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


def nested(overrides: dict) -> dict:
    """{"optim.lr": 1e-3} -> {"optim": {"lr": 1e-3}}, the form the config tree merges."""
    out: dict = {}
    for path, value in overrides.items():
        section, _, key = str(path).partition(".")
        if not key or "." in key:
            raise ConfigError(str(path), value, "expected a dotted config path 'section.field', e.g. optim.lr")
        out.setdefault(section, {})[key] = value
    return out


def dotted(changes: dict, prefix: str = "") -> dict:
    """{"optim": {"epochs": 15}} -> {"optim.epochs": 15}: the inverse of nested."""
    out = {}
    for k, v in changes.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and not prefix else {f"{prefix}{k}": v})
    return out


def is_distribution(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


_YAML_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def distribution(spec: dict) -> tuple[str, list]:
    """(kind, arguments) of a distribution; YAML 1.1 reads 1e-5 (no dot) as a string, so such strings
    are read as the numbers they spell."""
    kind, args = next(iter(spec.items()))
    if isinstance(args, list):
        args = [float(x) if isinstance(x, str) and _YAML_FLOAT.match(x) else x for x in args]
    return kind, args


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_arguments(name: str, spec: dict) -> list:
    """The values a distribution reaches at its ends (each of a choice's), after checking its arguments."""
    kind, args = distribution(spec)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(name, spec, "choice takes a non-empty list of values")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(_number(x) for x in args) and args[0] < args[1]):
        raise ConfigError(name, spec, f"{kind} takes [lower, upper] with lower < upper")
    if kind == "randint":
        if not all(float(x).is_integer() for x in args):
            raise ConfigError(name, spec, "randint takes integers [lower, upper), upper excluded")
        return [int(args[0]), int(args[1]) - 1]
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(name, spec, "loguniform needs lower > 0")
    return list(args)


def check_overrides(cfg, overrides, name: str, *, distributions: bool = False,
                    sections: tuple[str, ...] = ("data", "model", "optim", "scaling")) -> None:
    """Raise ConfigError unless every override is a known field of one of sections and cfg with it
    applied validates; with distributions, each distribution is checked at its ends (every value of
    a choice). Errors name the override as <name>.<path>."""
    if not isinstance(overrides, dict):
        raise ConfigError(name, overrides, "expected a mapping of dotted config paths, e.g. {optim.lr: 0.001}")
    for path, value in overrides.items():
        where = f"{name}.{path}"
        if str(path).split(".", 1)[0] not in sections:
            raise ConfigError(where, value, f"may change only the sections {', '.join(sections)}")
        if is_distribution(value) and not distributions:
            raise ConfigError(where, value, "expected a value, not a distribution")
        if isinstance(value, dict) and not is_distribution(value):
            raise ConfigError(where, value, f"expected a value or a distribution ({', '.join(DISTRIBUTIONS)})"
                              if distributions else "expected a value")
        for v in _check_arguments(where, value) if is_distribution(value) else [value]:
            try:
                cfg.with_overrides({path: v}).validate_fields()
            except ConfigError as err:  # named as the override's own entry
                raise ConfigError(f"{name}.{err.field_name}", err.value, err.allowed) from None
