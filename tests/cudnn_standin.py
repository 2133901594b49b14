"""A numpy stand-in for the `cudnn` module (nvidia-cudnn-frontend) that runs flash-attention
graphs on host memory, so crystal.backends.cudnn_attention runs its real code path without a GPU.

    standin = CudnnStandIn()                       # needs the real frontend installed (not libcudnn)
    fa = FlashAttention(standin, lambda n: np.empty(n, np.uint8))

What it emulates: cudnn.pygraph with tensor / sdpa / sdpa_backward / validate /
build_operation_graph / create_execution_plans / check_support / build_plans / get_workspace_size /
execute, create_handle / set_stream / destroy_handle / backend_version, and the real enums
(data_type, heur_mode, diagonal_alignment, ...: the installed frontend's own objects).

Every call is first bound against the REAL installed frontend's parameter list, so a keyword the
real one does not take fails here as it would on a GPU: inspect.signature for the frontend's Python
functions, the signature lines of the compiled binding's docstring (pybind11 / nanobind give no
inspect.signature: `sdpa(self, q: ..., k: ..., ..., stats_use_log2: bool = False) -> list[...]`,
one line per overload) for the binding, and both when the Python layer forwards **kwargs to the
binding (frontend 1.2x+: pygraph.sdpa captures any keyword and hands it to
`_pybind_module.backend_graph.sdpa` when the graph is lowered).

execute() reads each tensor at the pointer the variant pack gives, through the dims/strides the
graph declared (ctypes.from_address: "device" memory is host memory here), computes in float64
from the bf16 inputs, and stores bf16 outputs rounded to nearest even (ml_dtypes), Stats in float32
as the natural-log logsumexp of the scaled masked scores. The backward is the standard flash
backward from Q, K, V, O, dO and Stats (P = exp(S - Stats), D = rowsum(dO * O) and the dQ
accumulator kept in float32 in the workspace, dS = P * (dP - D)). Grouped-query attention as the
frontend declares it: k, v (and dK, dV) with KV heads dividing q's NH, query head h reading kv head
h // (NH / KV), dK and dV of a kv head the sum over its query heads.

Buffers and the workspace reach execute() as the frontend converts them (nvidia-cudnn-frontend
python/cudnn/__init__.py `_library_device_pointer`, 1.8 to 1.23, and python/pygraph/pygraph.cpp
`extract_data_pointer`): an int is the address itself; anything else must have `__dlpack__`,
which the frontend calls WITHOUT a stream (`obj.attr("__dlpack__")()`), so None is refused
(ValueError "Object does not have the __dlpack__() method": std::invalid_argument) and an array
is exported through DLPack, which for a cupy array makes the legacy stream wait on an event of
the current stream (tests/emu/device.py `export_without_stream`: refused inside a capture).
Later frontends (1.32: python/cudnn/_pygraph.py `_normalize`) take None as "no workspace" and
read a cupy array's `.data.ptr`; the stand-in keeps the stricter rule of every frontend crystal
accepts (>= 1.8): an int address, 0 when a graph needs no workspace.
execute() issues its device work through the stand-in's `device` (tests/emu/device.py): run now,
or recorded into the capture of the handle's stream, replayed with the addresses given at capture.

Dropout is NOT cuDNN's Philox: keep (b, h, i, j) <=> u(seed, offset, b, h, i, j) >= p for a
splitmix64 hash u in [0, 1) (`dropout_keep`), kept probabilities scaled by 1 / (1 - p). Only
determinism and the algebra around the mask are meaningful under the stand-in.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import re

import ml_dtypes
import numpy as np

from crystal.backends.cudnn_attention import split_parameters
from emu.device import EmulatedDevice

BF16 = np.dtype(ml_dtypes.bfloat16)
ALIGNMENT = 16  # bytes: the address alignment assumed of the flash kernels' bf16 operands (128-bit loads)


# --- binding calls against the real frontend's parameter lists ---

_POS, _POS_KW, _KW, _VAR_POS, _VAR_KW = "positional-only", "positional-or-keyword", "keyword-only", "*args", "**kwargs"


def _has_top_level_equals(text: str) -> bool:
    return len(split_parameters(text, "=")) > 1


def doc_signatures(doc: str, name: str) -> list[list[tuple[str, str, bool]]]:
    """Each overload's parameters (name, kind, has_default) from the `name(...)` lines a compiled
    function's docstring starts with (pybind11 numbers its overloads `1. name(...)`)."""
    pattern = re.compile(rf"^\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)(?:\s*->.*)?$")
    overloads = []
    for line in (doc or "").splitlines():
        m = pattern.match(line)
        if not m or m.group(1) == "*args, **kwargs":
            continue
        params, kind = [], _POS_KW
        for p in split_parameters(m.group(1)):
            if p == "/":  # everything before is positional-only
                params = [(n, _POS if k == _POS_KW else k, d) for n, k, d in params]
                continue
            if p == "*":
                kind = _KW
                continue
            pname = re.split(r"[:=]", p, maxsplit=1)[0].strip()
            if pname.startswith("**"):
                params.append((pname[2:], _VAR_KW, False))
            elif pname.startswith("*"):
                params.append((pname[1:], _VAR_POS, False))
                kind = _KW
            else:
                params.append((pname, kind, _has_top_level_equals(p)))
        overloads.append(params)
    return overloads


