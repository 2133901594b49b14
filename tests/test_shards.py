"""Token shards: memory-mapped token files, many shards as one stream, llm.c's shards as they are,
the window order of an epoch without an array of every window, `crystal data verify`."""

import json
import mmap
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crystal.cli import main
from crystal.data import BatchIterator, eval_batches, load_dataset, prepare, write_tokens
from crystal.shards import DATA_ORDER, LEGACY_ORDER, TokenStream, WindowOrder
from test_bad_inputs import R, refused

VOCAB = 512
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 9_000).astype(np.uint16)
CUTS = [0, 1_000, 1_001, 2_900, 4_000, 4_033, 7_500, len(TOKENS)]  # 7 shards of uneven size (one of 1 token)
TINY = ["train", "--preset", "tiny", "--steps", "4", "--micro-batches", "2", "--spheres", "2", "--quiet",
        "--log-every", "100"]


def llmc_shard(path: Path, ids: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None,
               dtype: str = "<u2") -> None:
    """llm.c dev/data/data_common.py write_datafile: 256 int32 (magic, version, count), then the ids."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(ids) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(ids).astype(dtype).tobytes())


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The same tokens as one crystal token file, as 7 crystal shards, and as llm.c shards of
    both headers (3 each)."""
    root = tmp_path_factory.mktemp("forms")
    write_tokens(root / "one.bin", TOKENS, VOCAB)
    for d in ("seven", "llmc1", "llmc7"):
        (root / d).mkdir()
    for i, (a, b) in enumerate(zip(CUTS, CUTS[1:])):
        write_tokens(root / "seven" / f"part_{i:03d}.bin", TOKENS[a:b], VOCAB)
    for i, (a, b) in enumerate(zip([0, 3_000, 6_500], [3_000, 6_500, len(TOKENS)])):
        llmc_shard(root / "llmc1" / f"fineweb_train_{i:06d}.bin", TOKENS[a:b])
        llmc_shard(root / "llmc7" / f"shard_{i:06d}.bin", TOKENS[a:b], 20240801, 7, dtype="<u4")
    return {"root": root, "one": str(root / "one.bin"), "seven": str(root / "seven" / "part_*.bin"),
            "llmc1": str(root / "llmc1" / "fineweb_train_*.bin"), "llmc7": str(root / "llmc7" / "shard_*.bin")}


def batches(data: str, epochs: int = 2, **kw) -> list:
    ds = load_dataset(data, 0.1, vocab_size=VOCAB if "llmc" in data else None, **kw)
    it = BatchIterator(ds.train, 3, 16, seed=4, vocab_size=ds.vocab_size)
    out = [it.next_batch() for _ in range(epochs * it.batches_per_epoch)]
    return out + eval_batches(ds.val, 3, 16, 4, 5)


def test_one_file_seven_shards_and_llmc_shards_give_the_same_batches(forms):
    expected = batches(forms["one"])
    for form in ("seven", "llmc1", "llmc7"):
        got = batches(forms[form])
        assert len(got) == len(expected)
        assert all(np.array_equal(x, u) and np.array_equal(y, v) for (x, y), (u, v) in zip(got, expected)), form


def mapped(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a.obj if isinstance(a, memoryview) else a, mmap.mmap)


def test_shards_are_memory_mapped_and_their_fingerprint_reads_samples(forms):
    ds = load_dataset(forms["seven"])
    assert isinstance(ds.train, TokenStream) and all(mapped(p) for p in ds.train.parts)
    assert len(ds.train) + len(ds.val) == len(TOKENS) and ds.vocab_size == VOCAB and ds.tokenizer is None
    assert ds.sha256 == load_dataset(forms["seven"]).sha256 != load_dataset(forms["one"]).sha256


def test_val_data_is_a_separate_glob_and_every_data_token_trains(forms):
    ds = load_dataset(forms["one"], 0.1, val_data=forms["llmc1"])
    assert len(ds.train) == len(TOKENS) and len(ds.val) == len(TOKENS) and ds.val_bytes is None


