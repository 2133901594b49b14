"""Streaming `crystal prepare` (issue 32, item 4): inputs read as streams (text, .jsonl, .parquet,
globs, directories), <|endoftext|> between documents, the same bytes for any --workers, an interrupted
prepare run again gives the same data set, bpe trained on a seeded sample, and the refusals.

The tokenizer is a byte-level BPE trained here; the reference ids are its own `encode`."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import R, refused

import crystal.corpus
import crystal.data
from crystal.corpus import Progress
from crystal.data import EOT, BPETokenizer, Cutter, default_corpus, load_dataset, prepare

tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers library")

TEXT = default_corpus()[:60_000].decode()
DOCS = [TEXT[i:i + n] for i, n in zip(range(0, 50_000, 5_000), [700, 40, 3000, 0, 1, 900, 200, 5, 2500, 60])]


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def all_ids(d: Path) -> np.ndarray:
    ds = load_dataset(str(d))
    return np.concatenate([np.asarray(ds.train), np.asarray(ds.val)]).astype(np.int64)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "a.txt").write_text(TEXT, encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"id": len(d), "text": d}) + "\n")
        f.write("\n")  # a blank line is no document
    tok = BPETokenizer.train([TEXT], 300)
    (root / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    return root


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    """A .parquet file of `columns` (name -> list of values), in row groups of row_group_size rows."""
    pytest.importorskip("pyarrow", reason="reading .parquet needs pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def reference_ids(root: Path) -> list[int]:
    """a.txt then b.jsonl's documents, <|endoftext|> between each two."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    for d in DOCS:
        ids += [eot] + tok.encode(d, add_special_tokens=False).ids
    return ids


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces, batches, scratch files and val decoding scaled down, so these inputs cross each."""
    monkeypatch.setattr(crystal.data, "PIECE_CHARS", 1000)
    monkeypatch.setattr(crystal.data, "BATCH_CHARS", 3000)
    monkeypatch.setattr(crystal.data, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(crystal.data, "DECODE_TOKENS", 700)
    monkeypatch.setattr(crystal.corpus, "SCRATCH_TOKENS", 4000)
    monkeypatch.setattr(crystal.corpus, "READ_BYTES", 777)


def test_any_worker_count_writes_the_same_bytes_and_the_tokenizers_own_ids(inputs, tmp_path, small_pieces):
    out = {}
    for workers in (1, 2, 4):
        prepare([str(inputs / "a.txt"), str(inputs / "b.jsonl")], str(tmp_path / f"w{workers}"),
                str(inputs / "tokenizer.json"), shard_tokens=5000, workers=workers)
        out[workers] = hashes(tmp_path / f"w{workers}")
    assert out[1] == out[2] == out[4]
    assert {"train_000000.bin", "train_000001.bin", "val_000000.bin", "meta.json"} <= out[1].keys()
    assert all_ids(tmp_path / "w1").tolist() == reference_ids(inputs)
    meta = json.loads((tmp_path / "w1" / "meta.json").read_text())
    ds = load_dataset(str(tmp_path / "w1"))
    assert meta["val_bytes"] == len(ds.tokenizer.decode(np.asarray(ds.val)).encode())  # decoded in pieces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1", "w2", "w4"]  # no scratch or sibling left


def test_the_stream_cutter_gives_the_pieces_of_the_whole_text(inputs, monkeypatch):
    monkeypatch.setattr(crystal.data, "PIECE_CHARS", 500)
    monkeypatch.setattr(crystal.data, "MAX_PIECE_CHARS", 3000)
    cutter = Cutter(BPETokenizer.from_file(inputs / "tokenizer.json").tok)
    text = TEXT[:25_000]
    whole = list(cutter.pieces(text, "t"))
    assert len(whole) > 20
    for size in (7, 1000, 10 ** 6):
        assert list(cutter.stream((text[i:i + size] for i in range(0, len(text), size)), "t")) == whole


def test_globs_and_directories_are_read_in_the_order_of_their_names(inputs, tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "2.txt").write_text("second ")
    (d / "1.txt").write_text("first ")
    (d / ".hidden").write_text("never")
    prepare([str(d)], str(tmp_path / "a"), "bytes", val_fraction=0)
    prepare([str(d / "*.txt"), str(d / "s*" / "*.txt")], str(tmp_path / "b"), "bytes", val_fraction=0)
    for name in "ab":  # the byte tokenizer has no <|endoftext|>: documents as they are
        assert bytes(all_ids(tmp_path / name).astype(np.uint8)) == b"first second "


def test_bpe_beyond_the_budget_trains_on_a_seeded_sample(inputs, tmp_path, small_pieces):
    text = TEXT[:20_000]
    (tmp_path / "t.txt").write_text(text)
    whole = prepare([str(tmp_path / "t.txt")], str(tmp_path / "whole"), "bpe", 300)
    assert "bpe_sample" not in whole  # the input fits: trained on all of it, as before
    assert (tmp_path / "whole" / "tokenizer.json").read_text() == BPETokenizer.train([text], 300).to_json()
    metas = [prepare([str(tmp_path / "t.txt")], str(tmp_path / n), "bpe", 300, bpe_train_bytes=8_000) for n in "xy"]
    assert metas[0] == metas[1] and 0 < metas[0]["bpe_sample"]["bytes"] < 20_000
    assert hashes(tmp_path / "x") == hashes(tmp_path / "y")


def test_progress_is_a_plain_line_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(4_000_000, out)
    p.every = 0.0
    p.start("tokenizing")
    p.read(2_000_000)
    p.wrote(500_000)
    lines = out.getvalue().splitlines()
    assert lines and "\r" not in out.getvalue()
    assert lines[-1].startswith("tokenizing: 2.0 of 4.0 MB (50%)") and "500,000 tokens" in lines[-1]


def test_a_killed_prepare_run_again_gives_the_same_data_set(inputs, tmp_path):
    src = tmp_path / "big.txt"
    src.write_text(TEXT * 16, encoding="utf-8")  # 1 MB: a second or so on one worker
    out = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "crystal", "prepare", str(src), "--out", str(out), "--tokenizer",
                             str(inputs / "tokenizer.json"), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".data.*.tmp")):  # tokenizing into the sibling
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".data.*.tmp"))  # what it left: a sibling only
    meta = prepare([str(src)], str(out), str(inputs / "tokenizer.json"), workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "data"]  # the orphan is removed
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(inputs / "tokenizer.json")).encode(TEXT * 16, add_special_tokens=False).ids
    assert meta["tokens_sha256"] == hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()
    assert all_ids(out).tolist() == ids


BIG = 1 << 30  # the memory test's input: 1 GiB of jsonl
# The child's peak RSS: its own VmHWM (the peak of its memory since exec; its ru_maxrss is no
# use: through vfork and exec it starts at the peak of the process that started it, here pytest's)
# and the ru_maxrss of the processes it started (tokenizer workers; none for bytes).
CHILD_RSS = """
import json, resource, sys
from crystal.cli import main
code = main(sys.argv[1:])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_rss": 1024 * max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)}))
"""


def write_big_jsonl(path: Path, size: int) -> tuple[int, bytes, bytes]:
    """At least `size` bytes of jsonl: a 32 MiB block of Tiny Shakespeare documents (1,000-6,000
    characters) written again and again. Returns the byte tokenizer's id count, the first
    document's bytes and the last one's."""
    text = default_corpus().decode()
    rng = np.random.default_rng(0)
    docs, lines, n = [], [], 0
    while n < 32 << 20:
        at = int(rng.integers(0, len(text) - 6000))
        docs.append(text[at:at + int(rng.integers(1000, 6000))])
        lines.append(json.dumps({"text": docs[-1]}) + "\n")
        n += len(lines[-1])
    block = "".join(lines).encode()
    repeats = -(-size // len(block))
    with open(path, "wb") as f:
        for _ in range(repeats):
            f.write(block)
    return repeats * sum(len(d.encode()) for d in docs), docs[0].encode(), docs[-1].encode()


def test_a_1_gib_jsonl_prepares_with_peak_rss_under_1_gib(tmp_path):
    # disk: the input, then at most about 2 bytes an id in the scratch (1 byte an id, freed as
    # the shards are written) and the shards (2 bytes an id) together, with an id per input byte
    need = 3 * BIG + (256 << 20)
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the child's peak RSS (VmHWM) from /proc (Linux)")
    if shutil.disk_usage(tmp_path).free < need:
        pytest.skip(f"needs {need / 2**30:.2f} GiB free in {tmp_path} for a 1 GiB input and its shards")
    try:
        n, first, last = write_big_jsonl(tmp_path / "big.jsonl", BIG)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([sys.executable, "-c", CHILD_RSS, "prepare", str(tmp_path / "big.jsonl"), "--out",
                               str(tmp_path / "d"), "--tokenizer", "bytes"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        child = json.loads(done.stdout.splitlines()[-1])
        assert child["code"] == 0, done.stderr
        assert child["peak_rss"] < 1 << 30, f"peak RSS {child['peak_rss'] / 2**20:.0f} MiB"
        meta = json.loads((tmp_path / "d" / "meta.json").read_text())
        assert meta["train_tokens"] + meta["val_tokens"] == n
        assert sum(s["tokens"] for split in ("train_shards", "val_shards") for s in meta[split]) == n
        head = crystal.data.map_tokens(crystal.data.open_token_file(tmp_path / "d" / meta["train_shards"][0]["file"]))
        tail = crystal.data.map_tokens(crystal.data.open_token_file(tmp_path / "d" / meta["val_shards"][-1]["file"]))
        assert bytes(head[:len(first)].astype(np.uint8)) == first and bytes(tail[-len(last):].astype(np.uint8)) == last
        del head, tail
    finally:  # pytest keeps the last runs' tmp_path: delete the 3 GiB now
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_parquet_rows_prepare_to_the_same_token_files_as_the_same_jsonl_lines(inputs, tmp_path, small_pieces):
    write_parquet(tmp_path / "b.parquet", {"id": [len(d) for d in DOCS], "text": DOCS}, row_group_size=3)
    metas = {}
    for name in ("b.jsonl", "b.parquet"):
        src = inputs / name if name.endswith("jsonl") else tmp_path / name
        metas[name] = prepare([str(inputs / "a.txt"), str(src)], str(tmp_path / name[2:]),
                              str(inputs / "tokenizer.json"), shard_tokens=5000, workers=1)
    assert hashes(tmp_path / "jsonl").keys() == hashes(tmp_path / "parquet").keys()
    for f, h in hashes(tmp_path / "jsonl").items():  # meta.json names its inputs, so differs there only
        assert f == "meta.json" or hashes(tmp_path / "parquet")[f] == h, f
    assert {k: v for k, v in metas["b.jsonl"].items() if k != "sources"} == \
        {k: v for k, v in metas["b.parquet"].items() if k != "sources"}
    assert all_ids(tmp_path / "parquet").tolist() == reference_ids(inputs)


def test_text_field_picks_the_parquet_column(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", {"text": ["not this ", "nor this"], "body": ["this ", "one"]})
    prepare([str(src)], str(tmp_path / "d"), "bytes", val_fraction=0, text_field="body")
    assert bytes(all_ids(tmp_path / "d").astype(np.uint8)) == b"this one"


def test_parquet_rows_keep_their_order_across_row_groups_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(crystal.corpus, "PARQUET_ROWS", 4)  # batches of 4 rows over row groups of 7
    docs = [f"<{i}>" for i in range(50)]
    src = write_parquet(tmp_path / "x.parquet", {"text": docs}, row_group_size=7)
    prepare([str(src)], str(tmp_path / "d"), "bytes", val_fraction=0)
    assert bytes(all_ids(tmp_path / "d").astype(np.uint8)) == "".join(docs).encode()


# --- refusals: exit 2, one line, nothing written ---------------------------------------------------------

CASES = {
    "glob matching nothing": (None, ["prepare", f"{R}/nothing*.txt", "--out", f"{R}/p"]),
    "jsonl line without the text field": (
        lambda r: (r / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n'),
        ["prepare", f"{R}/x.jsonl", "--out", f"{R}/p", "--tokenizer", f"{R}/tokenizer.json"]),
    "jsonl text not a string": (lambda r: (r / "x.jsonl").write_text('{"text": 3}\n'),
                                ["prepare", f"{R}/x.jsonl", "--out", f"{R}/p"]),
    "jsonl line not json": (lambda r: (r / "x.jsonl").write_text('{"text": "a"}\n{"text": \n'),
                            ["prepare", f"{R}/x.jsonl", "--out", f"{R}/p"]),
    "jsonl wrong --text-field": (lambda r: (r / "x.jsonl").write_text('{"text": "a"}\n'),
                                 ["prepare", f"{R}/x.jsonl", "--out", f"{R}/p", "--text-field", "content"]),
    "parquet without pyarrow": (lambda r: (r / "x.parquet").write_bytes(b"PAR1"),
                                ["prepare", f"{R}/x.parquet", "--out", f"{R}/p"]),
    "parquet not a parquet file": (lambda r: (r / "x.parquet").write_bytes(b"PAR1garbage"),
                                   ["prepare", f"{R}/x.parquet", "--out", f"{R}/p"]),
    "parquet without the column": (lambda r: write_parquet(r / "x.parquet", {"body": ["a"]}),
                                   ["prepare", f"{R}/x.parquet", "--out", f"{R}/p"]),
    "parquet column of ints": (lambda r: write_parquet(r / "x.parquet", {"text": [1, 2]}),
                               ["prepare", f"{R}/x.parquet", "--out", f"{R}/p"]),
    "parquet null in the column": (lambda r: write_parquet(r / "x.parquet", {"text": ["a", "b", None, "c"]}),
                                   ["prepare", f"{R}/x.parquet", "--out", f"{R}/p"]),
    "workers 0": (None, ["prepare", f"{R}/a.txt", "--out", f"{R}/p", "--workers", "0"]),
    "bpe-train-bytes 0": (None, ["prepare", f"{R}/a.txt", "--out", f"{R}/p", "--tokenizer", "bpe",
                                 "--bpe-train-bytes", "0"]),
    "bpe-train-bytes without bpe": (None, ["prepare", f"{R}/a.txt", "--out", f"{R}/p", "--bpe-train-bytes", "9"]),
    "a directory without files": (lambda r: (r / "empty").mkdir(), ["prepare", f"{R}/empty", "--out", f"{R}/p"]),
    "a prepared data set as input": (lambda r: prepare([str(r / "a.txt")], str(r / "ds")),
                                     ["prepare", f"{R}/ds", "--out", f"{R}/p"]),
    "not UTF-8 after the first block": (lambda r: (r / "u.txt").write_bytes(b"a" * 3_000_000 + b"\xff"),
                                        ["prepare", f"{R}/u.txt", "--out", f"{R}/p", "--tokenizer", "bpe"]),
}

SAYS = {  # what the line must say, where it matters
    "parquet without pyarrow": "needs pyarrow",
    "parquet not a parquet file": "not a parquet file",
    "parquet without the column": "no 'text' column",
    "parquet column of ints": "holds int64, not strings",
    "parquet null in the column": "row 2 (counting from 0): the 'text' field is null",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_prepare_input_exits_2_with_one_line_and_writes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    root = tmp_path / "r"
    root.mkdir()
    for name in ("a.txt", "tokenizer.json"):
        (root / name).write_bytes((inputs / name).read_bytes())
    damage, argv = CASES[case]
    if damage:
        damage(root)
    if case == "parquet without pyarrow":  # pretend it is not installed, whether it is or not
        find_spec = crystal.corpus.importlib.util.find_spec
        monkeypatch.setattr(crystal.corpus.importlib.util, "find_spec",
                            lambda name, *a: None if name == "pyarrow" else find_spec(name, *a))
    elif case.startswith("parquet"):
        pytest.importorskip("pyarrow", reason="reading .parquet needs pyarrow")
    line = refused(root, argv, capsys)[0]
    if case == "not UTF-8 after the first block":
        assert "byte 3,000,000" in line or "byte 3000000" in line
    if case in SAYS:
        assert SAYS[case] in line, line
    assert not (root / "p").exists() and not list(root.glob(".p.*"))
