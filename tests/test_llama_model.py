"""The llama block against transformers: logits and every parameter's gradient of tiny random
LlamaForCausalLM (tied, untied, llama3 rope scaling) and Qwen2ForCausalLM (q/k/v biases) models,
dropout, the rotary table, and training's contracts (bitwise for any sphere count, Muon)."""

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from crystal.backends.cpu import CpuBackend  # noqa: E402
from crystal.config import ModelConfig, resolve  # noqa: E402
from crystal.dropout import Dropout  # noqa: E402
from crystal.model import GPT, ParamLayout, activation_bytes, flops_per_token, init_params  # noqa: E402
from crystal.rope import rope_table  # noqa: E402

V, T, B = 300, 16, 2
SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)
VARIANTS = {
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "untied": ("llama", dict(tie_word_embeddings=False)),
    "llama3": ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}


def hf_model(variant: str):
    """A tiny random transformers model (fp32, eval mode, eager attention) of the variant."""
    kind, extra = VARIANTS[variant]
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**SHAPE, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**SHAPE, **extra, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # norms and biases away from their inits, so their gradients mean something
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.float().eval()


def crystal_config(variant: str) -> ModelConfig:
    kind, extra = VARIANTS[variant]
    rope = extra.get("rope_scaling") or {}
    return ModelConfig(
        arch="llama", vocab_size=V, block_size=SHAPE["max_position_embeddings"], n_layer=2, n_head=4, n_kv_head=2,
        n_embd=64, intermediate_size=176, layer_norm_epsilon=1e-5, rope_theta=extra.get("rope_theta", 10000.0),
        tie_word_embeddings=extra["tie_word_embeddings"], attention_bias=kind == "qwen2",
        rope_scaling="llama3" if rope else None, rope_factor=rope.get("factor"),
        rope_low_freq_factor=rope.get("low_freq_factor"), rope_high_freq_factor=rope.get("high_freq_factor"),
        rope_original_max_position=rope.get("original_max_position_embeddings"))


def hf_tensors(model, cfg: ModelConfig) -> dict:
    """The state dict by crystal's names (a tied head is embed_tokens; its lm_head entry is not)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return {s.name: sd[s.name] for s in ParamLayout(cfg).specs}


def crystal_flat(model, cfg: ModelConfig) -> np.ndarray:
    layout = ParamLayout(cfg)
    flat = layout.zeros()
    views, tensors = layout.views(flat), hf_tensors(model, cfg)
    for s in layout.specs:
        views[s.name][...] = tensors[s.name]
    return flat


@pytest.fixture(scope="module")
def be():
    return CpuBackend()


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, be):
    """(variant, transformers model, crystal GPT on its weights)."""
    model = hf_model(request.param)
    cfg = crystal_config(request.param)
    return request.param, model, GPT(cfg, crystal_flat(model, cfg), be)


def test_logits_equal_transformers(pair):
    _, model, gpt = pair
    idx, _ = batch()
    with torch.no_grad():
        want = model(torch.tensor(idx)).logits.numpy()
    got = gpt.logits(idx)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_every_gradient_equals_torch_autograd(pair):
    name, model, gpt = pair
    idx, tgt = batch(1)
    model.zero_grad()
    logits = model(torch.tensor(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(tgt).reshape(-1))
    loss.backward()
    got_loss, grads = gpt.loss_and_grads(idx, tgt)
    assert got_loss == pytest.approx(loss.item(), rel=1e-6)
    params = dict(model.named_parameters())
    for n, g in grads.items():
        want = params[n].grad.numpy()
        scale = np.abs(want).max()
        assert scale > 0, n
        err = np.abs(g - want).max() / scale
        assert err < 1e-5, f"{name} {n}: relative error {err:.2e}"


def test_rotary_table_is_transformers_to_float32_rounding():
    """cos/sin rows of crystal.rope against LlamaRotaryEmbedding's (their first hd/2 columns)."""
    for variant in ("tied", "llama3", "qwen2"):
        model, cfg = hf_model(variant), crystal_config(variant)
        pos = torch.arange(cfg.block_size)[None]
        cos, sin = model.model.rotary_emb(torch.zeros(1), pos)
        c, s = rope_table(cfg)
        hd2 = cfg.head_size // 2
        np.testing.assert_allclose(c, cos[0, :, :hd2].numpy(), rtol=0, atol=4e-7)
        np.testing.assert_allclose(s, sin[0, :, :hd2].numpy(), rtol=0, atol=4e-7)
        np.testing.assert_array_equal(cos[0, :, :hd2], cos[0, :, hd2:])  # transformers repeats the halves


