"""LP-FT's linear-probe head (model.probe_init): the fit, its cross-validation and its start."""

from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
import torchvision

from pipeline.config import Config, ConfigError, validate
from pipeline.model import SourceWeights, build_for_config, imagenet_categories
from pipeline.probe import PENALTIES, cross_validated_penalty, fit_logistic, fit_probe_head, start_head
from pipeline.transforms import ImagePreset


def _source():
    torch.manual_seed(1)
    return SourceWeights(torchvision.models.resnet18().state_dict(), (0.5,) * 3, (0.5,) * 3, imagenet_categories())


def test_logistic_fit_separates_and_the_penalty_holds_it_at_the_start():
    x = torch.tensor([[2.0, 0.1], [1.5, -0.3], [-1.8, 0.2], [-2.2, -0.1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    w0, b0 = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    w, b = fit_logistic(x, y, w0, b0, penalty=1e-3)
    assert ((x @ w.T + b).argmax(1) == y).all()
    start = torch.tensor([[0.0, 5.0], [0.0, -5.0]], dtype=torch.float64)  # a start that ignores feature 0
    w, _ = fit_logistic(x, y, start, b0, penalty=1e6)
    assert torch.allclose(w, start, atol=1e-4)


def test_cross_validation_keeps_an_image_with_its_mirror():
    """Random labels: nothing generalizes, so the strongest penalty (the start, loss log 2) is best,
    unless a row's duplicate sat on the other side of the fold and leaked its label."""
    rng = np.random.default_rng(0)
    n, d = 40, 30
    feats = rng.normal(size=(n, d))
    x = torch.as_tensor(np.concatenate([feats, feats]))
    y = torch.as_tensor(np.tile(rng.integers(0, 2, n), 2))
    w0, b0 = torch.zeros(2, d, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    penalty, scores = cross_validated_penalty(x, y, np.tile(np.arange(n), 2), w0, b0)
    assert penalty == max(PENALTIES) and list(scores) == list(PENALTIES)
    leaky, _ = cross_validated_penalty(x, y, np.arange(2 * n), w0, b0)  # every row its own group
    assert leaky < max(PENALTIES)


def test_start_head_is_the_reused_rows_and_the_rest_bias():
    source = _source()
    w, b = start_head(source, "resnet18", 3, {1: 934}, {2: 4.5})
    assert np.array_equal(w[1], source.state_dict["fc.weight"][934].double().numpy())
    assert b[1] == float(source.state_dict["fc.bias"][934]) and b[2] == 4.5
    assert not w[0].any() and not w[2].any() and b[0] == 0


def test_probe_head_fits_the_training_images_and_goes_into_the_model(ray_local):
    """Bright images are class 0, dark ones class 1: the fitted head tells every training image
    (and its mirror) apart on the source network's features, and build_for_config starts from it."""
    source = _source()
    rng = np.random.default_rng(0)
    rows = [{"image": np.clip(rng.normal(200 if y == 0 else 50, 20, (40, 40, 3)), 0, 255).astype(np.uint8),
             "label": y} for y in [0, 1] * 12]
    prep = SimpleNamespace(source=source, classes=["hot_dog", "rest"], reuse_rows={0: 934}, rest_bias={1: 3.0},
                           preset=ImagePreset(image_size=32, resize_size=40),
                           splits={"train": SimpleNamespace(dataset=ray.data.from_items(rows))})
    head = fit_probe_head(prep, "resnet18", reuse=True)
    assert head["weight"].shape == (2, 512) and head["penalty"] in PENALTIES and head["toward_reused"]
    from pipeline.zeroshot import source_logits

    feats, labels = source_logits(source, "resnet18", prep.splits["train"].dataset, prep.preset, mirror=True,
                                  features=True)
    assert len(labels) == 48 and ((feats @ head["weight"].T + head["bias"]).argmax(1) == labels).all()
    cfg = Config()
    cfg.model.probe_init = True
    model = build_for_config(cfg, 2, source, {0: 934}, {1: 3.0}, head)
    assert torch.equal(model.fc.weight, torch.as_tensor(head["weight"]))
    assert torch.equal(model.fc.bias, torch.as_tensor(head["bias"]))
    cfg.model.probe_init = False  # off: the reused row again
    assert torch.equal(build_for_config(cfg, 2, source, {0: 934}, {1: 3.0}, head).fc.weight[0],
                       source.state_dict["fc.weight"][934])


def test_probe_init_needs_pretrained_weights():
    cfg = Config()
    cfg.model.weights, cfg.model.probe_init = "none", True
    with pytest.raises(ConfigError, match=r"model.probe_init = True: needs pretrained weights"):
        validate(cfg)


def test_a_prepared_probe_head_is_reused_only_when_fitted_toward_the_same_start():
    from pipeline.runner import lacks_probe_head

    cfg = Config()
    prep = SimpleNamespace(reuse_rows={0: 934}, probe_head=None)
    assert not lacks_probe_head(prep, cfg)  # probe_init off: nothing wanted
    cfg.model.probe_init = True
    assert lacks_probe_head(prep, cfg)
    prep.probe_head = {"toward_reused": True}
    assert not lacks_probe_head(prep, cfg)
    cfg.model.reuse_classifier = False  # reuse off: a head fitted toward the reused rows will not do
    assert lacks_probe_head(prep, cfg)
