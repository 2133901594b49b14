"""crystal.backends.cudnn_attention against a float64 numpy reference, through the numpy stand-in
of the cudnn module (tests/cudnn_standin.py: the real installed frontend checks every call, the
stand-in executes the graphs on host memory)."""

import math
import types

import ml_dtypes
import numpy as np
import pytest

import cudnn_standin
from compare import rel_err
from crystal.backends.cudnn_attention import FlashAttention, FlashAttentionError, parameter_names, unavailable_reason
from cudnn_standin import CudnnStandIn
from emu.device import StreamCaptureError

cudnn = pytest.importorskip("cudnn")  # the real frontend: the stand-in's signatures and enums come from it
BF16 = ml_dtypes.bfloat16
B, T, C, NH = 2, 19, 48, 3  # hs = 16


class Allocator:
    """alloc(nbytes) -> a uint8 host array (the emulated device memory, registered with the
    stand-in's device, which then knows when it is freed), counting calls. Holds no reference."""

    def __init__(self, device):
        self.device = device
        self.sizes = []

    def __call__(self, n):
        self.sizes.append(n)
        a = np.zeros(n, dtype=np.uint8)
        self.device.register(a)
        return a


def make(stream=lambda: 0, **standin):
    sd = CudnnStandIn(**standin)
    alloc = Allocator(sd.device)
    return sd, FlashAttention(sd, alloc, stream), alloc



def replay(record):
    for fn, args, kwargs in record:
        fn(*args, **kwargs)


def inputs(seed=0, b=B, t=T, c=C):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, t, 3 * c)).astype(BF16)
    dout = rng.standard_normal((b, t, c)).astype(BF16)
    return qkv, dout


def buffers(b=B, t=T, c=C, nh=NH):
    return np.zeros((b, t, c), BF16), np.zeros((b, nh, t), np.float32), np.zeros((b, t, 3 * c), BF16)


def heads(x, n, nh):
    """[B, T, n*C] -> n arrays [B, NH, T, hs]."""
    b, t, width = x.shape
    c = width // n
    return [x[..., i * c:(i + 1) * c].reshape(b, t, nh, c // nh).transpose(0, 2, 1, 3) for i in range(n)]


def reference(qkv, nh, z=1.0):
    """float64 causal attention: (y [B,T,C], lse [B,NH,T], saved). z: dropout factor keep / (1 - p)."""
    q, k, v = heads(np.asarray(qkv, np.float64), 3, nh)
    t, hs = q.shape[2], q.shape[3]
    s = (q @ k.swapaxes(-1, -2)) / math.sqrt(hs)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) + s.max(-1, keepdims=True)
    P = np.exp(s - lse)
    y = (P * z) @ v
    return y.transpose(0, 2, 1, 3).reshape(qkv.shape[0], t, -1), lse[..., 0], (q, k, v, P)


def reference_backward(qkv, dout, nh, z=1.0):
    """float64 gradient of sum(y * dout) through qkv, written out by hand (softmax backward with
    sum(P * dP), not rowsum(dO * O), so it does not share the flash identity it checks)."""
    _, _, (q, k, v, P) = reference(qkv, nh, z)
    (dy,) = heads(np.asarray(dout, np.float64), 1, nh)
    scale = 1 / math.sqrt(q.shape[-1])
    dv = (P * z).swapaxes(-1, -2) @ dy
    dP = (dy @ v.swapaxes(-1, -2)) * z
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))
    dq, dk = scale * dS @ k, scale * dS.swapaxes(-1, -2) @ q
    b, t = qkv.shape[:2]
    return np.concatenate([g.transpose(0, 2, 1, 3).reshape(b, t, -1) for g in (dq, dk, dv)], axis=-1)


def mask_factor(seed, offset, p, b=B, nh=NH, t=T):
    return cudnn_standin.dropout_keep(seed, offset, b, nh, t, p) / (1 - p)


# --- numerics ---

def test_forward_matches_float64_reference():
    sd, fa, _ = make()
    qkv, _ = inputs()
    out, stats, _ = buffers()
    fa.forward(out, stats, qkv, NH)
    y, lse, _ = reference(qkv, NH)
    assert rel_err(out, y) <= 1e-2
    assert rel_err(stats, lse) <= 1e-5
    assert np.abs(out.astype(np.float64) - y).max() <= np.abs(y).max() * 2 ** -8  # one bf16 rounding


