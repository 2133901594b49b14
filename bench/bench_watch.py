"""What watching costs training: tokens/s of `crystal train` with --watch and the page open in a
headless Chromium (the page polls the server once a second) against the same run without it.

Usage: python bench/bench_watch.py [--preset small] [--steps 400] [--warmup-steps 100] [--rounds 4]
                                   [--json OUT]

Both sides are the same `crystal train` command (cpu, --quiet, 12 spheres, one process each) run
one after the other, alternating, so the machine's noise hits both. "watched" adds --watch --port
P and, once training has started, a headless Chromium on the page for the rest of the run (or a
Python poller at 2 Hz when no Chromium is installed). The rate is measured from metrics.jsonl
over the steps after --warmup-steps (by then the browser has started: opening a page is not
watching). Both runs write live.json (training always does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from run_rate import rate_after


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chrome-headless-shell", "chromium", "chromium-browser"):
        if (path := shutil.which(name)) is not None:
            return path
    return None


def open_page(url: str):
    """A page that stays open and polls (Chromium), or a 2 Hz Python poller; returns a closer."""
    browser = chromium()
    if browser is not None:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                                 url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return lambda: (proc.kill(), proc.wait())
    stop = threading.Event()

    def poll():
        after = 0
        while not stop.wait(0.5):
            try:
                urllib.request.urlopen(url + "api/state", timeout=5).read()
                after = json.loads(urllib.request.urlopen(f"{url}api/metrics?after={after}", timeout=5).read())["next"]
            except OSError:
                pass

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return lambda: (stop.set(), t.join())


def run(preset: str, steps: int, warmup: int, watched: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "crystal.cli", "train", "--preset", preset, "--device", "cpu", "--steps", str(steps),
               "--eval-every", "0", "--quiet", "--out", str(out)]
        port = free_port()
        if watched:
            cmd += ["--watch", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        close = None
        if watched:
            while not (out / "live.json").exists() and proc.poll() is None:
                time.sleep(0.05)
            close = open_page(f"http://127.0.0.1:{port}/")
        _, err = proc.communicate()
        if close is not None:
            close()
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
        return rate_after(out, warmup)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {"plain": [], "watched": []}
    for rnd in range(args.rounds):
        order = ["plain", "watched"] if rnd % 2 == 0 else ["watched", "plain"]
        for side in order:
            res[side].append(run(args.preset, args.steps, args.warmup_steps, side == "watched"))
            print(f"round {rnd + 1}: {side:>7}: {res[side][-1]:,.0f} tok/s", flush=True)
    mean = {k: sum(v) / len(v) for k, v in res.items()}
    ratio = mean["watched"] / mean["plain"]
    print(f"mean: plain {mean['plain']:,.0f} tok/s, watched {mean['watched']:,.0f} tok/s; ratio {ratio:.3f} "
          f"(page: {'chromium' if chromium() else 'python poller'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "steps": args.steps, "cores": os.cpu_count(),
                                               "date": time.strftime("%Y-%m-%d"), "page": "chromium" if chromium()
                                               else "python poller", "tok_s": res, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
