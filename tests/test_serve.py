"""`crystal serve`: the official openai client against a live server on 127.0.0.1 (models,
completions, chat completions, streamed and not, n, stop, usage), the chat template rendered as
transformers renders it, every bound and bad request answered with OpenAI's error JSON, many
clients at once, a client that leaves mid-stream, and the command line's bad inputs."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystal.cli import main  # noqa: E402
from crystal.data import EOT  # noqa: E402
from crystal.serve import Limits, ServedModel, Server  # noqa: E402
from crystal.watch import bind  # noqa: E402
from tiny_hf import save_tiny_gpt2  # noqa: E402

KEY = "test-key"
# ChatML with the special tokens a template may use (bos_token, eos_token) and raise_exception
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "ROMEO: who goes there?"}]
LIMITS = Limits(max_body_bytes=64 << 10, max_tokens=8192, max_n=4, max_queue=8)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers twice: with a chat template and without."""
    root = tmp_path_factory.mktemp("serve")
    save_tiny_gpt2(root, TEMPLATE, "chat")
    return root


def start(path, api_key=None, limits=LIMITS) -> Server:
    server = Server(ServedModel(path), bind("127.0.0.1", 0), api_key=api_key, limits=limits)
    server.start()
    return server


@pytest.fixture(scope="module")
def chat_server(model_dirs):
    server = start(model_dirs / "chat", api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server(model_dirs):
    server = start(model_dirs / "plain", limits=Limits(max_tokens=64, max_queue=4))
    yield server
    server.stop()


def client(server, key=KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=30)


def raw(server, method, path, body=b"", headers=None) -> tuple[int, dict | str]:
    """One request as written (no client-side checks); the JSON answer or the text."""
    port = server.sock.getsockname()[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode()


def post(server, path, body: dict, **kw):
    return raw(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}, **kw)


# --- the API through the openai client ------------------------------------------------------------

def test_models_lists_the_one_model_named_after_its_directory(chat_server):
    assert [m.id for m in client(chat_server).models.list()] == ["chat"]


def test_a_greedy_completion_is_crystal_sample_at_temperature_0(chat_server, model_dirs, capsys):
    out = client(chat_server).completions.create(model="chat", prompt="ROMEO:", max_tokens=20, temperature=0)
    capsys.readouterr()
    assert main(["sample", str(model_dirs / "chat"), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max-tokens", "20"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + out.choices[0].text + "\n"


def test_a_streamed_completion_joins_to_the_same_text(chat_server):
    c = client(chat_server)
    whole = c.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, seed=5)
    chunks = list(c.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, seed=5, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage == whole.usage


def test_usage_counts_the_prompt_and_every_generated_token(chat_server):
    tok = transformers.AutoTokenizer.from_pretrained(str(_dir(chat_server)))
    out = client(chat_server).completions.create(model="chat", prompt="ROMEO: who", max_tokens=7, n=3,
                                                 temperature=1.0, seed=1)
    assert out.usage.prompt_tokens == len(tok("ROMEO: who")["input_ids"])
    # no end-of-text within 7 tokens here: every choice runs to max_tokens
    assert [c.finish_reason for c in out.choices] == ["length"] * 3
    assert out.usage.completion_tokens == 21 and out.usage.total_tokens == out.usage.prompt_tokens + 21


def _dir(server):
    return server.served.path


def test_n_choices_are_the_seeds_s_to_s_plus_n_minus_1_drawn_alone(chat_server):
    c = client(chat_server)
    three = c.completions.create(model="chat", prompt="ROMEO:", max_tokens=12, n=3, seed=10)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    alone = [c.completions.create(model="chat", prompt="ROMEO:", max_tokens=12, seed=10 + i).choices[0].text
             for i in range(3)]
    assert [ch.text for ch in three.choices] == alone
    assert len(set(alone)) > 1


def test_a_stop_text_ends_the_choice_before_it(chat_server):
    c = client(chat_server)
    free = c.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, temperature=0).choices[0].text
    stop = free[5:7]
    cut = c.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_chat_messages_are_rendered_by_the_tokenizers_template_as_transformers_renders_them(chat_server):
    tok = transformers.AutoTokenizer.from_pretrained(str(_dir(chat_server)))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat_server.served.chat.render(MESSAGES) == text
    out = client(chat_server).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, seed=3)
    assert out.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert out.choices[0].message.role == "assistant"
    same = client(chat_server).completions.create(model="chat", prompt=tok(text, add_special_tokens=False)["input_ids"],
                                                  max_tokens=10, seed=3)
    assert out.choices[0].message.content == same.choices[0].text


def test_a_streamed_chat_completion_gives_the_role_then_the_content(chat_server):
    c = client(chat_server)
    whole = c.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=15, n=2, seed=4)
    chunks = list(c.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=15, n=2, seed=4, stream=True))
    for i in range(2):
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices[0].index == i]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == whole.choices[i].message.content


