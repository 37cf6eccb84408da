"""The config tree: its sections, how values reach it (YAML mappings, CLI strings) and its
validation, the sections' own checks plus those that span sections."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.config.fields import ConfigError, check
from pipeline.config.overrides import check_overrides, nested
from pipeline.config.sections import (
    DEFAULT_FINETUNE_LR,
    DEFAULT_SCRATCH_LR,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    SearchConfig,
)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: SearchConfig = field(default_factory=SearchConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    # ---- derived quantities (a single place decides them) ----
    @property
    def pretrained(self) -> bool:
        return self.model.weights != "none"

    @property
    def lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return DEFAULT_FINETUNE_LR if self.pretrained else DEFAULT_SCRATCH_LR

    @property
    def head_lr_mult(self) -> float:
        if self.optim.head_lr_mult is not None:
            return self.optim.head_lr_mult
        return 10.0 if self.pretrained else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict) -> Config:
        """A copy with overrides ({"optim.lr": 1e-3, ...}) applied; self is unchanged."""
        return with_changes(self, nested(overrides))

    def validate(self) -> Config:
        """Check every value, tune.space and the experiment's recipes included; raise ConfigError
        naming the first bad one. Returns self."""
        self.validate_fields()
        check(bool(self.tune.space), "tune.space", self.tune.space, "must name at least one config path to search")
        # The overrides are checked on the config they change, without its own overrides (no recursion).
        plain = with_changes(self, {"tune": {"space": {}}, "experiment": {"tuned_recipe": {}, "scratch_recipe": {}}})
        check_overrides(plain, self.tune.space, "tune.space", distributions=True)
        check_overrides(plain, self.experiment.tuned_recipe, "experiment.tuned_recipe")
        check_overrides(plain, self.experiment.scratch_recipe, "experiment.scratch_recipe")
        return self

    def validate_fields(self) -> Config:
        """Check every field, each section's own checks and those that span sections; the overrides
        a config carries (tune.space, the experiment's recipes) are checked by validate."""
        d, s, t = self.data, self.scaling, self.tune
        d.validate()
        s.validate()
        check(s.workers == 0 or (d.batch_size >= s.workers and d.batch_size % s.workers == 0), "data.batch_size",
              d.batch_size, f"must be a multiple of scaling.workers ({s.workers}) so every worker gets an equal share")
        sizes = s.group_sizes()
        check(s.workers == 0 or all(d.batch_size % n == 0 for n in sizes), "data.batch_size", d.batch_size,
              f"must be a multiple of every worker count from scaling.min_workers to scaling.workers "
              f"({', '.join(map(str, sizes))}) so each group size splits the same global batch evenly")
        self.model.validate()
        self.optim.validate()
        self.run.validate()
        t.validate()
        check(all(x == 0 or 16 <= x <= d.resize_size for x in t.eval_crop_sizes), "tune.eval_crop_sizes",
              t.eval_crop_sizes, f"every value must be 0 (= image_size) or in 16..data.resize_size ({d.resize_size})")
        check(d.batch_size % t.workers_per_trial == 0, "data.batch_size", d.batch_size,
              f"must be a multiple of tune.workers_per_trial ({t.workers_per_trial})")
        self.experiment.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        apply_dict(cfg, d)
        return cfg



SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def iter_fields(cfg: Config):
    """Yield (dotted name, section object, dataclasses.Field) for every leaf field."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            yield f"{sec.name}.{f.name}", obj, f


def _leaf_type(obj, f) -> type:
    """The field's type: int, float, str, bool, dict, list (of floats) or list[int]."""
    hint = typing.get_type_hints(type(obj))[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return hint
    return typing.get_origin(hint) or hint


def coerce(name: str, value: Any, typ: type) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError."""
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # 'inf' and 'nan' parse as floats, and no field means them
                raise ConfigError(name, value, "must be a finite number")
            return number
        if typ is list or typing.get_origin(typ) is list:
            items = value if isinstance(value, (list, tuple)) else [x for x in str(value).split(",") if x.strip()]
            element = (typing.get_args(typ) or (float,))[0]
            return [coerce(name, x, element) for x in items]
        if typ is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if isinstance(value, bool):  # YAML's `use_gpu: true` for a field whose choices include "true"
            return "true" if value else "false"
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(name, value, f"expected {typ if typing.get_origin(typ) else typ.__name__}") from None


def apply_dict(cfg: Config, d: dict, source: str = "config") -> None:
    """Merge a nested {section: {field: value}} mapping into cfg; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(source, d, "expected a mapping of sections")
    for sec_name, values in d.items():
        if sec_name not in SECTIONS:
            raise ConfigError(sec_name, values, f"unknown section; valid: {', '.join(SECTIONS)}")
        sec = getattr(cfg, sec_name)
        if not isinstance(values, dict):
            raise ConfigError(sec_name, values, "expected a mapping of fields")
        known = {f.name: f for f in dataclasses.fields(sec)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{sec_name}.{key}", value, f"unknown field; valid: {', '.join(known)}")
            setattr(sec, key, coerce(f"{sec_name}.{key}", value, _leaf_type(sec, known[key])))


def with_changes(cfg: Config, changes: dict) -> Config:
    """A copy of cfg with a nested {section: {field: value}} mapping applied (cfg is unchanged)."""
    out = Config.from_dict(cfg.to_dict())
    apply_dict(out, changes)
    return out


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of cfg with a dotted {"section.field": value} mapping applied (cfg is unchanged)."""
    return cfg.with_overrides(overrides)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except OSError as e:
        raise ConfigError("--config", path, f"cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", path, f"invalid YAML: {e}") from None



def validate(cfg: Config) -> Config:
    """Check every value of cfg (Config.validate); raise ConfigError naming the first bad one."""
    return cfg.validate()
