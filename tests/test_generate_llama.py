"""KV-cache generation for llama (crystal.generate.llama_block): tiny random transformers
LlamaForCausalLM models (tied, untied, llama3 rope scaling) and a Qwen2ForCausalLM (q/k/v biases),
4 heads on 2 KV heads. A batch of prompts of different lengths is prefilled and decoded; at every
position the cached logits equal crystal's full forward (1e-5) and transformers' (1e-5), and the
greedy tokens are transformers' `generate(do_sample=False)`. On the cuda backend under emulation:
the decoder's logits are the cpu's (fp32 1e-5, bf16 cosine >= 0.99), and decode steps replayed as
CUDA graphs are bitwise the eager ones. `crystal sample --temperature 0` and `crystal serve` on a
saved LlamaForCausalLM directory give transformers' greedy text.

The models (and the HF -> crystal weight copy) are tests/test_llama_model.py's."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from crystal.config import ModelConfig  # noqa: E402
from crystal.generate import Decoder, kv_cache_bytes, kv_cache_shape  # noqa: E402
from crystal.model import GPT, ParamLayout, init_params  # noqa: E402
from crystal.sample import Generation, SamplingParams, context_window  # noqa: E402
from compare import rel_err  # noqa: E402
from test_llama_model import V, VARIANTS, crystal_config, crystal_flat, hf_model  # noqa: E402

TOL = 1e-5
LENGTHS = (1, 6, 17, 31)  # prompts decoded together: 1 to block_size - 1 (block_size 32)
STEPS_CHECKED = 5


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """(transformers model, crystal GPT on its weights) of each variant."""
    model, cfg = hf_model(request.param), crystal_config(request.param)
    return model, GPT(cfg, crystal_flat(model, cfg))


def hf_last_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_cached_logits_equal_the_full_forward_and_transformers_at_every_position(pair):
    """Prompts of 1..block_size-1 tokens in one batch, decoded greedily (a row sits out at one
    step; the longest fills its cache and sits out after); every live row's logits at every
    position against crystal's full forward and transformers' of that row's tokens so far."""
    model, gpt = pair
    decoder = Decoder(gpt, len(LENGTHS))
    ctx = [list(p) for p in prompts_of(LENGTHS)]
    last = decoder.prefill(ctx)  # each row's latest logits
    worst = worst_hf = 0.0
    for step in range(STEPS_CHECKED):
        active = decoder.lengths < decoder.capacity
        if step == 2:
            active[1] = False  # sits out: its cache, position and latest logits stay
        for b in np.flatnonzero(active):
            worst = max(worst, rel_err(last[b], gpt.logits(np.array(ctx[b]))[0, -1]))
            worst_hf = max(worst_hf, float(np.abs(last[b] - hf_last_logits(model, ctx[b])).max()))
            ctx[b].append(int(np.argmax(last[b])))
        logits = decoder.decode([c[-1] for c in ctx], active)
        last[active] = logits[active]
    assert worst <= TOL and worst_hf <= TOL
    assert decoder.lengths.tolist() == [len(c) for c in ctx]


def test_greedy_tokens_equal_transformers_generate(pair):
    """What `crystal sample --temperature 0` decodes (crystal.sample.Generation, the prompts as
    one batch) against transformers' generate with its cache, each prompt alone."""
    model, gpt = pair
    prompts, new = prompts_of((1, 9, 24), seed=1), 8
    gen = Generation(gpt, prompts, SamplingParams(max_tokens=new, temperature=0))
    while gen.step():
        pass
    for p, ids in zip(prompts, gen.ids):
        want = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        assert ids == want[0].tolist()


def test_a_refilled_window_gives_the_full_forward_of_the_window():
    """A context that slides is recomputed from position 0 (the rotations of the kept window's
    new positions), as the full forward of the window alone."""
    model, cfg = hf_model("llama3"), crystal_config("llama3")
    gpt = GPT(cfg, crystal_flat(model, cfg))
    decoder = Decoder(gpt, 2)
    prompts = prompts_of((cfg.block_size, 3), seed=2)
    decoder.prefill(prompts)
    window = context_window(prompts[0], cfg.block_size)
    assert rel_err(decoder.refill(0, window), gpt.logits(np.array(window))[0, -1]) <= TOL
    logits = decoder.decode([5, 7])
    assert rel_err(logits[0], gpt.logits(np.array(window + [5]))[0, -1]) <= TOL
    assert rel_err(logits[1], hf_last_logits(model, prompts[1] + [7])) <= TOL


def test_the_cache_holds_kv_heads_of_head_dim():
    """GQA: the cache is [batch, KV heads, capacity, head_dim] per layer, NH / KV times smaller
    than the query heads'; head_dim may differ from n_embd / n_head."""
    cfg = ModelConfig(arch="llama", vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      head_dim=8, intermediate_size=64)
    assert kv_cache_shape(cfg, 3, 20) == (3, 2, 20, 8)
    decoder = Decoder(GPT(cfg, init_params(cfg, 0)), 3, 20)
    assert decoder.cache.nbytes == kv_cache_bytes(cfg, 3, 20) == 2 * 2 * 3 * 20 * 2 * 8 * 4
    prompts = prompts_of((4, 1, 7), seed=3)
    logits = decoder.prefill(prompts)
    for b, p in enumerate(prompts):
        assert rel_err(logits[b], decoder.model.logits(np.array(p))[0, -1]) <= TOL


