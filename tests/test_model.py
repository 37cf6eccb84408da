import functools
import hashlib
import http.server
import json
import os
import threading

import pytest
import torch
import torchvision

from pipeline.archs import ARCHS
from pipeline.config import ModelConfig
from pipeline.model import (
    build_model,
    freeze_batchnorm,
    head_of,
    load_source_weights,
    param_groups,
    set_train_mode,
)
from pipeline.weights import WeightsError


@pytest.mark.parametrize("arch", list(ARCHS))
def test_head_replaced_with_xavier_linear(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3)
    head = head_of(model, arch)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert torch.count_nonzero(head.bias) == 0
    fan_in, fan_out = head.in_features, 3
    expected_std = (2.0 / (fan_in + fan_out)) ** 0.5
    assert abs(head.weight.std().item() - expected_std) / expected_std < 0.15
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_two_param_groups_with_ten_x_head():
    model = build_model("resnet18", 2)
    groups = param_groups(model, "resnet18", lr=1e-3, head_lr_mult=10)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert {id(p) for p in groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    n_all = sum(1 for _ in model.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all
    one = param_groups(model, "resnet18", lr=1e-3, head_lr_mult=1.0)
    assert len(one) == 1 and len(one[0]["params"]) == n_all


def test_frozen_batchnorm_stays_frozen_through_training_steps():
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "downsample.1" in k}
    opt = torch.optim.SGD(param_groups(model, "resnet18", 0.1, 10), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):
        set_train_mode(model, freeze_bn=True)
        assert all(not m.training for m in bns) and model.fc.training
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, biases, running stats, counters
    assert not torch.equal(model.conv1.weight, build_model("resnet18", 2).conv1.weight)


def test_state_dict_file_with_sidecar(tmp_path):
    sd = torchvision.models.mobilenet_v2().state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    (tmp_path / "w.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "categories": ["a"] * 1000}))
    src = load_source_weights(ModelConfig(arch="mobilenet_v2", weights=str(path)))
    assert src.mean == (0.5, 0.5, 0.5) and src.std == (0.5, 0.5, 0.5) and len(src.categories) == 1000
    flags = load_source_weights(ModelConfig(arch="mobilenet_v2", weights=str(path), mean=[0.1, 0.2, 0.3]))
    assert flags.mean == (0.1, 0.2, 0.3)  # flags override the sidecar
    model = build_model("mobilenet_v2", 2, src)
    assert torch.equal(model.features[0][0].weight, sd["features.0.0.weight"])


@pytest.fixture
def weights_mirror(tmp_path, monkeypatch):
    """A local HTTP server standing in for download.pytorch.org, and an empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_imagenet_weights_download_through_mirror_is_hash_checked(weights_mirror):
    served, url = weights_mirror
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    name = enum.url.rsplit("/", 1)[1]  # resnet18-f37072fd.pth: the sha256 prefix torch checks
    torch.save(torchvision.models.resnet18().state_dict(), served / name)
    assert not hashlib.sha256((served / name).read_bytes()).hexdigest().startswith("f37072fd")
    with pytest.raises(WeightsError, match="does not start with f37072fd"):
        load_source_weights(ModelConfig(arch="resnet18", weights="imagenet", weights_mirror=url))
    cache = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", name)
    assert not os.path.exists(cache)  # a corrupt download never lands in the cache


def test_imagenet_weights_served_from_cache_with_enum_metadata(weights_mirror, monkeypatch):
    """Once a file is in torchvision's cache nothing is downloaded, but it is verified again on every
    load; mean/std/categories come from the enum."""
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    cache = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints")
    os.makedirs(cache)
    sd = torchvision.models.resnet18().state_dict()
    path = os.path.join(cache, enum.url.rsplit("/", 1)[1])
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="does not start with f37072fd"):  # not the file its name promises
        load_source_weights(ModelConfig(arch="resnet18", weights="imagenet"))
    pinned = hashlib.sha256(open(path, "rb").read()).hexdigest()
    src = load_source_weights(ModelConfig(arch="resnet18", weights="imagenet", weights_sha256=pinned))
    assert src.mean == (0.485, 0.456, 0.406) and src.std == (0.229, 0.224, 0.225)
    assert src.categories[934] == "hotdog"
    assert torch.equal(src.state_dict["conv1.weight"], sd["conv1.weight"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_freeze_depth_counts_stages_bottom_up(arch):
    from pipeline.config import Config
    from pipeline.model import build_for_config

    cfg = Config()
    cfg.model.arch = arch
    cfg.model.freeze_depth = len(ARCHS[arch].stages)
    probe = build_for_config(cfg, 2)
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {f"{ARCHS[arch].head}.weight", f"{ARCHS[arch].head}.bias"}  # every stage frozen: a linear probe
    cfg.model.freeze_depth = 1
    stem_only = build_for_config(cfg, 2)
    stem = ARCHS[arch].stages[0][0]
    assert all(not p.requires_grad for n, p in stem_only.named_parameters() if n.startswith(stem + "."))
    assert any(p.requires_grad for n, p in stem_only.named_parameters() if n.startswith(ARCHS[arch].stages[1][0] + "."))


def test_frozen_stages_do_not_change_in_training():
    from pipeline.config import Config
    from pipeline.model import build_for_config

    cfg = Config()
    cfg.model.freeze_depth = 2  # stem + layer1
    torch.manual_seed(0)
    model = build_for_config(cfg, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(param_groups(model, "resnet18", 0.1, 10), lr=0.1, momentum=0.9)
    for _ in range(2):
        set_train_mode(model, False, "resnet18", 2)
        assert not model.layer1.training and model.layer2.training
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        frozen = k.startswith(("conv1.", "bn1.", "layer1."))
        assert torch.equal(before[k], after[k]) == frozen or k.endswith("num_batches_tracked"), k


def test_class_probabilities_with_mirror_average_the_two_views():
    from pipeline.model import class_probabilities

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(5, 3, 8, 8)
    plain = class_probabilities(net, x)
    assert torch.allclose(plain, torch.softmax(net(x), 1))
    both = class_probabilities(net, x, mirror=True)
    assert torch.allclose(both, (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1)) / 2)
    assert not torch.allclose(both, plain)  # this net is not mirror-invariant, so the views differ
    assert torch.allclose(both.sum(1), torch.ones(5))


def test_interpolate_weights_is_wise_ft():
    """alpha 0 = the start, 1 = the trained weights, between: the straight line; frozen weights
    and buffers (not in start) come from the trained state as they are."""
    from pipeline.model import interpolate_weights, trainable_weights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    start = trainable_weights(net)
    assert set(start) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    trained = net.state_dict()
    for alpha in (0.0, 0.25, 1.0):
        mixed = interpolate_weights(start, trained, alpha)
        assert set(mixed) == set(trained)
        assert torch.allclose(mixed["2.weight"], start["2.weight"] + alpha)
        assert torch.equal(mixed["0.weight"], trained["0.weight"])  # frozen: never left its start
        assert torch.equal(mixed["1.running_var"], trained["1.running_var"])
    assert torch.equal(interpolate_weights(start, trained, 0.0)["2.bias"], start["2.bias"])


def test_wise_alpha_is_the_smallest_within_the_tolerance_of_the_best():
    """The one-standard-error rule, for a loss (lower is better) and an accuracy (higher is better)."""
    from pipeline.selection import chosen_wise_alpha, standard_error

    alphas = [1.0, 0.8, 0.6, 0.5]
    losses, errors = [0.157, 0.159, 0.175, 0.190], [0.030, 0.031, 0.033, 0.035]
    neg = lambda s: -s  # noqa: E731
    assert chosen_wise_alpha(alphas, losses, errors, neg, 1.0) == (2, pytest.approx(0.030))  # 0.175 <= 0.187
    assert chosen_wise_alpha(alphas, losses, errors, neg, 0.0) == (0, 0.0)  # the best
    assert chosen_wise_alpha(alphas, losses, errors, neg, 2.0)[0] == 3  # 0.190 <= 0.217
    assert chosen_wise_alpha([0.5, 1.0], [0.9, 0.9], [0.0, 0.0], lambda s: s, 0.0)[0] == 0  # ties: the smaller
    accs = [0.92, 0.90, 0.85, 0.84]
    errs = [standard_error(a, a, 124) for a in accs]
    assert errs[0] == pytest.approx((0.92 * 0.08 / 124) ** 0.5)
    assert chosen_wise_alpha(alphas, accs, errs, lambda s: s, 1.0)[0] == 1  # 0.90 >= 0.92 - 0.024
    assert standard_error(2.0, 4.0, 10) == 0.0  # no spread, no error


def test_weight_average_is_the_mean_then_has_its_half_life_and_round_trips():
    """The average starts as the plain mean of the steps' weights (never the start weights); once
    its window is full, half_life_steps updates toward fixed weights go halfway. Its state loads
    into a fresh average; a checkpoint with it is evaluated at the average."""
    from pipeline.model import WeightAverage, evaluated_weights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    average = WeightAverage(net, half_life_steps=4)  # decay 0.84: a window of 6.3 steps
    assert set(average.weights) == {"1.weight", "1.bias"}  # frozen weights need no average
    seen = []
    with torch.no_grad():
        for _ in range(3):
            net[1].weight.add_(1.0)
            seen.append(net[1].weight.clone())
            average.update(net)
    assert torch.allclose(average.weights["1.weight"], torch.stack(seen).mean(0))
    with torch.no_grad():
        for _ in range(20):  # fill the window at fixed weights
            average.update(net)
        net[1].weight.add_(1.0)
    before = average.weights["1.weight"].clone()
    for _ in range(4):
        average.update(net)
    assert torch.allclose(average.weights["1.weight"], (before + net[1].weight) / 2)

    fresh = WeightAverage(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), half_life_steps=100)
    fresh.load_state_dict(average.state_dict())
    assert (fresh.decay, fresh.steps) == (average.decay, average.steps) == (0.5 ** 0.25, 27)
    assert all(torch.equal(fresh.weights[n], average.weights[n]) for n in average.weights)

    state = {"model": net.state_dict(), "ema": average.state_dict()}
    evaluated = evaluated_weights(state)
    assert torch.equal(evaluated["1.weight"], average.weights["1.weight"])
    assert torch.equal(evaluated["0.weight"], net[0].weight)  # frozen: as trained
    assert evaluated_weights({"model": state["model"]}) is state["model"]
