"""Trained checkpoints to start from: `crystal train --init-from DIR`.

DIR is a Hugging Face directory of a GPT2LMHeadModel, a LlamaForCausalLM or a Qwen2ForCausalLM
(a released model, or one saved with `save_pretrained`) or a crystal run. A Hugging Face
directory holds
    config.json                   GPT2Config / LlamaConfig / Qwen2Config fields
                                  (ModelConfig.from_hf refuses what crystal cannot represent)
    tokenizer.json                the model's tokenizer: the data must be tokenized with it
    model.safetensors             the weights, or model.safetensors.index.json naming shards
Every tensor is stored in crystal's layout (GPT-2's Conv1D weights [in, out], Llama's nn.Linear
[out, in]), so each is copied as it is: the parameters training starts from are bitwise the
file's float32 values (float16 and bfloat16 are widened to float32, which is exact; other dtypes
are refused). Names may carry the `transformer.` / `model.` prefix (GPT2LMHeadModel,
LlamaForCausalLM) or not (GPT2Model, LlamaModel); the buffers GPT-2's `attn.bias` /
`attn.masked_bias` and old Llamas' `rotary_emb.inv_freq` are skipped. A tied model's
`lm_head.weight`, when saved, must be bitwise its token embedding; an untied llama's must be
there. Pickle files (pytorch_model.bin) are never loaded: the refusal says how
to convert them. A crystal run gives its model.safetensors (or its newest checkpoint's), read
as strictly as `crystal.load_checkpoint` reads it, and none of its optimizer state.

Every check runs before any tensor is read, and every tensor is read straight into its place in
the one flat float32 buffer (no second copy of the model in memory).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_json, atomic_write_text, check_regular, fsync_dir
from crystal.checkpoint import (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, TRAIN_FILE, latest_checkpoint,
                                invalid_safetensors, read_config, read_params, require_finite, save_model)
from crystal.config import ModelConfig, check_hf_exportable
from crystal.errors import CrystalError
from crystal.jsonio import parse_json, read_json
from crystal.lora import merge
from crystal.model import GPT, ParamLayout, param_shapes

WEIGHTS = MODEL_FILE
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
RUN_MARK = TRAIN_FILE  # what makes a directory a crystal run
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # masks, rotary tables: not parameters
LM_HEAD = "lm_head.weight"
# safetensors dtype -> (its bytes as numpy reads them, its name)
DTYPES = {"F32": ("<f4", "float32"), "F16": ("<f2", "float16"), "BF16": ("<u2", "bfloat16"),
          "F64": ("<f8", "float64"), "I64": ("<i8", "int64"), "I32": ("<i4", "int32"), "I16": ("<i2", "int16"),
          "I8": ("i1", "int8"), "U8": ("u1", "uint8"), "BOOL": ("?", "bool")}
EXACT = ("F32", "F16", "BF16")  # what float32 holds exactly: the parameters' dtypes crystal reads
# Bits per element of every dtype the safetensors library knows (its Dtype::bitsize).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


@dataclass
class Pretrained:
    """A checkpoint to start from: its model shape and tokenizer, and where its tensors are.
    `load_params` reads them."""

    path: Path
    config: ModelConfig
    weights: list[Path]  # the safetensors files that hold the parameters
    run: bool  # a crystal run (strict crystal names, float32), else a Hugging Face directory
    tokenizer_json: str | None = None  # None: the directory has none (refused by require_tokenizer)
    notes: list[str] = field(default_factory=list)  # what load_params did beyond copying


def open_pretrained(directory: str | Path) -> Pretrained:
    """config.json and the weight files of a Hugging Face directory (GPT-2, Llama, Qwen2) or a
    crystal run, checked; no tensor is read."""
    path = Path(directory)
    if not path.is_dir():
        raise CrystalError(f"--init-from {path}: {'not a directory' if path.exists() else 'no such directory'} "
                           "(give a Hugging Face model directory or a crystal run)")
    run = (path / RUN_MARK).exists()
    if run:
        weights = path / MODEL_FILE
        if not weights.exists() and (latest := latest_checkpoint(path)) is not None:
            weights = latest / MODEL_FILE  # a run stopped before its end
        if not weights.exists():
            if lora_base(path) is not None:
                raise CrystalError(f"{path} is a LoRA run (adapters on a frozen base); start from its merged model: "
                                   f"crystal export {path} --format hf --out DIR, then --init-from DIR")
            raise CrystalError(f"{path}: a crystal run without a model.safetensors or a checkpoint")
        files = [weights]
    else:
        files = _hf_weight_files(path)
    config = read_config(path / CONFIG_FILE)
    tokenizer = None
    if (path / TOKENIZER_FILE).exists():
        check_regular(path / TOKENIZER_FILE)
        try:
            tokenizer = (path / TOKENIZER_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CrystalError(f"cannot read {path / TOKENIZER_FILE}: {e}") from None
    return Pretrained(path, config, files, run, tokenizer)


def _hf_weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names (each present)."""
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    if (path / INDEX).exists():
        try:
            weight_map = read_json(path / INDEX)["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(s, str) and Path(s).name == s for s in shards):
                raise ValueError("weight_map must name shard files in the directory")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
                ValueError) as e:
            raise CrystalError(f"{path / INDEX}: not a readable shard index ({e})") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CrystalError(f"{path}: shard {missing[0]} is listed in {INDEX} but absent "
                               f"({len(missing)} of {len(shards)} missing)")
        return [path / s for s in shards]
    pickle = next((p for p in PICKLES if (path / p).exists()), None)
    if pickle:
        raise CrystalError(
            f"{path} holds {pickle}, a pickle, which crystal never loads; convert it to safetensors with: "
            f"python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{path}')"
            f".save_pretrained('{path}', safe_serialization=True)\"")
    raise CrystalError(f"{path}: no {WEIGHTS} or {INDEX} (a Hugging Face model directory or a crystal run)")


