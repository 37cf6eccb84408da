"""Classifier reuse (name matching, copied rows), the zero-shot rule and the experiment's row configs."""

from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
import torchvision

from pipeline.archs import ARCHS
from pipeline.config import Config, ConfigError, validate, with_overrides
from pipeline.experiment import _summarize, format_table, row_overrides
from pipeline.model import SourceWeights, build_for_config, imagenet_categories, match_classes
from pipeline.search import search_space
from pipeline.train_loop import accuracy_standard_error
from pipeline.zeroshot import rest_threshold, zero_shot_accuracy, zero_shot_predict

IMAGENET = imagenet_categories()


@pytest.mark.parametrize("name", ["hot_dog", "hot-dog", "Hot Dog", "hotdog", "HOTDOG"])
def test_spellings_of_hot_dog_match_imagenet_934(name):
    assert IMAGENET[934] == "hotdog"
    assert match_classes([name, "not_hot_dog"], IMAGENET).rows == {0: 934}


def test_no_match_two_matches_and_ambiguous_names():
    assert match_classes(["cats_x", "dogs_y"], IMAGENET).rows == {}
    assert match_classes(["hotdog", "other", "Pizza"], IMAGENET).rows == {0: 934, 2: 963}
    m = match_classes(["crane", "hotdog"], ["crane", "hotdog", "crane"])
    assert m.rows == {1: 1} and m.ambiguous == {0: [0, 2]}  # two 'crane's: a guess, so not reused
    assert match_classes(["hotdog"], None).rows == {}


def _source(arch="resnet18"):
    torch.manual_seed(1)
    sd = torchvision.models.get_model(arch).state_dict()
    return SourceWeights(sd, (0.5,) * 3, (0.5,) * 3, IMAGENET)


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("mobilenet_v2", "classifier.1")])
def test_reused_rows_equal_the_source_rows(arch, head):
    source = _source(arch)
    rows = match_classes(["pizza", "hot_dog", "rest"], source.categories).rows
    assert rows == {0: 963, 1: 934}
    cfg = Config()
    cfg.model.arch = arch
    model = build_for_config(cfg, 3, source, rows)
    w, b = model.get_submodule(head).weight, model.get_submodule(head).bias
    for target, src in rows.items():
        assert torch.equal(w[target], source.state_dict[f"{head}.weight"][src])
        assert torch.equal(b[target], source.state_dict[f"{head}.bias"][src])
    assert b[2] == 0 and not any(torch.equal(w[2], source.state_dict[f"{head}.weight"][s]) for s in range(1000))
    cfg.model.reuse_classifier = False  # switched off: every row is Xavier, bias 0
    off = build_for_config(cfg, 3, source, rows).get_submodule(head)
    assert torch.count_nonzero(off.bias) == 0 and not torch.equal(off.weight[1], w[1])


def test_zero_shot_rule():
    logits = np.array([[0, 9, 0, 1], [5, 0, 0, 1], [0, 0, 7, 1]], dtype=float)
    # one matched class (0 <- category 1), class 1 is "the rest"
    assert zero_shot_predict(logits, {0: 1}, 2).tolist() == [0, 1, 1]
    # every class matched: top-1 among the matched categories only
    assert zero_shot_predict(logits, {0: 3, 1: 2}, 2).tolist() == [0, 0, 1]
    assert zero_shot_predict(logits, {0: 1}, 3) is None  # two unmatched classes: no rule
    assert zero_shot_predict(logits, {}, 2) is None


def test_zero_shot_accuracy_known_answer(ray_local):
    """A source net whose classifier always says category 7: every image is the class matched to 7."""
    source = _source()
    source.state_dict["fc.weight"].zero_()
    source.state_dict["fc.bias"].zero_()
    source.state_dict["fc.bias"][7] = 1.0
    rng = np.random.default_rng(0)
    labels = [0] * 3 + [1] * 7
    ds = ray.data.from_items([{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "label": y}
                              for y in labels])
    prep = SimpleNamespace(source=source, classes=["seven", "rest"], reuse_rows={0: 7},
                           splits={"test": SimpleNamespace(dataset=ds)})
    assert zero_shot_accuracy(prep, "resnet18") == {"test_acc": 0.3, "test_images": 10,
                                                    "test_acc_by_class": {"seven": 1.0, "rest": 0.0}}
    prep.reuse_rows = {0: 3}  # category 7 now wins for "the rest"
    assert zero_shot_accuracy(prep, "resnet18")["test_acc"] == 0.7