def signatures(fn, name: str | None = None) -> list[list[tuple[str, str, bool]]]:
    """The overloads of a real frontend callable: inspect.signature when it has one, else the
    signature lines of its docstring. A leading `self` is dropped."""
    name = name or getattr(fn, "__name__", "")
    try:
        sig = inspect.signature(fn)
        kinds = {inspect.Parameter.POSITIONAL_ONLY: _POS, inspect.Parameter.POSITIONAL_OR_KEYWORD: _POS_KW,
                 inspect.Parameter.KEYWORD_ONLY: _KW, inspect.Parameter.VAR_POSITIONAL: _VAR_POS,
                 inspect.Parameter.VAR_KEYWORD: _VAR_KW}
        overloads = [[(p.name, kinds[p.kind], p.default is not inspect.Parameter.empty)
                      for p in sig.parameters.values()]]
    except (TypeError, ValueError):  # compiled: the docstring is the only signature there is
        overloads = doc_signatures(fn.__doc__, name)
    if not overloads:
        raise RuntimeError(f"stand-in: cannot read the real frontend's signature of {name}")
    return [o[1:] if o and o[0][0] == "self" else o for o in overloads]


def _bind_one(params, args, kwargs) -> str | None:
    """None when (args, kwargs) bind to `params`, else why not."""
    positional = [n for n, k, _ in params if k in (_POS, _POS_KW)]
    var_pos = any(k == _VAR_POS for _, k, _ in params)
    var_kw = any(k == _VAR_KW for _, k, _ in params)
    if len(args) > len(positional) and not var_pos:
        return f"takes at most {len(positional)} positional arguments, got {len(args)}"
    given = set(positional[:len(args)])
    by_name = {n: k for n, k, _ in params}
    for key in kwargs:
        if key in given:
            return f"got multiple values for {key!r}"
        if by_name.get(key) in (_POS_KW, _KW):
            given.add(key)
        elif not var_kw:
            return f"got an unexpected keyword argument {key!r}"
    missing = [n for n, k, has_default in params if k in (_POS, _POS_KW, _KW) and not has_default and n not in given]
    return f"missing required argument {missing[0]!r}" if missing else None


def bind(overloads, args, kwargs, what: str) -> None:
    """Raise TypeError, as the real frontend would, unless some overload takes (args, kwargs)."""
    reasons = [_bind_one(params, args, kwargs) for params in overloads]
    if all(reasons):
        raise TypeError(f"{what}(): {reasons[0]} (checked against the installed cudnn frontend)")


# --- host memory at device pointers ---

def _address(data, device, stream: int, what: str) -> int:
    """A variant-pack buffer or the workspace as the frontend turns it into an address: an int
    as it is, else through `__dlpack__()` with no stream (None has none: the frontend's ValueError)."""
    if type(data) is int:
        return data
    if not hasattr(data, "__dlpack__"):
        raise ValueError(f"{what}: Object does not have the __dlpack__() method")
    device.export_without_stream(stream, what)
    return int(data.ctypes.data) if isinstance(data, np.ndarray) else int(data.data.ptr)  # numpy, else cupy-like


