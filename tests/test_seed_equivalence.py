"""The seed's update, reproduced: d2l's summed loss on one process == ours on 1 or 2 DDP workers."""

import os

import pytest
import ray.train
import ray.train.torch
import torch

from pipeline.config import Config, apply_dict, load_yaml
from pipeline.model import build_model, freeze_batchnorm, make_optimizer
from pipeline.train_loop import training_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 2, (BATCH,), generator=g)


def fresh_model():
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    # BN in eval mode: batch statistics would differ between one batch of 16 and two of 8.
    freeze_batchnorm(model)
    model.eval()
    return model


def seed_step() -> dict:
    """d2l train_batch_ch13 with the fine-tuning optimizer: loss.sum().backward() on the whole batch."""
    model = fresh_model()
    params_1x = [p for name, p in model.named_parameters() if name not in ("fc.weight", "fc.bias") and p.requires_grad]
    trainer = torch.optim.SGD([{"params": params_1x}, {"params": model.fc.parameters(), "lr": 5e-5 * 10}],
                              lr=5e-5, weight_decay=0.001)
    x, y = fixed_batch()
    loss = torch.nn.CrossEntropyLoss(reduction="none")(model(x), y)
    trainer.zero_grad()
    loss.sum().backward()
    trainer.step()
    return model.state_dict()


def seed_config() -> Config:
    cfg = Config()
    apply_dict(cfg, load_yaml(os.path.join(REPO, "configs", "seed_finetune.yaml")))
    cfg.data.batch_size = BATCH
    return cfg


def our_step(loop_config: dict):
    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    raw = fresh_model()
    model = ray.train.torch.prepare_model(raw)
    opt = make_optimizer(raw, cfg)
    x, y = fixed_batch()
    per = BATCH // world
    logits = model(x[rank * per:(rank + 1) * per])
    loss, _ = training_loss(logits, y[rank * per:(rank + 1) * per], cfg.optim.loss_reduction, world)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: v.detach().numpy().copy() for k, v in raw.state_dict().items()}  # no tensors across Ray


@pytest.mark.parametrize("workers", [1, 2])
def test_seed_config_reproduces_the_seed_update_on_any_worker_count(ray_local, tmp_path, workers):
    cfg = seed_config()
    assert (cfg.lr, cfg.head_lr_mult, cfg.optim.momentum, cfg.optim.weight_decay) == (5e-5, 10, 0.0, 1e-3)
    trainer = ray.train.torch.TorchTrainer(
        our_step, train_loop_config={"config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name=f"eq{workers}"))
    ours = trainer.fit().return_value
    ref, start = seed_step(), fresh_model().state_dict()
    moved = 0
    for k, v in ref.items():
        assert torch.allclose(torch.from_numpy(ours[k]), v, rtol=1e-4, atol=1e-6), k
        moved += int(not torch.equal(v, start[k]))
    assert moved > 10  # the step really changed the weights


def test_mean_convention_equals_seed_with_lr_times_batch():
    """Why the defaults are in mean units: lr_mean = lr_seed x B and wd_mean = wd_seed / B give the same step."""
    model = fresh_model()
    cfg = Config()
    cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.momentum = 5e-5 * BATCH, 10, 0.0
    cfg.optim.weight_decay = 1e-3 / BATCH
    opt = make_optimizer(model, cfg)
    x, y = fixed_batch()
    loss, _ = training_loss(model(x), y, "mean", 1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ref = seed_step()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ref[k], rtol=1e-4, atol=1e-6), k