def test_backward_matches_float64_reference():
    sd, fa, _ = make()
    qkv, dout = inputs(1)
    out, stats, dqkv = buffers()
    fa.forward(out, stats, qkv, NH)
    fa.backward(dqkv, dout, qkv, out, stats, NH)
    expected = reference_backward(qkv, dout, NH)
    for i, name in enumerate(("dq", "dk", "dv")):
        part = slice(i * C, (i + 1) * C)
        assert rel_err(dqkv[..., part], expected[..., part]) <= 2e-2, name


@pytest.mark.parametrize("dropout", [None, (0.25, 7, 3)])
def test_backward_matches_finite_differences(dropout):
    """Tiny case: the float64 reference gradient and the flash backward against central differences
    of the float64 forward's loss sum(y * dout) (the stand-in's mask held fixed under dropout)."""
    b, t, c, nh = 1, 5, 16, 2
    qkv, dout = inputs(2, b, t, c)
    z = 1.0 if dropout is None else mask_factor(dropout[1], dropout[2], dropout[0], b, nh, t)
    x = np.asarray(qkv, np.float64)
    d = np.asarray(dout, np.float64)
    fd = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = ((reference(xp, nh, z)[0] * d).sum() - (reference(xm, nh, z)[0] * d).sum()) / (2 * h)
    assert rel_err(reference_backward(qkv, dout, nh, z), fd) <= 1e-6
    sd, fa, _ = make()
    out, stats, dqkv = buffers(b, t, c, nh)
    fa.forward(out, stats, qkv, nh, dropout=dropout)
    fa.backward(dqkv, dout, qkv, out, stats, nh, dropout=dropout)
    assert rel_err(dqkv, fd) <= 2e-2


# --- dropout ---

def run(fa, qkv, dout, dropout):
    out, stats, dqkv = buffers()
    fa.forward(out, stats, qkv, NH, dropout=dropout)
    fa.backward(dqkv, dout, qkv, out, stats, NH, dropout=dropout)
    return out, stats, dqkv


def test_dropout_is_a_function_of_seed_and_offset():
    sd, fa, _ = make()
    qkv, dout = inputs(3)
    first = run(fa, qkv, dout, (0.2, 1234, 5))
    again = run(fa, qkv, dout, (0.2, 1234, 5))
    for a, b in zip(first, again):  # bitwise
        assert a.tobytes() == b.tobytes()
    for other in ((0.2, 1235, 5), (0.2, 1234, 6)):
        out, _, dqkv = run(fa, qkv, dout, other)
        assert out.tobytes() != first[0].tobytes() and dqkv.tobytes() != first[2].tobytes()
    # the statistics are the softmax's, before dropout
    assert first[1].tobytes() == run(fa, qkv, dout, None)[1].tobytes()


def test_dropout_backward_uses_the_forward_mask():
    sd, fa, _ = make()
    qkv, dout = inputs(4)
    p, seed, offset = 0.3, (1 << 63) + 12345, 77  # a seed past int64: passed as its two's complement
    out, stats, dqkv = run(fa, qkv, dout, (p, seed, offset))
    z = mask_factor(seed, offset, p)
    y, lse, _ = reference(qkv, NH, z)
    assert rel_err(out, y) <= 1e-2
    assert rel_err(stats, lse) <= 1e-5
    assert rel_err(dqkv, reference_backward(qkv, dout, NH, z)) <= 2e-2
    # and not with any other mask
    assert rel_err(dqkv, reference_backward(qkv, dout, NH, mask_factor(seed + 1, offset, p))) > 0.1


def test_dropout_seed_and_offset_reach_cudnn_by_value():
    sd, fa, _ = make()
    qkv, dout = inputs(5)
    run(fa, qkv, dout, (0.1, -5, 9))
    graph = sd.graphs[-1]
    _, seed, offset = graph.spec["dropout"]
    assert graph.spec["dropout"][0] == pytest.approx(0.1)
    assert seed.is_pass_by_value and offset.is_pass_by_value
    assert seed.data_type == cudnn.data_type.INT64 and seed.dim == [1, 1, 1, 1]
    ptr = sd.executions[-1]["Seed"][0]
    assert list(cudnn_standin.memory(ptr, [2], [1], np.int64)) == [-5, 9]


# --- graphs, workspace, handle ---

