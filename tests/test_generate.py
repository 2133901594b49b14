"""The KV-cache inference path (crystal.generate): a batch of prompts of different lengths is
prefilled in one forward and decoded a token a step; at every position its logits are the full
forward's, and its greedy tokens are transformers' `generate` with a cache.

The model for transformers is a tiny random GPT-2 that transformers builds and saves here;
crystal reads it through its Hugging Face loader (crystal.load_checkpoint of the directory).
"""

import os

import numpy as np
import pytest

from crystal import load_checkpoint
from crystal.config import ModelConfig
from crystal.generate import Decoder, kv_cache_bytes
from crystal.model import GPT, ParamLayout, init_params
from crystal.sample import Generation, SamplingParams, context_window, generate
from compare import rel_err

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)
LENGTHS = (1, 6, 17, 39)  # prompt lengths decoded together: 1 to block_size - 1
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(5)
    flat = init_params(CFG, 3)
    flat += rng.standard_normal(flat.shape).astype(np.float32) * 0.05  # logits far from uniform
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    return GPT(CFG, flat)


def prompts_of(lengths, seed=0, vocab=CFG.vocab_size):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def last_logits(model, ids) -> np.ndarray:
    """The full forward's logits after the last of ids (the reference a cache must equal)."""
    return model.logits(np.array(ids))[0, -1]


def decode_checked(model, decoder, prompts, steps):
    """Greedy decoding of prompts in one batch, checking every row's logits against the full
    forward at every position; the worst relative error."""
    ctx = [list(p) for p in prompts]
    logits, worst = decoder.prefill(prompts), 0.0
    for _ in range(steps):
        active = decoder.lengths < decoder.capacity
        for b in np.flatnonzero(active):
            worst = max(worst, rel_err(logits[b], last_logits(model, ctx[b])))
            ctx[b].append(int(np.argmax(logits[b])))
        if not active.any():
            break
        logits = decoder.decode([c[-1] for c in ctx], active)
    return worst


def test_cached_logits_equal_a_full_recompute_at_every_decode_position(model):
    decoder = Decoder(model, len(LENGTHS))
    assert decode_checked(model, decoder, prompts_of(LENGTHS), CFG.block_size) <= TOL


def test_a_refilled_window_gives_the_full_forward_of_the_window(model):
    decoder = Decoder(model, 2)
    prompts = prompts_of((CFG.block_size, 3), seed=1)
    decoder.prefill(prompts)
    window = context_window(prompts[0], CFG.block_size)
    assert rel_err(decoder.refill(0, window), last_logits(model, window)) <= TOL
    assert decoder.lengths.tolist() == [len(window), 3]
    logits = decoder.decode([5, 7])  # both rows go on from their own positions
    assert rel_err(logits[0], last_logits(model, window + [5])) <= TOL
    assert rel_err(logits[1], last_logits(model, prompts[1] + [7])) <= TOL


def test_generation_beyond_block_size_slides_and_each_token_is_the_windows_greedy_token(model):
    prompt = prompts_of((30,), seed=2)[0]
    ids = generate(model, prompt, 40, temperature=0)
    # replay: each token is the argmax after the window the cache held; a full window
    # (block_size tokens) is still used whole, the token after it slides
    cached = len(prompt)
    for k in range(len(prompt), len(ids)):
        if cached > CFG.block_size:
            cached = len(context_window(ids[:k], CFG.block_size))
        assert ids[k] == int(np.argmax(last_logits(model, ids[k - cached:k])))
        cached += 1


def test_the_cache_is_allocated_once_per_batch_and_its_size_is_known(model):
    decoder = Decoder(model, 3, capacity=20)
    buffers = [id(a) for a in (*decoder.cache.k, *decoder.cache.v)]
    decoder.prefill(prompts_of((2, 9, 4)))
    for _ in range(5):
        decoder.decode([1, 2, 3])
    assert [id(a) for a in (*decoder.cache.k, *decoder.cache.v)] == buffers
    assert decoder.cache.nbytes == kv_cache_bytes(CFG, 3, 20) == 2 * 2 * 3 * 20 * 48 * 4


