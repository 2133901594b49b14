"""A table of bad inputs: each exits 2 with one line on stderr, no traceback, and changes no file.

Every case runs against its own copy of a finished run (with resumable checkpoints and a BPE
data set beside it), damaged as the case says; every file of the copy is hashed before and
after the command, so an error never writes a checkpoint, a model or a metrics line.
"""

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crystal.cli import main
from crystal.data import TOKEN_HEADER, default_corpus, prepare


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    (root / "input.txt").write_bytes(default_corpus()[:60_000])
    prepare([str(root / "input.txt")], str(root / "bpe"), "bpe", vocab_size=300)
    prepare([str(root / "input.txt")], str(root / "bytes"), "bytes")
    assert main(["train", "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2", "--spheres", "2",
                 "--quiet", "--data", str(root / "bytes"), "--out", str(root / "run")]) == 0
    return root


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- damage helpers: each takes the copied root ---
def model(root):
    return root / "run" / "model.safetensors"


def resave(path, change):
    t = load_file(str(path))
    change(t)
    save_file(t, str(path), metadata={"format": "pt"})


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def write(path, data):
    Path(path).write_bytes(data)


def set_json(path, key, value):
    d = json.loads(Path(path).read_text())
    d[key] = value
    Path(path).write_text(json.dumps(d))


def hf_dir(root):
    """The run as a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json)."""
    d = root / "hf"
    if not d.exists():
        d.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            shutil.copy(root / "run" / f, d / f)
    return d


def resave_hf(root, change):
    resave(hf_dir(root) / "model.safetensors", change)


