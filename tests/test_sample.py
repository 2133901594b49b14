"""`crystal sample` on the KV-cache decoder: text printed as it is decoded (whole characters
only), several samples decoded as one batch with per-sample seeds, top-p, stop texts, the
end-of-text token, prompts from files and standard input, and its bad inputs."""

import io
import sys

import numpy as np
import pytest

from crystal import load_checkpoint
from crystal.cli import main
from crystal.data import ByteTokenizer, default_corpus, prepare, run_tokenizer
from crystal.sample import (OrderedPrinter, SamplingParams, TextStream, choose, eos_token_id, generate,
                            sample_text)

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: byte tokens, and BPE tokens (whose tokenizer has <|endoftext|>)."""
    root = tmp_path_factory.mktemp("sample")
    (root / "input.txt").write_bytes(default_corpus()[:60_000])
    prepare([str(root / "input.txt")], str(root / "bpe_data"), "bpe", vocab_size=300)
    for name, data in (("bytes", []), ("bpe", ["--data", str(root / "bpe_data")])):
        assert main(["train", "--preset", "tiny", "--steps", "3", "--spheres", "1", "--quiet", *data,
                     "--out", str(root / name)]) == 0
    return root


def run_cli(args, capsys) -> str:
    capsys.readouterr()
    assert main(["sample", *args]) == 0
    return capsys.readouterr().out


# --- batches and seeds ----------------------------------------------------------------------------

def test_sample_i_of_a_batch_is_the_sample_of_seed_plus_i_drawn_alone(runs, capsys):
    args = [str(runs / "bpe"), "--prompt", PROMPT, "--max-tokens", "40", "--temperature", "1.0"]
    batch = run_cli([*args, "--num-samples", "4", "--seed", "5"], capsys)
    alone = [run_cli([*args, "--seed", str(5 + i)], capsys) for i in range(4)]
    assert batch == "".join(a + OrderedPrinter.SEPARATOR for a in alone)
    assert len(set(alone)) == 4


def test_the_same_seed_gives_the_same_text(runs, capsys):
    args = [str(runs / "bytes"), "--prompt", PROMPT, "--max-tokens", "30", "--seed", "9"]
    assert run_cli(args, capsys) == run_cli(args, capsys)


def test_tokens_is_an_alias_of_max_tokens(runs, capsys):
    args = [str(runs / "bytes"), "--prompt", PROMPT, "--seed", "2"]
    assert run_cli([*args, "--tokens", "12"], capsys) == run_cli([*args, "--max-tokens", "12"], capsys)


# --- streaming ------------------------------------------------------------------------------------

def test_streamed_pieces_joined_are_the_decoded_tokens(runs):
    model, tok = load_checkpoint(runs / "bpe"), run_tokenizer(runs / "bpe")
    prompt = tok.encode(PROMPT).tolist()
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3)
    pieces = []
    sample_text(model, tok, prompt, params, write=pieces.append)
    eos = eos_token_id(tok)
    ids = generate(model, prompt, 60, temperature=1.0, seed=3, eos=eos)
    assert len(pieces) > 10  # streamed, not written once
    assert "".join(pieces) == tok.decode(ids[:-1] if ids[-1] == eos else ids) + "\n"


def test_a_piece_never_ends_inside_a_utf8_character():
    text = "héllo, 世界 🌍!"
    stream = TextStream(ByteTokenizer(), [])
    pieces = [stream.push(b) for b in text.encode()] + [stream.finish()]
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == list(text)  # each character once it is whole


def test_bytes_that_never_complete_a_character_come_out_as_decode_gives_them():
    data = "a".encode() + b"\xe4\xb8" + b"b"  # a cut 3-byte character
    stream = TextStream(ByteTokenizer(), [])
    pieces = [stream.push(b) for b in data] + [stream.finish()]
    assert "".join(pieces) == ByteTokenizer().decode(list(data)) == "a\ufffdb"


def stream_bytes(text: str, stops) -> tuple[str, bool]:
    stream = TextStream(ByteTokenizer(), [], tuple(stops))
    out = "".join(stream.push(b) for b in text.encode()) + stream.finish()
    return out, stream.stopped


def test_a_stop_text_ends_the_text_before_it_even_across_tokens():
    assert stream_bytes("the cat sat on the mat", ["on t"]) == ("the cat sat ", True)


def test_the_first_stop_text_to_appear_ends_the_text():
    assert stream_bytes("the cat sat on the mat", ["mat", "sat", "zebra"]) == ("the cat ", True)


def test_text_held_back_as_a_possible_stop_is_released_when_it_is_not_one():
    assert stream_bytes("the cat", ["cab"]) == ("the cat", False)
    stream = TextStream(ByteTokenizer(), [], ("cab",))
    assert [stream.push(b) for b in b"xca"] == ["x", "", ""]  # "ca" might begin "cab"


def test_stop_on_the_command_line_cuts_the_printed_sample(runs, capsys):
    args = [str(runs / "bytes"), "--prompt", PROMPT, "--max-tokens", "80", "--seed", "1"]
    full = run_cli(args, capsys)
    new = full[len(PROMPT):-1]
    stop = new[10:12]
    assert run_cli([*args, "--stop", stop], capsys) == PROMPT + new[:new.index(stop)] + "\n"


def test_the_end_of_text_token_ends_a_sample_and_is_not_printed(runs, monkeypatch):
    model, tok = load_checkpoint(runs / "bpe"), run_tokenizer(runs / "bpe")
    prompt = tok.encode(PROMPT).tolist()
    greedy = generate(model, prompt, 12, temperature=0)
    eos = greedy[len(prompt) + 5]  # stands in for <|endoftext|>: the sixth new token
    first = greedy.index(eos, len(prompt))
    assert generate(model, prompt, 12, temperature=0, eos=eos) == greedy[:first + 1]
    monkeypatch.setattr("crystal.sample.eos_token_id", lambda tok: eos)
    pieces = []
    sample_text(model, tok, prompt, SamplingParams(max_tokens=12, temperature=0), write=pieces.append)
    assert "".join(pieces) == tok.decode(greedy[:first]) + "\n"


def test_samples_print_in_order_the_first_as_it_comes():
    written = []
    printer = OrderedPrinter(2, "> ", written.append)
    printer.text(1, "b")  # sample 1 waits for sample 0
    printer.text(0, "a")
    assert "".join(written) == "> a"
    printer.end(0)
    printer.text(1, "c")
    printer.end(1)
    sep = OrderedPrinter.SEPARATOR
    assert "".join(written) == f"> a\n{sep}> bc\n{sep}"


# --- sampling rules -------------------------------------------------------------------------------

def test_top_p_draws_from_the_smallest_set_of_most_likely_tokens_reaching_p():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    rng = np.random.default_rng(0)

    def drawn(p):
        return {choose(logits, SamplingParams(temperature=1.0, top_p=p), rng) for _ in range(300)}

    assert drawn(0.4) == {1}
    assert drawn(0.75) == {1, 3}
    assert drawn(0.85) == {1, 3, 2}
    assert drawn(1.0) == {0, 1, 2, 3}


def test_a_tiny_top_p_samples_as_greedy(runs, capsys):
    args = [str(runs / "bytes"), "--prompt", PROMPT, "--max-tokens", "30"]
    assert run_cli([*args, "--top-p", "1e-9", "--temperature", "1"], capsys) == \
        run_cli([*args, "--temperature", "0"], capsys)


# --- prompts --------------------------------------------------------------------------------------

def test_a_prompt_file_and_standard_input_give_the_prompts_sample(runs, capsys, tmp_path, monkeypatch):
    args = [str(runs / "bytes"), "--max-tokens", "20", "--seed", "4"]
    text = "KING RICHARD:\nWhat?"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    expected = run_cli([*args, "--prompt", text], capsys)
    assert run_cli([*args, "--prompt-file", str(tmp_path / "p.txt")], capsys) == expected
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert run_cli([*args, "--prompt-file", "-"], capsys) == expected


def test_a_prompt_longer_than_block_size_continues_from_its_last_block_size_tokens(runs, capsys):
    model = load_checkpoint(runs / "bytes")
    T = model.config.block_size
    long = (default_corpus()[:3 * T]).decode("utf-8", errors="ignore")
    ids = ByteTokenizer().encode(long).tolist()
    assert generate(model, ids, 10, temperature=0)[len(ids):] == \
        generate(model, ids[-T:], 10, temperature=0)[T:]


# --- dry run --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,max_tokens,prompt", [(3, 25, PROMPT), (2, 1000, "x" * 300)])
def test_dry_run_prints_the_kv_cache_the_decoder_allocates_without_loading_the_model(
        n, max_tokens, prompt, runs, capsys, monkeypatch):
    from crystal.sample import Generation

    model = load_checkpoint(runs / "bytes")
    ids = ByteTokenizer().encode(prompt).tolist()
    nbytes = Generation(model, [ids] * n, SamplingParams(max_tokens)).decoder.cache.nbytes
    monkeypatch.setattr("crystal.pretrained.load_checkpoint", None)  # a dry run reads no tensor
    out = run_cli([str(runs / "bytes"), "--prompt", prompt, "--num-samples", str(n), "--max-tokens",
                   str(max_tokens), "--dry-run"], capsys)
    assert f"KV cache {nbytes / 2**20:,.1f} MiB" in out and f"({nbytes:,} bytes)" in out
    assert f"{n} sequence(s) x {min(len(ids) + max_tokens, model.config.block_size):,} positions" in out


# --- bad inputs -----------------------------------------------------------------------------------

BAD = {
    "empty prompt file": ["--prompt-file", "{tmp}/empty.txt"],
    "empty standard input": ["--prompt-file", "-"],
    "prompt file missing": ["--prompt-file", "{tmp}/nope.txt"],
    "prompt file not utf-8": ["--prompt-file", "{tmp}/latin1.txt"],
    "prompt and prompt file": ["--prompt", "x", "--prompt-file", "{tmp}/latin1.txt"],
    "top-p 0": ["--top-p", "0"],
    "top-p above 1": ["--top-p", "1.5"],
    "top-p nan": ["--top-p", "nan"],
    "num-samples 0": ["--num-samples", "0"],
    "num-samples above the bound": ["--num-samples", "100000"],
    "empty stop text": ["--stop", ""],
    "max-tokens negative": ["--max-tokens", "-1"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_input_exits_2_with_one_line(case, runs, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    args = [a.format(tmp=tmp_path) for a in BAD[case]]
    capsys.readouterr()
    assert main(["sample", str(runs / "bytes"), *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err


def test_cuda_graphs_auto_on_the_cpu_samples_as_without(runs, capsys):
    args = [str(runs / "bytes"), "--prompt", PROMPT, "--max-tokens", "8", "--seed", "3"]
    assert run_cli([*args, "--cuda-graphs", "auto"], capsys) == run_cli(args, capsys)
