"""cuDNN fused flash attention (forward and backward) for the cuda backend's bf16 mode.

Causal self-attention of GPT-2 and Llama through nvidia-cudnn-frontend's Python graph API, the way
llm.c's llmc/cudnn_att.cpp does it in C++: one `sdpa` graph for the forward, one `sdpa_backward`
graph for the backward, each built once per shape and cached, executed on the calling thread's
stream. Grouped-query attention (Llama: KV < NH key/value heads, query head h reading kv head
h // (NH/KV)) is the frontend's own: K, V (and dK, dV) are declared with KV heads.

    S = (Q K^T) / sqrt(hs), causal (column j > row i masked), P = softmax(S), y = P V
    stats[b, h, i] = logsumexp_j S[b, h, i, j]   (natural log, float32; the only thing saved)
    backward recomputes P = exp(S - stats); D_i = rowsum(dO * O); dS = P * (dP - D)

No [B, NH, T, T] tensor exists anywhere. cuDNN reads q, k, v straight out of crystal's qkv buffer
and writes y straight into its [B, T, C] layout through strided views (no permute kernels):

    qkv [B, T, W], W = (NH + 2 KV) hs: q head h = columns h*hs ... + hs of each row, k head h
      NH*hs + h*hs ..., v head h (NH + KV)*hs + h*hs ...  (GPT-2: KV = NH, W = 3C)
      -> Q dims (B, NH, T, hs), K and V dims (B, KV, T, hs), strides (T*W, hs, W, 1),
         element offsets 0, NH*hs, (NH + KV)*hs
    out / dout [B, T, C], C = NH hs -> dims (B, NH, T, hs), strides (T*C, hs, C, 1)
    stats [B, NH, T]    -> dims (B, NH, T, 1),  strides (NH*T, T, 1, 1), float32
    dqkv: the same views as qkv

Arrays are bf16: cupy uint16 storage on a GPU, ml_dtypes.bfloat16 numpy arrays under emulation
(tests/cudnn_standin.py executes the same graphs on host memory). cuDNN only sees raw pointers
(`x.data.ptr` for cupy, `x.ctypes.data` for numpy), the workspace's included (0 when a graph needs
none), and the dims/strides declared in the graph: the frontend (python/cudnn/__init__.py
`_library_device_pointer`, pygraph.cpp `extract_data_pointer`) takes an int as the address and
calls `__dlpack__()` without a stream on anything else, which refuses None and, for a cupy
array, makes the legacy stream wait on the sphere's stream (cupy's core.pyx): a broken capture.

Dropout on the attention probabilities is cuDNN's own Philox generator: (p, seed, offset) with
seed and offset int64 pass-by-value tensors read from host memory at execute (the frontend's
Attention.md lists Seed/Offset as "CPU or GPU, INT32 or INT64, (1,1,1,1)"); the backward, given the
same triple, regenerates the same mask. The backward asks for cuDNN's deterministic algorithm when
the installed frontend's `sdpa_backward` takes `use_deterministic_algorithm` (read from the
binding's own signature line, since its Python wrapper captures keywords generically).
"""

from __future__ import annotations

import math
import re

import numpy as np

MIN_BACKEND_VERSION = 90000  # cuDNN 9.0.0 (cuDNN 9 encodes major*10000 + minor*100 + patch)


class FlashAttentionError(RuntimeError):
    """cuDNN cannot build or run a flash-attention graph for this shape (one line)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _version_string(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def unavailable_reason(cudnn=None) -> str | None:
    """Why cuDNN flash attention cannot run here (one line: frontend not installed, backend
    library not loadable / too old), or None. `cudnn`: the module to ask (default: import it)."""
    if cudnn is None:
        try:
            import cudnn
        except ImportError:
            return "the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend)"
        except Exception as e:  # a broken install
            return f"the cuDNN frontend failed to import ({type(e).__name__}: {_first_line(e)})"
    try:
        version = int(cudnn.backend_version())
    except Exception as e:  # the frontend dlopens libcudnn lazily: a missing library surfaces here
        return (f"the cuDNN library (libcudnn) is not loadable ({_first_line(e)}; "
                f"pip install nvidia-cudnn-cu12 or -cu13, matching CUDA)")
    if version < MIN_BACKEND_VERSION:
        return (f"cuDNN {_version_string(version)} is too old for fused flash attention "
                f"(needs {_version_string(MIN_BACKEND_VERSION)} or newer)")
    return None


# --- what the installed frontend accepts, from its own signature lines ---

def _binding(cudnn, op: str):
    """The callable whose docstring lists `op`'s parameters: the compiled graph binding (frontend
    1.2x+: `cudnn.pygraph` is a Python class that forwards sdpa keywords there unchanged), else
    `cudnn.pygraph`'s own method (older frontends, where pygraph is the binding)."""
    compiled = getattr(getattr(cudnn, "_pybind_module", None), "backend_graph", None)
    for owner in (compiled, getattr(cudnn, "pygraph", None)):
        fn = getattr(owner, op, None)
        if fn is not None and _signature_lines(fn.__doc__ or "", op):
            return fn
    return None


