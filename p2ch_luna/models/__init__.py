"""Models (nodule classifier, U-Net segmenter), their registry, and checkpoints."""

from p2ch_luna.models.catalog import find_latest_checkpoint
from p2ch_luna.models.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from p2ch_luna.models.classifier import LunaBlock, LunaModel
from p2ch_luna.models.registry import MODEL_REGISTRY, build_model
from p2ch_luna.models.unet import UNet, UNetWrapper

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