def test_dropout_gradient_matches_finite_differences(be):
    """Under one micro-batch's dropout masks (fixed by its key), the backward is the gradient of
    the forward: central differences of the loss along a random direction in float64 terms."""
    cfg = crystal_config("qwen2")
    gpt = GPT(cfg, init_params(cfg, 3), be)
    drop = Dropout(0.2, 5, 1, 0)  # p, seed, step, micro-batch
    idx, tgt = batch(2)
    loss, grads = gpt.loss_and_grads(idx, tgt, drop)
    assert np.isfinite(loss)
    layout = ParamLayout(cfg)
    rng = np.random.default_rng(0)
    base = np.array(gpt.flat, copy=True)
    direction = layout.zeros()
    dviews = layout.views(direction)
    for n in dviews:
        dviews[n][...] = rng.standard_normal(dviews[n].shape)
    slope = sum(float((grads[n].astype(np.float64) * dviews[n]).sum()) for n in grads)
    eps = 1e-3
    losses = []
    for sign in (1, -1):
        gpt.flat[...] = base + sign * eps * direction
        losses.append(gpt.loss_and_grads(idx, tgt, drop)[0])
    gpt.flat[...] = base
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert numeric == pytest.approx(slope, rel=2e-2)
    # and the masks matter: without dropout the loss differs
    assert gpt.loss(idx, tgt) != pytest.approx(loss, rel=1e-6)


def test_untied_head_and_embedding_gradients_are_separate(be):
    """Untied: the embedding's gradient is the scatter alone (zero on tokens not in the batch),
    the head's covers every row."""
    cfg = crystal_config("untied")
    gpt = GPT(cfg, init_params(cfg, 0), be)
    idx = np.zeros((1, 4), dtype=np.int64)
    _, g = gpt.loss_and_grads(idx, idx + 1)
    emb = g["model.embed_tokens.weight"]
    assert np.abs(emb[0]).sum() > 0 and not emb[1:].any()
    assert np.abs(g["lm_head.weight"][5]).sum() > 0


def test_init_flops_and_activation_bytes():
    cfg = crystal_config("untied")
    layout = ParamLayout(cfg)
    views = layout.views(init_params(cfg, 0))
    assert (views["model.norm.weight"] == 1).all() and (views["model.layers.0.input_layernorm.weight"] == 1).all()
    std = np.std(views["model.layers.0.mlp.down_proj.weight"])
    assert std == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    assert np.std(views["model.layers.0.mlp.gate_proj.weight"]) == pytest.approx(0.02, rel=0.05)
    # 6 x (parameters but the looked-up embedding) + 12 L T NH hd
    assert flops_per_token(cfg, T) == 6 * (layout.n_params - V * 64) + 12 * 2 * T * 64
    tied = crystal_config("tied")
    assert flops_per_token(tied, T) == 6 * ParamLayout(tied).n_params + 12 * 2 * T * 64
    # activations: the norms save rstd only; q|k|v is (NH + 2 KV) hd = 128 wide with 2 KV heads
    # per layer: ln1, atty, attproj, res2, ln2, fcproj, res3 (64 wide), qkv, gate|up, swiglu, 2 rstd; att
    per_layer = 4 * B * T * (7 * 64 + 128 + 2 * 176 + 176 + 2) + 4 * B * 4 * T * T
    # encoded, lnf, dres, dln, datty, dqkv, dfch, dfch_act, lnf_rstd, losses, logits (Vp = 320)
    rest = 4 * B * T * (5 * 64 + 128 + 2 * 176 + 176 + 2 + 320)
    assert activation_bytes(cfg, B, T) == 2 * per_layer + rest + 4 * 2 * T * T


