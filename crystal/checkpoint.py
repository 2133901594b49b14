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
A LoRA run (crystal.lora) holds its adapters instead of the model: adapter_model.safetensors and
adapter_config.json (PEFT's files: the run directory is a PEFT adapter directory), its
checkpoints adapter_model.safetensors with the adapters' AdamW moments; train.json and every
state.json name the frozen base (`base_model`: its path and the sha256 of its weights).
    .crystal.lock      the lock its writer holds (crystal.runlock), with the writer's pid
Files hold the model's tensors only, in their Hugging Face shapes: the LM head's padding rows of
the flat buffer (crystal.model.ParamLayout) are left out of model.safetensors and of the flat
AdamW moments in optim.safetensors, and put back as zeros on reading, so a checkpoint does not
depend on the layout of the run that wrote it. A Muon run's optim.safetensors holds AdamW's
moments of AdamW's tensors alone and muon.momentum of Muon's matrices (crystal.muon).
Every file is written to a temporary name in its directory, fsynced and renamed; a checkpoint
directory is complete before it is renamed into place, and `latest` moves only after that.
Training has no randomness besides the data order, which is a function of (seed, epoch), so
the data position (epoch, cursor) is the whole RNG state of a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_regular, fsync_dir
from crystal.config import ModelConfig, TrainConfig, check_types, validate_train
from crystal.errors import CrystalError
from crystal.jsonio import parse_json, read_json
from crystal.lora import ADAPTER_CONFIG, ADAPTER_FILE, peft_config
from crystal.model import ParamLayout
from crystal.runlock import LOCK_FILE, RunLock, check_free

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


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, read by the safetensors library under its rules (the
    header's length, JSON, names, dtypes and offsets); anything malformed is a CrystalError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    check_regular(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CrystalError(f"missing file {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return load(data)
    except (SafetensorError, ValueError, OverflowError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise invalid_safetensors(path, e) from None


def invalid_safetensors(path: Path, e: Exception) -> CrystalError:
    """The one-line error for a file the safetensors library refuses, with its reason."""
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return CrystalError(f"{path}: not a valid safetensors file ({reason})")


def require_finite(path: Path, name: str, values: np.ndarray) -> None:
    """Loaded weights (or optimizer moments) must be finite: a NaN or infinity would evaluate to
    a nan loss, export as it is, or start a run that stops at its first step. Every loader calls
    this on each tensor before anything is written."""
    if not np.isfinite(values).all():
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise CrystalError(f"{path}: {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or infinity); "
                           "a model with them cannot be evaluated, exported or trained")


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
    m: np.ndarray  # AdamW first moments, the same layout (Muon: of AdamW's tensors, packed: crystal.optim.Packing)
    v: np.ndarray  # AdamW second moments, as m
    data: dict  # BatchIterator position {"epoch", "cursor"}
    adam_t: int = -1  # AdamW's step count (differs from step after skipped steps); -1: = step
    base: dict | None = None  # LoRA: the frozen base {"path", "sha256"}; params, m and v are the adapters'
    momentum: np.ndarray | None = None  # Muon's momentum of its matrices, packed (crystal.muon); None: AdamW alone

    def __post_init__(self):
        if self.adam_t < 0:
            self.adam_t = self.step


def optimizer_tensors(layout: ParamLayout, state: TrainState) -> dict[str, np.ndarray]:
    """optim.safetensors: AdamW's moments of every tensor ("adamw.m", "adamw.v": the layout's
    values in buffer order, the padding rows' zero moments left out), or of a Muon run AdamW's
    moments of its own tensors beside Muon's momentum of its matrices (crystal.muon.state_tensors)."""
    if state.momentum is None:
        return {"adamw.m": layout.unpadded(state.m), "adamw.v": layout.unpadded(state.v)}
    from crystal.muon import state_tensors

    return state_tensors(layout, state.m, state.v, state.momentum)


def read_optimizer_state(path: Path, layout: ParamLayout) -> tuple:
    """(m, v, momentum) of optim.safetensors (the inverse of optimizer_tensors): an AdamW run's,
    and a Muon run's written before its state was packed (momentum None: crystal.muon reads it),
    or a Muon run's (muon.momentum present), each checked against the model's shapes."""
    optim = load_tensors(path)
    if "muon.momentum" in optim:
        from crystal.muon import state_shapes

        shapes = state_shapes(layout)
    else:
        shapes = {"adamw.m": (layout.n_params,), "adamw.v": (layout.n_params,)}
    if set(optim) != set(shapes) or any(t.dtype != np.float32 or t.shape != shapes[k] for k, t in optim.items()):
        raise CrystalError(f"{path}: optimizer state does not match the model")
    for name, t in optim.items():
        require_finite(path, name, t)
    if "muon.momentum" in optim:
        from crystal.muon import state_from_tensors

        return state_from_tensors(layout, optim)
    return layout.padded(optim["adamw.m"]), layout.padded(optim["adamw.v"]), None


class RunDir:
    """The files of one training run, written by one process at a time.

    Made, it checks the directory and writes nothing, not even the directory: a start refused
    later (a flag the trainer refuses, a missing package) leaves no trace. The first write (the
    configs of a new run, the metrics of a resumed one) creates the directory, takes its lock
    (crystal.runlock: another writer is refused naming its pid), checks it again under the lock
    and, with --overwrite, clears the old run. A write that fails (a full disk) is one line that
    names the newest complete checkpoint, which --resume continues bitwise."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False):
        self.path = Path(path)
        self._metrics = None
        self._lock: RunLock | None = None
        self._resume = resume
        self._replacing = overwrite and not resume  # the old run goes at the first write
        self._check(locked=False)

    def _check(self, locked: bool) -> None:
        """What the directory must be for this run; locked: the re-check under our own lock."""
        p = self.path
        if os.path.lexists(p) and not p.is_dir():
            raise CrystalError(f"run directory {p} exists and is not a directory")
        if not p.exists():
            if self._resume:
                raise CrystalError(f"{p} is not a crystal run (no {TRAIN_FILE})")
            _check_creatable(p)
            return
        if not locked:
            check_free(p)  # a writer holds it: refused, whatever it holds
        if self._resume:
            if not (p / TRAIN_FILE).exists():
                raise CrystalError(f"{p} is not a crystal run (no {TRAIN_FILE})")
        elif not self._replacing and any(e.name != LOCK_FILE for e in p.iterdir()):
            if (p / TRAIN_FILE).exists() or (p / MODEL_FILE).exists() or (p / ADAPTER_FILE).exists():
                raise CrystalError(f"--out {p} already holds a run; "
                                   "choose another --out, --resume it, or pass --overwrite")
            raise CrystalError(f"--out {p} is not empty and not a crystal run; "
                               "choose a new or empty directory, or pass --overwrite")
        ckpts = p / CHECKPOINTS
        if self._replacing and os.path.lexists(ckpts) and not ckpts.is_dir():
            raise CrystalError(f"--overwrite: {ckpts} is not a directory (or a link to one); remove it")
        if not os.access(p, os.W_OK | os.X_OK):
            raise CrystalError(f"cannot write run directory {p}: {os.strerror(errno.EACCES)}")

    def _claim(self) -> None:
        """The run's first write: the directory, its lock, the check under the lock (another
        writer may have come and gone since), then --overwrite's clearing of the old run."""
        if self._lock is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CrystalError(f"cannot write run directory {self.path}: {e.strerror or e}") from None
        self._lock = RunLock.acquire(self.path)
        try:
            self._check(locked=True)
        except BaseException:
            self.close()
            raise
        for stale in (self.path / CHECKPOINTS).glob(".step-*.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        if self._replacing:
            self._clear_old_run()

    def _clear_old_run(self) -> None:
        """--overwrite: the old run's outputs, once the new run has passed every check (so a
        new config that fails leaves the old run whole). In checkpoints/ (a directory or a link
        to one) crystal's own entries go, so no fallback can find the old run's steps; a file
        that cannot be removed is an error, never skipped."""
        ckpts = self.path / CHECKPOINTS
        try:
            if ckpts.is_dir():
                for entry in ckpts.iterdir():
                    if entry.name == LATEST or entry.name.startswith(("step-", ".step-")):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
            for name in (METRICS_FILE, MODEL_FILE, ADAPTER_FILE, ADAPTER_CONFIG, SPHERES_FILE, "live.json"):
                (self.path / name).unlink(missing_ok=True)
            for events in self.path.glob("events.out.tfevents.*"):  # the old run's TensorBoard log
                events.unlink()
        except OSError as e:
            raise CrystalError(f"--overwrite: cannot remove the old run's {e.filename or ckpts}: "
                               f"{e.strerror or e}") from None
        self._replacing = False

    @contextlib.contextmanager
    def _writing(self, what: str):
        """The run's writes: the first one claims the directory; a failed one (a full disk) is
        one line naming what survives: the newest complete checkpoint."""
        self._claim()
        try:
            yield
        except OSError as e:
            ckpt = latest_checkpoint(self.path)
            left = (f"checkpoint {ckpt.name} is intact: free space, then crystal train --resume {self.path} "
                    "continues from it" if ckpt else "no checkpoint was written")
            raise CrystalError(f"cannot write {what} in {self.path}: {e.strerror or e}; {left}") from None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    # --- configs ---
    def write_configs(self, model: ModelConfig, train: TrainConfig, tokenizer_json: str | None = None,
                      data_sha256: str | None = None, data_order: int | None = None,
                      base: dict | None = None) -> None:
        """The run's first write (a new run, every check passed). data_sha256: the fingerprint of
        the data it trains on, kept in train.json beside the config so that changed data is
        reported; data_order: how its epochs shuffle windows (crystal.shards.WindowOrder); base:
        LoRA's frozen model {"path", "sha256"} (train.json's base_model)."""
        extra = {"data_sha256": data_sha256} if data_sha256 else {}
        if data_order is not None:
            extra["data_order"] = data_order
        if base is not None:
            extra["base_model"] = base
        with self._writing("the run's configs"):
            atomic_write_json(self.path / CONFIG_FILE, model.to_hf())
            atomic_write_json(self.path / TRAIN_FILE, {**dataclasses.asdict(train), **extra})
            if tokenizer_json is not None:
                atomic_write_text(self.path / TOKENIZER_FILE, tokenizer_json)

    def read_configs(self) -> tuple[ModelConfig, TrainConfig]:
        model = read_config(self.path / CONFIG_FILE)
        return model, read_train_config(self.path / TRAIN_FILE, model)

    # --- metrics ---
    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl, unbuffered (a failed write raises here, not at
        close; a torn last line is what truncate_metrics drops on resume)."""
        with self._writing(METRICS_FILE):
            if self._metrics is None:
                self._metrics = open(self.path / METRICS_FILE, "ab", buffering=0)
            line = memoryview((json.dumps(record) + "\n").encode())
            while line:
                line = line[self._metrics.write(line):]

    def truncate_metrics(self, step: int) -> None:
        """Keep only the lines of steps <= step (a resumed run rewrites what came after)."""
        path = self.path / METRICS_FILE
        self._claim()  # a resumed run's first write
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if parse_json(line, str(path)).get("step", 0) <= step:
                    keep.append(line)
            except (CrystalError, AttributeError, TypeError):
                break  # a torn last line from a killed process
        with self._writing(METRICS_FILE):
            atomic_write_text(path, "".join(l + "\n" for l in keep))

    def write_spheres(self, stats: dict) -> None:
        with self._writing(SPHERES_FILE):
            atomic_write_json(self.path / SPHERES_FILE, stats)

    def write_model(self, layout: ParamLayout, flat: np.ndarray) -> None:
        with self._writing(MODEL_FILE):
            save_model(self.model_path, layout, flat)

    def write_adapters(self, layout, flat: np.ndarray, base: dict) -> None:
        """A LoRA run's final adapters, as PEFT's adapter directory files."""
        with self._writing(ADAPTER_FILE):
            save_model(self.path / ADAPTER_FILE, layout, flat)
            atomic_write_json(self.path / ADAPTER_CONFIG, peft_config(layout, base["path"]))

    # --- resumable checkpoints ---
    def save_state(self, layout: ParamLayout, state: TrainState, keep: int) -> Path:
        root = self.path / CHECKPOINTS
        final = root / f"step-{state.step:08d}"
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        weights = ADAPTER_FILE if state.base is not None else MODEL_FILE  # LoRA: the adapters alone
        extra = {"base_model": state.base} if state.base is not None else {}
        with self._writing(f"the checkpoint of step {state.step}"):
            try:
                root.mkdir(exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                save_model(tmp / weights, layout, state.params)
                # the moments of the padding rows are zero (their gradient always is): left out
                optim = optimizer_tensors(layout, state)
                save_tensors(tmp / OPTIM_FILE, optim)
                atomic_write_json(tmp / STATE_FILE, {"format": STATE_FORMAT, "step": state.step,
                                                     "adam_t": state.adam_t, "data": state.data,
                                                     "params": int(layout.n_params), **extra})
                verify_safetensors(tmp / weights, {s.name: s.shape for s in layout.specs})
                verify_safetensors(tmp / OPTIM_FILE, {k: t.shape for k, t in optim.items()})
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint frees its space
                raise
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

    def load_state(self, model: ModelConfig, lora_layout=None) -> TrainState:
        """The newest checkpoint; lora_layout (crystal.lora.AdapterLayout): a LoRA run's, whose
        params and moments are the adapters' and whose state names the base."""
        ckpt = latest_checkpoint(self.path)
        if ckpt is None:
            raise CrystalError(f"{self.path} has no checkpoint to resume from "
                               "(train with --checkpoint-every N)")
        check_regular(ckpt / STATE_FILE)
        try:
            meta = read_json(ckpt / STATE_FILE)
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"format {meta.get('format')}")
            step, data = _count(meta["step"], "step"), dict(meta["data"])
            for key in ("epoch", "cursor"):  # the data position (BatchIterator.set_state checks its range)
                _count(data[key], f"data.{key}")
            adam_t = _count(meta.get("adam_t", step), "adam_t")
            base = None
            if lora_layout is not None:
                base = meta["base_model"]
                if not (isinstance(base, dict) and isinstance(base.get("path"), str)
                        and isinstance(base.get("sha256"), str)):
                    raise ValueError("base_model must be {path, sha256}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise CrystalError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({e})") from None
        if lora_layout is not None:
            layout = lora_layout
            params = layout.from_state_dict(load_tensors(ckpt / ADAPTER_FILE), str(ckpt / ADAPTER_FILE))
        else:
            layout = ParamLayout(model)
            params = read_params(ckpt / MODEL_FILE, model)
        m, v, momentum = read_optimizer_state(ckpt / OPTIM_FILE, layout)
        return TrainState(step, params, m, v, data, adam_t, base, momentum=momentum)

    def close(self) -> None:
        """Close metrics.jsonl and release the run's lock (the run's last act)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _check_creatable(path: Path) -> None:
    """A new run directory can be made: its nearest existing ancestor is a writable directory."""
    up = path.absolute()
    while not os.path.lexists(up):
        up = up.parent
    if not up.is_dir():
        raise CrystalError(f"cannot write run directory {path}: {up} is not a directory")
    if not os.access(up, os.W_OK | os.X_OK):
        raise CrystalError(f"cannot write run directory {path}: {os.strerror(errno.EACCES)} ({up})")


def data_order_of(run: Path) -> int:
    """How a run's epochs shuffle windows (crystal.shards.WindowOrder): train.json's data_order;
    a run whose train.json has none was started before it was recorded, with LEGACY_ORDER, and
    resumes with it (the batches it would have seen)."""
    from crystal.shards import DATA_ORDER, LEGACY_ORDER

    path = Path(run) / TRAIN_FILE
    try:
        d = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise CrystalError(f"{path}: not a readable training config ({e})") from None
    order = d.get("data_order", LEGACY_ORDER) if isinstance(d, dict) else LEGACY_ORDER
    if not isinstance(order, int) or isinstance(order, bool) or order not in (LEGACY_ORDER, DATA_ORDER):
        raise CrystalError(f"{path}: data_order {order!r} is not one this crystal knows "
                           f"({LEGACY_ORDER} or {DATA_ORDER})")
    return order


def data_sha256_of(run: Path) -> str | None:
    """The data hash a run's train.json keeps (None: none recorded, or unreadable)."""
    try:
        v = read_json(Path(run) / TRAIN_FILE).get("data_sha256")
    except (OSError, CrystalError, AttributeError):
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
        d = read_json(path)
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
        d = read_json(path)
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
        require_finite(path, s.name, tensors[s.name])
        views[s.name][...] = tensors[s.name]
    return flat