def memory(ptr: int, dims, strides, dtype) -> np.ndarray:
    """A writable numpy view of the elements at `ptr` with element strides `strides`."""
    if not ptr:
        raise ValueError("stand-in: null pointer in the variant pack")
    dtype = np.dtype(dtype)
    span = (sum((d - 1) * s for d, s in zip(dims, strides)) + 1) * dtype.itemsize
    flat = np.frombuffer((ctypes.c_char * span).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(flat, shape=tuple(dims), strides=tuple(s * dtype.itemsize for s in strides))


# --- the stand-in dropout mask ---

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def dropout_keep(seed: int, offset: int, B: int, NH: int, T: int, p: float) -> np.ndarray:
    """bool [B, NH, T, T]: which attention probabilities the stand-in keeps (NOT cuDNN's Philox)."""
    u64 = lambda x: np.array([x], dtype=np.int64 if x < (1 << 63) else np.uint64).view(np.uint64)[0]  # noqa: E731
    b, h, i, j = (a.astype(np.uint64) for a in np.meshgrid(*(np.arange(n) for n in (B, NH, T, T)), indexing="ij"))
    with np.errstate(over="ignore"):
        z = _splitmix(u64(seed) * np.uint64(_GOLDEN) + _splitmix(u64(offset) + np.uint64(_GOLDEN)))
        for coordinate in (b, h, i, j):  # one splitmix round per coordinate
            z = _splitmix(z + (coordinate + np.uint64(1)) * np.uint64(_GOLDEN))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return u >= p


# --- module objects ---

class Handle:
    """A stand-in cuDNN handle: the stream it runs on."""

    def __init__(self):
        self.stream = 0
        self.alive = True


class Tensor:
    """A graph tensor: what cuDNN knows about a buffer (dims, strides, data type, uid)."""

    def __init__(self, owner: "CudnnStandIn", name, dim, stride, data_type, is_virtual=False,
                 is_pass_by_value=False, uid=0):
        self._owner = owner
        self.name, self.dim, self.stride, self.data_type = name, list(dim or []), list(stride or []), data_type
        self.is_virtual, self.is_pass_by_value, self.uid = is_virtual, is_pass_by_value, uid
        self.is_output = False

    def _check(self, method, args, kwargs=None):
        self._owner._check_tensor_method(method, args, kwargs or {})

    def set_output(self, value):
        self._check("set_output", (value,))
        self.is_output = bool(value)
        self.is_virtual = not value
        return self

    def set_dim(self, dim):
        self._check("set_dim", (dim,))
        self.dim = [int(d) for d in dim]
        return self

    def set_stride(self, stride):
        self._check("set_stride", (stride,))
        self.stride = [int(s) for s in stride]
        return self

    def set_data_type(self, dtype):
        self._check("set_data_type", (dtype,))
        self._owner._check_enum(dtype, "data_type")
        self.data_type = dtype
        return self

    def set_name(self, name):
        self._check("set_name", (name,))
        self.name = name
        return self

    def set_uid(self, uid):
        self._check("set_uid", (uid,))
        self.uid = int(uid)
        return self

    def get_uid(self):
        return self.uid

    def get_dim(self):
        return list(self.dim)

    def get_stride(self):
        return list(self.stride)

    def get_data_type(self):
        return self.data_type

    def __repr__(self):
        return f"Tensor({self.name!r}, dim={self.dim}, stride={self.stride}, uid={self.uid})"


_SDPA_EMULATED = {"q", "k", "v", "attn_scale", "generate_stats", "is_inference", "use_causal_mask",
                  "diagonal_alignment", "diagonal_band_right_bound", "dropout", "name", "compute_data_type",
                  "implementation"}
_SDPA_BWD_EMULATED = {"q", "k", "v", "o", "dO", "stats", "attn_scale", "use_causal_mask", "diagonal_alignment",
                      "diagonal_band_right_bound", "dropout", "use_deterministic_algorithm", "name",
                      "compute_data_type"}


class Graph:
    """cudnn.pygraph on host memory: one sdpa or sdpa_backward node, bf16 io, fp32 compute."""

    _cudnn: "CudnnStandIn"  # set on the per-stand-in subclass

    def __init__(self, *args, **kwargs):
        cd = self._cudnn
        cd._check_graph_method("__init__", args, kwargs)
        params = dict(zip(("name", "io_data_type", "intermediate_data_type", "compute_data_type", "handle"), args))
        params.update(kwargs)
        for key in ("io_data_type", "intermediate_data_type", "compute_data_type"):
            if params.get(key) is not None:
                cd._check_enum(params[key], "data_type")
        handle = params.get("handle")
        if handle is not None and not isinstance(handle, Handle):
            raise TypeError(f"stand-in pygraph: handle must come from create_handle(), got {type(handle).__name__}")
        self.handle = handle
        self.io_data_type = params.get("io_data_type")
        self.tensors: list[Tensor] = []
        self.node = None  # (op, {parameter: value}) once sdpa / sdpa_backward is called
        self.state = "building"  # -> validated -> operation_graph -> planned -> supported -> built
        self.calls: list[str] = []
        cd.graphs.append(self)

    # --- construction ---
    def _new_tensor(self, name, dim, stride, data_type, **kw):
        t = Tensor(self._cudnn, name, dim, stride, data_type, uid=len(self.tensors) + 1, **kw)
        self.tensors.append(t)
        return t

    def tensor(self, *args, **kwargs):
        cd = self._cudnn
        cd._check_graph_method("tensor", args, kwargs)
        p = dict(zip(("dim", "stride", "data_type", "is_virtual", "is_pass_by_value"), args))
        p.update(kwargs)
        dtype = p.get("data_type")
        if dtype is None or dtype == cd.data_type.NOT_SET:
            dtype = self.io_data_type
        cd._check_enum(dtype, "data_type")
        return self._new_tensor(p.get("name") or f"tensor_{len(self.tensors)}", p["dim"], p.get("stride"), dtype,
                                is_pass_by_value=bool(p.get("is_pass_by_value", False)))

    def _node(self, op, ports, args, kwargs):
        if self.node is not None:
            raise NotImplementedError("stand-in: one sdpa / sdpa_backward node per graph")
        self._cudnn._check_graph_method(op, args, kwargs)
        params = dict(zip(ports, args))
        params.update(kwargs)
        self.node = (op, params)
        return params

    def sdpa(self, *args, **kwargs):
        params = self._node("sdpa", ("q", "k", "v"), args, kwargs)
        q = params["q"]
        o = self._new_tensor("O", list(q.dim), None, self.io_data_type, is_virtual=True)
        stats_wanted = params.get("generate_stats")
        if stats_wanted is None:
            stats_wanted = params.get("is_inference") is False
        stats = None
        if stats_wanted:
            stats = self._new_tensor("Stats", list(q.dim[:3]) + [1], None, self._cudnn.data_type.FLOAT, is_virtual=True)
        params["_outputs"] = {"O": o, "Stats": stats}
        return [o, stats]

    def sdpa_backward(self, *args, **kwargs):
        params = self._node("sdpa_backward", ("q", "k", "v", "o", "dO", "stats"), args, kwargs)
        grads = {name: self._new_tensor(name, list(params[port].dim), None, self.io_data_type, is_virtual=True)
                 for name, port in (("dQ", "q"), ("dK", "k"), ("dV", "v"))}
        params["_outputs"] = grads
        return list(grads.values())

    # --- build sequence ---
    def _step(self, name, needs, becomes):
        order = ["building", "validated", "operation_graph", "planned", "supported", "built"]
        if order.index(self.state) < order.index(needs):
            raise RuntimeError(f"stand-in pygraph: {name}() before the graph is {needs}")
        self.calls.append(name)
        if order.index(becomes) > order.index(self.state):
            self.state = becomes

    def validate(self, *args, **kwargs):
        self._cudnn._check_graph_method("validate", args, kwargs)
        if self.node is None:
            raise ValueError("stand-in pygraph: the graph has no operation")
        self.spec = _validate(self._cudnn, *self.node)
        self._step("validate", "building", "validated")

    def build_operation_graph(self, *args, **kwargs):
        self._cudnn._check_graph_method("build_operation_graph", args, kwargs)
        self._step("build_operation_graph", "validated", "operation_graph")

    def create_execution_plans(self, *args, **kwargs):
        cd = self._cudnn
        cd._check_graph_method("create_execution_plans", args, kwargs)
        if "create_execution_plans" in self.calls:
            raise RuntimeError("create_execution_plans() was already called on this graph; planning is one-shot")
        modes = args[0] if args else kwargs.get("heuristics")
        for m in modes or []:
            cd._check_enum(m, "heur_mode")
        self.heuristics = list(modes or [])
        self._step("create_execution_plans", "operation_graph", "planned")

    def check_support(self, *args, **kwargs):
        cd = self._cudnn
        cd._check_graph_method("check_support", args, kwargs)
        self._step("check_support", "planned", "supported")
        hs = self.spec["hs"]
        limit = 256 if self.spec["op"] == "sdpa" else cd.max_backward_head_dim
        if hs % 8 or hs > limit:  # Attention.md: head dim a multiple of 8, at most 256 (bprop: 128 on Ampere)
            raise cd.cudnnGraphNotSupportedError(f"[stand-in] No valid engine configs for SDPA with head dim {hs}")

    def build_plans(self, *args, **kwargs):
        self._cudnn._check_graph_method("build_plans", args, kwargs)
        self._step("build_plans", "supported", "built")
        self._cudnn.plans_built += 1

    def get_workspace_size(self, *args, **kwargs):
        self._cudnn._check_graph_method("get_workspace_size", args, kwargs)
        self._step("get_workspace_size", "built", "built")
        s = self.spec
        if s["op"] == "sdpa":
            return 0
        rows = s["B"] * s["NH"] * s["T"]
        return 4 * rows + 4 * rows * s["hs"]  # D = rowsum(dO * O), then the dQ accumulator (fp32)

    def execute(self, *args, **kwargs):
        cd = self._cudnn
        cd._check_graph_method("execute", args, kwargs)
        p = dict(zip(("tensor_dict", "workspace", "handle"), args))
        p.update(kwargs)
        if self.state != "built":
            raise RuntimeError("stand-in pygraph: execute() before build_plans()")
        handle = p.get("handle")
        if not isinstance(handle, Handle) or not handle.alive:
            raise TypeError("stand-in pygraph: execute() needs a live handle from create_handle()")
        _execute(cd, self, p["tensor_dict"], p.get("workspace"), handle)


class CudnnStandIn:
    """Module-like numpy stand-in for `cudnn`; the real installed frontend supplies the enums and
    every parameter list calls are checked against.

    Records for tests: graphs (every pygraph made), plans_built (build_plans calls), executions
    (one dict per execute: tensor name -> (address, dims, strides)), streams (the handle's stream
    at each execute)."""

    def __init__(self, real=None, backend_version: int = 91300, max_backward_head_dim: int = 256, device=None):
        self.device = device or EmulatedDevice()  # streams and memory (an emulated backend sets its own)
        self._real = real = real or importlib.import_module("cudnn")
        self._version = backend_version
        self.max_backward_head_dim = max_backward_head_dim
        self.__version__ = getattr(real, "__version__", "")
        for enum in ("data_type", "heur_mode", "diagonal_alignment", "attention_implementation", "build_plan_policy"):
            if hasattr(real, enum):
                setattr(self, enum, getattr(real, enum))
        self.cudnnGraphNotSupportedError = real.cudnnGraphNotSupportedError
        self._real_tensor = getattr(real, "Tensor", None) or real.tensor
        self._compiled = getattr(getattr(real, "_pybind_module", None), "backend_graph", None)
        self._signatures: dict = {}
        # cudnn.pygraph: a class per stand-in whose sdpa / sdpa_backward carry the real binding's
        # docstrings, like the compiled pygraph of older frontends does
        members = {"_cudnn": self}
        for op in ("sdpa", "sdpa_backward"):
            members[op] = _with_doc(getattr(Graph, op), self._binding_doc(op))
        self.pygraph = type("pygraph", (Graph,), members)
        self.graphs: list[Graph] = []
        self.plans_built = 0
        self.executions: list[dict] = []
        self.streams: list[int] = []

    # --- module functions ---
    def backend_version(self, *args, **kwargs):
        self._check_module("backend_version", args, kwargs)
        return self._version

    def create_handle(self, *args, **kwargs):
        self._check_module("create_handle", args, kwargs)
        return Handle()

    def set_stream(self, *args, **kwargs):
        self._check_module("set_stream", args, kwargs)
        p = dict(zip(("handle", "stream"), args))
        p.update(kwargs)
        if not isinstance(p["handle"], Handle):
            raise TypeError(f"cudnn.set_stream expects a handle from create_handle(), got {type(p['handle']).__name__}")
        p["handle"].stream = int(p["stream"])

    def destroy_handle(self, *args, **kwargs):
        self._check_module("destroy_handle", args, kwargs)
        handle = args[0] if args else kwargs["handle"]
        handle.alive = False

    # --- checks against the real frontend ---
    def _sigs(self, key, fn, name):
        if key not in self._signatures:
            self._signatures[key] = signatures(fn, name)
        return self._signatures[key]

    def _check_module(self, name, args, kwargs):
        bind(self._sigs(("module", name), getattr(self._real, name), name), args, kwargs, f"cudnn.{name}")

    def _check_tensor_method(self, name, args, kwargs):
        bind(self._sigs(("tensor", name), getattr(self._real_tensor, name), name), args, kwargs, f"tensor.{name}")

    def _binding_doc(self, op):
        fn = getattr(self._compiled, op, None) if self._compiled is not None else None
        if fn is None or not doc_signatures(fn.__doc__, op):
            fn = getattr(self._real.pygraph, op)
        return fn.__doc__

    def _check_graph_method(self, name, args, kwargs):
        """Bind against pygraph.<name>; when that Python layer takes **kwargs and the compiled
        graph has the method too, the keywords it does not consume itself go on to the compiled
        one, so they must bind there as well."""
        real = getattr(self._real.pygraph, name)
        overloads = self._sigs(("pygraph", name), real, name)
        bind(overloads, args, kwargs, f"pygraph.{name}")
        compiled = getattr(self._compiled, name, None) if self._compiled is not None else None
        if compiled is None or compiled is real or not any(k == _VAR_KW for o in overloads for _, k, _ in o):
            return
        try:
            inner = self._sigs(("compiled", name), compiled, name)
        except RuntimeError:  # the compiled method documents no signature
            return
        own = {n for o in overloads for n, k, _ in o if k in (_POS_KW, _KW)}
        known = {n for o in inner for n, _, _ in o}
        forwarded = {k: v for k, v in kwargs.items() if k not in own or k in known}
        bind(inner, args, forwarded, f"pygraph.{name} (forwarded to the compiled graph)")

    def _check_enum(self, value, enum):
        kind = type(next(iter(getattr(self._real, enum).__members__.values())))
        if not isinstance(value, kind):
            raise TypeError(f"stand-in: expected a cudnn.{enum} member, got {value!r}")


def _with_doc(fn, doc):
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    method.__name__, method.__qualname__, method.__doc__ = fn.__name__, f"pygraph.{fn.__name__}", doc
    return method


# --- semantics ---

def _not_supported(cd, what):
    return cd.cudnnGraphNotSupportedError(f"[stand-in] {what}")


def _validate(cd, op, params) -> dict:
    """The node's shape and options, or the error the real frontend would raise for them."""
    dt = cd.data_type
    emulated = _SDPA_EMULATED if op == "sdpa" else _SDPA_BWD_EMULATED
    for key, value in params.items():
        if key.startswith("_") or key in emulated:
            continue
        if value is None or value is False or (key == "diagonal_alignment" and value == cd.diagonal_alignment.TOP_LEFT):
            continue
        raise _not_supported(cd, f"{op}: {key}={value!r} is not emulated")
    if params.get("implementation") not in (None, getattr(getattr(cd, "attention_implementation", None), "AUTO", None)):
        raise _not_supported(cd, f"{op}: implementation {params['implementation']!r} is not emulated")
    ports = ("q", "k", "v") if op == "sdpa" else ("q", "k", "v", "o", "dO", "stats")
    for port in ports:
        t = params.get(port)
        if not isinstance(t, Tensor) or t.is_virtual:
            raise ValueError(f"{op}: {port} must be a graph input tensor")
        if len(t.dim) != 4 or len(t.stride) != 4:
            raise ValueError(f"{op}: {port} needs 4 dims and 4 strides, got {t.dim} / {t.stride}")
        want = dt.FLOAT if port == "stats" else dt.BFLOAT16
        if t.data_type != want:
            raise _not_supported(cd, f"{op}: {port} is {t.data_type}, the stand-in emulates bf16 io and fp32 stats")
    B, NH, T, hs = params["q"].dim
    KV = params["k"].dim[1]  # grouped-query attention: KV heads of k and v, query head h reads h // (NH / KV)
    if KV < 1 or NH % KV:
        raise ValueError(f"{op}: k has {KV} heads, which do not divide q's {NH}")
    for port in ports[1:]:
        want = {"stats": [B, NH, T, 1], "k": [B, KV, T, hs], "v": [B, KV, T, hs]}.get(port, [B, NH, T, hs])
        if params[port].dim != want:
            raise _not_supported(cd, f"{op}: {port} dims {params[port].dim}, the stand-in emulates {want}")
    # causal: the preferred top-left band with right bound 0, or the deprecated use_causal_mask
    right = params.get("diagonal_band_right_bound")
    if right not in (None, 0):
        raise _not_supported(cd, f"{op}: diagonal_band_right_bound={right}")
    causal = right == 0 or bool(params.get("use_causal_mask"))
    if right == 0 and params.get("use_causal_mask"):
        raise ValueError(f"{op}: use_causal_mask together with the diagonal band is ill-formed")
    scale = params.get("attn_scale")
    if scale is not None and not isinstance(scale, (int, float)):
        raise _not_supported(cd, f"{op}: attn_scale as a tensor is not emulated")
    spec = dict(op=op, B=B, NH=NH, KV=KV, T=T, hs=hs, causal=causal, scale=1.0 if scale is None else float(scale),
                deterministic=bool(params.get("use_deterministic_algorithm")), dropout=None,
                inputs={port: params[port] for port in ports}, outputs=params["_outputs"])
    drop = params.get("dropout")
    if drop is not None:
        if not isinstance(drop, tuple) or len(drop) != 3 or isinstance(drop[0], Tensor):
            raise _not_supported(cd, f"{op}: only (probability, seed, offset) dropout is emulated")
        p, seed, offset = drop
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"{op}: dropout probability {p} must be in [0, 1)")
        for t in (seed, offset):
            if not isinstance(t, Tensor) or t.dim != [1, 1, 1, 1] or t.data_type not in (dt.INT64, dt.INT32):
                raise ValueError(f"{op}: dropout seed/offset must be (1,1,1,1) INT64 or INT32 tensors")
        spec["dropout"] = (float(p), seed, offset)
    if op == "sdpa":
        gen, infer = params.get("generate_stats"), params.get("is_inference")
        if gen is None and infer is None:
            raise ValueError("sdpa: one of generate_stats, is_inference must be set")
        if gen is not None and infer is not None and bool(gen) == bool(infer):
            raise ValueError("sdpa: generate_stats and is_inference contradict each other")
    for name, t in spec["outputs"].items():
        if t is None:
            continue
        if not t.is_output:
            raise ValueError(f"{op}: output {name} is not marked set_output(True)")
        want_dims = {"Stats": [B, NH, T, 1], "dK": [B, KV, T, hs], "dV": [B, KV, T, hs]}.get(name, [B, NH, T, hs])
        if t.dim != want_dims or len(t.stride) != 4:
            raise ValueError(f"{op}: output {name} needs dims {want_dims} and 4 strides, got {t.dim} / {t.stride}")
        want = dt.FLOAT if name == "Stats" else dt.BFLOAT16
        if t.data_type != want:
            raise _not_supported(cd, f"{op}: output {name} must be {want}, got {t.data_type}")
    return spec


