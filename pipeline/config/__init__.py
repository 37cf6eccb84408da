"""One typed config tree for a fine-tuning run.

Every field carries its documentation in ``metadata["help"]``; the CLI, the configuration
reference (docs/configuration.md) and error messages all read it from there. Values come from
defaults, then a YAML file, then CLI flags (later wins). Unknown keys are rejected and every value
is validated before any Ray work: each section checks its own fields (sections.py), and the tree
adds the checks that span sections (tree.py).

    fields.py    the field helper, ConfigError, check
    sections.py  the sections (data, model, optim, scaling, run, tune, experiment), each with validate()
    overrides.py dotted {"section.field": value} mappings and search distributions, and their checks
    tree.py      Config, YAML and CLI values into it (apply_dict, with_changes, with_overrides), validate
    args.py      the start-up banner, the CLI flags, the reference table (python -m pipeline.config)
"""

from pipeline.config.args import add_config_args, config_from_args, describe, reference_markdown
from pipeline.config.fields import ConfigError
from pipeline.config.sections import ModelConfig
from pipeline.config.tree import Config, apply_dict, load_yaml, validate, with_changes, with_overrides

__all__ = ["Config", "ConfigError", "ModelConfig", "add_config_args", "apply_dict", "config_from_args",
           "describe", "load_yaml", "reference_markdown", "validate", "with_changes", "with_overrides"]