def test_llmc_shards_take_the_vocabulary_their_magic_names_unless_given(forms):
    assert load_dataset(forms["llmc1"]).vocab_size == 50257
    assert load_dataset(forms["llmc7"]).vocab_size == 128256
    assert load_dataset(forms["llmc7"], vocab_size=1000).vocab_size == 1000


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 100, 1025, 4099])
def test_the_window_order_is_a_permutation_computed_at_any_position(n):
    order = WindowOrder(n, 8, True, seed=3, epoch=2)
    whole = order.at(np.arange(n))
    assert sorted(whole.tolist()) == list(range(n))
    picks = np.array([n - 1, 0, n // 2])
    assert order.at(picks).tolist() == whole[picks].tolist()  # a position alone: what resume computes


def test_the_window_order_of_billions_of_windows_needs_no_array_of_them():
    order = WindowOrder(5_000_000_000, 1024, True, seed=1, epoch=0)
    at = order.at(np.arange(10**6, 10**6 + 64))
    assert len(set(at.tolist())) == 64 and int(at.max()) < 5_000_000_000 and not hasattr(order, "_perm")


def test_the_legacy_order_is_numpys_permutation_of_every_window():
    n, T = 50, 8
    rng = np.random.default_rng([7, 3])
    phase = int(rng.integers(T))
    legacy = WindowOrder(n, T, True, seed=7, epoch=3, order=LEGACY_ORDER)
    assert legacy.phase == phase and legacy.at(np.arange(n)).tolist() == rng.permutation(n).tolist()
    assert WindowOrder(n, T, True, seed=7, epoch=3).phase == phase  # the same phase in either order


# --- whole runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(forms, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for form in ("one", "seven", "llmc7"):
        extra = ["--vocab-size", str(VOCAB)] if "llmc" in form else []
        assert main([*TINY, "--data", forms[form], *extra, "--out", str(root / form)]) == 0
    return root


def model_bytes(run: Path) -> bytes:
    return (run / "model.safetensors").read_bytes()


def test_one_file_and_shards_of_either_kind_train_bitwise_the_same_run(runs):
    assert model_bytes(runs / "one") == model_bytes(runs / "seven") == model_bytes(runs / "llmc7")
    saved = json.loads((runs / "seven" / "train.json").read_text())
    assert saved["data_order"] == DATA_ORDER and saved["data"].endswith("part_*.bin")


def test_a_run_stopped_and_resumed_across_shards_is_bitwise_the_straight_run(runs, forms, tmp_path):
    assert main([*TINY, "--data", forms["seven"], "--checkpoint-every", "2", "--stop-at", "2",
                 "--out", str(tmp_path / "r")]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert model_bytes(tmp_path / "r") == model_bytes(runs / "seven")


def test_a_run_started_before_data_order_was_recorded_resumes_with_its_own_order(forms, runs, tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # runs as crystal started them before: numpy's permutation
        m.setattr("crystal.data.DATA_ORDER", LEGACY_ORDER)
        assert main([*TINY, "--data", forms["one"], "--out", str(tmp_path / "straight")]) == 0
        assert main([*TINY, "--data", forms["one"], "--checkpoint-every", "2", "--stop-at", "2",
                     "--out", str(tmp_path / "r")]) == 0
    train_json = tmp_path / "r" / "train.json"
    saved = json.loads(train_json.read_text())
    del saved["data_order"]  # as crystal wrote train.json then
    train_json.write_text(json.dumps(saved))
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert model_bytes(tmp_path / "r") == model_bytes(tmp_path / "straight") != model_bytes(runs / "one")


# --- crystal data verify ---------------------------------------------------------------------------

def test_data_verify_reads_every_id_that_training_does_not(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world, " * 200)
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "d"), "bytes")
    assert main(["data", "verify", str(tmp_path / "d")]) == 0
    assert "sha256 is meta.json's" in capsys.readouterr().out
    ids = np.arange(300) % 256
    ids[123] = 400
    write_tokens(tmp_path / "bad.bin", ids, 512)
    assert main(["data", "verify", str(tmp_path / "bad.bin")]) == 0  # 400 < 512: in the header's vocabulary
    llmc_shard(tmp_path / "bad_llmc.bin", ids)
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "bad_llmc.bin"), "--vocab-size", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token id 400 at token 123" in err[0]


def test_a_training_batch_with_an_id_outside_the_vocabulary_is_refused(tmp_path, capsys):
    llmc_shard(tmp_path / "s.bin", np.full(4_000, 300))
    assert main([*TINY, "--data", str(tmp_path / "s.bin"), "--vocab-size", "256", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token id 300" in err[0] and "crystal data verify" in err[0]


# --- bad inputs: exit 2, one line, nothing written ---------------------------------------------------

def damaged(root: Path, name: str) -> None:
    d = root / "bad"
    d.mkdir(exist_ok=True)
    ids = TOKENS[:3_000]
    if name == "vocabularies":
        write_tokens(d / "a.bin", ids, VOCAB)
        write_tokens(d / "b.bin", ids, VOCAB + 1)
    elif name == "headers":
        write_tokens(d / "a.bin", ids, VOCAB)
        llmc_shard(d / "b.bin", ids)
    elif name == "truncated":
        write_tokens(d / "a.bin", ids, VOCAB)
        (d / "b.bin").write_bytes((root / "seven" / "part_002.bin").read_bytes()[:-3])
    elif name == "llmc magic":
        llmc_shard(d / "a.bin", ids)
        llmc_shard(d / "b.bin", ids, magic=20240521)
    elif name == "llmc count":
        llmc_shard(d / "a.bin", ids, count=len(ids) + 1)
    elif name == "llmc version":
        llmc_shard(d / "a.bin", ids, version=7)
    elif name == "text":
        (d / "a.txt").write_text("plain text " * 100)


BAD = {  # damage, --data and what follows it; the last: whether `crystal data verify` refuses it too
    "a glob that matches nothing": (None, [f"{R}/nothing/*.bin"], True),
    "a val glob that matches nothing": (None, [f"{R}/one.bin", "--val-data", f"{R}/nothing_*.bin"], True),
    "shards of different vocabularies": ("vocabularies", [f"{R}/bad/*.bin"], True),
    "shards of different headers": ("headers", [f"{R}/bad/*.bin"], True),
    "a truncated shard": ("truncated", [f"{R}/bad/*.bin"], True),
    "an llm.c shard with a wrong magic": ("llmc magic", [f"{R}/bad/*.bin"], True),
    "an llm.c header with a wrong count": ("llmc count", [f"{R}/bad/a.bin"], True),
    "an llm.c header with a wrong version": ("llmc version", [f"{R}/bad/a.bin"], True),
    "val data of another vocabulary": ("vocabularies", [f"{R}/one.bin", "--val-data", f"{R}/bad/b.bin"], True),
    "val data a text file": ("text", [f"{R}/one.bin", "--val-data", f"{R}/bad/a.txt"], True),
    "--vocab-size for crystal shards": (None, [f"{R}/one.bin", "--vocab-size", "1000"], False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_shards_exit_2_with_one_line_and_write_nothing(case, forms, capsys):
    damage, args, verify_too = BAD[case]
    root = forms["root"]
    if damage:
        damaged(root, damage)
    try:
        refused(root, [*TINY, "--data", *args, "--out", f"{R}/new"], capsys)
        if verify_too:
            refused(root, ["data", "verify", *args], capsys)
    finally:
        for p in (root / "bad").glob("*"):
            p.unlink()


# --- memory: startup on a large memory-mapped set ----------------------------------------------------

STARTUP = """
import resource, sys
from crystal.data import BatchIterator, load_dataset
ds = load_dataset(sys.argv[1], 0.001)
it = BatchIterator(ds.train, 4, 64, 0, ds.vocab_size)
for _ in range(50):
    it.next_batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def startup_rss_kib(path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_peak_rss_of_startup_does_not_grow_with_the_data(tmp_path):
    """A 10 MB set and a 2 GiB one (sparse: its ids read as zeros): the peak RSS of loading it and
    drawing 50 batches differs by less than 100 MB (the whole set in memory would be 2 GiB)."""
    sizes = {"small": 5_000_000, "large": (2 << 30) // 2}
    for name, count in sizes.items():
        with open(tmp_path / f"{name}.bin", "wb") as f:
            f.write(struct.pack("<8sIIQI4x", b"CRYSTOK1", 1, 2, count, 256))
            f.truncate(32 + 2 * count)  # sparse: no disk, zeros when read
    small, large = startup_rss_kib(tmp_path / "small.bin"), startup_rss_kib(tmp_path / "large.bin")
    assert large - small < 100 * 1024, (small, large)


def test_a_prepared_directory_of_many_shards_is_the_same_data_as_one_of_two_files(tmp_path, capsys):
    (tmp_path / "t.txt").write_bytes((TOKENS % 256).astype(np.uint8).tobytes())
    one = prepare([str(tmp_path / "t.txt")], str(tmp_path / "one"), "bytes")
    many = prepare([str(tmp_path / "t.txt")], str(tmp_path / "many"), "bytes", shard_tokens=700)
    assert [s["tokens"] for s in many["train_shards"]] == [700] * 11 + [8_100 - 7_700]
    assert [s["file"] for s in many["val_shards"]] == ["val_000000.bin", "val_000001.bin"]
    assert many["tokens_sha256"] == one["tokens_sha256"]
    a, b = (load_dataset(str(tmp_path / d)) for d in ("one", "many"))
    assert a.sha256 == b.sha256 and len(b.train.parts) == 12
    for x, y in zip(batches(str(tmp_path / "one")), batches(str(tmp_path / "many"))):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
    assert main(["data", "verify", str(tmp_path / "many")]) == 0
    (tmp_path / "many" / "train_000003.bin").unlink()
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "many"), "--print-config"]) == 2
    assert "train_000003.bin" in capsys.readouterr().err


def test_eval_of_a_run_on_shards_reads_its_shards_and_reports_no_bits_per_byte(runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(runs / "seven"), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "bits per byte" not in out and "part_*.bin" in out
