"""Run directories and checkpoints: safetensors + JSON, atomic writes, no pickle.

A run directory holds
    config.json        Hugging Face GPT2Config fields of the model
    train.json         the resolved training config (crystal.config.TrainConfig)
    tokenizer.json     the data's tokenizer (Hugging Face format)
    metrics.jsonl      one JSON object per step; eval lines carry val_loss
    spheres.json       final per-sphere and root statistics
    model.safetensors  the final parameters, float32, HF GPT-2 names (LM head tied to wte)
    checkpoints/       resumable states step-XXXXXXXX/{model,optim}.safetensors + state.json,
                       and `latest`, the name of the newest complete one
Files hold the model's tensors only, in their Hugging Face shapes: the LM head's padding rows of
the flat buffer (crystal.model.ParamLayout) are left out of model.safetensors and of the flat
AdamW moments in optim.safetensors, and put back as zeros on reading, so a checkpoint does not
depend on the layout of the run that wrote it.
Every file is written to a temporary name in its directory, fsynced and renamed; a checkpoint
directory is complete before it is renamed into place, and `latest` moves only after that.
Training has no randomness besides the data order, which is a function of (seed, epoch), so
the data position (epoch, cursor) is the whole RNG state of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_regular, fsync_dir
from crystal.config import ModelConfig, TrainConfig, check_types, validate_train
from crystal.errors import CrystalError
from crystal.model import ParamLayout

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
TRAIN_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
SPHERES_FILE = "spheres.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FORMAT = 1


def state_dict(layout: ParamLayout, flat: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(v) for name, v in layout.views(flat).items()}


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file; anything malformed is a CrystalError, never a crash."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    check_regular(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CrystalError(f"missing file {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 8:
        raise CrystalError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER, len(data) - 8):
        raise CrystalError(f"{path}: corrupt safetensors header (length {n} for a {len(data)}-byte file)")
    try:
        return load(data)
    except (SafetensorError, ValueError, OverflowError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise CrystalError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def verify_safetensors(path: Path, shapes: dict[str, tuple]) -> None:
    """Read back a written file: the same tensor names and shapes, float32 (write verification)."""
    t = load_tensors(path)
    if set(t) != set(shapes) or any(t[k].shape != tuple(shapes[k]) or t[k].dtype != np.float32 for k in t):
        raise OSError(f"verification of {path} failed: it does not hold what was written")


def save_model(path: Path, layout: ParamLayout, flat: np.ndarray) -> None:
    save_tensors(path, state_dict(layout, flat))


@dataclass
class TrainState:
    """Everything a run needs to continue bitwise as if it had never stopped."""

    step: int  # optimizer steps taken
    params: np.ndarray  # flat float32, a buffer of ParamLayout (padding rows zero)
    m: np.ndarray  # AdamW first moments, the same layout
    v: np.ndarray  # AdamW second moments, the same layout
    data: dict  # BatchIterator position {"epoch", "cursor"}
    adam_t: int = -1  # AdamW's step count (differs from step after skipped steps); -1: = step

    def __post_init__(self):
        if self.adam_t < 0:
            self.adam_t = self.step


class RunDir:
    """The files of one training run."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False,
                 readonly: bool = False):
        """readonly (with resume): read the configs and checkpoints, touch nothing (ranks > 0)."""
        self.path = Path(path)
        self._metrics = None
        if self.path.exists() and not self.path.is_dir():
            raise CrystalError(f"run directory {self.path} exists and is not a directory")
        if resume:
            if not (self.path / TRAIN_FILE).exists():
                raise CrystalError(f"{self.path} is not a crystal run (no {TRAIN_FILE})")
            if readonly:
                return
        elif self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            if (self.path / TRAIN_FILE).exists() or (self.path / MODEL_FILE).exists():
                raise CrystalError(f"--out {self.path} already holds a run; "
                                   "choose another --out, --resume it, or pass --overwrite")
            raise CrystalError(f"--out {self.path} is not empty and not a crystal run; "
                               "choose a new or empty directory, or pass --overwrite")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".crystal-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CrystalError(f"cannot write run directory {self.path}: {e.strerror or e}") from None
        self._replacing = overwrite and not resume  # the old run goes when the new one starts (write_configs)
        for stale in (self.path / CHECKPOINTS).glob(".step-*.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        self._metrics = None

    def _clear_old_run(self) -> None:
        """--overwrite: the old run's outputs, once the new run has passed every check (so a
        new config that fails leaves the old run whole)."""
        shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
        for name in (METRICS_FILE, MODEL_FILE, SPHERES_FILE, "live.json"):
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob("events.out.tfevents.*"):  # the old run's TensorBoard log
            events.unlink()
        self._replacing = False

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    # --- configs ---
    def write_configs(self, model: ModelConfig, train: TrainConfig, tokenizer_json: str | None = None,
                      data_sha256: str | None = None) -> None:
        """The run's first write (a new run, every check passed). data_sha256: of the tokens it
        trains on, kept in train.json beside the config so that changed data is reported."""
        if self._replacing:
            self._clear_old_run()
        extra = {"data_sha256": data_sha256} if data_sha256 else {}
        atomic_write_json(self.path / CONFIG_FILE, model.to_hf())
        atomic_write_json(self.path / TRAIN_FILE, {**dataclasses.asdict(train), **extra})
        if tokenizer_json is not None:
            atomic_write_text(self.path / TOKENIZER_FILE, tokenizer_json)

    def read_configs(self) -> tuple[ModelConfig, TrainConfig]:
        model = read_config(self.path / CONFIG_FILE)
        return model, read_train_config(self.path / TRAIN_FILE, model)

    # --- metrics ---
    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl, flushed."""
        if self._metrics is None:
            self._metrics = open(self.path / METRICS_FILE, "a", encoding="utf-8")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def truncate_metrics(self, step: int) -> None:
        """Keep only the lines of steps <= step (a resumed run rewrites what came after)."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):
                break  # a torn last line from a killed process
        atomic_write_text(path, "".join(l + "\n" for l in keep))

    def write_spheres(self, stats: dict) -> None:
        atomic_write_json(self.path / SPHERES_FILE, stats)

    def write_model(self, layout: ParamLayout, flat: np.ndarray) -> None:
        save_model(self.model_path, layout, flat)

    # --- resumable checkpoints ---
    def save_state(self, layout: ParamLayout, state: TrainState, keep: int) -> Path:
        root = self.path / CHECKPOINTS
        root.mkdir(exist_ok=True)
        final = root / f"step-{state.step:08d}"
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(tmp / MODEL_FILE, layout, state.params)
        # the moments of the padding rows are zero (their gradient always is): left out
        save_tensors(tmp / OPTIM_FILE, {"adamw.m": layout.unpadded(state.m), "adamw.v": layout.unpadded(state.v)})
        atomic_write_json(tmp / STATE_FILE, {"format": STATE_FORMAT, "step": state.step,
                                             "adam_t": state.adam_t, "data": state.data,
                                             "params": int(layout.n_params)})
        verify_safetensors(tmp / MODEL_FILE, {s.name: s.shape for s in layout.specs})
        verify_safetensors(tmp / OPTIM_FILE, {"adamw.m": (layout.n_params,), "adamw.v": (layout.n_params,)})
        if final.exists():  # re-reaching a step after resuming from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_state(self, model: ModelConfig) -> TrainState:
        ckpt = latest_checkpoint(self.path)
        if ckpt is None:
            raise CrystalError(f"{self.path} has no checkpoint to resume from "
                               "(train with --checkpoint-every N)")
        check_regular(ckpt / STATE_FILE)
        try:
            meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"format {meta.get('format')}")
            step, data = _count(meta["step"], "step"), dict(meta["data"])
            for key in ("epoch", "cursor"):  # the data position (BatchIterator.set_state checks its range)
                _count(data[key], f"data.{key}")
            adam_t = _count(meta.get("adam_t", step), "adam_t")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise CrystalError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({e})") from None
        layout = ParamLayout(model)
        params = read_params(ckpt / MODEL_FILE, model)
        optim = load_tensors(ckpt / OPTIM_FILE)
        if set(optim) != {"adamw.m", "adamw.v"} or any(
                t.dtype != np.float32 or t.shape != (layout.n_params,) for t in optim.values()):
            raise CrystalError(f"{ckpt / OPTIM_FILE}: optimizer state does not match the model")
        return TrainState(step, params, layout.padded(optim["adamw.m"]), layout.padded(optim["adamw.v"]), data,
                          adam_t)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def data_sha256_of(run: Path) -> str | None:
    """The data hash a run's train.json keeps (None: none recorded, or unreadable)."""
    try:
        v = json.loads((Path(run) / TRAIN_FILE).read_text(encoding="utf-8")).get("data_sha256")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return v if isinstance(v, str) else None