def test_graphs_are_built_once_per_shape():
    sd, fa, alloc = make()
    qkv, dout = inputs(6)
    run(fa, qkv, dout, None)
    assert (len(sd.graphs), sd.plans_built) == (2, 2)
    assert sd.graphs[0].calls[:5] == ["validate", "build_operation_graph", "create_execution_plans",
                                      "check_support", "build_plans"]
    assert sd.graphs[0].heuristics == [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
    run(fa, qkv, dout, None)  # the same shape builds nothing
    assert (len(sd.graphs), sd.plans_built, len(sd.executions)) == (2, 2, 4)
    run(fa, qkv, dout, (0.1, 1, 0))
    run(fa, qkv, dout, (0.1, 2, 0))  # a new seed is not a new graph
    assert sd.plans_built == 4
    run(fa, qkv, dout, (0.2, 1, 0))  # the probability is a graph constant
    assert sd.plans_built == 6
    workspace = alloc.sizes[-1]
    small_qkv, small_dout = inputs(7, 1, 8, C)
    out, stats, dqkv = buffers(1, 8)
    fa.forward(out, stats, small_qkv, NH)
    fa.backward(dqkv, small_dout, small_qkv, out, stats, NH)
    assert sd.plans_built == 8
    assert alloc.sizes == [workspace]  # grown once, to the largest graph's need
    assert workspace == sd.graphs[1].get_workspace_size() > 0


def test_workspace_grows_to_the_largest_graph():
    sd, fa, alloc = make()
    small_qkv, small_dout = inputs(8, 1, 8, C)
    out, stats, dqkv = buffers(1, 8)
    fa.forward(out, stats, small_qkv, NH)
    fa.backward(dqkv, small_dout, small_qkv, out, stats, NH)
    qkv, dout = inputs(9)
    run(fa, qkv, dout, None)
    fa.backward(dqkv, small_dout, small_qkv, out, stats, NH)  # the small graph runs in the big workspace
    assert alloc.sizes == [sd.graphs[1].get_workspace_size(), sd.graphs[3].get_workspace_size()]
    assert alloc.sizes[0] < alloc.sizes[1]


def test_one_handle_on_the_callers_stream():
    streams = iter([11, 12, 13, 14])
    sd, fa, _ = make(stream=lambda: next(streams))
    qkv, dout = inputs(10)
    run(fa, qkv, dout, None)
    run(fa, qkv, dout, None)
    assert sd.streams == [11, 12, 13, 14]  # set before every execute
    assert all(g.handle is fa.handle for g in sd.graphs)
    fa.close()
    assert not fa.handle and not sd.graphs[0].handle.alive


def test_deterministic_backward_is_requested():
    assert "use_deterministic_algorithm" in parameter_names(
        cudnn._pybind_module.backend_graph.sdpa_backward.__doc__, "sdpa_backward")
    sd, fa, _ = make()
    assert fa.deterministic
    qkv, dout = inputs(11)
    run(fa, qkv, dout, None)
    fwd, bwd = (g.node[1] for g in sd.graphs)
    assert bwd["use_deterministic_algorithm"] is True and "use_deterministic_algorithm" not in fwd
    for params in (fwd, bwd):  # causal top-left, 1/sqrt(hs)
        assert params["diagonal_alignment"] == cudnn.diagonal_alignment.TOP_LEFT
        assert params["diagonal_band_right_bound"] == 0
        assert params["attn_scale"] == pytest.approx(1 / math.sqrt(C // NH))
    assert fwd["generate_stats"] is True


def test_cudnn_views_point_into_crystal_buffers():
    sd, fa, _ = make()
    qkv, dout = inputs(12)
    out, stats, dqkv = run(fa, qkv, dout, None)
    hs = C // NH
    qkv_view = ((B, NH, T, hs), (T * 3 * C, hs, 3 * C, 1))
    y_view = ((B, NH, T, hs), (T * C, hs, C, 1))
    stats_view = ((B, NH, T, 1), (NH * T, T, 1, 1))
    base, dbase = qkv.ctypes.data, dqkv.ctypes.data
    fwd, bwd = sd.executions
    assert fwd == {"q": (base, *qkv_view), "k": (base + 2 * C, *qkv_view), "v": (base + 4 * C, *qkv_view),
                   "O": (out.ctypes.data, *y_view), "Stats": (stats.ctypes.data, *stats_view)}
    assert bwd == {"q": (base, *qkv_view), "k": (base + 2 * C, *qkv_view), "v": (base + 4 * C, *qkv_view),
                   "o": (out.ctypes.data, *y_view), "dO": (dout.ctypes.data, *y_view),
                   "stats": (stats.ctypes.data, *stats_view), "dQ": (dbase, *qkv_view),
                   "dK": (dbase + 2 * C, *qkv_view), "dV": (dbase + 4 * C, *qkv_view)}
    # element (b, h, t, d) of the K view is qkv[b, t, C + h*hs + d]
    k = cudnn_standin.memory(base + 2 * C, *qkv_view, BF16)
    assert np.array_equal(k[1, 2, 5], qkv[1, 5, C + 2 * hs:C + 3 * hs])


# --- the workspace and captures: what the frontend does with execute's arguments ---

def test_a_graph_that_needs_no_workspace_is_given_a_null_pointer():
    sd, fa, alloc = make()
    qkv, _ = inputs(20)
    out, stats, _ = buffers()
    fa.forward(out, stats, qkv, NH)  # the frontend refuses None: it has no __dlpack__
    assert sd.graphs[0].get_workspace_size() == 0 and alloc.sizes == []
    assert rel_err(out, reference(qkv, NH)[0]) <= 1e-2


def test_the_workspace_reaches_cudnn_as_an_address_so_the_legacy_stream_never_waits():
    sd, fa, _ = make(stream=lambda: 7)
    qkv, dout = inputs(21)
    out, stats, eager = run(fa, qkv, dout, None)
    assert sd.graphs[1].get_workspace_size() > 0
    assert sd.device.legacy_waits == 0  # an array would be exported by __dlpack__() without a stream
    dqkv = np.zeros_like(eager)
    record = sd.device.captured(7, lambda: fa.backward(dqkv, dout, qkv, out, stats, NH))
    assert not dqkv.any()  # captured, not run
    replay(record)
    assert dqkv.tobytes() == eager.tobytes()


def test_a_captured_graph_keeps_its_workspace_when_a_larger_graph_is_built():
    sd, fa, alloc = make(stream=lambda: 7)
    small_qkv, small_dout = inputs(22, 1, 8, C)
    out, stats, eager = buffers(1, 8)
    fa.forward(out, stats, small_qkv, NH)
    fa.backward(eager, small_dout, small_qkv, out, stats, NH)
    dqkv = np.zeros_like(eager)
    record = sd.device.captured(7, lambda: fa.backward(dqkv, small_dout, small_qkv, out, stats, NH))
    run(fa, *inputs(23), None)  # a larger backward: a larger workspace
    assert alloc.sizes[0] < alloc.sizes[1]
    replay(record)  # the captured graph still points at the first workspace
    assert dqkv.tobytes() == eager.tobytes()


# --- the stand-in refuses what the frontend and CUDA refuse ---

@pytest.fixture
def built():
    """A stand-in that ran one forward and one backward on stream 7, and that backward's pack
    (its buffers held until the test ends)."""
    def make_built(stream=7):
        sd, fa, _ = make(stream=lambda: stream)
        qkv, dout = inputs(24)
        held.append((qkv, dout, *run(fa, qkv, dout, None)))
        g = sd.graphs[1]
        tensors = dict(g.spec["inputs"], **g.spec["outputs"])
        pack = {t: sd.executions[-1][name][0] for name, t in tensors.items()}
        return sd, g, pack

    held = []
    return make_built


def test_standin_refuses_none_as_the_workspace_as_the_frontend_does(built):
    sd, g, pack = built()
    with pytest.raises(ValueError, match="__dlpack__"):
        g.execute(pack, None, handle=g.handle)


def test_standin_refuses_a_null_workspace_for_a_graph_that_needs_one(built):
    sd, g, pack = built()
    with pytest.raises(ValueError, match="workspace bytes"):
        g.execute(pack, 0, handle=g.handle)


def test_standin_exports_an_array_through_dlpack_without_a_stream_so_the_legacy_stream_waits(built):
    sd, g, pack = built()
    workspace = np.zeros(g.get_workspace_size(), np.uint8)
    g.execute(pack, workspace, handle=g.handle)
    assert sd.device.legacy_waits == 1
    with pytest.raises(StreamCaptureError, match="legacy stream wait"):
        sd.device.captured(7, lambda: g.execute(pack, workspace, handle=g.handle))


def test_standin_refuses_a_graph_run_on_another_stream_than_the_one_captured(built):
    sd, g, pack = built(stream=8)
    workspace = np.zeros(g.get_workspace_size(), np.uint8)
    with pytest.raises(StreamCaptureError, match="stream 8 while this thread captures stream 7"):
        sd.device.captured(7, lambda: g.execute(pack, int(workspace.ctypes.data), handle=g.handle))


def test_standin_refuses_to_replay_a_graph_into_memory_freed_since_the_capture(built):
    sd, g, pack = built()
    workspace = np.zeros(g.get_workspace_size(), np.uint8)
    sd.device.register(workspace)
    record = sd.device.captured(7, lambda: g.execute(pack, int(workspace.ctypes.data), handle=g.handle))
    replay(record)
    del workspace
    with pytest.raises(StreamCaptureError, match="freed since the capture"):
        replay(record)


def test_standin_device_refuses_to_capture_the_legacy_stream():
    sd, _, _ = make()
    for legacy in (0, 1, 2):
        with pytest.raises(StreamCaptureError, match="cudaErrorStreamCaptureUnsupported"):
            sd.device.begin_capture(legacy, [])


# --- errors and availability ---

def test_unsupported_head_dim_is_a_flash_attention_error():
    sd, fa, _ = make()
    qkv, _ = inputs(13, c=36)  # hs = 12: cuDNN wants a multiple of 8
    out, stats, _ = buffers(c=36)
    with pytest.raises(FlashAttentionError) as e:
        fa.forward(out, stats, qkv, NH)
    assert "hs=12" in str(e.value) and "\n" not in str(e.value)
    sd, fa, _ = make(max_backward_head_dim=8)  # e.g. an architecture with a smaller backward limit
    qkv, dout = inputs(14)
    with pytest.raises(FlashAttentionError, match="backward"):
        run(fa, qkv, dout, None)


def test_bad_buffers_are_refused():
    sd, fa, _ = make()
    qkv, _ = inputs(15)
    out, stats, _ = buffers()
    with pytest.raises(ValueError, match="stats"):
        fa.forward(out, stats.astype(np.float64), qkv, NH)
    with pytest.raises(ValueError, match="qkv"):
        fa.forward(out, stats, qkv[:, :, :-1], NH)
    with pytest.raises(ValueError, match="dropout probability"):
        fa.forward(out, stats, qkv, NH, dropout=(1.0, 0, 0))


def test_standin_checks_calls_against_the_real_frontend():
    sd = CudnnStandIn()
    g = sd.pygraph(io_data_type=cudnn.data_type.BFLOAT16, handle=sd.create_handle())
    q = g.tensor(name="Q", dim=[1, 1, 8, 8], stride=[64, 64, 8, 1], data_type=cudnn.data_type.BFLOAT16)
    with pytest.raises(TypeError, match="causal"):
        g.sdpa(q=q, k=q, v=q, causal=True)  # not a keyword of the real sdpa
    with pytest.raises(TypeError, match="'dim'"):
        g.tensor(dims=[1], stride=[1])
    with pytest.raises(TypeError, match="'dims'"):  # pygraph.tensor takes **kwargs: they must fit what it feeds
        g.tensor(dim=[1], stride=[1], dims=[1])
    with pytest.raises(TypeError, match="use_deterministic"):
        g.sdpa(q=q, k=q, v=q, use_deterministic_algorithm=True)  # a backward-only keyword
    with pytest.raises(TypeError):
        sd.set_stream(sd.create_handle(), 0, 1)
    with pytest.raises(TypeError, match="data_type"):
        g.tensor(dim=[1], stride=[1], data_type="bf16")  # not a real cudnn.data_type member
    # the stand-in's pygraph documents sdpa with the real binding's signature lines
    assert parameter_names(sd.pygraph.sdpa_backward.__doc__, "sdpa_backward") == parameter_names(
        cudnn._pybind_module.backend_graph.sdpa_backward.__doc__, "sdpa_backward")


def test_unavailable_reason():
    assert unavailable_reason(CudnnStandIn()) is None
    try:
        cudnn.backend_version()
        loadable = True
    except Exception:
        loadable = False
    if not loadable:  # this machine: the frontend is installed, libcudnn is not
        reason = unavailable_reason()
        assert reason and "\n" not in reason and "libcudnn" in reason

    def failing():
        raise RuntimeError("Unable to find symbol cudnnGetVersion\nmore")

    reason = unavailable_reason(types.SimpleNamespace(backend_version=failing))
    assert reason.startswith("the cuDNN library (libcudnn) is not loadable") and "\n" not in reason
    reason = unavailable_reason(types.SimpleNamespace(backend_version=lambda: 8906))
    assert "8.9.6 is too old" in reason and "9.0.0" in reason
    assert unavailable_reason(CudnnStandIn(backend_version=90100)) is None