class Trap:
    """Unpickling this creates a file, which the table's hashes would see: a pickle is never loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def pickle_only(root):
    import pickle

    d = hf_dir(root)
    (d / "model.safetensors").unlink()
    write(d / "pytorch_model.bin", pickle.dumps(Trap(root / "unpickled")))


def shards_with_one_missing(root):
    d = hf_dir(root)
    t = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(t)
    shard = {k: f"model-0000{1 + 2 * i // len(names)}-of-00002.safetensors" for i, k in enumerate(names)}
    save_file({k: t[k] for k in names if shard[k].startswith("model-00001")},
              str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    write(d / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": shard}).encode())


def token_file(root, ids, vocab=256, magic=b"CRYSTOK1"):
    d = root / "tok"
    shutil.copytree(root / "bytes", d)
    ids = np.asarray(ids, dtype="<u2")
    write(d / "train.bin", TOKEN_HEADER.pack(magic, 1, 2, ids.size, vocab) + ids.tobytes())
    return d


def toml(line: str, table: str = "train"):
    """A damage writing c.toml with `line` in [table]."""
    return lambda r: write(r / "c.toml", f"[{table}]\n{line}\n".encode())


def latest(root):
    return max((root / "run" / "checkpoints").glob("step-*"))


def latest_state(root) -> bytes:
    return (latest(root) / "state.json").read_bytes()


R = "{root}"
TRAIN = ["train", "--preset", "tiny", "--quiet", "--out", f"{R}/new"]
INIT = ["train", "--init-from", f"{R}/hf", "--data", f"{R}/bytes", "--quiet", "--out", f"{R}/new"]
CASES = {
    # command-line values
    "zero spheres": (None, [*TRAIN, "--spheres", "0"]),
    "65 spheres": (None, [*TRAIN, "--spheres", "65"]),
    "spheres not a number": (None, [*TRAIN, "--spheres", "x"]),
    "zero steps": (None, [*TRAIN, "--steps", "0"]),
    "negative lr": (None, [*TRAIN, "--lr", "-1"]),
    "nan lr": (None, [*TRAIN, "--lr", "nan"]),
    "inf grad clip": (None, [*TRAIN, "--grad-clip", "inf"]),
    "dropout of one": (None, [*TRAIN, "--dropout", "1"]),
    "cuda graphs on the cpu": (None, [*TRAIN, "--device", "cpu", "--cuda-graphs", "on"]),
    "cuda graphs nonsense": (None, [*TRAIN, "--cuda-graphs", "sometimes"]),
    "n_embd not divisible": (None, [*TRAIN, "--n-embd", "30", "--n-head", "4"]),
    "seq_len above block": (None, [*TRAIN, "--seq-len", "64", "--block-size", "32"]),
    "negative warmup": (None, [*TRAIN, "--warmup", "-5"]),
    "weight decay 2": (None, [*TRAIN, "--weight-decay", "2"]),
    "beta1 of 1": (None, [*TRAIN, "--beta1", "1"]),
    "val fraction 1.5": (None, [*TRAIN, "--val-fraction", "1.5"]),
    "negative keep": (None, [*TRAIN, "--keep", "-1"]),
    "stop at 0": (None, [*TRAIN, "--stop-at", "0"]),
    "negative seed": (None, [*TRAIN, "--seed", "-1"]),
    "unknown preset": (None, [*TRAIN, "--preset", "gpt5"]),
    "unknown device": (None, [*TRAIN, "--device", "tpu"]),
    "unknown precision": (None, [*TRAIN, "--precision", "fp8"]),
    "bf16 on the cpu": (None, [*TRAIN, "--device", "cpu", "--precision", "bf16"]),
    "bf16 on the cpu from a config": (lambda r: write(r / "c.toml", b'[train]\nprecision = "bf16"\ndevice = "cpu"\n'),
                                      [*TRAIN, "--config", f"{R}/c.toml"]),
    "unknown on-nonfinite": (None, [*TRAIN, "--on-nonfinite", "ignore"]),
    "missing config file": (None, [*TRAIN, "--config", f"{R}/nope.toml"]),
    "config not toml": (lambda r: write(r / "c.toml", b"[train\nlr = "), [*TRAIN, "--config", f"{R}/c.toml"]),
    "config unknown key": (lambda r: write(r / "c.toml", b"[train]\nspeed = 3\n"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "shard_optimizer not a boolean": (lambda r: write(r / "c.toml", b'[train]\nshard_optimizer = "yes"\n'),
                                      [*TRAIN, "--config", f"{R}/c.toml"]),
    "sample negative tokens": (None, ["sample", f"{R}/run", "--tokens", "-5"]),
    "sample negative temperature": (None, ["sample", f"{R}/run", "--temperature", "-1"]),
    "sample top-k 0": (None, ["sample", f"{R}/run", "--top-k", "0"]),
    "prepare bpe vocab 10": (None, ["prepare", f"{R}/input.txt", "--out", f"{R}/p", "--tokenizer", "bpe",
                                    "--vocab-size", "10"]),
    "prepare missing input": (None, ["prepare", f"{R}/missing.txt", "--out", f"{R}/p"]),
    "resume changes lr": (None, ["train", "--resume", f"{R}/run", "--lr", "0.1"]),
    # data files
    "empty data": (lambda r: write(r / "e.txt", b""), [*TRAIN, "--data", f"{R}/e.txt"]),
    "one byte of data": (lambda r: write(r / "o.txt", b"x"), [*TRAIN, "--data", f"{R}/o.txt"]),
    "binary input for bpe": (lambda r: write(r / "b.bin", bytes(range(256)) * 50),
                             ["prepare", f"{R}/b.bin", "--out", f"{R}/p", "--tokenizer", "bpe"]),
    "token ids above vocab": (lambda r: token_file(r, [1, 2, 300, 4] * 200), [*TRAIN, "--data", f"{R}/tok"]),
    "token file wrong magic": (lambda r: token_file(r, [1, 2, 3] * 300, magic=b"NOTATOKN"),
                               [*TRAIN, "--data", f"{R}/tok"]),
    "token file truncated": (lambda r: truncate(token_file(r, [1, 2, 3] * 300) / "train.bin", 0.7),
                             [*TRAIN, "--data", f"{R}/tok"]),
    "prepared dir bad meta": (lambda r: write(r / "bytes" / "meta.json", b"{not json"),
                              [*TRAIN, "--data", f"{R}/bytes"]),
    "data is bpe, run is bytes": (None, ["eval", f"{R}/run", "--data", f"{R}/bpe"]),
    # checkpoints
    "truncated model": (lambda r: truncate(model(r)), ["eval", f"{R}/run"]),
    "model wrong shape": (lambda r: resave(model(r), lambda t: t.update(
        {"transformer.ln_f.bias": np.zeros(7, np.float32)})), ["eval", f"{R}/run"]),
    "model missing tensor": (lambda r: resave(model(r), lambda t: t.pop("transformer.wpe.weight")),
                             ["eval", f"{R}/run"]),
    "model extra tensor": (lambda r: resave(model(r), lambda t: t.update({"lm_head.weight": np.zeros(3, np.float32)})),
                           ["sample", f"{R}/run"]),
    "model float16": (lambda r: resave(model(r), lambda t: t.update(
        {"transformer.ln_f.bias": t["transformer.ln_f.bias"].astype(np.float16)})), ["export", f"{R}/run", "--out", f"{R}/hf"]),
    "huge header length": (lambda r: write(model(r), struct.pack("<Q", 2**62) + model(r).read_bytes()[8:]),
                           ["eval", f"{R}/run"]),
    "config mismatch": (lambda r: set_json(r / "run" / "config.json", "n_embd", 48), ["eval", f"{R}/run"]),
    "config not json": (lambda r: write(r / "run" / "config.json", b"n_embd = 32"), ["sample", f"{R}/run"]),
    "config not gpt2": (lambda r: set_json(r / "run" / "config.json", "model_type", "llama"), ["eval", f"{R}/run"]),
    "train.json not json": (lambda r: write(r / "run" / "train.json", b"\x00\x01"), ["eval", f"{R}/run"]),
    "tokenizer.json corrupt": (lambda r: write(r / "run" / "tokenizer.json", b"{}"), ["sample", f"{R}/run"]),
    "resume truncated optimizer": (lambda r: truncate(r / "run" / "checkpoints" / "step-00000004" / "optim.safetensors"),
                                   ["train", "--resume", f"{R}/run"]),
    "resume corrupt state": (lambda r: write(r / "run" / "checkpoints" / "step-00000004" / "state.json", b"[]"),
                             ["train", "--resume", f"{R}/run"]),
    # run directories
    "out under a file": (lambda r: write(r / "afile", b"x"), [*TRAIN[:-2], "--out", f"{R}/afile/run"]),
    "out is a file": (lambda r: write(r / "afile", b"x"), [*TRAIN[:-2], "--out", f"{R}/afile"]),
    "existing run without overwrite": (None, [*TRAIN[:-2], "--out", f"{R}/run"]),
    "resume missing dir": (None, ["train", "--resume", f"{R}/missing"]),
    "resume dir without checkpoints": (lambda r: shutil.rmtree(r / "run" / "checkpoints"),
                                       ["train", "--resume", f"{R}/run"]),
    "eval missing run": (None, ["eval", f"{R}/missing"]),
    "export to a file path": (lambda r: write(r / "afile", b"x"), ["export", f"{R}/run", "--out", f"{R}/afile/hf"]),
    "plot missing run": (None, ["plot", f"{R}/missing", "--out", f"{R}/x.png"]),
    # fine-tuning: --init-from DIR (the run, as a Hugging Face directory) and prepare --tokenizer PATH
    "init-from a pickle only": (pickle_only, INIT),
    "init-from relu activation": (lambda r: set_json(hf_dir(r) / "config.json", "activation_function", "relu"), INIT),
    "init-from untied head in config": (lambda r: set_json(hf_dir(r) / "config.json", "tie_word_embeddings", False),
                                        INIT),
    "init-from n_inner not 4x": (lambda r: set_json(hf_dir(r) / "config.json", "n_inner", 96), INIT),
    "init-from attention scaled by layer": (lambda r: set_json(hf_dir(r) / "config.json",
                                                               "scale_attn_by_inverse_layer_idx", True), INIT),
    "init-from reordered upcast attention": (lambda r: set_json(hf_dir(r) / "config.json", "reorder_and_upcast_attn",
                                                                True), INIT),
    "init-from lm_head not wte": (lambda r: resave_hf(r, lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"] + 1})), INIT),
    "init-from data of another vocabulary": (hf_dir, [*INIT, "--data", f"{R}/bpe"]),
    "init-from without tokenizer.json": (lambda r: (hf_dir(r) / "tokenizer.json").unlink(), INIT),
    "init-from a listed shard absent": (shards_with_one_missing, INIT),
    "init-from tensor of wrong shape": (lambda r: resave_hf(r, lambda t: t.update(
        {"transformer.wpe.weight": np.zeros((16, 32), np.float32)})), INIT),
    "init-from float64 tensor": (lambda r: resave_hf(r, lambda t: t.update(
        {"transformer.ln_f.bias": t["transformer.ln_f.bias"].astype(np.float64)})), INIT),
    "init-from seq-len above n_positions": (hf_dir, [*INIT, "--seq-len", "64"]),
    "init-from with a model flag": (hf_dir, [*INIT, "--n-layer", "3"]),
    "init-from with --resume": (hf_dir, ["train", "--resume", f"{R}/run", "--init-from", f"{R}/hf"]),
    "init-from missing directory": (None, [*INIT[:2], f"{R}/missing", *INIT[3:]]),
    "finetune preset without init-from": (None, [*TRAIN, "--preset", "finetune"]),
    "prepare tokenizer not found": (None, ["prepare", f"{R}/input.txt", "--out", f"{R}/p", "--tokenizer",
                                           f"{R}/missing.json"]),
    "prepare tokenizer dir without one": (None, ["prepare", f"{R}/input.txt", "--out", f"{R}/p", "--tokenizer", R]),
    "prepare tokenizer with --vocab-size": (None, ["prepare", f"{R}/input.txt", "--out", f"{R}/p", "--tokenizer",
                                                   f"{R}/bpe", "--vocab-size", "500"]),
    # --- round two (issue 21): values of the wrong type, eval, sizes, non-regular files, run directories ---
    "toml lr a string": (toml('lr = "x"'), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml warmup a string": (toml('warmup = "x"'), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml dropout a list": (toml("dropout = [0.1]"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml lr a date": (toml("lr = 1979-05-27"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml data a number": (toml("data = 5"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml out a number": (toml("out = 5"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml steps a float": (toml("steps = 2.5"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml n_layer a table": (toml("n_layer = {a = 1}", "model"), [*TRAIN, "--config", f"{R}/c.toml"]),
    "toml lr a string, print-config": (toml('lr = "x"'), ["train", "--config", f"{R}/c.toml", "--print-config"]),
    "toml preset a list": (lambda r: write(r / "c.toml", b'preset = ["small"]\n'), [*TRAIN, "--config", f"{R}/c.toml"]),
    "epochs inf": (None, [*TRAIN, "--epochs", "inf"]),
    "epochs nan": (None, [*TRAIN, "--epochs", "nan"]),
    "train.json lr a string, resume": (lambda r: set_json(r / "run" / "train.json", "lr", "x"),
                                       ["train", "--resume", f"{R}/run"]),
    "train.json preset a list, resume": (lambda r: set_json(r / "run" / "train.json", "preset", ["tiny"]),
                                         ["train", "--resume", f"{R}/run"]),
    "train.json data a number, eval": (lambda r: set_json(r / "run" / "train.json", "data", 5), ["eval", f"{R}/run"]),
    "train.json batch_size 0, eval": (lambda r: set_json(r / "run" / "train.json", "batch_size", 0),
                                      ["eval", f"{R}/run"]),
    "train.json seq_len above block, eval": (lambda r: set_json(r / "run" / "train.json", "seq_len", 4096),
                                             ["eval", f"{R}/run"]),
    "train.json seed -1, eval": (lambda r: set_json(r / "run" / "train.json", "seed", -1), ["eval", f"{R}/run"]),
    "train.json a list, eval": (lambda r: write(r / "run" / "train.json", b"[1, 2]"), ["eval", f"{R}/run"]),
    "state.json step Infinity": (lambda r: write(latest(r) / "state.json", latest_state(r).replace(
        b'"step": 4', b'"step": Infinity')), ["train", "--resume", f"{R}/run"]),
    "state.json step 2.5": (lambda r: write(latest(r) / "state.json", latest_state(r).replace(
        b'"step": 4', b'"step": 2.5')), ["train", "--resume", f"{R}/run"]),
    "state.json epoch Infinity": (lambda r: write(latest(r) / "state.json", latest_state(r).replace(
        b'"epoch": ', b'"epoch": Infinity, "was": ')), ["train", "--resume", f"{R}/run"]),
    "meta.json vocab_size 1e400": (lambda r: write(r / "bytes" / "meta.json", (r / "bytes" / "meta.json").read_bytes()
                                                   .replace(b'"vocab_size": 256', b'"vocab_size": 1e400')),
                                   [*TRAIN, "--data", f"{R}/bytes"]),
    "meta.json vocab_size a string": (lambda r: set_json(r / "bytes" / "meta.json", "vocab_size", "256"),
                                      [*TRAIN, "--data", f"{R}/bytes"]),
    "model of 192 GiB": (None, [*TRAIN, "--n-embd", "8192", "--n-head", "8", "--n-layer", "64"]),
    "a million micro-batches": (None, [*TRAIN, "--micro-batches", "1000000"]),
    "data /dev/zero": (None, [*TRAIN, "--data", "/dev/zero"]),
    "prepare /dev/zero": (None, ["prepare", "/dev/zero", "--out", f"{R}/p"]),
    "data a FIFO": (lambda r: os.mkfifo(r / "fifo"), [*TRAIN, "--data", f"{R}/fifo"]),
    "config a FIFO": (lambda r: os.mkfifo(r / "fifo"), [*TRAIN, "--config", f"{R}/fifo"]),
    "prepare tokenizer a FIFO": (lambda r: os.mkfifo(r / "fifo"), ["prepare", f"{R}/input.txt", "--out", f"{R}/p",
                                                                  "--tokenizer", f"{R}/fifo"]),
    "run's config.json a FIFO": (lambda r: (model(r).parent / "config.json").unlink() or os.mkfifo(
        model(r).parent / "config.json"), ["eval", f"{R}/run"]),
    "overwrite, new config fails late": (None, [*TRAIN[:-2], "--out", f"{R}/run", "--overwrite", "--val-fraction", "0",
                                                "--eval-every", "2"]),
    "out holds foreign files": (lambda r: (r / "proj").mkdir() or write(r / "proj" / "config.json", b'{"a": 1}'),
                                [*TRAIN[:-2], "--out", f"{R}/proj"]),
    "prepare into a run": (None, ["prepare", f"{R}/input.txt", "--out", f"{R}/run"]),
    "prepare into foreign files": (lambda r: (r / "proj").mkdir() or write(r / "proj" / "notes.txt", b"x"),
                                   ["prepare", f"{R}/input.txt", "--out", f"{R}/proj"]),
    # --- round two (issue 21): sample, export, plot ---
    "sample temperature inf": (None, ["sample", f"{R}/run", "--temperature", "inf"]),
    "sample seed -1": (None, ["sample", f"{R}/run", "--seed", "-1"]),
    "sample prompt not utf-8 (a lone surrogate from argv)": (None, ["sample", f"{R}/run", "--prompt", "ROMEO\udcff"]),
    "sample tokens above the bound": (None, ["sample", f"{R}/run", "--tokens", "100001"]),
    "sample tokens 10**30": (None, ["sample", f"{R}/run", "--tokens", str(10**30)]),
    "sample nan weights": (lambda r: resave(model(r), lambda t: t.update(
        {"transformer.ln_f.bias": np.full_like(t["transformer.ln_f.bias"], np.nan)})), ["sample", f"{R}/run"]),
    "sample inf weights greedy": (lambda r: resave(model(r), lambda t: t.update(
        {"transformer.wte.weight": np.full_like(t["transformer.wte.weight"], np.inf)})),
                                  ["sample", f"{R}/run", "--temperature", "0"]),
    "sample a bpe run's safetensors file without its tokenizer": (lambda r: (
        main(["train", "--preset", "tiny", "--steps", "1", "--spheres", "1", "--quiet", "--data", f"{r}/bpe",
              "--out", f"{r}/b"]), (r / "b" / "tokenizer.json").unlink()), ["sample", f"{R}/b/model.safetensors"]),
    "sample a bytes model with a bpe tokenizer.json": (lambda r: shutil.copy(r / "bpe" / "tokenizer.json",
                                                                             r / "run" / "tokenizer.json"),
                                                       ["sample", f"{R}/run"]),
    "export corrupt tokenizer.json": (lambda r: write(r / "run" / "tokenizer.json", b"{}"),
                                      ["export", f"{R}/run", "--out", f"{R}/exported"]),
    "export tokenizer.json not utf-8": (lambda r: write(r / "run" / "tokenizer.json", b"\xff\xfe{}"),
                                        ["export", f"{R}/run", "--out", f"{R}/exported"]),
    "export tokenizer.json of another vocabulary": (lambda r: shutil.copy(r / "bpe" / "tokenizer.json",
                                                                          r / "run" / "tokenizer.json"),
                                                    ["export", f"{R}/run", "--out", f"{R}/exported"]),
    "export into another run": (lambda r: shutil.copytree(r / "run", r / "other"),
                                ["export", f"{R}/run", "--out", f"{R}/other"]),
    "export into the run itself": (None, ["export", f"{R}/run", "--out", f"{R}/run"]),
    "export into a non-empty directory": (None, ["export", f"{R}/run", "--out", f"{R}/bpe"]),
    "export into an earlier export": (hf_dir, ["export", f"{R}/run", "--out", f"{R}/hf"]),
    "export out is a file": (lambda r: write(r / "afile", b"x"), ["export", f"{R}/run", "--out", f"{R}/afile"]),
    "plot unknown format .xyz": (None, ["plot", f"{R}/run", "--out", f"{R}/x.xyz"]),
    "plot format .jpg": (None, ["plot", f"{R}/run", "--out", f"{R}/x.jpg"]),
    "plot out without a suffix": (None, ["plot", f"{R}/run", "--out", f"{R}/x"]),
    "plot width 0": (None, ["plot", f"{R}/run", "--out", f"{R}/x.png", "--width", "0"]),
    "plot negative height": (None, ["plot", f"{R}/run", "--out", f"{R}/x.png", "--height", "-800"]),
    "plot height 10**6": (None, ["plot", f"{R}/run", "--out", f"{R}/x.png", "--height", str(10**6)]),
    "plot metrics line not json": (lambda r: write(r / "run" / "metrics.jsonl", b"not json\n" + (
        r / "run" / "metrics.jsonl").read_bytes()), ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot metrics line a json list": (lambda r: write(r / "run" / "metrics.jsonl", b"[1, 2]\n" + (
        r / "run" / "metrics.jsonl").read_bytes()), ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot metrics line without elapsed": (lambda r: write(r / "run" / "metrics.jsonl", b'{"step": 0, "loss": 5}\n' + (
        r / "run" / "metrics.jsonl").read_bytes()), ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot metrics loss a string": (lambda r: write(r / "run" / "metrics.jsonl", b'{"step": 0, "loss": "5", '
                                                   b'"elapsed": 0}\n' + (r / "run" / "metrics.jsonl").read_bytes()),
                                   ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot metrics line not utf-8": (lambda r: write(r / "run" / "metrics.jsonl", b"\xff\xfe\n" + (
        r / "run" / "metrics.jsonl").read_bytes()), ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot spheres.json not json": (lambda r: write(r / "run" / "spheres.json", b"{"),
                                   ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot spheres.json spheres not a list": (lambda r: set_json(r / "run" / "spheres.json", "spheres", 3),
                                             ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot spheres.json sphere not a number": (lambda r: set_json(r / "run" / "spheres.json", "spheres",
                                                                 [{"sphere": "a", "batches": 1}]),
                                              ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "plot out is a directory": (lambda r: (r / "d.png").mkdir(), ["plot", f"{R}/run", "--out", f"{R}/d.png"]),
}


def test_the_table_has_more_than_a_hundred_cases():
    assert len(CASES) > 100


def refused(root: Path, argv: list[str], capsys, snapshot=hashes) -> list[str]:
    """Runs `crystal argv` (R standing for root) and checks the refusal: exit 2, one `error:`
    line, no traceback, and snapshot(root) unchanged. Returns the error lines."""
    before = snapshot(root)
    capsys.readouterr()
    code = main([a.replace(R, str(root)) for a in argv])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err + out.out
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    assert snapshot(root) == before
    return lines


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_no_file(case, reference, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(reference, root)
    damage, argv = CASES[case]
    if damage:
        damage(root)
    refused(root, argv, capsys)
