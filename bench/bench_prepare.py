"""Time `crystal prepare` with BPE on a 1 MB text (Tiny Shakespeare, 1,115,394 bytes).

Usage: python bench/bench_prepare.py [--vocab-size 1024]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from crystal.data import default_corpus, load_dataset, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