def _signature_lines(doc: str, op: str) -> list[str]:
    """The `op(...)` signature lines a pybind11/nanobind docstring starts with (one per overload)."""
    pattern = re.compile(rf"^\s*(?:\d+\.\s*)?{re.escape(op)}\((.*)\)(?:\s*->.*)?$")
    return [m.group(1) for line in doc.splitlines() if (m := pattern.match(line)) and m.group(1) != "*args, **kwargs"]


def split_parameters(text: str, sep: str = ",") -> list[str]:
    """Split a signature's parameter list at top-level `sep` (types nest [], (), {} and quotes)."""
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def parameter_names(doc: str, op: str) -> set[str]:
    """Every keyword any overload of `op` accepts, read from its docstring's signature lines."""
    names = set()
    for params in _signature_lines(doc, op):
        for p in split_parameters(params):
            name = re.split(r"[:=]", p, maxsplit=1)[0].strip()
            if name.isidentifier() and name != "self":
                names.add(name)
    return names


def _accepted(cudnn, op: str) -> set[str]:
    fn = _binding(cudnn, op)
    return parameter_names(fn.__doc__, op) if fn is not None else set()


# --- crystal buffers as raw pointers ---

def _pointer(x) -> int:
    """Device address of a cupy array, host address of a numpy one."""
    return int(x.ctypes.data) if isinstance(x, np.ndarray) else int(x.data.ptr)