def test_rest_threshold_reproduces_the_best_zero_shot_rule():
    # matched class 0 <- category 1; class 1 is the rest. Category-1 logits: 9, 5, 3, 1 for labels 0, 0, 1, 1.
    logits = np.zeros((4, 3))
    logits[:, 1] = [9, 5, 3, 1]
    t, acc = rest_threshold(logits, np.array([0, 0, 1, 1]), {0: 1}, rest=1)
    assert 3 < t < 5 and acc == 1.0
    t, acc = rest_threshold(logits, np.array([1, 0, 1, 0]), {0: 1}, rest=1)
    assert acc == 0.5


def test_rest_bias_goes_into_the_head():
    source = _source()
    model = build_for_config(Config(), 2, source, {0: 934}, {1: 7.5})
    assert model.fc.bias[1] == 7.5 and torch.equal(model.fc.weight[0], source.state_dict["fc.weight"][934])


def row_config(cfg: Config, row: str, seed: int, pick: dict | None = None) -> Config:
    return with_overrides(cfg, row_overrides(cfg, row, seed, pick))


def test_row_configs_change_only_what_the_row_says():
    base = Config()
    base.model.freeze_bn, base.optim.lr = True, 1e-3
    assert not row_config(base, "finetune", 0).model.reuse_classifier
    assert row_config(base, "finetune_reuse", 2).model.reuse_classifier
    assert row_config(base, "finetune_reuse", 2).optim.seed == 2
    assert row_config(base, "linear_probe", 0).model.freeze_depth == len(ARCHS["resnet18"].stages)
    scratch = row_config(base, "scratch", 0)
    assert (scratch.model.weights, scratch.model.freeze_bn, scratch.head_lr_mult) == ("none", False, 1.0)
    assert scratch.lr != base.lr
    own = row_config(base, "scratch_recipe", 0)  # scratch with experiment.scratch_recipe on top
    assert (own.model.weights, own.model.freeze_bn, own.head_lr_mult, own.model.reuse_classifier) == (
        "none", False, 1.0, False)
    assert (own.data.batch_size, own.optim.schedule, own.optim.epochs) == (32, "cosine", 15)
    assert own.lr == base.experiment.scratch_recipe["optim.lr"]
    tuned = row_config(base, "finetune_tuned", 1, {"optim.lr": 0.02, "model.freeze_depth": 3,
                                                   "data.crop_min_scale": 0.5, "data.eval_crop_size": 256,
                                                   "model.wise_alpha": 0.7})
    assert (tuned.lr, tuned.model.freeze_depth, tuned.data.crop_min_scale) == (0.02, 3, 0.5)
    assert (tuned.data.eval_crop_size, tuned.model.wise_alpha, tuned.optim.seed) == (256, 0.7, 1)


def test_tuned_recipe_applies_to_the_tuned_row_only():
    base = Config()
    base.experiment.tuned_recipe = {"optim.epochs": 15, "optim.schedule": "cosine", "data.batch_size": 32}
    validate(base)
    search_start = row_config(base, "finetune_tuned", 0)  # what the search starts from
    assert (search_start.optim.epochs, search_start.optim.schedule, search_start.data.batch_size) == (15, "cosine", 32)
    assert search_start.model.reuse_classifier and search_start.optim.lr is None
    tuned = row_config(base, "finetune_tuned", 2, {"optim.lr": 1e-4, "model.freeze_depth": 2})
    assert (tuned.optim.epochs, tuned.data.batch_size, tuned.lr, tuned.optim.seed) == (15, 32, 1e-4, 2)
    for row in ("linear_probe", "finetune", "finetune_reuse", "scratch"):
        c = row_config(base, row, 0)
        assert (c.optim.epochs, c.optim.schedule, c.data.batch_size) == (5, "constant", 128)
    # The seed-recipe rows keep the book's recipe whatever the base (the defaults) says; the defaults row is the base.
    base.optim.ema_half_life, base.data.low_res_prob, base.optim.epochs = 2.0, 0.5, 12
    for row in ("linear_probe", "finetune", "finetune_reuse", "scratch"):
        c = row_config(base, row, 0)
        assert (c.optim.ema_half_life, c.data.low_res_prob, c.optim.epochs) == (0.0, 0.0, 5)
    c = row_config(base, "finetune_defaults", 0)
    assert (c.optim.ema_half_life, c.data.low_res_prob, c.optim.epochs) == (2.0, 0.5, 12)
    base.model.probe_init = True  # LP-FT set for all: the tuned row only, the others are the seed's rows
    assert [row_config(base, row, 0).model.probe_init for row in ("finetune", "finetune_tuned", "scratch")] == [
        False, True, False]


