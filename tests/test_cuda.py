"""Cross-backend equivalence on a real GPU (`pytest -m cuda`; skipped without one).

The cuda backend must compute what the cpu backend computes: the same loss and gradients for
the same parameters and batch, the same loss trajectory over training steps, and, like the cpu
backend, bitwise identical results for any number of sphere streams.
"""

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train
from compare import rel_err, worst_rel_err

pytestmark = pytest.mark.cuda

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="module")
def pair():
    from crystal.backends.cpu import CpuBackend
    from crystal.backends.cuda import CudaBackend

    rng = np.random.default_rng(5)
    flat = init_params(CFG, 3) + rng.standard_normal(init_params(CFG, 3).shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    targets = rng.integers(0, CFG.vocab_size, (3, 37))
    cpu = GPT(CFG, flat, CpuBackend())
    gpu = GPT(CFG, flat, CudaBackend("fp32"))
    return cpu, gpu, idx, targets


def test_cuda_loss_matches_cpu(pair):
    cpu, gpu, idx, targets = pair
    a, _ = cpu.loss_and_grads(idx, targets)
    b, _ = gpu.loss_and_grads(idx, targets)
    assert abs(a - b) / abs(a) <= 1e-5


def test_cuda_logits_match_cpu(pair):
    cpu, gpu, idx, _ = pair
    assert rel_err(gpu.logits(idx), cpu.logits(idx)) <= 1e-5


def test_cuda_gradients_match_cpu(pair):
    cpu, gpu, idx, targets = pair
    _, ga = cpu.loss_and_grads(idx, targets)
    _, gb = gpu.loss_and_grads(idx, targets)
    worst, err = worst_rel_err(gb, ga)
    assert err <= 1e-4, (worst, err)


def test_ten_cuda_steps_follow_the_cpu_loss_trajectory():
    model_cfg, cfg_cpu = resolve("tiny", train_overrides=dict(device="cpu", steps=10, spheres=4))
    _, cfg_gpu = resolve("tiny", train_overrides=dict(device="cuda", steps=10, spheres=4))
    a, b = train(model_cfg, cfg_cpu).losses, train(model_cfg, cfg_gpu).losses
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-4


def test_cuda_stream_count_does_not_change_the_result():
    runs = []
    for spheres in (1, 4, 12):
        model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", steps=5, spheres=spheres))
        runs.append(train(model_cfg, cfg))
    assert runs[0].losses == runs[1].losses == runs[2].losses
    assert runs[0].params.tobytes() == runs[1].params.tobytes() == runs[2].params.tobytes()


def test_cuda_dropout_drops_what_the_cpu_drops_for_any_stream_count():
    over = dict(steps=5, dropout=0.2)
    model_cfg, cfg_cpu = resolve("tiny", train_overrides=dict(device="cpu", spheres=2, **over))
    cpu = train(model_cfg, cfg_cpu)
    runs = [train(model_cfg, resolve("tiny", train_overrides=dict(device="cuda", spheres=s, **over))[1])
            for s in (1, 3)]
    assert runs[0].losses == runs[1].losses and runs[0].params.tobytes() == runs[1].params.tobytes()
    assert max(abs(x - y) / abs(x) for x, y in zip(cpu.losses, runs[0].losses)) <= 1e-4


def test_tf32_precision_trains_close_to_fp32():
    model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", steps=5, precision="tf32"))
    _, cfg32 = resolve("tiny", train_overrides=dict(device="cuda", steps=5))
    a, b = train(model_cfg, cfg).losses, train(model_cfg, cfg32).losses
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-2


def test_cuda_column_sums_match_cpu_and_do_not_depend_on_the_block_size():
    """layernorm's dw, db and the bias gradient: two-stage column sums whose order is fixed by the
    shapes alone (kernels/column_reduce.cuh), here over 1000 rows (16 parts) of 768 columns."""
    from crystal.backends.cpu import CpuBackend
    from crystal.backends.cuda import CudaBackend

    N, C = 1000, 768
    rng = np.random.default_rng(11)
    dout, inp = (rng.standard_normal((N, C)).astype(np.float32) for _ in range(2))
    w = np.ones(C, np.float32)
    cpu = CpuBackend()
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.layernorm_forward(np.empty((N, C), np.float32), mean, rstd, inp, w, np.zeros(C, np.float32), 1e-5)
    expected = [np.empty(C, np.float32) for _ in range(3)]
    cpu.layernorm_backward(np.zeros((N, C), np.float32), expected[0], expected[1], dout, inp, w, mean, rstd)
    cpu.matmul_backward(np.empty((N, C), np.float32), np.empty((C, C), np.float32), expected[2], dout, inp,
                        np.eye(C, dtype=np.float32))
    runs = []
    for block in (64, 256):
        gpu = CudaBackend("fp32", block=block)
        d = {k: gpu.to_device(v) for k, v in dict(dout=dout, inp=inp, w=w, mean=mean, rstd=rstd).items()}
        dw, db, dbias = (gpu.empty((C,)) for _ in range(3))
        gpu.layernorm_backward(gpu.zeros((N, C)), dw, db, d["dout"], d["inp"], d["w"], d["mean"], d["rstd"])
        gpu.matmul_backward(gpu.empty((N, C)), gpu.empty((C, C)), dbias, d["dout"], d["inp"],
                            gpu.to_device(np.eye(C, dtype=np.float32)))
        runs.append([gpu.to_host(x) for x in (dw, db, dbias)])
    assert all(rel_err(x, e) <= 1e-5 for x, e in zip(runs[0], expected))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(*runs))


