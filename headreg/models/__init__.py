"""Backbone → neck → head models: `create_model`, `HeadModel`, checkpoints, LeNet++."""

from .checkpoint import load_model, load_weights, read_config, save_model
from .factory import create_backbone, create_model, list_backbones
from .head_model import BackboneAdapter, HeadModel, Neck
from .lenetpp import LeNetPP

__all__ = [
    "BackboneAdapter",
    "HeadModel",
    "LeNetPP",
    "Neck",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_model",
    "load_weights",
    "read_config",
    "save_model",
]
