"""The config at the edges of the program: the start-up banner, the CLI flags, the reference table."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from pipeline.config.tree import Config, _leaf_type, apply_dict, iter_fields, load_yaml


def describe(cfg: Config, sections: tuple[str, ...] = ()) -> str:
    """The resolved config as YAML (these sections, or all), plus the derived quantities, for the
    start-up banner."""
    from pipeline.redact import redact_tree

    tree = {k: v for k, v in redact_tree(cfg.to_dict()).items() if not sections or k in sections}
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
    derived = {"lr": cfg.lr, "head_lr": cfg.lr * cfg.head_lr_mult,
               "per_worker_batch": cfg.data.batch_size // cfg.scaling.workers if cfg.scaling.workers else "at start"}
    return text + "derived: " + ", ".join(f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}"
                                          for k, v in derived.items())


def add_config_args(parser) -> None:
    """Add --config plus one flag per field (--section.field, and a short alias where one is set)."""
    parser.add_argument("--config", help="YAML file with {section: {field: value}}; flags override it.")
    for name, obj, f in iter_fields(Config()):
        flags = [f"--{name}"] + ([f.metadata["flag"]] if "flag" in f.metadata else [])
        typ = _leaf_type(obj, f)
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default not in ("", None) else "")
        if typ is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=help_text)
        else:
            metavar = "LIST" if typing.get_origin(typ) is list else typ.__name__.upper()
            parser.add_argument(*flags, dest=name, default=None, metavar=metavar,
                                help=help_text)


def config_from_args(args) -> Config:
    """Defaults <- YAML (--config) <- flags, then validated. Raises ConfigError."""
    cfg = Config()
    if getattr(args, "config", None):
        apply_dict(cfg, load_yaml(args.config), source=args.config)
    overrides: dict = {}
    for name, _, _ in iter_fields(cfg):
        value = getattr(args, name, None)
        if value is not None:
            sec, key = name.split(".")
            overrides.setdefault(sec, {})[key] = value
    apply_dict(cfg, overrides)
    return cfg.validate()


def reference_markdown() -> str:
    """The configuration reference table of docs/configuration.md (a test keeps the two identical)."""
    rows = ["| field | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, _, f in iter_fields(Config()):
        flag = f.metadata.get("flag", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{name}` | {f'`{flag}`' if flag else ''} | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
