"""Instruction data: Alpaca and chat records -> token ids and a loss mask
(`crystal prepare FILE.json[l] --format alpaca|chat --tokenizer DIR`).

Records: a JSON array of objects (FILE.json) or one object per line (FILE.jsonl; blank lines
skipped).
- alpaca: {"instruction", "input"?, "output"} (texts; input may be missing, null or ""), rendered
  with the Stanford Alpaca prompt (litgpt's `Alpaca` prompt style), with or without the input
  paragraph. The ids are encode(prompt) + encode(output) + [EOS], litgpt's SFT encoding; the mask
  is 0 on the prompt, 1 on the output and the EOS.
- chat: {"messages": [{"role", "content"}, ...]}, rendered with the tokenizer's chat template
  (crystal.chat, as transformers' apply_chat_template renders it) and encoded whole, so the ids
  are apply_chat_template's, token for token. Assistant turn i's text is what the conversation
  up to it adds to the conversation before it with the generation prompt: its content and the
  template's end-of-turn text (the model learns to stop); a token is a response token when its
  characters overlap such a text. A template that does not render each turn as a continuation of
  the ones before is refused. EOS follows the record unless its ids already end with it (a
  response token after an assistant turn, else a prompt token).

Mask: 1 on response tokens (the loss's targets), 0 on prompt tokens; each record must have at
least one. `--max-seq-len N` bounds a record's tokens: `--on-long truncate` (the default, as
litgpt) keeps its first N (a record left with no response token is dropped), `drop` drops it.
The records' ids (and masks) are concatenated (packing): the token stream is cut into windows
as for text, so the batches, their order and the bits are those of plain data, for any sphere
count and across a resume. The last `val_fraction` of the records is the validation split.

Files: as `crystal.data.prepare` writes them (train.bin and val.bin, or shards train_000000.bin,
... with --shard-tokens), each with its mask beside it (train.mask, train_000000.mask: one byte a
token, no header); meta.json lists both per shard with their sampled sha256, and the sha256 of
every mask byte (masks_sha256), which crystal.data.load_prepared and `crystal data verify` check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from crystal.chat import ChatTemplate, TemplateRefused, read_chat_template, special_token, special_tokens
from crystal.data import (DEFAULT_SHARD_TOKENS, EOT, MAX_VOCAB, META_FILE, TOKENIZER_FILE, BPETokenizer,
                          _check_prepare_out, _read_input, _replace_dir, mask_sha256, tokenizer_identity, tokens_sha256,
                          write_tokens)
from crystal.shards import open_mask_file, open_token_file, sample_sha256
from crystal.errors import CrystalError
from crystal.jsonio import parse_json

FORMATS = ("alpaca", "chat")
ON_LONG = ("truncate", "drop")

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (litgpt's), up to and including "### Response:\\n"."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def read_records(path: Path) -> list[tuple[str, object]]:
    """(name, record) of every record of a .json (an array) or .jsonl (an object a line) file;
    the name ("FILE record 3", "FILE line 7") is what an error about the record shows."""
    data = _read_input(path)
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                out.append((f"{path} line {n}", parse_json(line, f"{path} line {n}")))
        return out
    records = parse_json(data, str(path))
    if not isinstance(records, list):
        raise CrystalError(f"{path}: a JSON array of records was expected (or one record a line in a .jsonl file), "
                           f"got {type(records).__name__}")
    return [(f"{path} record {n}", r) for n, r in enumerate(records, 1)]


def _text(record: dict, key: str, name: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "has no" if value is None else f"has a {type(value).__name__} for its"
        raise CrystalError(f"{name} {what} '{key}' text")
    return value


class Encoder:
    """Records of one format -> (ids uint32, mask uint8), with the tokenizer of `tokenizer`:
    a directory holding tokenizer.json (and tokenizer_config.json / chat_template.jinja), or a
    tokenizer.json file (its directory's config)."""

    def __init__(self, fmt: str, tokenizer: str):
        if fmt not in FORMATS:
            raise CrystalError(f"--format must be one of text, {', '.join(FORMATS)}, got {fmt!r}")
        if tokenizer in ("bytes", "bpe"):
            raise CrystalError(f"--format {fmt} needs --tokenizer DIR: the tokenizer (with its end-of-text token"
                               f"{' and chat template' if fmt == 'chat' else ''}) of the model to fine-tune")
        self.fmt = fmt
        self.tok = BPETokenizer.from_file(tokenizer)
        if self.tok.vocab_size > MAX_VOCAB:
            raise CrystalError(f"{tokenizer}: {self.tok.vocab_size} tokens, above crystal's limit of {MAX_VOCAB}")
        where = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
        source, config = read_chat_template(where)
        eos_text = special_token(config, "eos_token") or EOT
        eos = self.tok.tok.token_to_id(eos_text)
        if eos is None:
            raise CrystalError(f"--tokenizer {tokenizer}: no end-of-text token (tokenizer_config.json's eos_token, "
                               f"or {EOT}) in its vocabulary")
        self.eos = eos
        self.chat = None
        if fmt == "chat":
            if source is None:
                raise CrystalError(f"--tokenizer {tokenizer} has no chat_template (tokenizer_config.json's, or "
                                   "chat_template.jinja): --format chat renders conversations with it")
            self.chat = ChatTemplate(source, special_tokens(config))

    def encode(self, record, name: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(record, dict):
            raise CrystalError(f"{name} is a {type(record).__name__}, not an object")
        ids, mask = self._alpaca(record, name) if self.fmt == "alpaca" else self._chat(record, name)
        if not mask.any():
            raise CrystalError(f"{name} has no response tokens to train on")
        return ids, mask

    def _ids(self, text: str) -> list[int]:
        return self.tok.tok.encode(text, add_special_tokens=False).ids

    def _alpaca(self, record: dict, name: str):
        instruction, output = _text(record, "instruction", name), _text(record, "output", name)
        prompt = self._ids(alpaca_prompt(instruction, _text(record, "input", name, required=False)))
        response = self._ids(output)
        if not response:
            raise CrystalError(f"{name} has no response tokens to train on (its 'output' is empty)")
        ids = prompt + response + [self.eos]
        return np.asarray(ids, np.uint32), np.repeat(np.uint8([0, 1]), [len(prompt), len(response) + 1])

    def _render(self, messages: list, generation: bool, name: str) -> str:
        try:
            return self.chat.render(messages, add_generation_prompt=generation)
        except TemplateRefused as e:
            raise CrystalError(f"{name}: {e}") from None

    def _chat(self, record: dict, name: str):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise CrystalError(f"{name} has no 'messages' list")
        for k, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise CrystalError(f"{name}: message {k} needs a 'role' and a 'content' text")
        if not any(m["role"] == "assistant" for m in messages):
            raise CrystalError(f"{name} has no response tokens to train on (no 'assistant' message)")
        text = self._render(messages, False, name)
        spans = []  # [start, end) of each assistant turn's text in `text`
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self._render(messages[:i], True, name), self._render(messages[:i + 1], False, name)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise CrystalError(f"{name}: the chat template does not render message {i + 1} as a continuation "
                                   "of the messages before it, so its response tokens cannot be told apart")
            spans.append((len(before), len(upto)))
        enc = self.tok.tok.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [int(any(max(a, s) < min(b, e) or (a == b and s <= a < e) for s, e in spans)) for a, b in enc.offsets]
        if not ids or ids[-1] != self.eos:  # the record's end: a response token after an assistant turn
            ids.append(self.eos)
            mask.append(int(messages[-1]["role"] == "assistant"))
        return np.asarray(ids, np.uint32), np.asarray(mask, np.uint8)


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)


def _write_split(d: Path, name: str, ids: np.ndarray, mask: np.ndarray, shard_tokens: int | None,
                 vocab: int) -> list[dict]:
    """A split's ids and mask as token files and mask files beside them: name.bin and name.mask,
    or shards name_000000.bin and name_000000.mask, ... of `shard_tokens` (as crystal.data's
    prepare cuts them: one file each up to DEFAULT_SHARD_TOKENS, at least one, empty where the
    split is). Returns meta.json's list of them."""
    per = shard_tokens or DEFAULT_SHARD_TOKENS
    named = shard_tokens is not None or ids.size > per
    listed = []
    for i, a in enumerate(range(0, max(ids.size, 1), per)):
        stem = f"{name}_{i:06d}" if named else name
        write_tokens(d / f"{stem}.bin", ids[a:a + per], vocab)
        atomic_write_bytes(d / f"{stem}.mask", mask[a:a + per].tobytes())
        n = int(ids[a:a + per].size)
        listed.append({"file": f"{stem}.bin", "tokens": n,
                       "sample_sha256": sample_sha256(open_token_file(d / f"{stem}.bin")), "mask": f"{stem}.mask",
                       "mask_sample_sha256": sample_sha256(open_mask_file(d / f"{stem}.mask", n))})
    return listed


def prepare_instruct(inputs: list[str], out: str, fmt: str, tokenizer: str, val_fraction: float = 0.1,
                     max_seq_len: int | None = None, on_long: str = "truncate",
                     shard_tokens: int | None = None) -> dict:
    """Instruction records into a prepared directory (each split's token files with a mask file
    beside each, tokenizer.json, meta.json), written whole as `crystal.data.prepare` writes;
    returns meta.json's contents. shard_tokens: as crystal.data.prepare's (a mask per shard)."""
    if not inputs:
        raise CrystalError("give at least one input file")
    if on_long not in ON_LONG:
        raise CrystalError(f"--on-long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    if max_seq_len is not None and max_seq_len < 2:
        raise CrystalError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    if shard_tokens is not None and not (isinstance(shard_tokens, int) and shard_tokens >= 1):
        raise CrystalError(f"--shard-tokens must be a positive number of tokens, got {shard_tokens!r}")
    if not (0 <= val_fraction < 1):
        raise CrystalError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    _check_prepare_out(Path(out))
    enc = Encoder(fmt, tokenizer)
    records = [r for p in inputs for r in read_records(Path(p))]
    if not records:
        raise CrystalError(f"{', '.join(inputs)}: no records")
    kept, truncated, dropped = [], 0, 0
    for name, record in records:
        ids, mask = enc.encode(record, name)
        if max_seq_len is not None and len(ids) > max_seq_len:
            if on_long == "drop" or not mask[:max_seq_len].any():  # truncation would leave no response token
                dropped += 1
                continue
            ids, mask, truncated = ids[:max_seq_len], mask[:max_seq_len], truncated + 1
        kept.append((ids, mask))
    n_val = int(round(len(kept) * val_fraction))
    train_part, val_part = kept[:len(kept) - n_val], kept[len(kept) - n_val:]
    if not train_part:
        raise CrystalError(f"no record left for the training split ({len(records)} records, {dropped} dropped "
                           f"as longer than --max-seq-len {max_seq_len}, {n_val} held out for validation)")
    V = enc.tok.vocab_size
    train, val = (_concat([r[0] for r in part], np.uint32) for part in (train_part, val_part))
    train_mask, val_mask = (_concat([r[1] for r in part], np.uint8) for part in (train_part, val_part))
    meta = {
        "tokenizer": enc.tok.kind, "vocab_size": V,
        "train_tokens": int(train.size), "val_tokens": int(val.size),
        "val_bytes": len(enc.tok.decode(val[val_mask == 1]).encode("utf-8")) if val.size else 0,
        "sources": [str(p) for p in inputs], "val_fraction": val_fraction,
        "tokens_sha256": tokens_sha256(train, val), "tokenizer_identity": tokenizer_identity(enc.tok),
        "tokenizer_from": str(tokenizer), "end_of_text": enc.eos,
        "format": fmt, "masks_sha256": mask_sha256(train_mask, val_mask),
        "records": {"train": len(train_part), "val": len(val_part), "truncated": truncated, "dropped": dropped},
        "response_tokens": {"train": int(train_mask.sum()), "val": int(val_mask.sum())},
        "max_seq_len": max_seq_len, "on_long": on_long,
    }
    tok_json = enc.tok.to_json()

    def write(d: Path) -> None:
        for name, ids, mask in (("train", train, train_mask), ("val", val, val_mask)):
            meta[f"{name}_shards"] = _write_split(d, name, ids, mask, shard_tokens, V)
        atomic_write_text(d / TOKENIZER_FILE, tok_json)
        atomic_write_json(d / META_FILE, meta)

    _replace_dir(Path(out), write)
    return meta
