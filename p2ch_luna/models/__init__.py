"""Models (nodule classifier, U-Net segmenter), their registry, and checkpoints."""

from .checkpoint import LoadedCheckpoint, find_latest_checkpoint, load_checkpoint, save_checkpoint
from .classifier import LunaBlock, LunaModel
from .registry import MODEL_REGISTRY, build_model
from .unet import UNet, UNetWrapper

__all__ = [
    "MODEL_REGISTRY",
    "LoadedCheckpoint",
    "LunaBlock",
    "LunaModel",
    "UNet",
    "UNetWrapper",
    "build_model",
    "find_latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
