"""`crystal watch RUN_DIR`: the sphere ring and the curves of a run in a browser.

A small read-only HTTP server (starlette + uvicorn, the `watch` extra) for one run directory,
finished or still being written. It serves
    /                   the page (crystal/assets/watch/index.html)
    /static/NAME        the page's files: a fixed list (watch.js, the dygraphs chart library and
                        its stylesheet, the licence); nothing else of the file system
    /api/state          the run's live.json (crystal.live_state), train.json and what is missing
    /api/metrics?after=N  the whole metrics.jsonl lines after byte N, and the next N
and nothing else: every other path is 404, every method but GET and HEAD 405, and no endpoint
writes. The run's files are read only when their real path lies inside the run directory (a
symlink out of it is 404). What is sent is JSON: a NaN or an infinity in the run's files is sent
as null, a file or line that does not parse (not JSON, nested too deeply) is left out. Only
requests whose Host header names the bound address are answered (crystal.hostcheck: a web page
cannot read the run through DNS rebinding); others get 421. The page polls once a second. It
binds 127.0.0.1 unless told otherwise; a port in use is a one-line error (exit 2).
"""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

from crystal.errors import CrystalError
from crystal.hostcheck import HostCheck, HostRule
from crystal.jsonio import parse_json, read_json
from crystal.live_state import LIVE_FILE, read_live_state

ASSETS = Path(__file__).parent / "assets" / "watch"
STATIC = {"watch.js": "text/javascript", "dygraph.min.js": "text/javascript", "dygraph.min.css": "text/css",
          "LICENSE.dygraphs.txt": "text/plain"}
METRICS_FILE, TRAIN_FILE = "metrics.jsonl", "train.json"
MAX_METRICS_BYTES = 8 * 2**20  # one answer reads at most this much of metrics.jsonl


def _inside(run: Path, name: str) -> Path | None:
    """run/name when it exists and its real path is inside the run directory, else None."""
    path = run / name
    try:
        real, root = path.resolve(strict=True), run.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if real.parent == root and real.is_file() else None


def _points_out(run: Path, name: str) -> bool:
    """run/name exists (or dangles) but is not a file inside the run: refused, never followed."""
    path = run / name
    return (path.exists() or path.is_symlink()) and _inside(run, name) is None


def read_metrics(run: Path, after: int) -> dict:
    """The whole lines of metrics.jsonl from byte `after` (a half-written last line waits for
    the next call; a malformed line is skipped; NaN and infinities read as null); reset when the
    file became shorter (a resume). Lines are read from their start: a line longer than one
    answer (MAX_METRICS_BYTES) is skipped, the answer's `next` then lies inside it, and an answer
    from inside a line (byte after - 1 is not a newline) skips the rest of that line first."""
    path = _inside(run, METRICS_FILE)
    if path is None:
        return {"records": [], "next": 0, "reset": after > 0}
    size = path.stat().st_size
    reset = after > size
    start = 0 if reset else after
    with open(path, "rb") as f:
        f.seek(max(start - 1, 0))
        inside_line = start > 0 and f.read(1) != b"\n"  # then the file is at `start`
        chunk = f.read(MAX_METRICS_BYTES)
    begin = chunk.find(b"\n") + 1 if inside_line else 0  # 0 when inside a line: its end is still to come
    end = chunk.rfind(b"\n") + 1
    if (inside_line and begin == 0) or (end == 0 and len(chunk) == MAX_METRICS_BYTES):  # inside a long line
        return {"records": [], "next": start + len(chunk), "reset": reset}
    records = []
    for line in chunk[begin:end].splitlines():
        try:
            rec = parse_json(line, METRICS_FILE, finite=True)
        except CrystalError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return {"records": records, "next": start + end, "reset": reset}


def run_state(run: Path) -> dict:
    """What /api/state answers: the run's name, live state, config, and a problem line."""
    state = {"run": run.name or str(run), "live": None, "train": None, "problem": None}
    if not run.is_dir():
        state["problem"] = f"{run} is not a directory (yet): no run to show"
        return state
    if _inside(run, LIVE_FILE) is not None:
        state["live"] = read_live_state(run)
    elif _points_out(run, LIVE_FILE):
        state["problem"] = f"{LIVE_FILE} is not a file inside the run; not read"
        return state
    train = _inside(run, TRAIN_FILE)
    if train is not None:
        try:
            state["train"] = read_json(train, finite=True)
        except (OSError, CrystalError):
            pass
    if state["live"] is None:
        state["problem"] = ("this run has no live state yet (training writes live.json about once a second; "
                            "runs trained before crystal watch existed have none)")
    return state


def make_app(run_dir: str | Path, hosts: HostRule):
    """The ASGI application for one run directory, answering the Host values of `hosts`."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Route
    except ImportError as e:
        raise CrystalError(f"crystal watch needs starlette and uvicorn (pip install 'crystal[watch]'): {e}") from None
    run = Path(run_dir)

    def page(request):
        return FileResponse(ASSETS / "index.html", media_type="text/html")

    def static(request):
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", status_code=404)
        return FileResponse(ASSETS / name, media_type=STATIC[name])

    def state(request):
        return JSONResponse(run_state(run), headers={"Cache-Control": "no-store"})

    def metrics(request):
        try:
            after = max(0, int(request.query_params.get("after", "0")))
        except ValueError:
            return Response("after must be a byte offset", status_code=400)
        if _points_out(run, METRICS_FILE):
            return Response("not found", status_code=404)
        return JSONResponse(read_metrics(run, after), headers={"Cache-Control": "no-store"})

    methods = ["GET", "HEAD"]
    app = Starlette(routes=[Route("/", page, methods=methods), Route("/static/{name}", static, methods=methods),
                            Route("/api/state", state, methods=methods),
                            Route("/api/metrics", metrics, methods=methods)])
    return HostCheck(app, hosts)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port in use, bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise CrystalError(f"--host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CrystalError(f"port {port} on {host} is in use; choose another with --port") from None
        raise CrystalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class WatchServer:
    """uvicorn serving make_app(run_dir) on a socket already bound (`bind`) to `host` (as given:
    the Host headers answered follow it, crystal.hostcheck), in this thread (`serve`) or a daemon
    thread (`start`, for `crystal train --watch`)."""

    def __init__(self, run_dir: str | Path, sock: socket.socket, host: str = "127.0.0.1"):
        try:
            import uvicorn
        except ImportError as e:
            raise CrystalError(f"crystal watch needs starlette and uvicorn (pip install 'crystal[watch]'): {e}") from None
        self.sock = sock
        app = make_app(run_dir, HostRule.bound(host, sock.getsockname()[1]))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def serve(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="crystal-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)


def host_warning(host: str) -> str | None:
    """One line when the page would be reachable from other machines."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"warning: --host {host} serves the run to every machine that can reach this one "
            "(no authentication); 127.0.0.1 and an SSH tunnel keep it private")


def check_port(port: int) -> None:
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise CrystalError(f"--port must be between 0 and 65535, got {port}")