def test_a_row_that_sits_out_a_decode_step_keeps_its_cache_and_goes_on_where_it_was(model):
    decoder = Decoder(model, 2)
    prompts = prompts_of((5, 8), seed=4)
    decoder.prefill(prompts)
    before = [a[1].copy() for a in (*decoder.cache.k, *decoder.cache.v)]
    decoder.decode([3, 99], active=[True, False])
    assert all(np.array_equal(a[1], b) for a, b in zip((*decoder.cache.k, *decoder.cache.v), before))
    assert decoder.lengths.tolist() == [6, 8]
    logits = decoder.decode([4, 9])
    assert rel_err(logits[1], last_logits(model, prompts[1] + [9])) <= TOL


def test_generation_leaves_the_parameter_buffer_bitwise_unchanged(model):
    before = model.flat.tobytes()
    generate(model, [1, 2, 3], 10, temperature=1.0, seed=4)
    assert model.flat.tobytes() == before


def test_logits_are_restricted_to_the_vocabulary_when_wte_has_padding_rows(model):
    """The LM head's product covers every row of wte, padding included (259 -> 320 rows);
    only the first vocab_size columns are logits."""
    assert model._tensors.wte.shape[0] == CFG.padded_vocab_size > CFG.vocab_size
    got = Decoder(model, 1).prefill([[3, 4, 5]])
    assert got.shape == (1, CFG.vocab_size) and rel_err(got[0], last_logits(model, [3, 4, 5])) <= TOL


def test_one_prompt_in_every_row_is_prefilled_once_and_shared(model):
    """n samples of one prompt: the prompt is computed in one row (the only prefill workspace is
    [1, T]) and its cache copied into the others; logits and cache bitwise the prompt's alone,
    and each row then decodes its own tokens as the full forward does."""
    prompt = prompts_of((11,), seed=4)[0]
    alone, shared = Decoder(model, 1), Decoder(model, 4)
    want, got = alone.prefill([prompt]), shared.prefill([prompt] * 4)
    assert list(shared._work) == [(1, len(prompt))]
    assert all(np.array_equal(row, want[0]) for row in got)
    assert shared.lengths.tolist() == [len(prompt)] * 4
    for a, b in zip((*alone.cache.k, *alone.cache.v), (*shared.cache.k, *shared.cache.v)):
        assert all(np.array_equal(b[r, :, :len(prompt)], a[0, :, :len(prompt)]) for r in range(4))
    logits = shared.decode([1, 2, 3, 4])
    for r, t in enumerate([1, 2, 3, 4]):
        assert rel_err(logits[r], last_logits(model, prompt + [t])) <= TOL


def test_a_row_shared_into_rows_anywhere_in_the_batch_continues_its_context(model):
    """Decoder.share copies a row's cache (its positions only) into rows that need not be
    adjacent; they continue its context, the others theirs."""
    prompts = prompts_of((3, 9, 5, 2, 7), seed=6)
    decoder = Decoder(model, 5)
    decoder.prefill(prompts)
    decoder.share(1, [0, 3, 4])
    assert decoder.lengths.tolist() == [9, 9, 5, 9, 9]
    logits = decoder.decode([10, 11, 12, 13, 14])
    ctx = [prompts[1], prompts[1], prompts[2], prompts[1], prompts[1]]
    for r in range(5):
        assert rel_err(logits[r], last_logits(model, ctx[r] + [10 + r])) <= TOL
    with pytest.raises(ValueError):
        decoder.share(1, [1, 2])


