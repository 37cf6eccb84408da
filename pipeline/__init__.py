"""ray-finetune: Ray Data -> Ray Train (DDP) fine-tuning of torchvision classifiers."""

__version__ = "0.1.0"