def test_a_model_without_a_chat_template_refuses_chat_and_completes(plain_server):
    c = client(plain_server)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        c.chat.completions.create(model="plain", messages=MESSAGES)
    assert c.completions.create(model="plain", prompt="ROMEO:", max_tokens=3).usage.completion_tokens == 3


def test_decoding_the_first_rows_of_a_decoder_gives_their_rows_of_a_whole_decode(model_dirs):
    import numpy as np

    from crystal import load_checkpoint
    from crystal.generate import Decoder

    model = load_checkpoint(model_dirs / "plain")
    whole, part = Decoder(model, 4), Decoder(model, 4)
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    whole.prefill(prompts)
    part.prefill(prompts)
    full = whole.decode([1, 2, 3, 4], [True, False, True, True])
    first = part.decode([1, 2, 3], [True, False, True])
    np.testing.assert_allclose(first[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-5)  # BLAS: other shapes, other rounding
    assert part.lengths.tolist() == [4, 1, 3, 4] and whole.lengths.tolist() == [4, 1, 3, 5]


# --- bad requests and bounds ------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,param", [
    ({"model": "chat", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "chat", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "chat", "prompt": "x", "max_tokens": 8193}, 400, "max_tokens"),
    ({"model": "chat", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "chat", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "chat", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "chat", "prompt": "x", "n": 5}, 400, "n"),
    ({"model": "chat", "prompt": "x", "stop": ""}, 400, "stop"),
    ({"model": "chat", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "chat", "prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"model": "chat", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "chat", "prompt": 5}, 400, "prompt"),
    ({"model": "chat", "prompt": [1, 300]}, 400, "prompt"),
    ({"model": "chat", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "chat", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": 7, "prompt": "x"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
])
def test_a_bad_completion_request_is_answered_with_openai_error_json(chat_server, body, status, param):
    code, answer = post(chat_server, "/v1/completions", body)
    assert code == status and answer["error"]["param"] == param and answer["error"]["message"]


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "hi"}], [{"role": "user", "content": 5}],
                                      [{"role": "wizard", "content": "hi"}]])
def test_bad_chat_messages_are_400(chat_server, messages):
    code, answer = post(chat_server, "/v1/chat/completions", {"model": "chat", "messages": messages})
    assert code == 400 and answer["error"]["param"] == "messages"


def test_malformed_json_is_400(chat_server):
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        code, answer = raw(chat_server, "POST", "/v1/completions", body)
        assert code == 400 and answer["error"]["type"] == "invalid_request_error", body


def test_a_body_over_the_bound_is_413(chat_server):
    code, answer = post(chat_server, "/v1/completions", {"model": "chat", "prompt": "x" * (64 << 10)})
    assert code == 413 and "larger than" in answer["error"]["message"]


def test_a_prompt_over_the_bound_is_400(model_dirs):
    server = start(model_dirs / "plain", limits=Limits(max_prompt_tokens=10))
    try:
        with pytest.raises(openai.BadRequestError, match="at most 10"):
            client(server).completions.create(model="plain", prompt=list(range(11)))
    finally:
        server.stop()


def test_the_api_key_is_required_when_set(chat_server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        code, answer = raw(chat_server, "GET", "/v1/models", headers=headers)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(chat_server, key="wrong").completions.create(model="chat", prompt="x", max_tokens=1)


def test_a_host_header_not_naming_the_bound_address_is_421(chat_server):
    code, _ = raw(chat_server, "GET", "/v1/models", headers={"Host": "evil.example:8000"})
    assert code == 421


def test_unknown_paths_and_methods_are_openai_errors(chat_server):
    assert raw(chat_server, "GET", "/v1/engines")[0] == 404
    code, answer = raw(chat_server, "GET", "/v1/completions")
    assert code == 405 and answer["error"]["message"]


# --- many clients, and clients that leave ---------------------------------------------------------

def test_concurrent_clients_are_each_answered_or_told_the_queue_is_full(plain_server):
    c = client(plain_server, key="none")
    want = c.completions.create(model="plain", prompt="ROMEO:", max_tokens=8, temperature=0).choices[0].text
    results = [None] * 16

    def ask(i):
        try:
            if i % 2:
                chunks = c.completions.create(model="plain", prompt="ROMEO:", max_tokens=8, temperature=0, stream=True)
                results[i] = "".join(ch.choices[0].text for ch in chunks)
            else:
                results[i] = c.completions.create(model="plain", prompt="ROMEO:", max_tokens=8,
                                                  temperature=0).choices[0].text
        except openai.RateLimitError as e:
            results[i] = e.status_code

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r == want or r == 429 for r in results), results
    assert results.count(want) >= 4
    assert [m.id for m in c.models.list()] == ["plain"]  # still up


