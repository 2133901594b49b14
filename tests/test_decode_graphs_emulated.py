"""CUDA graphs of decode steps (crystal.decode_graphs), played under emulation (tests/emu/backend.py):
a replayed decode step is bitwise the eager one (logits and cache), for every batch prefix and
with rows sitting out; each prefix is captured once, nothing inside a capture allocates, reads
back or synchronizes, and a replayed step costs Python one copy, one graph launch and one read
back."""

from __future__ import annotations

import pytest

from crystal.config import ModelConfig
from crystal.errors import GraphCaptureError
from crystal.generate import Decoder
from crystal.model import GPT, init_params
from emu.backend import EmulatedCudaBackend

CFG = ModelConfig(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=16)  # emulation is slow
PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6]]
# (tokens, active): full batch steps, a row sitting out, and prefixes of the rows
STEPS = [([3, 4, 5], None), ([6, 7, 8], None), ([9, 10, 11], [True, False, True]), ([12, 13, 14], None),
         ([15, 16], None), ([17, 18], None), ([19, 20], None), ([21, 22, 23], None)]


def decoded(be, graphs: bool, precision: str = "fp32"):
    decoder = Decoder(GPT(CFG, init_params(CFG, 1), be), 3, graphs=graphs)
    out = [decoder.prefill(PROMPTS)]
    for tokens, active in STEPS:
        out.append(decoder.decode(tokens, active))
    out.append(decoder.refill(1, [4, 5]))
    out.append(decoder.decode([1, 2, 3]))
    return decoder, out


def bf16_backend(graphs: bool):
    from lt_standin import LtStandIn

    return EmulatedCudaBackend("bf16", lt=LtStandIn(), flash=False, graphs=graphs)


@pytest.fixture(scope="module")
def eager():
    return decoded(EmulatedCudaBackend(graphs=True), graphs=False)


@pytest.fixture(scope="module")
def replayed():
    be = EmulatedCudaBackend(graphs=True)
    return (*decoded(be, graphs=True), be)


def test_replayed_decode_steps_are_bitwise_the_eager_steps(eager, replayed):
    (eager_dec, eager_out), (dec, out, _) = eager, replayed
    assert dec.graphs.failed is None and dec.graphs.replays > 0
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, eager_out))
    cache = lambda d: [a.tobytes() for a in (*d.cache.k, *d.cache.v)]  # noqa: E731
    assert cache(dec) == cache(eager_dec)


def test_each_batch_prefix_is_captured_once_at_its_second_step(replayed):
    dec, _, be = replayed
    assert dec.graphs.captures == be.captures == 2  # 3 rows and 2 rows
    assert dec.graphs.replays == 7  # 9 steps (6 of 3 rows, 3 of 2): the first of each prefix ran eagerly


def test_a_replayed_step_is_one_copy_one_graph_launch_and_one_read_back(replayed):
    dec, _, be = replayed
    before = be.thread_launches()
    dec.decode([1, 2, 3])
    assert be.thread_launches() - before == 2  # the inputs' copy and the graph (a read back is no launch)


def test_bf16_replayed_decode_steps_are_bitwise_the_eager_steps():
    _, eager_out = decoded(bf16_backend(True), graphs=False)
    dec, out = decoded(bf16_backend(True), graphs=True)
    assert dec.graphs.failed is None and dec.graphs.captures == 2
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, eager_out))


def test_a_backend_not_made_for_graphs_decodes_eagerly():
    dec = Decoder(GPT(CFG, init_params(CFG, 1), EmulatedCudaBackend()), 2, graphs=True)
    assert dec.graphs is None


class FailingCapture(EmulatedCudaBackend):
    def end_capture(self):
        super().end_capture()
        raise GraphCaptureError("injected")


def test_a_failed_capture_goes_on_eagerly_with_the_same_bits(eager):
    dec, out = decoded(FailingCapture(graphs=True), graphs=True)
    assert dec.graphs.failed == "injected" and dec.graphs.replays == 0
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, eager[1]))


def test_sampling_on_a_backend_made_for_graphs_replays_its_decode_steps_and_draws_the_eager_tokens():
    from crystal.sample import Generation, SamplingParams

    def tokens(be, graphs=None):
        model = GPT(CFG, init_params(CFG, 1), be)
        gen = Generation(model, PROMPTS, SamplingParams(max_tokens=6, temperature=1.0, seed=3))
        if graphs is False:
            gen.decoder.graphs = None
        while gen.step():
            pass
        return gen.ids, gen.decoder.graphs

    ids, graphs = tokens(EmulatedCudaBackend(graphs=True))  # `--cuda-graphs auto`: the default there
    assert graphs is not None and graphs.replays == 4
    assert ids == tokens(EmulatedCudaBackend(graphs=True), graphs=False)[0]
