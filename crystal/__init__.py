"""crystal: GPT-2 training on a ring of spheres (CPU threads or CUDA streams) around a root."""

__version__ = "0.1.0"

from crystal.pretrained import load_checkpoint  # noqa: E402
from crystal.config import ModelConfig, TrainConfig  # noqa: E402
from crystal.errors import CrystalError  # noqa: E402

__all__ = ["load_checkpoint", "ModelConfig", "TrainConfig", "CrystalError", "__version__"]