def require_tokenizer(pre: Pretrained):
    """The model's tokenizer (a BPETokenizer that writes its tokenizer.json verbatim); a model
    without one is refused, since the data must be tokenized with it."""
    from crystal.data import BPETokenizer

    if pre.tokenizer_json is None:
        raise CrystalError(f"{pre.path} has no tokenizer.json: the data must be tokenized with the model's "
                           "tokenizer; save it there with AutoTokenizer.from_pretrained(...).save_pretrained(DIR)")
    tok = BPETokenizer.from_json(pre.tokenizer_json, "hf", str(pre.path / TOKENIZER_FILE))
    if tok.vocab_size != pre.config.vocab_size:
        raise CrystalError(f"{pre.path}: tokenizer.json has {tok.vocab_size} tokens, config.json vocab_size "
                           f"{pre.config.vocab_size}; crystal needs them equal")
    return tok


def check_data_tokenizer(dataset, pre: Pretrained, model_tok) -> None:
    """The data must be tokenized with the model's tokenizer: the same vocabulary size, and the
    same tokenizer identity (crystal.data.tokenizer_identity: model, merges, normalizer,
    pre-tokenizer, added tokens), as meta.json recorded it when the data was prepared; a data set
    prepared before meta.json recorded it is compared by its tokenizer.json (which prepare wrote
    beside the tokens)."""
    from crystal.data import tokenizer_identity

    fix = f"tokenize it with the model's tokenizer: crystal prepare INPUT --out DIR --tokenizer {pre.path}"
    kind = f"{dataset.tokenizer.kind} tokenizer" if dataset.tokenizer is not None else "token shards"
    if dataset.vocab_size != pre.config.vocab_size:
        raise CrystalError(f"the data's vocabulary ({dataset.vocab_size} tokens, {kind}) is not the model's "
                           f"({pre.config.vocab_size} in {pre.path}); {fix}")
    if dataset.tokenizer is None and not dataset.tokenizer_identity:
        return  # token shards name no tokenizer: the vocabulary is all there is to compare
    theirs, ours = dataset.tokenizer_identity or tokenizer_identity(dataset.tokenizer), tokenizer_identity(model_tok)
    if theirs != ours:
        raise CrystalError(f"the data was tokenized with another tokenizer than the model's (the same vocabulary "
                           f"size, {pre.config.vocab_size}, but other tokens, merges, normalizer or pre-tokenizer: "
                           f"identity {theirs[:12]} vs the model's {ours[:12]}); {fix}")


def load_params(pre: Pretrained) -> np.ndarray:
    """The flat float32 parameters of `pre`, bitwise its tensors (float16/bfloat16 widened
    exactly); pre.notes says what was widened and what was skipped."""
    if pre.run:
        return read_params(pre.weights[0], pre.config)
    return _read_hf(pre)


# --- Hugging Face safetensors ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    file: Path
    name: str  # as stored
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the first byte in the file


def crystal_name(name: str, cfg: ModelConfig) -> str | None:
    """The crystal (= GPT2LMHeadModel / LlamaForCausalLM) name of a stored tensor; None for a
    buffer."""
    if name.endswith(BUFFERS):
        return None
    prefix = "model." if cfg.llama else "transformer."
    if name == LM_HEAD or name.startswith(prefix):
        return name
    return prefix + name  # GPT2Model / LlamaModel save without the prefix