@pytest.mark.parametrize("recipe, needle", [
    ({"optim.epochz": 15}, "experiment.tuned_recipe.optim.epochz = 15: unknown field; valid: epochs"),
    ({"optim.epochs": 0}, "experiment.tuned_recipe.optim.epochs = 0: must be in 1..10000"),
    ({"run.name": "x"}, "experiment.tuned_recipe.run.name = 'x': may change only the sections data, model, optim, "
                        "scaling"),
    ({"optim": {"epochs": 3}}, "experiment.tuned_recipe.optim = {'epochs': 3}: expected a value"),
    ({"model.arch": "resnet5"}, "experiment.tuned_recipe.model.arch = 'resnet5': valid: resnet18"),
    ({"epochs": 3}, "experiment.tuned_recipe.epochs = 3: may change only the sections"),
])
def test_tuned_recipe_validated_with_the_field_named(recipe, needle):
    cfg = Config()
    cfg.experiment.tuned_recipe = recipe
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


@pytest.mark.parametrize("space, needle", [
    ({"optim.lr": {"loguniform": [0, 1e-3]}}, "tune.space.optim.lr = {'loguniform': [0, 0.001]}: loguniform needs "
                                              "lower > 0"),
    ({"optim.lr": {"loguniform": [1e-3, 1e-4]}}, "takes [lower, upper] with lower < upper"),
    ({"model.freeze_depth": {"randint": [0, 7]}}, "tune.space.model.freeze_depth = 6: must be in 0..5 for resnet18"),
    ({"model.freeze_depth": {"randint": [0, 2.5]}}, "randint takes integers"),
    ({"data.crop_min_scale": {"choice": [0.5, 1.5]}}, "tune.space.data.crop_min_scale = 1.5:"),
    ({"data.crop_min_scale": {"choice": []}}, "choice takes a non-empty list"),
    ({"optim.lr": {"normal": [0, 1]}}, "expected a value or a distribution (loguniform, uniform, randint, choice)"),
    ({"tune.num_samples": 3}, "tune.space.tune.num_samples = 3: may change only the sections"),
    ({"optim.lrr": {"loguniform": [1e-4, 1e-3]}}, "tune.space.optim.lrr = 0.0001: unknown field"),
    ({}, "tune.space = {}: must name at least one config path"),
])
def test_search_space_validated_at_its_ends(space, needle):
    cfg = Config()
    cfg.tune.space = space
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_a_search_space_samples_overrides_that_validate():
    cfg = Config()
    # "1e-4": YAML 1.1 reads an exponent without a dot as a string; it is read as the number it spells.
    cfg.tune.space = {"optim.lr": {"loguniform": ["1e-4", 1e-2]}, "model.freeze_depth": {"randint": [0, 6]},
                      "optim.head_lr_mult": 5.0, "data.auto_augment": {"choice": ["none", "ta_wide"]}}
    validate(cfg)
    assert list(search_space(cfg)) == list(cfg.tune.space)  # the order the seeded generator draws in
    assert search_space(cfg)["optim.head_lr_mult"] == 5.0  # a fixed value is passed as is
    assert search_space(cfg)["optim.lr"].lower == 1e-4
    picked = with_overrides(cfg, {"optim.lr": 1e-3, "model.freeze_depth": 5, "data.auto_augment": "ta_wide"})
    assert (picked.lr, picked.model.freeze_depth, picked.data.auto_augment) == (1e-3, 5, "ta_wide")
    assert cfg.optim.lr is None  # the config itself is unchanged


def test_experiment_rows_validated():
    cfg = Config()
    cfg.experiment.rows = "finetune,fine_tune"
    with pytest.raises(ConfigError, match="experiment.rows.*valid rows: zero_shot"):
        validate(cfg)


def test_table_reports_the_test_sets_standard_error():
    """0.93 on 500 test images: sqrt(0.93 x 0.07 / 500) = 0.0114. The seeds share those images,
    so the SE is the mean's, not divided by the number of seeds."""
    runs = [{"test_acc": a, "curve": [0.9, a], "test_images": 500, "wall_s": 1.0}
            for a in (0.928, 0.932)]
    results = {"zero_shot": {"test_acc": 0.846, "test_images": 500},
               "rows": {"zero_shot": {"runs": [], "test_acc_mean": 0.846,
                                      "test_acc_se": accuracy_standard_error(0.846, 500)},
                        "finetune": {"runs": runs, **_summarize(runs)}}}
    assert results["rows"]["finetune"]["test_acc_se"] == pytest.approx(0.0114, abs=5e-5)
    table = format_table(results).splitlines()
    assert table[0].startswith("| row | test acc (last epoch), mean ± std | test-set SE | per seed |")
    assert table[2] == "| zero-shot (source classifier) | 0.846 | 0.016 | - | - | - | (baseline) |"
    assert table[3].startswith("| fine-tune, seed recipe | 0.930 ± 0.002 | 0.011 | 0.928, 0.932 | 0.900 ± 0.000 |")
    del results["rows"]["finetune"]["test_acc_se"]  # a results.json saved before the column
    assert "| 0.930 ± 0.002 | - | 0.928, 0.932 |" in format_table(results)
