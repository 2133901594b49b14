"""Token files and `crystal prepare`: exact round trips, validated headers, one-line refusals."""

import json
import struct

import numpy as np
import pytest

from crystal.cli import main
from crystal.data import TOKEN_HEADER, load_dataset, prepare, read_tokens, write_tokens
from crystal.errors import CrystalError

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 400)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "input.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.mark.parametrize("vocab,dtype", [(256, "<u2"), (65536, "<u2"), (70000, "<u4")])
def test_token_files_round_trip_exactly_with_the_smallest_dtype(tmp_path, vocab, dtype):
    ids = np.random.default_rng(0).integers(0, vocab, 1001)
    write_tokens(tmp_path / "t.bin", ids, vocab)
    back, v = read_tokens(tmp_path / "t.bin")
    assert v == vocab and back.dtype == np.dtype(dtype) and np.array_equal(back, ids)
    assert (tmp_path / "t.bin").stat().st_size == TOKEN_HEADER.size + 1001 * np.dtype(dtype).itemsize


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[:8] = b"NOTTOKEN"
    elif how == "version":
        data[8:12] = struct.pack("<I", 99)
    elif how == "itemsize":
        data[12:16] = struct.pack("<I", 3)
    elif how == "truncated":
        data = data[:-3]
    elif how == "padded":
        data += b"\0\0"
    elif how == "short header":
        data = data[:10]
    elif how == "id out of range":
        data[TOKEN_HEADER.size:TOKEN_HEADER.size + 2] = struct.pack("<H", 300)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["magic", "version", "itemsize", "truncated", "padded", "short header",
                                 "id out of range"])
def test_a_damaged_token_file_is_refused(tmp_path, how):
    write_tokens(tmp_path / "t.bin", np.arange(100) % 256, 256)
    corrupt(tmp_path / "t.bin", how)
    with pytest.raises(CrystalError):
        read_tokens(tmp_path / "t.bin")


def test_prepare_bytes_keeps_every_byte(text_file, tmp_path):
    meta = prepare([str(text_file)], str(tmp_path / "d"), "bytes", val_fraction=0.1)
    ds = load_dataset(str(tmp_path / "d"))
    assert bytes(np.concatenate([ds.train, ds.val]).astype(np.uint8)) == TEXT.encode()
    assert meta["tokenizer"] == "bytes" and ds.vocab_size == 256


def test_prepare_bpe_round_trips_the_text(text_file, tmp_path):
    meta = prepare([str(text_file)], str(tmp_path / "d"), "bpe", vocab_size=300, val_fraction=0.1)
    ds = load_dataset(str(tmp_path / "d"))
    assert meta["vocab_size"] == ds.vocab_size <= 300
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == TEXT
    assert len(ds.train) + len(ds.val) < len(TEXT.encode()) / 2  # merges compress
    assert json.loads((tmp_path / "d" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_prepare_refuses_binary_input_for_bpe(tmp_path, capsys):
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 10)
    assert main(["prepare", str(tmp_path / "bin.dat"), "--out", str(tmp_path / "d"),
                 "--tokenizer", "bpe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8" in err[0]


@pytest.mark.parametrize("how", ["magic", "truncated", "id out of range"])
def test_training_on_a_damaged_prepared_directory_exits_2_with_one_line(text_file, tmp_path, capsys, how):
    prepare([str(text_file)], str(tmp_path / "d"), "bytes")
    corrupt(tmp_path / "d" / "train.bin", how)
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.bin" in err[0]
