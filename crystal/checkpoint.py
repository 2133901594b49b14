"""Run directories and checkpoints: safetensors + JSON, atomic writes, no pickle.

A run directory holds
    config.json        Hugging Face GPT2Config fields of the model
    train.json         the resolved training config (crystal.config.TrainConfig)
    metrics.jsonl      one JSON object per logged step
    spheres.json       final per-sphere and root statistics
    model.safetensors  the final parameters, float32, HF GPT-2 names (LM head tied to wte)
Every whole-file write goes to a temporary file in the same directory, is fsynced, then
renamed over the target, so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from crystal.config import ModelConfig, TrainConfig
from crystal.errors import CrystalError
from crystal.model import GPT, ParamLayout

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
SPHERES_FILE = "spheres.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via temp file + fsync + rename + directory fsync."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a run's files are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def state_dict(layout: ParamLayout, flat: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(v) for name, v in layout.views(flat).items()}


def save_model(path: Path, layout: ParamLayout, flat: np.ndarray) -> None:
    from safetensors.numpy import save

    data = save(state_dict(layout, flat), metadata={"format": "pt"})
    atomic_write_bytes(path, data)


class RunDir:
    """The files of one training run. Creating one refuses to overwrite a finished run."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CrystalError(f"--out {self.path} exists and is not a directory")
        if (self.path / MODEL_FILE).exists() and not overwrite:
            raise CrystalError(f"--out {self.path} already holds a trained model; "
                               "choose another --out or pass --overwrite")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".crystal-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CrystalError(f"cannot write run directory {self.path}: {e.strerror or e}") from None
        self._metrics = None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def write_configs(self, model: ModelConfig, train: TrainConfig) -> None:
        atomic_write_json(self.path / CONFIG_FILE, model.to_hf())
        atomic_write_json(self.path / TRAIN_FILE, dataclasses.asdict(train))

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl, flushed."""
        if self._metrics is None:
            self._metrics = open(self.path / METRICS_FILE, "w", encoding="utf-8")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def write_spheres(self, stats: dict) -> None:
        atomic_write_json(self.path / SPHERES_FILE, stats)

    def write_model(self, layout: ParamLayout, flat: np.ndarray) -> None:
        save_model(self.model_path, layout, flat)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def read_config(path: Path) -> ModelConfig:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CrystalError(f"no {CONFIG_FILE} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrystalError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise CrystalError(f"{path}: config must be a JSON object")
    return ModelConfig.from_hf(d)


def read_params(path: Path, cfg: ModelConfig) -> np.ndarray:
    """Load model.safetensors into a flat buffer, checking names, dtypes and shapes exactly."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(Path(path).read_bytes())
    except FileNotFoundError:
        raise CrystalError(f"no model file at {path}") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise CrystalError(f"{path}: not a valid safetensors file ({e})") from None
    layout = ParamLayout(cfg)
    expected = {s.name for s in layout.specs}
    missing, extra = expected - tensors.keys(), tensors.keys() - expected
    if missing or extra:
        raise CrystalError(f"{path}: tensors do not match config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    flat = np.empty(layout.size, dtype=np.float32)
    views = layout.views(flat)
    for s in layout.specs:
        t = tensors[s.name]
        if t.dtype != np.float32 or t.shape != s.shape:
            raise CrystalError(f"{path}: {s.name} is {t.dtype}{list(t.shape)}, "
                               f"config.json needs float32{list(s.shape)}")
        views[s.name][...] = t
    return flat


def load_checkpoint(path: str | Path, backend=None) -> GPT:
    """A trained model from a run directory, or a .safetensors file with config.json beside it."""
    path = Path(path)
    if path.is_dir():
        model_file, config_file = path / MODEL_FILE, path / CONFIG_FILE
    else:
        model_file, config_file = path, path.parent / CONFIG_FILE
    if not model_file.exists():
        raise CrystalError(f"no checkpoint at {model_file}")
    cfg = read_config(config_file)
    return GPT(cfg, read_params(model_file, cfg), backend)