def test_requests_decoded_together_give_the_texts_they_give_alone(chat_server):
    c = client(chat_server)
    asks = [dict(prompt="ROMEO:", seed=1, n=2), dict(prompt="JULIET: O", seed=2, n=1),
            dict(prompt="To be", seed=3, n=3, stop="e"), dict(prompt="x", seed=4, n=1, temperature=0)]

    def ask(kw):
        return [ch.text for ch in c.completions.create(model="chat", max_tokens=150, **kw).choices]

    alone = [ask(kw) for kw in asks]
    chat_server.worker.peak_jobs = 0
    together = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(asks[i]))) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert chat_server.worker.peak_jobs >= 2  # they did share decode steps


def send_long_request(server, stream: bool) -> socket.socket:
    """A greedy request of max_tokens 8192 on a raw connection (seconds of decoding: greedy from
    this prompt never reaches the end-of-text token of the tiny model, so it cannot end before its
    client leaves, as a sampled one could), sent once the worker is idle (so `worker.running` then
    means this request is being decoded)."""
    deadline = time.monotonic() + 20
    while (server.worker.pending or server.worker.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.sock.getsockname()[1]
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"model": "chat", "prompt": "ROMEO:", "max_tokens": 8192, "temperature": 0,
                       "stream": stream}).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (port, KEY.encode(), len(body), body))
    return conn


def wait_for_cancel(worker, before):
    deadline = time.monotonic() + 20
    while (worker.pending or worker.cancelled == before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.cancelled == before + 1 and worker.pending == 0


def test_a_client_that_leaves_while_waiting_for_its_answer_frees_its_slot(chat_server):
    worker = chat_server.worker
    before = worker.cancelled
    conn = send_long_request(chat_server, stream=False)
    deadline = time.monotonic() + 10
    while not worker.running and time.monotonic() < deadline:  # being decoded
        time.sleep(0.005)
    conn.close()
    wait_for_cancel(worker, before)


def test_a_client_that_leaves_mid_stream_frees_its_slot(chat_server):
    worker = chat_server.worker
    before = worker.cancelled
    conn = send_long_request(chat_server, stream=True)
    got = b""
    while b"data: " not in got:  # the headers, then the first event: the worker is decoding
        got += conn.recv(4096)
    conn.close()
    wait_for_cancel(worker, before)
    assert client(chat_server).completions.create(model="chat", prompt="x", max_tokens=2).choices[0].text is not None


# --- the command line ------------------------------------------------------------------------------

def test_the_command_serves_until_interrupted(model_dirs):
    proc = subprocess.Popen([sys.executable, "-m", "crystal", "serve", str(model_dirs / "plain"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1) ", line).group(1)
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)
        assert c.completions.create(model="plain", prompt="ROMEO:", max_tokens=4).usage.completion_tokens == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) in (0, 130)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_run_directory_exits_2_with_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


def test_a_port_in_use_exits_2_with_one_line(model_dirs, capsys):
    taken = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(model_dirs / "plain"), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "in use" in err


def test_another_host_than_loopback_prints_a_warning():
    from crystal.serve import host_warning

    assert host_warning("127.0.0.1", None) is None and host_warning("localhost", KEY) is None
    assert "--api-key" in host_warning("0.0.0.0", None)
    assert "bearer token" in host_warning("0.0.0.0", KEY)


def test_a_chat_template_is_read_from_tokenizer_config_json_too(tmp_path):
    from crystal.serve import read_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": TEMPLATE}]}))
    assert read_chat_template(tmp_path)[0] == TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
    assert read_chat_template(tmp_path) == (None, {"eos_token": EOT})
