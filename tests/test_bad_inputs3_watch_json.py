"""Bad input, round three (issue 28): JSON and TOML that no parser should crash on, the watch
server's Host rule (DNS rebinding) and what it sends, the BLAS threads of --cores, --port without
--watch, long numbers in error lines, and a preset's derived values.

The table runs like tests/test_bad_inputs.py's: each case on its own copy of a finished run,
exit 2, one `error:` line, no traceback, every file as it was."""

import http.client
import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from crystal.cli import main
from crystal.config import resolve
from crystal.data import default_corpus, prepare
from crystal.errors import CrystalError
from crystal.jsonio import parse_json, read_json, read_toml
from test_bad_inputs import R, refused, write

DEEP = b"[" * 100_000  # nested deeper than Python's parsers recurse
DEEP_OBJECT = b'{"a": ' * 100_000


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished tiny run with a checkpoint, its bytes data set, and the run as a Hugging Face
    directory (hf)."""
    root = tmp_path_factory.mktemp("ref3")
    (root / "input.txt").write_bytes(default_corpus()[:30_000])
    prepare([str(root / "input.txt")], str(root / "bytes"), "bytes")
    assert main(["train", "--preset", "tiny", "--steps", "2", "--checkpoint-every", "2", "--spheres", "1",
                 "--quiet", "--data", str(root / "bytes"), "--out", str(root / "run")]) == 0
    (root / "hf").mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(root / "run" / f, root / "hf" / f)
    return root


def state_json(root) -> Path:
    return max((root / "run" / "checkpoints").glob("step-*")) / "state.json"


def index_instead_of_weights(root, index: bytes):
    """hf/ with its weights named by a shard index (model.safetensors.index.json) holding `index`."""
    (root / "hf" / "model.safetensors").rename(root / "hf" / "model-00001-of-00001.safetensors")
    write(root / "hf" / "model.safetensors.index.json", index)


def safetensors_header(root, header: bytes):
    """hf/model.safetensors as a file whose JSON header is `header`."""
    write(root / "hf" / "model.safetensors", struct.pack("<Q", len(header)) + header)


TRAIN = ["train", "--preset", "tiny", "--quiet", "--data", f"{R}/bytes", "--out", f"{R}/new"]
INIT = ["train", "--init-from", f"{R}/hf", "--data", f"{R}/bytes", "--quiet", "--out", f"{R}/new"]
CONFIG = [*TRAIN, "--config", f"{R}/c.toml"]
CASES = {
    # item 12: every JSON and TOML file crystal reads, nested 100,000 deep (a RecursionError before)
    "config.json nested 100,000 deep, eval": (lambda r: write(r / "run" / "config.json", DEEP), ["eval", f"{R}/run"]),
    "train.json nested 100,000 deep, eval": (lambda r: write(r / "run" / "train.json", DEEP), ["eval", f"{R}/run"]),
    "state.json nested 100,000 deep, resume": (lambda r: write(state_json(r), DEEP), ["train", "--resume", f"{R}/run"]),
    "meta.json nested 100,000 deep": (lambda r: write(r / "bytes" / "meta.json", DEEP), TRAIN),
    "safetensors index nested 100,000 deep": (lambda r: index_instead_of_weights(r, DEEP), INIT),
    "safetensors header nested 100,000 deep": (lambda r: safetensors_header(r, DEEP), INIT),
    "--config TOML array nested 100,000 deep": (lambda r: write(r / "c.toml", b"[train]\nlr = " + DEEP), CONFIG),
    # variants: objects and tables, other files, other ways a parser fails
    "config.json objects nested 100,000 deep, sample": (lambda r: write(r / "run" / "config.json", DEEP_OBJECT),
                                                        ["sample", f"{R}/run"]),
    "init-from config.json nested 100,000 deep": (lambda r: write(r / "hf" / "config.json", DEEP), INIT),
    "train.json nested 100,000 deep, resume": (lambda r: write(r / "run" / "train.json", DEEP),
                                               ["train", "--resume", f"{R}/run"]),
    "train.json objects nested 100,000 deep, eval": (lambda r: write(r / "run" / "train.json", DEEP_OBJECT),
                                                     ["eval", f"{R}/run"]),
    "spheres.json nested 100,000 deep, plot": (lambda r: write(r / "run" / "spheres.json", DEEP),
                                               ["plot", f"{R}/run", "--out", f"{R}/x.png"]),
    "--config TOML inline tables nested 50,000 deep": (lambda r: write(r / "c.toml", b"[train]\nlr = " +
                                                                       b"{a = " * 50_000), CONFIG),
    "--config TOML integer of 5,000 digits": (lambda r: write(r / "c.toml", b"[train]\nsteps = " + b"1" * 5000),
                                              CONFIG),
    "state.json integer of 5,000 digits": (lambda r: write(state_json(r), state_json(r).read_bytes().replace(
        b'"step": 2', b'"step": ' + b"2" * 5000)), ["train", "--resume", f"{R}/run"]),
    "safetensors index objects nested 100,000 deep": (lambda r: index_instead_of_weights(r, DEEP_OBJECT), INIT),
    "meta.json not UTF-8": (lambda r: write(r / "bytes" / "meta.json", b'{"tokenizer": "\xff"}'), TRAIN),
    # item 19: --port without --watch was ignored
    "--port without --watch": (None, [*TRAIN, "--port", "8123"]),
    "--port 0 without --watch": (None, [*TRAIN, "--port", "0"]),
    # item 20: a derived value given explicitly is still checked
    "init-from --lr 1e-12 with an explicit --min-lr above it": (None, [*INIT, "--lr", "1e-12", "--min-lr", "3e-5"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_no_file(case, reference, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(reference, root)
    damage, argv = CASES[case]
    if damage:
        damage(root)
    refused(root, argv, capsys)


# --- the one JSON/TOML reader (crystal.jsonio) ------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    (DEEP, "nested deeper than 128"), (DEEP_OBJECT, "nested deeper than 128"),
    (b"[" * 129 + b"]" * 129, "nested deeper than 128"), (b"\xff{}", "not UTF-8"),
    (b"1" * 5000, "4300 digits"), (b"{", "Expecting property name"), (b"", "Expecting value")])
def test_json_that_does_not_parse_is_one_line_naming_where_and_why(text, reason):
    with pytest.raises(CrystalError) as e:
        parse_json(text, "run/x.json")
    message = str(e.value)
    assert message.startswith("run/x.json: not valid JSON (") and reason in message and "\n" not in message


def test_finite_json_reads_nan_and_infinities_as_null():
    assert parse_json(b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e400, "e": [1.5, -1e999], "f": 7}',
                      "x", finite=True) == {"a": None, "b": None, "c": None, "d": None, "e": [1.5, None], "f": 7}


def test_json_nested_128_deep_is_read():
    value = parse_json(b"[" * 128 + b"]" * 128, "x")
    for _ in range(127):
        (value,) = value
    assert value == []


def test_json_keeps_nan_unless_asked_for_finite_values():
    assert math.isnan(parse_json("NaN", "x"))


def test_the_json_file_reader_leaves_a_missing_file_to_its_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_toml_that_does_not_parse_is_one_line(tmp_path):
    for text in (b"a = " + DEEP, b"a = " + b"[" * 129 + b"]" * 129, b"a = " + b"1" * 5000, b"a = \xff", b"[a"):
        write(tmp_path / "c.toml", text)
        with pytest.raises(CrystalError, match=r"c\.toml: not valid TOML \(") as e:
            read_toml(tmp_path / "c.toml")
        assert "\n" not in str(e.value)


# --- item 19: numbers in error lines ----------------------------------------------------------

def test_an_error_line_abbreviates_a_300_digit_number(capsys):
    assert main(["train", "--preset", "tiny", "--steps", str(10**300), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps 10000000...0000 (301 digits) is above the limit") and len(err) < 120


def test_numbers_up_to_20_digits_and_digits_in_paths_are_kept():
    long = "1" * 25
    message = str(CrystalError(f"got {2**64} in /runs/{long}/x.json and run{long}"))
    assert message == f"got {2**64} in /runs/{long}/x.json and run{long}"


# --- item 20: a preset's derived values follow the flags they derive from ---------------------

def test_finetune_min_lr_follows_a_lower_lr(reference, capsys):
    assert main(["train", "--init-from", str(reference / "hf"), "--data", str(reference / "bytes"), "--lr", "1e-12",
                 "--print-config"]) == 0
    assert "min_lr = 1e-12\n" in capsys.readouterr().out


def test_finetune_min_lr_follows_an_lr_from_a_config_file(tmp_path):
    write(tmp_path / "c.toml", b'preset = "finetune"\n[train]\ninit_from = "x"\nlr = 2e-6\n')
    from crystal.config import read_toml as read_config_file

    preset, model, train = read_config_file(str(tmp_path / "c.toml"))
    assert resolve(preset, model, train)[1].min_lr == 2e-6


def test_finetune_keeps_its_constant_schedule_and_an_explicit_min_lr():
    assert resolve("finetune", None, {"init_from": "x"})[1].min_lr == 3e-5
    assert resolve("finetune", None, {"init_from": "x", "lr": 1e-4, "min_lr": 0.0})[1].min_lr == 0.0


# --- item 18: BLAS threads never exceed the usable cores ---------------------------------------

@pytest.mark.parametrize("spheres, cores, expected", [(12, 4096, 1), (1, 4096, 2), (1, None, 2), (1, 1, 1)])
def test_blas_threads_per_sphere_are_capped_at_the_usable_cores(monkeypatch, spheres, cores, expected):
    import crystal.backends.cpu as cpu
    import crystal.spheres
    import crystal.trainer as trainer

    monkeypatch.setattr(trainer, "usable_cores", lambda: 2)  # a machine of 2 cores
    monkeypatch.setattr(crystal.spheres, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "blas_threads_agree", lambda n, shapes: True)
    model, cfg = resolve("tiny", None, {"spheres": spheres, "cores": cores})

    class CPU:
        name = "cpu"

    assert trainer.blas_threads_per_sphere(model, cfg, CPU()) == expected


# --- the watch server (crystal watch) -------------------------------------------------------------

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from crystal.hostcheck import HostRule  # noqa: E402
from crystal.watch import MAX_METRICS_BYTES, WatchServer, bind, make_app  # noqa: E402

PORT = 8000


def client(run: Path, base: str = f"http://127.0.0.1:{PORT}", host: str = "127.0.0.1") -> TestClient:
    return TestClient(make_app(run, HostRule.bound(host, PORT)), base_url=base)


@pytest.fixture
def run(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference / "run", out)
    return out


# item 6: DNS rebinding

@pytest.mark.parametrize("host", [f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"[::1]:{PORT}", f"LocalHost:{PORT}"])
def test_host_values_naming_the_loopback_address_and_port_are_answered(run, host):
    resp = client(run).get("/api/state", headers={"host": host})
    assert resp.status_code == 200 and resp.json()["train"]["preset"] == "tiny"


@pytest.mark.parametrize("host", ["attacker.example", f"attacker.example:{PORT}", f"127.0.0.1.nip.io:{PORT}",
                                  f"localhost.attacker.example:{PORT}", "127.0.0.1:9999", "localhost", "127.0.0.1",
                                  f"127.0.0.1:{PORT}@attacker.example", f"[::1]:{PORT}0", f"192.168.1.5:{PORT}", ""])
@pytest.mark.parametrize("path", ["/", "/api/state", "/api/metrics", "/static/watch.js", "/missing"])
def test_other_host_values_get_421_and_nothing_of_the_run(run, host, path):
    resp = client(run).get(path, headers={"host": host})
    assert resp.status_code == 421 and b"tiny" not in resp.content and b"loss" not in resp.content


def test_the_host_given_with_host_is_answered(run):
    app = client(run, "http://watch.lan:8000", host="watch.lan")
    assert app.get("/api/state").status_code == 200
    assert app.get("/api/state", headers={"host": "other.lan:8000"}).status_code == 421


def test_a_server_on_every_interface_answers_ip_addresses_but_not_names():
    rule = HostRule.bound("0.0.0.0", PORT)
    assert all(rule.allows(h) for h in (f"192.168.1.5:{PORT}", f"[fe80::1]:{PORT}", f"0.0.0.0:{PORT}"))
    assert not any(rule.allows(h) for h in (f"attacker.example:{PORT}", f"fe80::1:{PORT}", "192.168.1.5:80", None))


def test_port_80_is_answered_without_a_port_as_browsers_send_it():
    rule = HostRule.bound("127.0.0.1", 80)
    assert rule.allows("localhost") and rule.allows("[::1]") and rule.allows("localhost:80")
    assert not HostRule.bound("127.0.0.1", 8080).allows("localhost")


def raw_request(server, request: bytes) -> bytes:
    import socket

    with socket.create_connection(server.sock.getsockname()[:2], timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_the_running_server_refuses_a_rebound_name_a_missing_host_and_two_hosts(run):
    server = WatchServer(run, bind("127.0.0.1", 0))
    server.start()
    try:
        deadline = time.monotonic() + 10
        while not server.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.sock.getsockname()[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/state", headers={"Host": f"attacker.example:{port}"})
        resp = conn.getresponse()
        assert resp.status == 421 and b"tiny" not in resp.read()
        conn.request("GET", "/api/state")  # http.client sends Host 127.0.0.1:port
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["train"]["preset"] == "tiny"
        conn.close()
        for request in (b"GET /api/state HTTP/1.0\r\n\r\n",
                        f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: attacker.example\r\n"
                        "Connection: close\r\n\r\n".encode()):
            answer = raw_request(server, request)
            assert answer.split(b" ")[1] in (b"400", b"421") and b"tiny" not in answer
    finally:
        server.stop()


# items 12 and 16: what the page is sent

def test_nan_and_infinities_in_live_json_are_sent_as_null(run):
    live = json.loads((run / "live.json").read_text())
    (run / "live.json").write_text(json.dumps({**live, "loss": math.nan, "lr": math.inf, "grad_norm": -math.inf})
                                   .replace('"elapsed": ', '"elapsed": 1e400, "was": '))
    resp = client(run).get("/api/state")
    assert resp.status_code == 200
    state = resp.json()["live"]
    assert (state["loss"], state["lr"], state["grad_norm"], state["elapsed"]) == (None, None, None, None)


def test_nan_in_train_json_is_sent_as_null(run):
    train = json.loads((run / "train.json").read_text())
    (run / "train.json").write_text(json.dumps({**train, "lr": math.nan}))
    resp = client(run).get("/api/state")
    assert resp.status_code == 200 and resp.json()["train"]["lr"] is None


def test_a_nan_metrics_line_is_sent_with_null_and_the_reader_moves_on(run):
    nan = b'{"step": 3, "loss": NaN, "elapsed": Infinity}\n'
    lines = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(nan + lines)
    resp = client(run).get("/api/metrics?after=0")
    assert resp.status_code == 200
    body = resp.json()
    assert body["records"][0] == {"step": 3, "loss": None, "elapsed": None}
    assert len(body["records"]) == 1 + lines.count(b"\n") and body["next"] == len(nan) + len(lines)


@pytest.mark.parametrize("deep", [DEEP, DEEP_OBJECT])
def test_live_json_nested_100000_deep_is_left_out_with_a_problem_line(run, deep):
    write(run / "live.json", deep)
    resp = client(run).get("/api/state")
    assert resp.status_code == 200 and resp.json()["live"] is None and resp.json()["problem"]


def test_train_json_nested_100000_deep_is_left_out(run):
    write(run / "train.json", DEEP)
    resp = client(run).get("/api/state")
    assert resp.status_code == 200 and resp.json()["train"] is None and resp.json()["live"] is not None


def test_a_metrics_line_nested_100000_deep_is_skipped(run):
    lines = (run / "metrics.jsonl").read_bytes()
    write(run / "metrics.jsonl", DEEP + b"\n" + lines)
    resp = client(run).get("/api/metrics?after=0")
    assert resp.status_code == 200
    assert len(resp.json()["records"]) == lines.count(b"\n") and resp.json()["next"] == len(DEEP) + 1 + len(lines)


def test_json_nested_just_below_the_parsers_limit_is_sent_or_left_out_never_a_500(run):
    app = client(run)
    for depth in range(900, 1001, 4):
        write(run / "live.json", b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
        write(run / "metrics.jsonl", b'{"a": ' + b"[" * depth + b"]" * depth + b"}\n")
        assert app.get("/api/state").status_code == 200
        assert app.get("/api/metrics?after=0").status_code == 200


def poll(app, after: int = 0, limit: int = 10) -> tuple[list[dict], int]:
    """Every record the page gets polling from `after` until `next` stops moving."""
    records = []
    for _ in range(limit):
        body = app.get(f"/api/metrics?after={after}").json()
        records += body["records"]
        if body["next"] == after:
            return records, after
        after = body["next"]
    raise AssertionError("the reader did not reach the end of metrics.jsonl")


def test_a_metrics_line_over_8_mib_is_skipped_and_the_lines_after_it_are_read(run):
    lines = (run / "metrics.jsonl").read_bytes()
    long = b'{"step": 1, "loss": 5.0, "elapsed": 0.1, "pad": "' + b"x" * (MAX_METRICS_BYTES + 100) + b'"}\n'
    write(run / "metrics.jsonl", long + lines)
    records, end = poll(client(run))
    assert records == [json.loads(line) for line in lines.splitlines()]
    assert end == len(long) + len(lines)


def test_a_line_over_8_mib_being_written_is_skipped_once_it_ends(run):
    long = b'{"step": 1, "pad": "' + b"x" * (MAX_METRICS_BYTES + 100)
    write(run / "metrics.jsonl", long)
    app = client(run)
    records, after = poll(app)
    assert records == [] and after == len(long)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'"}\n{"step": 2, "loss": 4.5, "elapsed": 1.0}\n')
    assert poll(app, after)[0] == [{"step": 2, "loss": 4.5, "elapsed": 1.0}]


def test_an_offset_inside_a_line_skips_the_rest_of_that_line(run):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    body = client(run).get("/api/metrics?after=5").json()
    assert body["records"] == [json.loads(line) for line in lines[1:]]
    assert body["next"] == sum(map(len, lines))