# --- the Llama ops (kernels/rmsnorm.cu, rope.cu, swiglu.cu, grouped-query attention, nn.Linear
# products, the encoder without position embeddings) against the cpu backend ------------------

def llama_backend(precision="fp32", **kw):
    from crystal.backends.cuda import CudaBackend

    return CudaBackend(precision, **kw)


def up(gpu, x, act=True):
    """x (float32 host) on the device: activations/weights in the backend's act_dtype (bf16: rounded)."""
    if act and gpu.bf16:
        import ml_dtypes

        x = np.ascontiguousarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)).view(gpu.act_dtype)
    return gpu.to_device(np.ascontiguousarray(x))


def down(gpu, x):
    return np.asarray(gpu.to_host(x), np.float32)


def widened(x):
    """x as the bf16 backend sees it (rounded to bf16), in float32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


LB, LT, LNH, LHD = 3, 37, 6, 16  # head_dim 16: cuDNN's flash path in bf16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kv", [2, 1])
def test_cuda_llama_gqa_attention_matches_cpu(precision, kv):
    from crystal.backends.cpu import CpuBackend

    cpu, gpu = CpuBackend(), llama_backend(precision)
    rng = np.random.default_rng(21)
    W = (LNH + 2 * kv) * LHD
    qkv, dout = (rng.standard_normal(s).astype(np.float32) for s in ((LB, LT, W), (LB, LT, LNH * LHD)))
    if gpu.bf16:
        qkv, dout = widened(qkv), widened(dout)
    e_out, e_att = np.empty((LB, LT, LNH * LHD), np.float32), np.empty((LB, LNH, LT, LT), np.float32)
    e_dqkv = np.empty_like(qkv)
    cpu.attention_forward(e_out, e_att, qkv, LNH, n_kv_head=kv)
    cpu.attention_backward(e_dqkv, dout, qkv, e_att, LNH, out=e_out, n_kv_head=kv)
    shape, dtype = gpu.attention_saved(LB, LNH, LT, LHD)
    d_qkv, d_dout = up(gpu, qkv), up(gpu, dout)
    runs = []
    for _ in range(2):  # deterministic: the same bits twice
        out, att = gpu.empty((LB, LT, LNH * LHD), gpu.act_dtype), gpu.empty(shape, dtype)
        dqkv = gpu.empty(qkv.shape, gpu.act_dtype)
        gpu.attention_forward(out, att, d_qkv, LNH, n_kv_head=kv)
        gpu.attention_backward(dqkv, d_dout, d_qkv, att, LNH, out=out, n_kv_head=kv)
        runs.append((down(gpu, out), down(gpu, dqkv)))
    out, dqkv = runs[0]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(*runs))
    tol = 2e-2 if gpu.bf16 else 1e-4
    assert rel_err(out, e_out) <= tol and rel_err(dqkv, e_dqkv) <= tol
    assert cosine(dqkv, e_dqkv) >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_llama_rmsnorm_rope_swiglu_match_cpu(precision):
    from crystal.backends.cpu import CpuBackend

    cpu, gpu = CpuBackend(), llama_backend(precision)
    rng = np.random.default_rng(22)
    Nr, C, I, KV = LB * LT, 96, 80, 2
    prep = widened if gpu.bf16 else (lambda x: x)
    f = lambda *shape, s=1.0: prep((rng.standard_normal(shape) * s).astype(np.float32))  # noqa: E731
    a, b, w, dout, dinp0 = f(Nr, C, s=2.0), f(Nr, C), f(C), f(Nr, C), f(Nr, C)
    e = dict(res=np.empty((Nr, C), np.float32), out=np.empty((Nr, C), np.float32), rstd=np.empty(Nr, np.float32))
    cpu.residual_rmsnorm_forward(e["res"], e["out"], e["rstd"], a, b, w, 1e-5)
    res = up(gpu, a)
    out, rstd = gpu.empty((Nr, C), gpu.act_dtype), gpu.empty((Nr,))
    gpu.residual_rmsnorm_forward(res, out, rstd, res, up(gpu, b), up(gpu, w), 1e-5)  # res aliases a
    res_h = down(gpu, res)
    cpu.rmsnorm_forward(e["out"], e["rstd"], res_h, w, 1e-5)  # the stored (rounded, in bf16) sum
    tol, tol32 = (1e-2, 1e-5) if gpu.bf16 else (1e-5, 1e-5)
    assert rel_err(res_h, e["res"]) <= tol and rel_err(down(gpu, out), e["out"]) <= tol
    assert rel_err(down(gpu, rstd), e["rstd"]) <= tol32
    e_dinp, e_dw = dinp0.copy(), np.empty(C, np.float32)
    cpu.rmsnorm_backward(e_dinp, e_dw, dout, res_h, w, e["rstd"])
    dinp, dw = up(gpu, dinp0), gpu.empty((C,))
    gpu.rmsnorm_backward(dinp, dw, up(gpu, dout), res, up(gpu, w), rstd)
    assert rel_err(down(gpu, dinp), e_dinp) <= tol and rel_err(down(gpu, dw), e_dw) <= 1e-4

    Wq = (LNH + 2 * KV) * LHD
    qkv = f(LB, LT, Wq)
    inv = 1.0 / 10000.0 ** (np.arange(0, LHD, 2) / LHD)
    ang = np.arange(LT)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    for op in ("rope_forward", "rope_backward"):
        expected = qkv.copy()
        getattr(cpu, op)(expected, cos, sin, LNH, KV)
        x = up(gpu, qkv)
        getattr(gpu, op)(x, up(gpu, cos, act=False), up(gpu, sin, act=False), LNH, KV)
        assert rel_err(down(gpu, x), expected) <= tol

    gu, dy = f(Nr, 2 * I, s=2.0), f(Nr, I)
    e_y, e_dgu = np.empty((Nr, I), np.float32), np.empty((Nr, 2 * I), np.float32)
    cpu.swiglu_forward(e_y, gu)
    cpu.swiglu_backward(e_dgu, gu, dy)
    y, dgu = gpu.empty((Nr, I), gpu.act_dtype), gpu.empty((Nr, 2 * I), gpu.act_dtype)
    gpu.swiglu_forward(y, up(gpu, gu))
    gpu.swiglu_backward(dgu, up(gpu, gu), up(gpu, dy))
    assert rel_err(down(gpu, y), e_y) <= tol and rel_err(down(gpu, dgu), e_dgu) <= tol


@pytest.mark.parametrize("precision, graphs", [("fp32", False), ("fp32", True), ("bf16", False)])
@pytest.mark.parametrize("bias, frozen", [(True, False), (False, False), (True, True)])
def test_cuda_llama_linear_matches_cpu(precision, graphs, bias, frozen):
    """cuBLAS (fp32), or cuBLASLt (graphs, bf16): the BIAS epilogue only with a bias, dbias from the
    weight product's BGRADB epilogue; dw None: no weight product."""
    from crystal.backends.cpu import CpuBackend
    from crystal.errors import CrystalError

    cpu = CpuBackend()
    try:
        gpu = llama_backend(precision, graphs=graphs)
    except CrystalError as e:  # cuBLASLt needs nvmath-python
        pytest.skip(str(e))
    rng = np.random.default_rng(23)
    Nr, C, OC = LB * LT, 96, 144
    prep = widened if gpu.bf16 else (lambda x: x)
    inp, w, dout = (prep(rng.standard_normal(s).astype(np.float32)) for s in ((Nr, C), (OC, C), (Nr, OC)))
    b = prep(rng.standard_normal(OC).astype(np.float32)) if bias else None
    e_out = np.empty((Nr, OC), np.float32)
    cpu.linear_forward(e_out, inp, w, b)
    e_dinp, e_dw, e_db = np.empty_like(inp), np.empty_like(w), np.empty(OC, np.float32) if bias else None
    cpu.linear_backward(e_dinp, e_dw, e_db, dout, inp, w)
    out = gpu.empty((Nr, OC), gpu.act_dtype)
    d_inp, d_w = up(gpu, inp), up(gpu, w)
    gpu.linear_forward(out, d_inp, d_w, up(gpu, b) if bias else None)
    dinp, dw, db = gpu.empty((Nr, C), gpu.act_dtype), None if frozen else gpu.empty((OC, C)), \
        gpu.empty((OC,)) if bias else None
    gpu.linear_backward(dinp, dw, db, up(gpu, dout), d_inp, d_w)
    tol = 1e-2 if gpu.bf16 else 1e-5 if precision == "fp32" else 1e-3
    assert rel_err(down(gpu, out), e_out) <= tol and rel_err(down(gpu, dinp), e_dinp) <= tol
    assert frozen or rel_err(down(gpu, dw), e_dw) <= (1e-5 if precision == "fp32" else tol)
    assert not bias or rel_err(down(gpu, db), e_db) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_llama_encoder_without_position_embeddings_matches_cpu(precision):
    from crystal.backends.cpu import CpuBackend

    cpu, gpu = CpuBackend(), llama_backend(precision)
    rng = np.random.default_rng(24)
    V, C = 300, 64
    idx = rng.integers(0, V, (LB, LT)).astype(np.int32)
    wte = rng.standard_normal((V, C)).astype(np.float32)
    wte = widened(wte) if gpu.bf16 else wte
    dout = rng.standard_normal((LB, LT, C)).astype(np.float32)
    dout = widened(dout) if gpu.bf16 else dout
    out = gpu.empty((LB, LT, C), gpu.act_dtype)
    gpu.encoder_forward(out, gpu.to_device(idx), up(gpu, wte), None)
    assert down(gpu, out).tobytes() == wte[idx].tobytes()
    e_dwte = np.zeros((V, C), np.float32)
    cpu.encoder_backward(e_dwte, None, dout, idx)
    dwte = gpu.zeros((V, C))
    gpu.encoder_backward(dwte, None, up(gpu, dout), gpu.to_device(idx))
    assert rel_err(down(gpu, dwte), e_dwte) <= 1e-5