def _check(x, name: str, shape: tuple, itemsize: int) -> None:
    if tuple(x.shape) != shape or x.dtype.itemsize != itemsize:
        raise ValueError(f"flash attention: {name} must be {shape} with {itemsize}-byte elements, "
                         f"got {tuple(x.shape)} {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"flash attention: {name} must be C-contiguous")


def _int64(x: int) -> int:
    """A seed/offset as the int64 cuDNN reads (two's complement for values in [2^63, 2^64))."""
    x = int(x)
    if not -(1 << 63) <= x < (1 << 64):
        raise ValueError(f"flash attention: dropout seed/offset {x} does not fit in 64 bits")
    return x - (1 << 64) if x >= (1 << 63) else x


class _Graph:
    """One built graph, its tensors (variant-pack keys), its workspace need and the workspace it
    runs in: held as long as the graph is, since a CUDA graph captured with it keeps its address."""

    def __init__(self, graph, tensors: dict, workspace: int):
        self.graph, self.tensors, self.workspace = graph, tensors, workspace
        self.buffer = None  # the workspace array (None when the graph needs none)
        self.workspace_ptr = 0  # its address, what execute is given


class FlashAttention:
    """cuDNN fused attention for one sphere thread: one cuDNN handle on the thread's stream, graphs
    built once per shape and cached, a workspace grown to the largest a graph needs. A graph runs
    in the workspace current when it was built and holds it: a CUDA graph captured from it keeps
    that address, so a larger workspace made later never frees it under the capture.

    cudnn: the cudnn module or the stand-in; alloc(nbytes) -> a 1-D uint8 device array (cupy on a
    GPU, numpy under emulation); stream(): the current stream handle (an int).
    `deterministic`: whether the backward asked for cuDNN's deterministic algorithm (the installed
    frontend's sdpa_backward accepts `use_deterministic_algorithm`)."""

    def __init__(self, cudnn, alloc, stream=lambda: 0):
        self.cudnn = cudnn
        self._alloc = alloc
        self._stream = stream
        self.handle = cudnn.create_handle()
        self._graphs: dict[tuple, _Graph] = {}
        self._workspace = None  # uint8 device array, grown to the largest graph's need
        self._workspace_bytes = 0
        # dropout seed and offset, pass-by-value int64 read from here when a graph executes
        self._rng = np.zeros(2, dtype=np.int64)
        self._fwd_params = _accepted(cudnn, "sdpa")
        bwd_params = _accepted(cudnn, "sdpa_backward")
        self.deterministic = "use_deterministic_algorithm" in bwd_params
        self._bwd_params = bwd_params

    # --- public ---
    def forward(self, out, stats, qkv, n_head, dropout=None, n_kv_head=None) -> None:
        """out[B,T,C] (bf16) = causal attention of qkv[B,T,(NH+2KV)hs] (bf16, C = NH hs, KV =
        n_kv_head or NH); stats[B,NH,T] (fp32) = the rows' logsumexp of the scaled masked scores.
        dropout: None or (p, seed, offset)."""
        KV = n_head if n_kv_head is None else n_kv_head
        B, T, C, hs = self._shape(qkv, n_head, KV)
        _check(out, "out", (B, T, C), 2)
        _check(stats, "stats", (B, n_head, T), 4)
        p = self._probability(dropout)
        g = self._graph("fwd", B, T, n_head, KV, hs, p)
        q = _pointer(qkv)
        pack = {"Q": q, **self._kv(q, "K", "V", C, KV * hs), "O": _pointer(out), "Stats": _pointer(stats)}
        self._execute(g, pack, dropout if p else None)

    def backward(self, dqkv, dout, qkv, out, stats, n_head, dropout=None, n_kv_head=None) -> None:
        """dqkv (qkv's shape, bf16, written) = the gradient of the forward through qkv, from
        dout[B,T,C], the forward's qkv, out and stats, and the same dropout triple (dK, dV of a kv
        head: the sum over its query heads, cuDNN's)."""
        KV = n_head if n_kv_head is None else n_kv_head
        B, T, C, hs = self._shape(qkv, n_head, KV)
        _check(dqkv, "dqkv", tuple(qkv.shape), 2)
        _check(dout, "dout", (B, T, C), 2)
        _check(out, "out", (B, T, C), 2)
        _check(stats, "stats", (B, n_head, T), 4)
        p = self._probability(dropout)
        g = self._graph("bwd", B, T, n_head, KV, hs, p)
        q, dq = _pointer(qkv), _pointer(dqkv)
        pack = {"Q": q, **self._kv(q, "K", "V", C, KV * hs), "O": _pointer(out), "dO": _pointer(dout),
                "Stats": _pointer(stats), "dQ": dq, **self._kv(dq, "dK", "dV", C, KV * hs)}
        self._execute(g, pack, dropout if p else None)

    @staticmethod
    def _kv(base: int, k: str, v: str, Cq: int, Ckv: int) -> dict:
        """The k and v heads' addresses in a qkv row at `base`: Cq and Cq + Ckv bf16 elements on."""
        return {k: base + 2 * Cq, v: base + 2 * (Cq + Ckv)}

    def close(self) -> None:
        """Release the cuDNN handle (graphs and workspace go with this object)."""
        destroy = getattr(self.cudnn, "destroy_handle", None)
        if destroy is not None and self.handle is not None:
            destroy(self.handle)
        self.handle = None
        self._graphs.clear()
        self._workspace, self._workspace_bytes = None, 0

    # --- internals ---
    @staticmethod
    def _shape(qkv, n_head, KV):
        """(B, T, C = NH hs, hs) of qkv[B, T, (NH + 2 KV) hs]."""
        B, T, W = qkv.shape
        hs = W // (n_head + 2 * KV)
        if KV < 1 or n_head % KV or W != (n_head + 2 * KV) * hs:
            raise ValueError(f"flash attention: qkv {tuple(qkv.shape)} is not [B, T, (NH + 2 KV) hs] "
                             f"with {n_head} query heads and {KV} key/value heads dividing them")
        _check(qkv, "qkv", (B, T, W), 2)
        return B, T, n_head * hs, hs

    @staticmethod
    def _probability(dropout) -> float:
        if dropout is None:
            return 0.0
        p = float(dropout[0])
        if not 0.0 <= p < 1.0:
            raise ValueError(f"flash attention: dropout probability {p} is not in [0, 1)")
        return p

    def _execute(self, g: _Graph, pointers: dict, dropout) -> None:
        pack = {g.tensors[name]: ptr for name, ptr in pointers.items()}
        if dropout is not None:  # pass-by-value: cuDNN reads the host int64s when the kernel launches
            self._rng[0], self._rng[1] = _int64(dropout[1]), _int64(dropout[2])
            base = int(self._rng.ctypes.data)
            pack[g.tensors["Seed"]], pack[g.tensors["Offset"]] = base, base + 8
        self.cudnn.set_stream(self.handle, self._stream())
        # the workspace as an address (0: the graph needs none). The frontend turns any other
        # object into one through __dlpack__() with no stream: None has none (ValueError), and
        # a cupy array makes the legacy stream wait on this stream (illegal inside a capture)
        g.graph.execute(pack, g.workspace_ptr, handle=self.handle)

    def _graph(self, which: str, B: int, T: int, NH: int, KV: int, hs: int, p: float) -> _Graph:
        """The cached graph for this shape (the dropout probability is a graph constant)."""
        key = (which, B, T, NH, KV, hs, p)
        g = self._graphs.get(key)
        if g is None:
            g = self._build(which, B, T, NH, KV, hs, p)
            if g.workspace > self._workspace_bytes:  # grows only: later smaller graphs share the largest
                self._workspace = self._alloc(g.workspace)
                self._workspace_bytes = g.workspace
            if g.workspace:  # the graph keeps the one it was given, even once a larger one replaces it
                g.buffer, g.workspace_ptr = self._workspace, _pointer(self._workspace)
            self._graphs[key] = g
        return g

    def _build(self, which, B, T, NH, KV, hs, p) -> _Graph:
        cudnn = self.cudnn
        C, W = NH * hs, (NH + 2 * KV) * hs
        unsupported = getattr(cudnn, "cudnnGraphNotSupportedError", RuntimeError)
        try:
            graph = cudnn.pygraph(
                io_data_type=cudnn.data_type.BFLOAT16,
                intermediate_data_type=cudnn.data_type.FLOAT,
                compute_data_type=cudnn.data_type.FLOAT,
                handle=self.handle,
            )
            bf16 = cudnn.data_type.BFLOAT16
            dims, kv_dims = [B, NH, T, hs], [B, KV, T, hs]
            qkv_stride = [T * W, hs, W, 1]  # head h of row t at t*W + h*hs (+ 0 | NH*hs | (NH+KV)*hs)
            y_stride = [T * C, hs, C, 1]  # head h of row t at t*C + h*hs
            stats_dims, stats_stride = [B, NH, T, 1], [NH * T, T, 1, 1]

            def tensor(name, stride, dtype=bf16, d=dims):
                return graph.tensor(name=name, dim=d, stride=stride, data_type=dtype)

            t = {name: tensor(name, qkv_stride, d=dims if name == "Q" else kv_dims) for name in ("Q", "K", "V")}
            options = dict(attn_scale=1.0 / math.sqrt(hs), **self._causal(which))
            if p:
                seed, offset = (graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                             data_type=cudnn.data_type.INT64, is_pass_by_value=True)
                                for name in ("Seed", "Offset"))
                t["Seed"], t["Offset"] = seed, offset
                options["dropout"] = (p, seed, offset)
            if which == "fwd":
                if "generate_stats" in self._fwd_params:
                    options["generate_stats"] = True
                else:  # frontends before generate_stats
                    options["is_inference"] = False
                o, stats = graph.sdpa(q=t["Q"], k=t["K"], v=t["V"], name="flash_attention", **options)
                o.set_output(True).set_dim(dims).set_stride(y_stride).set_data_type(bf16)
                stats.set_output(True).set_dim(stats_dims).set_stride(stats_stride).set_data_type(cudnn.data_type.FLOAT)
                t["O"], t["Stats"] = o, stats
            else:
                t["O"], t["dO"] = tensor("O", y_stride), tensor("dO", y_stride)
                t["Stats"] = tensor("Stats", stats_stride, cudnn.data_type.FLOAT, stats_dims)
                if self.deterministic:
                    options["use_deterministic_algorithm"] = True
                grads = graph.sdpa_backward(q=t["Q"], k=t["K"], v=t["V"], o=t["O"], dO=t["dO"], stats=t["Stats"],
                                            name="flash_attention_backward", **options)
                for name, g in zip(("dQ", "dK", "dV"), grads):  # written in place into dqkv
                    g.set_output(True).set_dim(dims if name == "dQ" else kv_dims).set_stride(qkv_stride)
                    g.set_data_type(bf16)
                    t[name] = g
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            workspace = int(graph.get_workspace_size())
        except (unsupported, RuntimeError, ValueError, NotImplementedError) as e:
            what = "forward" if which == "fwd" else "backward"
            drop = f", dropout {p}" if p else ""
            kv = f" KV={KV}" if KV != NH else ""
            raise FlashAttentionError(f"cuDNN flash attention {what} is not supported for B={B} T={T} NH={NH}{kv} "
                                      f"hs={hs}{drop}: {_first_line(e)}") from e
        return _Graph(graph, t, workspace)

    def _causal(self, which: str) -> dict:
        """Top-left causal mask: column j > row i is masked (the preferred diagonal-band form,
        or use_causal_mask on frontends that predate it)."""
        params = self._fwd_params if which == "fwd" else self._bwd_params
        if "diagonal_band_right_bound" in params:
            return dict(diagonal_alignment=self.cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
        return dict(use_causal_mask=True)