_NUMPY = {"BFLOAT16": BF16, "FLOAT": np.dtype(np.float32), "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32)}


def _execute(cd, graph: Graph, tensor_dict, workspace, handle):
    spec = graph.spec
    by_uid = {}
    for key, data in tensor_dict.items():
        uid = key.uid if isinstance(key, Tensor) else key if isinstance(key, int) else None
        if uid is None:
            raise TypeError(f"stand-in execute: variant pack keys are graph tensors or uids, got {key!r}")
        by_uid[uid] = _address(data, cd.device, handle.stream, f"execute: tensor uid {uid}")
    ws = _address(workspace, cd.device, handle.stream, "execute: workspace")
    tensors = dict(spec["inputs"], **{k: v for k, v in spec["outputs"].items() if v is not None})
    if spec["dropout"]:
        tensors["Seed"], tensors["Offset"] = spec["dropout"][1:]
    record = {}
    for name, t in tensors.items():
        if t.uid not in by_uid:
            raise ValueError(f"the variant pack is missing a buffer for tensor uid {t.uid} ({t.name!r})")
        if t.data_type == cd.data_type.BFLOAT16 and (by_uid[t.uid] % ALIGNMENT or t.stride[-1] != 1):
            raise cd.cudnnGraphNotSupportedError(f"[stand-in] {name}: bf16 tensors need {ALIGNMENT}-byte aligned "
                                                 f"addresses and a unit innermost stride")
        record[name] = (by_uid[t.uid], tuple(t.dim), tuple(t.stride))
    need = graph.get_workspace_size()
    if need and not ws:
        raise ValueError(f"stand-in execute: the graph needs {need} workspace bytes, got a null pointer")
    if hasattr(workspace, "nbytes") and workspace.nbytes < need:
        raise ValueError(f"stand-in execute: workspace of {workspace.nbytes} bytes, the graph needs {need}")
    cd.executions.append(record)
    cd.streams.append(handle.stream)
    seed_offset = None
    if spec["dropout"]:  # pass-by-value: read from host memory now (a capture keeps these values)
        seed_offset = tuple(int(memory(by_uid[tensors[n].uid], [1], [1], _NUMPY[tensors[n].data_type.name])[0])
                            for n in ("Seed", "Offset"))
    addresses = [by_uid[t.uid] for name, t in tensors.items() if name not in ("Seed", "Offset")]
    cd.device.launch(handle.stream, f"cuDNN {spec['op']}",
                     lambda: _run(graph, tensors, by_uid, ws, seed_offset), addresses + ([ws] if need else []))


def _run(graph: Graph, tensors: dict, by_uid: dict, ws: int, seed_offset):
    """The graph's device work: read the inputs at their addresses, write the outputs."""
    spec = graph.spec

    def read(name):
        t = tensors[name]
        return np.array(memory(by_uid[t.uid], t.dim, t.stride, _NUMPY[t.data_type.name]))

    def write(name, values):
        t = tensors[name]
        dtype = _NUMPY[t.data_type.name]
        memory(by_uid[t.uid], t.dim, t.stride, dtype)[...] = values.astype(np.float32).astype(dtype)

    B, NH, T, hs, g = spec["B"], spec["NH"], spec["T"], spec["hs"], spec["NH"] // spec["KV"]
    f64 = lambda name: read(name).astype(np.float64)  # noqa: E731
    q = f64("q")
    k, v = (np.repeat(f64(name), g, axis=1) for name in ("k", "v"))  # kv head of query head h: h // g
    group_sum = lambda x: x.reshape(B, NH // g, g, T, hs).sum(axis=2)  # noqa: E731  (dK, dV of a kv head)
    s = spec["scale"] * (q @ k.swapaxes(-1, -2))  # [B, NH, T, T]
    if spec["causal"]:
        s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    z = 1.0  # dropout: kept probabilities scaled by 1 / (1 - p), the rest zero
    if spec["dropout"]:
        p = spec["dropout"][0]
        seed, offset = seed_offset
        z = dropout_keep(seed, offset, B, NH, T, p) / (1.0 - p)
    if spec["op"] == "sdpa":
        m = s.max(axis=-1, keepdims=True)
        lse = m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True))  # natural-log logsumexp per row
        write("O", (np.exp(s - lse) * z) @ v)
        if spec["outputs"]["Stats"] is not None:
            write("Stats", lse)
        return
    o, do, lse = f64("o"), f64("dO"), f64("stats")  # lse [B, NH, T, 1] from the forward
    P = np.exp(s - lse)  # recomputed probabilities
    rows = B * NH * T
    D = memory(ws, (B, NH, T, 1), (NH * T, T, 1, 1), np.float32)
    D[...] = (do * o).sum(axis=-1, keepdims=True)  # rowsum(dO * O) in fp32, as cuDNN keeps it
    dv = (P * z).swapaxes(-1, -2) @ do
    dP = (do @ v.swapaxes(-1, -2)) * z
    dS = P * (dP - D.astype(np.float64))
    dq_acc = memory(ws + 4 * rows, (B, NH, T, hs), (NH * T * hs, T * hs, hs, 1), np.float32)
    dq_acc[...] = spec["scale"] * (dS @ k)  # the fp32 dQ accumulator
    write("dQ", dq_acc.astype(np.float64))
    write("dK", group_sum(spec["scale"] * (dS.swapaxes(-1, -2) @ q)))
    write("dV", group_sum(dv))