# --- LoRA's B on a column block of a fused product (matmul_columns_*: cuBLASLt, ld = the fused width) ---

@pytest.mark.parametrize("precision, graphs", [("fp32", False), ("fp32", True), ("bf16", False)])
@pytest.mark.parametrize("lo", [0, 96, 160])  # the first, an inner and the last block of a [N, 192] product
def test_cuda_matmul_columns_match_cpu_in_place_and_repeat_bitwise(precision, graphs, lo):
    from crystal.backends.cpu import CpuBackend
    from crystal.errors import CrystalError

    cpu = CpuBackend()
    try:
        gpu = llama_backend(precision, graphs=graphs)
        gpu.require_lt("the column-block products")
    except CrystalError as e:  # cuBLASLt needs nvmath-python
        pytest.skip(str(e))
    rng = np.random.default_rng(25)
    Nr, R, OC, W = LB * LT, 8, 32, 192
    prep = widened if gpu.bf16 else (lambda x: x)
    inp, w, out0, dout = (prep(rng.standard_normal(s).astype(np.float32)) for s in ((Nr, R), (R, OC), (Nr, W), (Nr, W)))
    e_out = out0.copy()
    cpu.matmul_columns_forward(e_out, inp, w, lo)
    e_dinp, e_dw = np.empty_like(inp), np.empty_like(w)
    cpu.matmul_columns_backward(e_dinp, e_dw, dout, inp, w, lo)
    d_inp, d_w, d_dout = up(gpu, inp), up(gpu, w), up(gpu, dout)
    results = []
    for _ in range(2):
        out = up(gpu, out0.copy())  # out0 stays the reference
        gpu.matmul_columns_forward(out, d_inp, d_w, lo)
        dinp, dw = gpu.empty((Nr, R), gpu.act_dtype), gpu.zeros((R, OC))
        gpu.matmul_columns_backward(dinp, dw, d_dout, d_inp, d_w, lo)
        results.append([down(gpu, x) for x in (out, dinp, dw)])
    (out, dinp, dw), again = results
    assert all(a.tobytes() == b.tobytes() for a, b in zip(results[0], again))  # deterministic
    outside = np.ones(W, bool)
    outside[lo:lo + OC] = False
    assert out[:, outside].tobytes() == out0[:, outside].tobytes()  # the other columns untouched
    tol = 1e-2 if gpu.bf16 else 1e-5
    assert rel_err(out, e_out) <= tol and rel_err(dinp, e_dinp) <= tol and rel_err(dw, e_dw) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_llama_lora_on_every_target_matches_cpu(precision):
    """q, k, v, gate, up adapters add into their columns of q|k|v and gate|up; o, down whole products."""
    from crystal.config import ModelConfig
    from crystal.dropout import Dropout
    from crystal.errors import CrystalError
    from crystal.lora import TARGETS, AdapterLayout, LoraConfig, LoraModel

    cfg = ModelConfig(arch="llama", vocab_size=259, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, tie_word_embeddings=False)
    lora = LoraConfig(8, 16.0, 0.1, tuple(TARGETS["llama"]))
    rng = np.random.default_rng(26)
    adapters = (rng.standard_normal(AdapterLayout(cfg, lora).size) * 0.1).astype(np.float32)
    x, y = (rng.integers(0, cfg.vocab_size, (LB, LT)).astype(np.int32) for _ in range(2))
    drop = Dropout(0.1, 1, 0, 0)
    try:
        gpu = llama_backend(precision)
        loss_g, grads_g = LoraModel(cfg, init_params(cfg, 1), lora, adapters, backend=gpu).loss_and_grads(x, y, drop)
    except CrystalError as e:  # cuBLASLt needs nvmath-python
        pytest.skip(str(e))
    loss_c, grads_c = LoraModel(cfg, init_params(cfg, 1), lora, adapters).loss_and_grads(x, y, drop)
    assert abs(loss_g - loss_c) / loss_c <= (2e-2 if gpu.bf16 else 1e-5)
    for k, g in grads_c.items():
        assert (cosine(grads_g[k], g) >= 0.99) if gpu.bf16 else (rel_err(grads_g[k], g) <= 1e-4), k