# --- training ------------------------------------------------------------------------------------

def llama_tiny(**train):
    model = dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                 tie_word_embeddings=False)
    return resolve("tiny", model_overrides=model, train_overrides=train)


@pytest.fixture(scope="module")
def runs_by_sphere_count():
    from crystal.trainer import train

    return {s: train(*llama_tiny(spheres=s, steps=3, dropout=0.1)) for s in (1, 3, 12)}


@pytest.mark.parametrize("spheres", [3, 12])
def test_training_is_bitwise_identical_for_any_sphere_count(runs_by_sphere_count, spheres):
    a, b = runs_by_sphere_count[1], runs_by_sphere_count[spheres]
    assert a.losses == b.losses
    assert a.params.tobytes() == b.params.tobytes()


def test_training_lowers_the_loss_and_changes_every_parameter(runs_by_sphere_count):
    r = runs_by_sphere_count[1]
    assert r.losses[-1] < r.losses[0]
    layout = ParamLayout(r.model)
    before, after = layout.views(init_params(r.model, r.train.seed)), layout.views(r.params)
    assert [n for n in before if np.array_equal(before[n], after[n])] == []


def test_a_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(runs_by_sphere_count, tmp_path):
    from crystal.checkpoint import RunDir
    from crystal.trainer import train

    model, cfg = llama_tiny(spheres=3, steps=3, dropout=0.1, checkpoint_every=1, stop_at=2)
    first = train(model, cfg, RunDir(tmp_path / "run"))
    assert not first.finished
    run_dir = RunDir(tmp_path / "run", resume=True)
    rest = train(model, dataclasses.replace(cfg, stop_at=None), run_dir, resume=run_dir.load_state(model))
    one = runs_by_sphere_count[1]
    assert first.losses + rest.losses == one.losses
    assert rest.params.tobytes() == one.params.tobytes()


def on_thread_ranks(ranks: int, **train):
    """train() of llama_tiny on `ranks` thread-ranks (2 spheres each); rank 0's result."""
    import threading

    from crystal.trainer import train as run
    from thread_ranks import ThreadComm, run_ranks

    shared = {"barrier": threading.Barrier(ranks)}
    out = run_ranks(ranks, lambda i: run(*llama_tiny(spheres=2, **train), comm=ThreadComm(i, ranks, shared)), shared)
    assert all(r.params.tobytes() == out[0].params.tobytes() for r in out)  # every rank's replica
    return out[0]


def test_two_ranks_with_the_sharded_optimizer_are_bitwise_one_process(runs_by_sphere_count):
    r = on_thread_ranks(2, steps=3, dropout=0.1, shard_optimizer=True)
    one = runs_by_sphere_count[1]
    assert r.losses == one.losses and r.params.tobytes() == one.params.tobytes()


def test_muon_takes_the_llama_block_matrices_and_is_bitwise_across_spheres_and_ranks():
    from crystal.muon import muon_matrices
    from crystal.trainer import train

    model, _ = llama_tiny()
    mats = muon_matrices(ParamLayout(model))
    names = [m.name.split(".", 3)[-1] for m in mats[:7]]
    assert names == ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    assert len(mats) == 14 and all(m.linear for m in mats)
    # out/in of nn.Linear [out, in]: gate [64, 32] scales by sqrt(2), down [32, 64] and k [16, 32] by 1
    assert [round(m.scale ** 2, 6) for m in mats[:7]] == [1, 1, 1, 1, 2, 2, 1]
    one = train(*llama_tiny(spheres=1, steps=3, optimizer="muon"))
    three = train(*llama_tiny(spheres=3, steps=3, optimizer="muon"))
    ranks = on_thread_ranks(2, steps=3, optimizer="muon", shard_optimizer=True)
    assert one.losses == three.losses == ranks.losses
    assert one.params.tobytes() == three.params.tobytes() == ranks.params.tobytes()