def _count(v, name: str) -> int:
    """A whole number >= 0 from JSON (not 3.5, not Infinity, not true)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
    return v


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    root = Path(run) / CHECKPOINTS
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
        if name and (root / name / STATE_FILE).exists():
            return root / name
    except (OSError, UnicodeDecodeError):
        pass
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    return complete[-1] if complete else None


def read_config(path: Path) -> ModelConfig:
    check_regular(path)
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CrystalError(f"no {Path(path).name} at {Path(path).parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrystalError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise CrystalError(f"{path}: config must be a JSON object")
    return ModelConfig.from_hf(d)


def read_train_config(path: Path, model: ModelConfig | None = None) -> TrainConfig:
    """A run's train.json, every field of the right type; with the run's model, validated too."""
    check_regular(path)
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CrystalError(f"no {Path(path).name} at {Path(path).parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise CrystalError(f"{path}: not a readable training config ({e})") from None
    if not isinstance(d, dict):
        raise CrystalError(f"{path}: not a readable training config (a JSON object is needed)")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    check_types(TrainConfig, d, f"{path}: ")
    cfg = TrainConfig(**d)
    if model is not None:
        try:
            validate_train(cfg, model)
        except CrystalError as e:
            raise CrystalError(f"{path}: {e}") from None
    return cfg


def read_params(path: Path, cfg: ModelConfig) -> np.ndarray:
    """Load a model.safetensors into a flat buffer (ParamLayout: the LM head's padding rows
    zero), checking names, dtypes and shapes exactly."""
    tensors = load_tensors(path)
    layout = ParamLayout(cfg)
    expected = {s.name for s in layout.specs}
    missing, extra = expected - tensors.keys(), tensors.keys() - expected
    if missing or extra:
        raise CrystalError(f"{path}: tensors do not match config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    for s in layout.specs:  # every shape checked before allocating what config.json claims
        t = tensors[s.name]
        if t.dtype != np.float32 or t.shape != s.shape:
            raise CrystalError(f"{path}: {s.name} is {t.dtype}{list(t.shape)}, "
                               f"config.json needs float32{list(s.shape)}")
    flat = layout.zeros()
    views = layout.views(flat)
    for s in layout.specs:
        views[s.name][...] = tensors[s.name]
    return flat