# --- the cuda backend under emulation ----------------------------------------------------------------

# emulation is slow: C=16, 4 heads of 4 on 2 KV heads; untied, with q/k/v biases (every llama tensor)
EMU_CFG = ModelConfig(arch="llama", vocab_size=67, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                      intermediate_size=24, tie_word_embeddings=False, attention_bias=True)
PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6]]
# (tokens, active): full batch steps, a row sitting out, and a prefix of the rows
STEPS = [([3, 4, 5], None), ([6, 7, 8], None), ([9, 10, 11], [True, False, True]), ([12, 13, 14], None),
         ([15, 16], None), ([17, 18], None)]


def emu_flat() -> np.ndarray:
    flat = init_params(EMU_CFG, 1)
    flat += np.random.default_rng(0).standard_normal(flat.shape).astype(np.float32) * 0.1  # norms, biases too
    flat[slice(*ParamLayout(EMU_CFG).padding)] = 0
    return flat


def decoded(be, graphs=None):
    """The decoder and its logits: a prefill, the STEPS, a refill and one more step."""
    decoder = Decoder(GPT(EMU_CFG, emu_flat(), be), len(PROMPTS), graphs=graphs)
    out = [decoder.prefill(PROMPTS)]
    for tokens, active in STEPS:
        out.append(decoder.decode(tokens, active))
    out.append(decoder.refill(1, [4, 5]))
    out.append(decoder.decode([1, 2, 3]))
    return decoder, out


def live_rows(out):
    """The logits rows that mean something (a row sitting out has none)."""
    return [o[[0, 2]] if i == 3 else o for i, o in enumerate(out)]


@pytest.fixture(scope="module")
def cpu_logits():
    from crystal.backends.cpu import CpuBackend

    return live_rows(decoded(CpuBackend())[1])


def emulated(precision: str):
    from emu.backend import EmulatedCudaBackend

    if precision == "fp32":
        return EmulatedCudaBackend(graphs=True)
    from lt_standin import LtStandIn

    return EmulatedCudaBackend("bf16", lt=LtStandIn(), flash=False, graphs=True)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_emulated_cuda_decoder_is_the_cpu_decoder_and_replayed_steps_are_bitwise_eager(cpu_logits, precision):
    _, eager = decoded(emulated(precision), graphs=False)
    decoder, replayed = decoded(emulated(precision), graphs=True)
    assert decoder.graphs.failed is None and decoder.graphs.captures == 2 and decoder.graphs.replays == 5
    assert all(a.tobytes() == b.tobytes() for a, b in zip(replayed, eager))
    for got, want in zip(live_rows(eager), cpu_logits):
        if precision == "fp32":
            assert rel_err(got, want) <= TOL
        else:
            assert cosine(got, want) >= 0.99


# --- `crystal sample` and `crystal serve` on a saved Llama directory ---------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (untied) and a byte-level BPE tokenizer, saved by
    transformers: (directory, model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from crystal.data import EOT, default_corpus

    root = tmp_path_factory.mktemp("llama") / "tiny-llama"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([default_corpus()[:30_000].decode()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, model.eval(), tok


def read_by_crystal(path) -> None:
    """crystal reads the LlamaForCausalLM directory (a CrystalError fails the test)."""
    from crystal.pretrained import checkpoint_config

    checkpoint_config(path)


def hf_greedy_text(model, tok, prompt: str, new: int) -> str:
    """transformers' greedy continuation of prompt (ending at its end-of-text token, not printed)."""
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(0)] if 0 in out else out)


def test_crystal_sample_at_temperature_0_prints_transformers_greedy_text(llama_dir, capsys):
    from crystal.cli import main

    root, model, tok = llama_dir
    read_by_crystal(root)
    capsys.readouterr()
    assert main(["sample", str(root), "--prompt", "ROMEO:", "--temperature", "0", "--max-tokens", "20"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + hf_greedy_text(model, tok, "ROMEO:", 20) + "\n"
    assert main(["sample", str(root), "--prompt", "ROMEO:", "--num-samples", "3", "--max-tokens", "10",
                 "--dry-run"]) == 0
    prompt = len(tok("ROMEO:")["input_ids"])  # the cache: 2 KV heads of 16 per layer and position
    assert f"3 sequence(s) x {prompt + 10} positions x 512 bytes (2 x 2 layers x 32 fp32)" in capsys.readouterr().out


def test_crystal_serve_completes_a_llama_greedily_as_transformers(llama_dir):
    root, model, tok = llama_dir
    read_by_crystal(root)
    from test_serve import LIMITS, client, start

    server = start(root, limits=LIMITS)
    try:
        out = client(server).completions.create(model=root.name, prompt="ROMEO:", max_tokens=20, temperature=0)
    finally:
        server.stop()
    assert out.choices[0].text == hf_greedy_text(model, tok, "ROMEO:", 20)
