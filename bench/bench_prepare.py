"""Time `crystal prepare` with BPE on a 1 MB text (Tiny Shakespeare, 1,115,394 bytes).

Usage: python bench/bench_prepare.py [--vocab-size 1024]
       python bench/bench_prepare.py --one-line MB [--vocab-size 1024]

--one-line MB: the time and peak RSS of `crystal prepare --tokenizer FILE` (a byte-level BPE
trained here on the corpus, as a Hugging Face tokenizer.json) on MB megabytes of text without a
newline (the corpus, newlines made spaces, repeated), in a child process: the memory of the
pieces crystal encodes at once, not of the line (issue 28, item 15).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crystal.data import default_corpus, load_dataset, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--one-line", type=float, default=None, metavar="MB")
    args = ap.parse_args()
    if args.one_line is not None:
        return one_line(args.one_line, args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "input.txt"
        src.write_bytes(default_corpus())
        t0 = time.perf_counter()
        meta = prepare([str(src)], str(Path(tmp) / "data"), "bpe", args.vocab_size, 0.1)
        wall = time.perf_counter() - t0
        ds = load_dataset(str(Path(tmp) / "data"))
    print(json.dumps({"input_bytes": len(default_corpus()), "vocab_size": meta["vocab_size"],
                      "tokens": meta["train_tokens"] + meta["val_tokens"],
                      "bytes_per_token": round(ds.bytes_per_token, 3), "seconds": round(wall, 2),
                      "date": time.strftime("%Y-%m-%d")}, indent=2))


def one_line(mb: float, vocab_size: int) -> None:
    from crystal.data import BPETokenizer

    text = default_corpus().decode().replace("\n", " ")
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_text(BPETokenizer.train([text], vocab_size).to_json(), encoding="utf-8")
        size = int(mb * 1e6)
        src = Path(tmp) / "line.txt"
        src.write_text((text * (size // len(text) + 1))[:size], encoding="utf-8")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "crystal", "prepare", str(src), "--out", str(Path(tmp) / "data"),
                        "--tokenizer", str(tok)], check=True)
        wall = time.perf_counter() - t0
    print(json.dumps({"one_line_bytes": size, "vocab_size": vocab_size, "seconds": round(wall, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                      "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
