"""Throughput of the streaming `crystal prepare` by worker count, against the `tokenizers`
library's own `encode_batch` of the same documents in one process (issue 32, item 4).

Usage: python bench/bench_prepare_stream.py [--mb 20] [--vocab-size 8192] [--workers 1,2] [--no-baseline]

The corpus: Tiny Shakespeare cut into documents of 200-5,000 characters, repeated to --mb MB,
as a .jsonl file written as the documents are made (kept in memory only for the baseline).
--no-baseline: no encode_batch (it holds the whole corpus); e.g. --mb 1024 --workers 2
--no-baseline for the 1 GiB memory figure. A GPT-2-style byte-level BPE of --vocab-size is
trained first on the corpus (1 MB). Each `crystal prepare --tokenizer FILE --workers N` runs in a child process; its wall
time and peak RSS (the largest of the child's VmHWM and its worker processes' ru_maxrss; the
child's own ru_maxrss would start at this process's peak: vfork and exec) are reported.
encode_batch holds every document and every id in memory; prepare streams them. The prepare
children run first.
Load average: os.getloadavg() before the first run (the machine's other work).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crystal.data import BPETokenizer, default_corpus

CHILD = """
import resource, sys, time
from crystal.data import prepare
t0 = time.perf_counter()
meta = prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]))
wall = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(wall, meta["train_tokens"] + meta["val_tokens"], hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def write_corpus(path: Path, mb: float, text: str, keep: bool) -> tuple[int, int, list[str]]:
    """The jsonl corpus, written a document at a time: (bytes of text, documents, the documents
    where `keep`, else [])."""
    rng = np.random.default_rng(0)
    docs, size, count, at = [], 0, 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            n = int(rng.integers(200, 5000))
            d = (text[at:at + n] if at + n <= len(text) else text[at:] + text[:at + n - len(text)])
            at = (at + n) % len(text)
            f.write(json.dumps({"text": d}) + "\n")
            size += len(d.encode())
            count += 1
            if keep:
                docs.append(d)
    return size, count, docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--no-baseline", action="store_true", help="skip encode_batch of the whole corpus")
    args = ap.parse_args()
    text = default_corpus().decode()
    workers = list(map(int, args.workers.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size, count, docs = write_corpus(tmp / "corpus.jsonl", args.mb, text, keep=not args.no_baseline)
        out = {"date": time.strftime("%Y-%m-%d"), "input_mb": round(size / 1e6, 1), "documents": count,
               "vocab_size": args.vocab_size, "cores": len(os.sched_getaffinity(0)),
               "load_average": os.getloadavg()[0]}
        tok = BPETokenizer.train([text], args.vocab_size)
        (tmp / "tokenizer.json").write_text(tok.to_json())
        for w in workers:
            r = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "corpus.jsonl"), str(tmp / f"d{w}"),
                                str(tmp / "tokenizer.json"), str(w)], check=True, capture_output=True, text=True)
            wall, n, rss_self, rss_children = r.stdout.split()
            wall = float(wall)
            out[f"prepare_workers_{w}"] = {"seconds": round(wall, 2), "mb_per_s": round(size / 1e6 / wall, 2),
                                           "tokens_per_s": round(int(n) / wall),
                                           "peak_rss_mib": round(max(int(rss_self), int(rss_children)) / 1024)}
        if not args.no_baseline:
            t0 = time.perf_counter()
            enc = tok.tok.encode_batch(docs, add_special_tokens=False)
            wall = time.perf_counter() - t0
            tokens = sum(len(e.ids) for e in enc) + len(docs) - 1
            del enc
            out["encode_batch"] = {"seconds": round(wall, 2), "mb_per_s": round(size / 1e6 / wall, 2),
                                   "tokens_per_s": round(tokens / wall),
                                   "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        out["same_meta_for_every_worker_count"] = len({(tmp / f"d{w}" / "meta.json").read_text() for w in workers}) == 1
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
