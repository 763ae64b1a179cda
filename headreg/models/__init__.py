"""Backbone → neck → head models: `create_model`, `HeadModel`, checkpoints, LeNet++, IResNet, MobileFaceNet."""

from .checkpoint import load_model, load_weights, read_config, save_model
from .factory import create_backbone, create_model, list_backbones
from .head_model import BackboneAdapter, HeadModel, Neck
from .iresnet import IResNet
from .lenetpp import LeNetPP
from .mobilefacenet import MobileFaceNet

__all__ = [
    "BackboneAdapter",
    "HeadModel",
    "IResNet",
    "LeNetPP",
    "MobileFaceNet",
    "Neck",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_model",
    "load_weights",
    "read_config",
    "save_model",
]
