"""`crystal watch` and `crystal train --watch`: the page through HTTP on 127.0.0.1 (its security
rules one by one), live.json, TensorBoard event files read back by tensorboard's own reader, and
the page in a real headless Chromium (the Debian package; skipped only where none is installed)."""

import hashlib
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from crystal.cli import main  # noqa: E402
from crystal.live_state import LIVE_FILE  # noqa: E402
from crystal.watch import WatchServer, bind, host_warning  # noqa: E402

TINY = ["train", "--preset", "tiny", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with TensorBoard logs."""
    out = tmp_path_factory.mktemp("watch") / "run"
    assert main([*TINY, "--steps", "20", "--eval-every", "10", "--log", "tensorboard", "--out", str(out)]) == 0
    return out


def serve(run_dir) -> WatchServer:
    server = WatchServer(run_dir, bind("127.0.0.1", 0))
    server.start()
    deadline = time.monotonic() + 10
    while not server.server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server


def get(server, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One raw request (the path is sent as written, unnormalized)."""
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def tree_hashes(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def page(finished):
    server = serve(finished)
    yield server
    server.stop()


# --- the run's files --------------------------------------------------------------------------

def test_training_leaves_a_live_state_of_every_sphere_and_the_root(finished):
    live = json.loads((finished / LIVE_FILE).read_text())
    assert live["status"] == "finished" and live["step"] == live["steps"] == 20
    assert [s["sphere"] for s in live["spheres"]] == list(range(12))
    assert all(s["batches"] == 20 for s in live["spheres"]) and live["active"] == 12
    assert live["val_loss"] is not None and live["grad_norm"] > 0


def test_tensorboard_events_hold_the_metrics_scalars(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished), size_guidance={"scalars": 0})
    acc.Reload()
    recs = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [r["step"] for r in steps]
        assert [e.value for e in events] == [float(np.float32(r[name])) for r in steps]
    vals = [r for r in recs if "val_loss" in r]
    assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == [(r["step"], float(np.float32(r["val_loss"])))
                                                                    for r in vals]
    spheres = json.loads((finished / "spheres.json").read_text())["spheres"]
    assert acc.Scalars("spheres/11/batches")[-1].value == spheres[11]["batches"]
    assert acc.Scalars("spheres/3/avg_loss")[-1].value == pytest.approx(spheres[3]["avg_loss"], rel=1e-6)


# --- HTTP: what is served ----------------------------------------------------------------------

def test_the_page_its_files_and_the_runs_data_are_served(page):
    status, body = get(page, "/")
    assert status == 200 and b'id="ring"' in body
    for name in ("watch.js", "dygraph.min.js", "dygraph.min.css", "LICENSE.dygraphs.txt"):
        assert get(page, f"/static/{name}")[0] == 200
    state = json.loads(get(page, "/api/state")[1])
    assert state["live"]["step"] == 20 and state["train"]["steps"] == 20 and state["problem"] is None
    metrics = json.loads(get(page, "/api/metrics?after=0")[1])
    assert len([r for r in metrics["records"] if "loss" in r]) == 20
    assert json.loads(get(page, f"/api/metrics?after={metrics['next']}")[1])["records"] == []


@pytest.mark.parametrize("path", [
    "/static/../train.json", "/static/../../../../etc/passwd", "/../etc/passwd", "/static/%2e%2e/train.json",
    "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/..%2fwatch.py", "//etc/passwd", "/static//etc/passwd",
    "/etc/passwd", "/static/index.html", "/static/", "/train.json", "/metrics.jsonl", "/api/../train.json",
    "/static/%2Fetc%2Fpasswd",
])
def test_paths_outside_the_page_and_the_api_are_404(page, path):
    status, body = get(page, path)
    assert status == 404, (path, body[:200])


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_no_endpoint_writes(page, finished, method):
    before = tree_hashes(finished)
    for path in ("/", "/api/state", "/api/metrics", "/static/watch.js"):
        assert get(page, path, method)[0] == 405
    assert tree_hashes(finished) == before


def test_a_symlink_out_of_the_run_is_not_followed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (run / "metrics.jsonl").symlink_to(secret)
    (run / LIVE_FILE).symlink_to(secret)
    server = serve(run)
    try:
        assert get(server, "/api/metrics?after=0")[0] == 404
        state = json.loads(get(server, "/api/state")[1])
        assert state["live"] is None and "not a file inside the run" in state["problem"]
    finally:
        server.stop()


def test_a_missing_run_directory_gives_a_page_that_says_so(tmp_path):
    server = serve(tmp_path / "not-yet")
    try:
        assert get(server, "/")[0] == 200
        state = json.loads(get(server, "/api/state")[1])
        assert state["live"] is None and "not a directory" in state["problem"]
        assert json.loads(get(server, "/api/metrics?after=0")[1])["records"] == []
    finally:
        server.stop()


def test_a_half_written_run_gives_its_whole_lines_and_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps({"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 1.0, "elapsed": 0.1}) + "\n"
    (run / "metrics.jsonl").write_text(whole + "not json\n" + '{"step": 2, "lo')  # a torn last line
    server = serve(run)
    try:
        state = json.loads(get(server, "/api/state")[1])
        assert state["live"] is None and "no live state yet" in state["problem"]
        metrics = json.loads(get(server, "/api/metrics?after=0")[1])
        assert [r["step"] for r in metrics["records"]] == [1]
        assert metrics["next"] == len(whole) + len("not json\n")
        assert get(server, "/api/metrics?after=x")[0] == 400
    finally:
        server.stop()


def test_a_rewritten_metrics_file_resets_the_reader(tmp_path):
    from crystal.watch import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    out = read_metrics(tmp_path, 1000)
    assert out["reset"] and [r["step"] for r in out["records"]] == [1]


# --- the command line --------------------------------------------------------------------------

def test_a_port_in_use_exits_2_with_one_line(finished, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["watch", str(finished), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: port {port} on 127.0.0.1 is in use; choose another with --port"]
        out = finished.parent / "other"
        assert main([*TINY, "--steps", "2", "--watch", "--port", str(port), "--out", str(out)]) == 2
        assert not out.exists()  # refused before the run directory was made


def test_listening_on_every_interface_prints_a_warning(finished, capsys):
    assert host_warning("127.0.0.1") is None and host_warning("::1") is None
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["watch", str(finished), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: --host 0.0.0.0 serves the run to every machine") and len(err) == 2


@pytest.mark.parametrize("port", ["70000", "-1", "x"])
def test_a_nonsense_port_exits_2(finished, port):
    assert main(["watch", str(finished), "--port", port]) == 2


# --- a real browser ----------------------------------------------------------------------------

def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chrome-headless-shell", "chromium", "chromium-browser",
                 "google-chrome"):
        if (path := shutil.which(name)) is not None:
            return path
    return None


def browse(url: str, *args: str) -> str:
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=3000", *args, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dom_hooks(html: str) -> dict:
    return {"spheres": {int(i): int(b) for i, b in re.findall(r'data-sphere="(\d+)" data-batches="(\d+)"', html)},
            "root": re.findall(r'data-root="" data-step="(\d+)"', html),
            "points": {k: int(v) for k, v in re.findall(r'id="([a-z-]+)" data-points="(\d+)"', html)}}


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium (Debian: apt-get install chromium-headless-shell)")
def test_a_browser_shows_the_ring_of_a_run_being_trained_and_it_grows(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "crystal.cli", *TINY, "--steps", "100000", "--spheres", "12",
                             "--eval-every", "50", "--watch", "--port", str(port), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LIVE_FILE).exists() or json.loads((out / LIVE_FILE).read_text())["step"] < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/"
        first = dom_hooks(browse(url, "--dump-dom"))
        time.sleep(2)
        second = dom_hooks(browse(url, "--dump-dom"))
        assert sorted(first["spheres"]) == list(range(12)) and len(first["root"]) == 1
        assert all(second["spheres"][i] > first["spheres"][i] for i in range(12))
        assert int(second["root"][0]) > int(first["root"][0])
        assert set(second["points"]) == {"loss-step", "loss-time", "lr", "rate"}
        assert all(n > 0 for n in second["points"].values())
        shot = tmp_path / "watch.png"
        browse(url, "--window-size=1300,1000", f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def test_the_chart_library_ships_with_its_licence():
    import crystal

    assets = Path(crystal.__file__).parent / "assets" / "watch"
    assert "MIT" in (assets / "LICENSE.dygraphs.txt").read_text()
    assert (assets / "dygraph.min.js").read_text().startswith("/*! @license")
    assert "http" not in (assets / "index.html").read_text(), "the page loads nothing from the network"
