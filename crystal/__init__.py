"""crystal: GPT-2 training on a ring of spheres (CPU threads or CUDA streams) around a root."""

__version__ = "0.1.0"

__all__ = ["load_checkpoint", "ModelConfig", "TrainConfig", "CrystalError", "__version__"]


def __getattr__(name: str):
    """The public names, imported when first used: `import crystal` (and so the `crystal`
    command's entry point, crystal.entry) loads nothing heavy."""
    if name == "load_checkpoint":
        from crystal.pretrained import load_checkpoint

        return load_checkpoint
    if name in ("ModelConfig", "TrainConfig"):
        from crystal import config

        return getattr(config, name)
    if name == "CrystalError":
        from crystal.errors import CrystalError

        return CrystalError
    raise AttributeError(f"module 'crystal' has no attribute {name!r}")