def test_sample_i_of_a_batch_of_one_prompt_is_bitwise_the_sample_of_seed_plus_i_alone(model):
    """The tokens (not just the text) of sample i of a batch sharing one prefill are those of
    seed + i drawn alone."""
    prompt, params = prompts_of((7,), seed=8)[0], SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    batch = Generation(model, [prompt] * 4, params)
    while batch.step():
        pass
    for i in range(4):
        assert batch.ids[i] == generate(model, prompt, 12, temperature=1.0, seed=3 + i)
    assert len({tuple(ids) for ids in batch.ids}) == 4


def test_emulated_cuda_decoder_matches_the_cpu_at_every_position():
    """kernels/kv_cache.cu through the cuda backend's host code, fp32, against the cpu."""
    from emu.backend import EmulatedCudaBackend

    cfg = ModelConfig(vocab_size=67, block_size=12, n_layer=2, n_head=2, n_embd=16)  # emulation is slow
    flat = init_params(cfg, 3)
    cpu, gpu = GPT(cfg, flat), GPT(cfg, flat, EmulatedCudaBackend())
    prompts = prompts_of((1, 4, 9), seed=3, vocab=cfg.vocab_size)
    runs = []
    for m in (cpu, gpu):
        decoder = Decoder(m, 3)
        logits = [decoder.prefill(prompts)]
        for k in range(3):  # the cpu's greedy tokens, fed to both
            logits.append(decoder.decode(np.argmax((runs[0] if runs else logits)[k], axis=-1)))
        logits.append(decoder.refill(2, prompts[2][-5:])[None])
        runs.append(logits)
    assert max(rel_err(g, c) for g, c in zip(runs[1], runs[0])) <= TOL
    assert rel_err(runs[1][0], decode_reference(cpu, prompts)) <= TOL


def test_emulated_cuda_decoder_shares_one_prompts_prefill_as_the_cpu():
    """The cuda backend's copy of cache rows (ops.copy_rows) under emulation, fp32: a prompt
    prefilled once and shared decodes as on the cpu."""
    from emu.backend import EmulatedCudaBackend

    cfg = ModelConfig(vocab_size=67, block_size=12, n_layer=2, n_head=2, n_embd=16)
    flat = init_params(cfg, 4)
    prompt = prompts_of((5,), seed=9, vocab=cfg.vocab_size)[0]
    cpu, runs = GPT(cfg, flat), []
    for m in (cpu, GPT(cfg, flat, EmulatedCudaBackend())):
        decoder = Decoder(m, 3)
        runs.append([decoder.prefill([prompt] * 3), decoder.decode([1, 2, 3]), decoder.decode([4, 5, 6])])
        decoder.share(2, [0])  # row 0 continues row 2's context
        runs[-1].append(decoder.decode([7, 8, 9]))
    assert max(rel_err(g, c) for g, c in zip(runs[1], runs[0])) <= TOL
    assert rel_err(runs[1][-1][0], last_logits(cpu, prompt + [3, 6, 7])) <= TOL


def decode_reference(model, prompts):
    return np.stack([last_logits(model, p) for p in prompts])


# --- against transformers -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_SHAPE = dict(vocab_size=300, n_positions=24, n_embd=36, n_layer=2, n_head=3)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers (every tensor perturbed: no zero biases)."""
    path = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(path)
    return hf, load_checkpoint(path)


def transformers_greedy(hf, prompt, n) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


def test_greedy_tokens_equal_transformers_generate_with_cache_for_prompts_of_1_to_block_size_minus_1(hf_gpt2):
    hf, ours = hf_gpt2
    T = HF_SHAPE["n_positions"]
    prompts = prompts_of(range(1, T), seed=7, vocab=HF_SHAPE["vocab_size"])
    gen = Generation(ours, prompts, SamplingParams(max_tokens=T - 1, temperature=0))  # one batch, every length
    while gen.step():
        pass
    for p, ids in zip(prompts, gen.ids):
        n = T - len(p)  # transformers stops at n_positions; crystal slides on
        assert ids[:T] == transformers_greedy(hf, p, n), len(p)
