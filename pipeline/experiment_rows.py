"""The rows of `finetune experiment`: each a title and the overrides it applies to the experiment's
base config (before the seed). Adding a row is one entry here.

  zero_shot       the source classifier itself, through the matched categories; no training
  linear_probe    every backbone stage frozen, only the new head trains
  finetune        the recipe: backbone at lr, new Xavier head at lr x head_lr_mult
  finetune_reuse  the same, with matched classes' head rows starting from the source classifier
  finetune_defaults  what `finetune train` does with the experiment's config and no other flag
  finetune_tuned  the defaults with experiment.tuned_recipe, then the pick of a Tune search over
                  tune.space on a validation split (its overrides, WiSE-FT alpha and eval crop)
  scratch         the same network from random init, one parameter group, the scratch lr
  scratch_recipe  scratch with experiment.scratch_recipe: this project's recipe from random init

The seed-recipe rows (linear_probe, finetune, finetune_reuse, scratch) pin the d2l chapter's recipe
(SEED_RECIPE), so that they stay the book's comparison whatever the defaults become.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.archs import ARCHS

PLAIN_HEAD = {"model.reuse_classifier": False, "model.probe_init": False}
# The d2l chapter's recipe (5 epochs of batch 128 at a constant lr, crop + flip, the last weights,
# one center crop), with this project's loss, momentum and learning rates: whatever the defaults are.
SEED_RECIPE = {"optim.epochs": 5, "optim.schedule": "constant", "optim.ema_half_life": 0.0,
               "data.batch_size": 128, "data.auto_augment": "none", "data.low_res_prob": 0.0,
               "data.eval_flip": False, "model.probe_init": False}
# None: the scratch defaults, one group at the scratch lr
SCRATCH = {**PLAIN_HEAD, "model.weights": "none", "model.freeze_bn": False, "model.freeze_depth": 0,
           "optim.lr": None, "optim.head_lr_mult": None}


@dataclass(frozen=True)
class Row:
    title: str
    # The row's overrides of the base config (a Config); None: a row that trains nothing.
    overrides: Callable[[object], dict] | None
    searched: bool = False  # the row's config is searched first, and the search's pick applied on top


ROWS: dict[str, Row] = {
    "zero_shot": Row("zero-shot (source classifier)", None),
    "linear_probe": Row("linear probe (backbone frozen)", lambda cfg: {
        **SEED_RECIPE, **PLAIN_HEAD, "model.freeze_depth": len(ARCHS[cfg.model.arch].stages)}),
    "finetune": Row("fine-tune, seed recipe", lambda cfg: {**SEED_RECIPE, **PLAIN_HEAD}),
    "finetune_reuse": Row("fine-tune + classifier reuse", lambda cfg: {
        **SEED_RECIPE, "model.reuse_classifier": True}),
    "finetune_defaults": Row("fine-tune, `finetune train` defaults", lambda cfg: {}),
    "finetune_tuned": Row("fine-tune, Tune-selected", lambda cfg: {
        "model.reuse_classifier": True, **cfg.experiment.tuned_recipe}, searched=True),
    "scratch": Row("from scratch, seed recipe", lambda cfg: {**SEED_RECIPE, **SCRATCH}),
    "scratch_recipe": Row("from scratch, this project's recipe", lambda cfg: {
        **SCRATCH, **cfg.experiment.scratch_recipe}),
}