def read_header(path: Path) -> dict[str, _Entry]:
    """The tensors a safetensors file holds, as the safetensors library reads its header: the
    library parses and validates it (strict JSON, no name twice, string `__metadata__` values,
    known dtypes, tensors packed in offset order from 0 without gap or overlap, each exactly
    its dtype x shape bytes, the file exactly header + data), so what it accepts is laid out
    as offset_keys() lists it and every offset follows from the sizes before it."""
    from safetensors import SafetensorError, safe_open

    check_regular(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = [(name, f.get_slice(name)) for name in f.offset_keys()]
            tensors = [(name, t.get_dtype(), tuple(t.get_shape())) for name, t in tensors]
        with open(path, "rb") as f:
            offset = 8 + int.from_bytes(f.read(8), "little")  # the first tensor's first byte
    except OSError as e:
        raise CrystalError(f"cannot read {path}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise invalid_safetensors(path, e) from None
    entries = {}
    for name, dtype, shape in tensors:
        if dtype not in DTYPE_BITS:
            raise CrystalError(f"{path}: tensor {name} has dtype {dtype}, unknown to crystal")
        entries[name] = _Entry(path, name, dtype, shape, offset)
        offset += math.prod(shape) * DTYPE_BITS[dtype] // 8
    return entries


def _collect(pre: Pretrained) -> dict[str, _Entry]:
    """Every parameter's entry under its crystal name, across the shards; buffers skipped."""
    found: dict[str, _Entry] = {}
    buffers = 0
    for file in pre.weights:
        for name, entry in read_header(file).items():
            key = crystal_name(name, pre.config)
            if key is None:
                buffers += 1
                continue
            if key in found:
                raise CrystalError(f"{pre.path}: {key} is stored twice ({found[key].name} in {found[key].file.name}, "
                                   f"{name} in {file.name})")
            found[key] = entry
    if buffers:
        pre.notes.append(f"skipped {buffers} buffers (attention masks, rotary tables)")
    return found


def _check(entry: _Entry, shape: tuple, what: str) -> None:
    if entry.dtype not in EXACT:
        name = DTYPES[entry.dtype][1] if entry.dtype in DTYPES else entry.dtype
        raise CrystalError(f"{entry.file}: {entry.name} is {name}; crystal reads float32, and widens float16 "
                           "and bfloat16 to it exactly")
    if entry.shape != shape:
        raise CrystalError(f"{entry.file}: {entry.name} has shape {list(entry.shape)}, {what} needs {list(shape)}")


def _read_into(entry: _Entry, out: np.ndarray) -> None:
    """Copy a tensor into `out` (float32), widening float16/bfloat16 exactly."""
    raw = np.fromfile(entry.file, dtype=DTYPES[entry.dtype][0], count=out.size, offset=entry.offset)
    if entry.dtype == "BF16":  # bfloat16 is the top half of a float32
        out.reshape(-1).view(np.uint32)[...] = raw.astype(np.uint32) << 16
    else:
        out.reshape(-1)[...] = raw


def _read_hf(pre: Pretrained) -> np.ndarray:
    found = _collect(pre)
    layout = ParamLayout(pre.config)
    embedding = param_shapes(pre.config)[0][0]  # the token embedding: transformer.wte / model.embed_tokens
    # A tied model's head is its embedding: a saved lm_head.weight is a copy (checked below).
    head = found.pop(LM_HEAD, None) if pre.config.tied else None
    missing, extra = layout.by_name.keys() - found.keys(), found.keys() - layout.by_name.keys()
    if missing or extra:
        raise CrystalError(f"{pre.path}: tensors do not match config.json (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(extra)[:3]})")
    for s in layout.specs:  # every shape and dtype checked before allocating what config.json claims
        _check(found[s.name], s.shape, "config.json")
    if head is not None:
        _check(head, layout.by_name[embedding].shape, f"a head tied to {embedding}")
    flat = layout.zeros()  # the LM head's padding rows zero
    views = layout.views(flat)
    for s in layout.specs:
        _read_into(found[s.name], views[s.name])
        require_finite(found[s.name].file, found[s.name].name, views[s.name])
    if head is not None:  # a saved copy of the tied head: it must be the embedding, bit for bit
        copy = np.empty(head.shape, dtype=np.float32)
        _read_into(head, copy)
        if not np.array_equal(copy.view(np.uint32), views[embedding].view(np.uint32)):
            tied = "tie_word_embeddings is true in config.json" if pre.config.llama else "crystal's GPT-2 head is tied"
            raise CrystalError(f"{head.file}: lm_head.weight differs from the token embedding {embedding} (an untied "
                               f"LM head) but {tied}")
    widened = sorted({DTYPES[e.dtype][1] for e in found.values() if e.dtype != "F32"})
    if widened:
        pre.notes.append(f"widened {' and '.join(widened)} to float32 (exact)")
    return flat


# --- crystal's own model from any of these, and back out as a Hugging Face directory ----------

def load_checkpoint(path: str | Path, backend=None) -> GPT:
    """A trained model from a run directory, a Hugging Face directory (crystal.pretrained:
    GPT-2, Llama, Qwen2; shards, names with or without the prefix, float16/bfloat16 widened
    exactly), or a .safetensors file with config.json beside it. A LoRA run gives its base with
    its adapters merged in (crystal.lora.merge)."""
    return GPT(*load_flat(path), backend)


def load_flat(path: str | Path) -> tuple[ModelConfig, np.ndarray]:
    """The model shape and flat float32 parameters (ParamLayout) load_checkpoint(path) reads."""
    path = Path(path)
    if path.is_dir() and not (path / TRAIN_FILE).exists():
        pre = open_pretrained(path)
        return pre.config, load_params(pre)
    if path.is_dir() and lora_base(path) is not None:
        cfg, layout, base, adapters = load_lora_run(path)
        return cfg, merge(layout, ParamLayout(cfg), base, adapters)
    if path.is_dir():
        model_file, config_file = path / MODEL_FILE, path / CONFIG_FILE
        if not model_file.exists() and (latest := latest_checkpoint(path)) is not None:
            model_file = latest / MODEL_FILE  # a run stopped before its end
    else:
        model_file, config_file = path, path.parent / CONFIG_FILE
    if not model_file.exists():
        raise CrystalError(f"no checkpoint at {model_file}")
    cfg = read_config(config_file)
    return cfg, read_params(model_file, cfg)


def lora_base(run: Path) -> dict | None:
    """A LoRA run's base {"path", "sha256"} (train.json's base_model), or None."""
    try:
        base = read_json(Path(run) / TRAIN_FILE).get("base_model")
    except (OSError, CrystalError, AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return base if isinstance(base, dict) else None


def load_lora_run(run: Path):
    """(config, AdapterLayout, base parameters, adapters) of a LoRA run: its final adapters, or
    its newest checkpoint's; the base read from where train.json says and refused unless its
    weights are the ones the run trained on (sha256)."""
    from crystal.checkpoint import load_tensors, read_train_config
    from crystal.lora import ADAPTER_FILE, AdapterLayout, LoraConfig, weights_sha256

    run = Path(run)
    cfg = read_config(run / CONFIG_FILE)
    train = read_train_config(run / TRAIN_FILE, cfg)
    base_id = lora_base(run)
    if not (isinstance(base_id.get("path"), str) and isinstance(base_id.get("sha256"), str)) or not train.lora_r:
        raise CrystalError(f"{run / TRAIN_FILE}: base_model must name the base's path and sha256 of a LoRA run")
    layout = AdapterLayout(cfg, LoraConfig.of(train, cfg))
    file = run / ADAPTER_FILE
    if not file.exists() and (latest := latest_checkpoint(run)) is not None:
        file = latest / ADAPTER_FILE  # a run stopped before its end
    if not file.exists():
        raise CrystalError(f"{run}: a LoRA run without {ADAPTER_FILE} or a checkpoint")
    adapters = layout.from_state_dict(load_tensors(file), str(file))
    pre = open_pretrained(base_id["path"])
    if pre.config != cfg:
        raise CrystalError(f"{run}: the base model {pre.path} is not the run's model (config.json differs)")
    base = load_params(pre)
    if weights_sha256(ParamLayout(cfg), base) != base_id["sha256"]:
        raise CrystalError(f"the base model {pre.path} changed since {run} was trained on it (the sha256 of its "
                           "weights differs from train.json's); the adapters belong to the base they trained on")
    return cfg, layout, base, adapters


def export_peft(run: str | Path, out: str | Path) -> Path:
    """A LoRA run's adapters as PEFT's adapter directory (adapter_config.json,
    adapter_model.safetensors): peft.PeftModel.from_pretrained(base, out) loads them. Written as
    export_hf writes: into a temporary sibling renamed into place."""
    from crystal.lora import ADAPTER_CONFIG, ADAPTER_FILE, peft_config

    run, out = Path(run), Path(out)
    _check_export_target(out)
    if not (run / TRAIN_FILE).exists() or lora_base(run) is None:
        raise CrystalError(f"--format peft exports a LoRA run's adapters; {run} is not a LoRA run "
                           "(train with --lora-r R)")
    _, layout, _, adapters = load_lora_run(run)

    def write(tmp: Path) -> None:
        save_model(tmp / ADAPTER_FILE, layout, adapters)
        atomic_write_json(tmp / ADAPTER_CONFIG, peft_config(layout, lora_base(run)["path"]))

    return _write_export(out, write)


def _write_export(out: Path, write) -> Path:
    """write(tmp) into a temporary sibling of out, then renamed onto it (out: whole or absent)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise CrystalError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; this is an ordinary directory
        os.replace(tmp, out)  # onto nothing or an empty directory; a non-empty one fails
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CrystalError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model shape of the checkpoint load_checkpoint(path) reads, from its config.json
    alone (no tensor is read)."""
    path = Path(path)
    if path.is_dir() and not (path / TRAIN_FILE).exists():
        return open_pretrained(path).config
    return read_config(path / CONFIG_FILE if path.is_dir() else path.parent / CONFIG_FILE)


def checkpoint_tokenizer(path: str | Path, cfg: ModelConfig):
    """The tokenizer of the checkpoint at `path` (crystal.data.run_tokenizer of the directory
    that holds its config.json), refused unless its vocabulary is the model's (config `cfg`):
    a token the model draws is always one the tokenizer decodes."""
    from crystal.data import run_tokenizer

    path = Path(path)
    where = path if path.is_dir() else path.parent
    tok = run_tokenizer(where)
    if tok.vocab_size != cfg.vocab_size:
        if (where / TOKENIZER_FILE).exists():
            found = f"{where / TOKENIZER_FILE} has {tok.vocab_size}"
        else:
            found = f"{where} has no {TOKENIZER_FILE} (bytes, {tok.vocab_size} tokens)"
        raise CrystalError(f"{path}: the model has {cfg.vocab_size} tokens but {found}; "
                           "give the run directory, which holds the model's tokenizer")
    return tok


def export_hf(run: str | Path, out: str | Path) -> Path:
    """A directory that transformers' AutoModelForCausalLM (GPT2LMHeadModel, LlamaForCausalLM or
    Qwen2ForCausalLM, as config.json says) and AutoTokenizer load offline.

    The model, its config and its tokenizer are read and checked before anything is written;
    the files are written into a temporary sibling of `out`, renamed into place when complete:
    `out` is the whole export or absent. An existing `out` must be an empty directory, so an
    export never replaces a file (another run's model, an earlier export)."""
    run, out = Path(run), Path(out)
    _check_export_target(out)
    cfg, flat = load_flat(run)  # the tensors as they are: no backend, no forward
    check_hf_exportable(cfg)
    tokenizer_json = checkpoint_tokenizer(run, cfg).to_json()  # a fine-tuned GPT-2's: the released one, verbatim
    # The end-of-text token (GPT-2's <|endoftext|>, 50256; 0 in crystal's bpe) is the first special one.
    try:
        specials = [(int(t["id"]), str(t["content"])) for t in parse_json(tokenizer_json, "tokenizer.json").get("added_tokens", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CrystalError(f"{run}: not a valid tokenizer.json ({e})") from None
    eot = specials[0][0] if specials else 0
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
               "clean_up_tokenization_spaces": False}
    if specials:
        name = specials[0][1]
        tok_cfg.update(bos_token=name, eos_token=name, unk_token=name)

    def write(tmp: Path) -> None:
        atomic_write_json(tmp / CONFIG_FILE, {**cfg.to_hf(), "bos_token_id": eot, "eos_token_id": eot})
        save_model(tmp / MODEL_FILE, ParamLayout(cfg), flat)
        atomic_write_text(tmp / TOKENIZER_FILE, tokenizer_json)
        atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": eot, "eos_token_id": eot, "max_length": cfg.block_size})

    return _write_export(out, write)


def _check_export_target(out: Path) -> None:
    """--out is absent or an empty directory (export never replaces a file)."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise CrystalError(f"--out {out} exists and is not a directory; export into a new or empty directory")
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as e:
        raise CrystalError(f"cannot read {out}: {e.strerror or e}") from None
    if not empty:
        what = "a crystal run" if (out / RUN_MARK).exists() else "not empty"
        raise CrystalError(f"--out {out} is {what}; export into a new or empty directory (export never replaces "
                           "files)")
