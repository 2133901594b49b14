"""LoRA: low-rank adapters on the frozen projections of a trained model (Hu et al. 2021), as
Hugging Face PEFT and litgpt train them.

An adapted projection (weight W, bias b, input x) computes

    out = x W + b + s * drop(x) A^T B^T,    s = alpha / r,  A [r, in],  B [out, r]

with W and b frozen: the backward computes the input gradient through W (never dW) and the
gradients of A and B only. Hugging Face names and shapes (A `lora_A.weight` [r, in], B
`lora_B.weight` [out, r]) are the files' (`adapter_model.safetensors` is PEFT's own file);
initialization is PEFT's: A kaiming-uniform (a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in))), B zero.

The adapters are parameters of their own: one flat float32 buffer (`AdapterLayout`), the only
thing the reducer, the gradient norm, clipping, AdamW, the sharded optimizer and checkpoints
see, so their memory and traffic scale with the adapters, not the model. In the buffer each
matrix is kept transposed, A^T [in, r] and B^T [r, out] (GPT-2's Conv1D layout), so the
backend's matmul ops compute the adapter; the files hold PEFT's shapes.

Per site the ops are (the backend's dropout op with threshold 0 is a plain scale):

    forward   xd = s * drop(x)          dropout(xd, x, key, threshold, s / (1 - p))
              h  = xd A^T               matmul_forward(h, xd, A^T)     [N, r]
              out += h B^T              matmul_forward(y, h, B^T); residual_forward(out, out, y)
    backward  dB^T = h^T dout, dh = dout B          matmul_backward(dh, dB^T, -, dout, h, B^T)
              dA^T = xd^T dh,  dxd = dh A           matmul_backward(dxd, dA^T, -, dh, xd, A^T)
              dx += s * drop(dxd)                   dropout(dxd, ...) then residual_forward(dx, dx, dxd)

s is folded into the input's dropout scale, so d/dA (= xd^T dh) and d/dB (= h^T dout) carry it
exactly as s (B A x) does.

The model calls the adapters by the role of the product they sit on (crystal.model: "qkv",
"attproj", "fc", "fcproj"). A llama's q, k, v projections are one fused q|k|v product and gate,
up one gate|up product: their adapters own a block of the product's output columns, [lo, lo +
out) of a [N, W] row, so B's product runs on that column block in place (the backend's
matmul_columns_* ops: a leading dimension W, no copy of the output, its gradient or any frozen
weight; one BLAS call on the cpu, one cuBLASLt product on cuda, in every precision):

    forward   out[:, lo:lo+out] += h B^T        matmul_columns_forward(out, h, B^T, lo)
    backward  dh = dout[:, lo:lo+out] B, dB^T = h^T dout[:, lo:lo+out]
                                                matmul_columns_backward(dh, dB^T, dout, h, B^T, lo)

Dropout masks are crystal.dropout's hash of (seed, step, micro-batch, layer, site), sites
LORA_SITE + target index: bitwise the same on any sphere, rank or resume.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from crystal.config import LORA_TARGETS as TARGETS, ModelConfig, TrainConfig, lora_target_shape as target_shape, lora_targets
from crystal.dropout import Dropout
from crystal.errors import CrystalError

# ROLES: the model's product each target (crystal.config.LORA_TARGETS) sits on (crystal.model's
# hooks), in its output's column order.
ROLES = {
    "gpt2": {"c_attn": "qkv", "attn.c_proj": "attproj", "c_fc": "fc", "mlp.c_proj": "fcproj"},
    "llama": {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "attproj", "gate_proj": "fc",
              "up_proj": "fc", "down_proj": "fcproj"},
}
LORA_SITE = 8  # dropout sites LORA_SITE + target index (crystal.dropout's model sites are 0..3)
PEFT_PREFIX = "base_model.model."  # PEFT's names: the wrapped model's, under this prefix
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def target_columns(cfg: ModelConfig, target: str) -> int:
    """The first output column of a target in its role's product (a llama's k_proj starts after
    the q heads of q|k|v, up_proj after gate of gate|up; every other target is its product: 0)."""
    role = ROLES[cfg.arch][target]
    lo = 0
    for t, r in ROLES[cfg.arch].items():
        if t == target:
            return lo
        if r == role:
            lo += target_shape(cfg, t)[1]
    raise KeyError(target)


def column_targets(cfg: ModelConfig, targets) -> tuple[str, ...]:
    """The targets that are a part of a fused product (a llama's q, k, v, gate, up): their B runs
    on a column block of the product (the matmul_columns_* ops)."""
    roles = ROLES[cfg.arch]
    return tuple(t for t in targets if sum(r == roles[t] for r in roles.values()) > 1)


def check_backend(be, cfg: ModelConfig, lora: "LoraConfig") -> None:
    """CrystalError, before any pass, unless `be` can run these adapters: the cuda backend runs
    the column-block products through cuBLASLt in every precision (nvmath-python)."""
    parts = column_targets(cfg, lora.targets)
    if parts and hasattr(be, "require_lt"):
        be.require_lt(f"LoRA on {', '.join(parts)} (a part of a fused product)")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def of(cls, cfg: TrainConfig, model: ModelConfig) -> "LoraConfig | None":
        """The run's LoRA (None: --lora-r 0, full training), validated against the model."""
        if not cfg.lora_r:
            return None
        return cls(cfg.lora_r, cfg.lora("alpha"), cfg.lora("dropout"), lora_targets(cfg, model))


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # PEFT's name (adapter_model.safetensors)
    shape: tuple[int, int]  # PEFT's: A [r, in], B [out, r]
    offset: int
    stored: tuple[int, int]  # in the buffer: the transpose, A^T [in, r], B^T [r, out]
    layer: int
    target: str
    kind: str  # "A" or "B"

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def span(self) -> int:
        return self.size


def module_path(cfg: ModelConfig, layer: int, target: str) -> str:
    """The HF name of an adapted projection (its weight is this + '.weight')."""
    block = f"model.layers.{layer}." if cfg.llama else f"transformer.h.{layer}."
    return block + TARGETS[cfg.arch][target]


class AdapterLayout:
    """Names, shapes and offsets of the adapters in their flat buffer: per layer, per target (in
    TARGETS order), A then B. Shares ParamLayout's interface where checkpoints use it (specs,
    views, n_params, size, unpadded/padded, decay_ranges)."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig):
        self.config, self.lora = cfg, lora
        self.specs: list[AdapterSpec] = []
        offset, r = 0, lora.r
        for l in range(cfg.n_layer):
            for t in lora.targets:
                n_in, n_out = target_shape(cfg, t)
                path = PEFT_PREFIX + module_path(cfg, l, t)
                for kind, shape, stored in (("A", (r, n_in), (n_in, r)), ("B", (n_out, r), (r, n_out))):
                    self.specs.append(AdapterSpec(f"{path}.lora_{kind}.weight", shape, offset, stored, l, t, kind))
                    offset += r * (n_in if kind == "A" else n_out)
        self.size = self.n_params = offset
        self.by_name = {s.name: s for s in self.specs}

    def stored_views(self, flat) -> dict:
        """name -> the buffer's view in its stored (transposed) shape, no copy."""
        return {s.name: flat[s.offset:s.offset + s.size].reshape(s.stored) for s in self.specs}

    def views(self, flat) -> dict:
        """name -> PEFT-shaped view (a transposed view of the buffer, no copy)."""
        return {k: v.T for k, v in self.stored_views(flat).items()}

    def zeros(self) -> np.ndarray:
        return np.zeros(self.size, dtype=np.float32)

    def check(self, flat, what: str = "adapter buffer") -> None:
        if np.shape(flat) != (self.size,):
            raise ValueError(f"{what} has shape {list(np.shape(flat))}, the adapters need [{self.size}]")

    def unpadded(self, flat) -> np.ndarray:
        """The buffer as files hold it (no padding: itself, a host copy)."""
        return np.array(flat, dtype=np.float32)

    def padded(self, values) -> np.ndarray:
        return np.array(values, dtype=np.float32)

    def decay_ranges(self) -> np.ndarray:
        """Every adapter is a matrix: weight decay on all of it (torch's AdamW over PEFT's group)."""
        return np.array([[0, self.size, 1]], dtype=np.int64)

    def tensors(self, flat) -> "AdapterTensors":
        return AdapterTensors(self, flat)

    def state_dict(self, flat) -> dict[str, np.ndarray]:
        """PEFT's tensors (contiguous host copies)."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.views(np.asarray(flat)).items()}

    def from_state_dict(self, tensors: dict, where: str) -> np.ndarray:
        """A flat buffer from PEFT-named tensors, every name, dtype and shape checked."""
        missing, extra = self.by_name.keys() - tensors.keys(), tensors.keys() - self.by_name.keys()
        if missing or extra:
            raise CrystalError(f"{where}: adapters do not match the run's LoRA config "
                               f"(missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})")
        flat = self.zeros()
        views = self.views(flat)
        for s in self.specs:
            t = tensors[s.name]
            if t.dtype != np.float32 or t.shape != s.shape:
                raise CrystalError(f"{where}: {s.name} is {t.dtype}{list(t.shape)}, the run's LoRA needs "
                                   f"float32{list(s.shape)}")
            if not np.isfinite(t).all():
                raise CrystalError(f"{where}: {s.name} holds non-finite values (NaN or infinity)")
            views[s.name][...] = t
        return flat


class AdapterTensors:
    """Named views of an adapter buffer (the weights, or a gradient row) for the forward and
    backward: site(l, target) -> (A^T [in, r], B^T [r, out]), or None where there is no adapter."""

    def __init__(self, layout: AdapterLayout, flat):
        self.flat = flat
        views = layout.stored_views(flat)
        self._sites: dict[tuple[int, str], list] = {}
        for s in layout.specs:
            self._sites.setdefault((s.layer, s.target), []).append(views[s.name])

    def site(self, layer: int, target: str):
        return self._sites.get((layer, target))


def init_adapters(layout: AdapterLayout, seed: int) -> np.ndarray:
    """PEFT's initialization, deterministic for a seed: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming
    uniform with a = sqrt 5), drawn in PEFT's [r, in] order, site after site; B = 0."""
    rng = np.random.default_rng(seed)
    flat = layout.zeros()
    views = layout.views(flat)
    for s in layout.specs:
        if s.kind == "A":
            bound = 1.0 / math.sqrt(s.shape[1])
            views[s.name][...] = rng.uniform(-bound, bound, size=s.shape).astype(np.float32)
    return flat


# --- activations and the two passes ---------------------------------------------------------------

class LoraActivations:
    """What the adapters of one sphere's forward/backward keep, allocated once: per layer and
    target, the scaled, dropped input xd [B,T,in] and h = xd A^T [B,T,r]; scratch for the adapter's
    output and the backward (shared by the sites)."""

    def __init__(self, be, layout: AdapterLayout, B: int, T: int):
        cfg, r, act = layout.config, layout.lora.r, be.act_dtype
        shapes = [target_shape(cfg, t) for t in layout.lora.targets]
        self.xd = {(l, t): be.empty((B, T, n_in), act) for l in range(cfg.n_layer)
                   for t, (n_in, _) in zip(layout.lora.targets, shapes)}
        self.h = {key: be.empty((B, T, r), act) for key in self.xd}
        self.N = B * T
        self.config = cfg
        self.y = be.empty((B * T * max(o for _, o in shapes),), act)  # one site's output, then its dxd
        self.dxd = be.empty((B * T * max(i for i, _ in shapes),), act)
        self.dh = be.empty((B, T, r), act)

    def scratch(self, buf, width: int):
        """A [N, width] view of the front of a scratch buffer."""
        return buf[:self.N * width].reshape(self.N, width)


def lora_activation_bytes(cfg: ModelConfig, lora: LoraConfig, B: int, T: int, act_bytes: int = 4) -> int:
    """Bytes of one sphere's LoraActivations."""
    shapes = [target_shape(cfg, t) for t in lora.targets]
    per_layer = sum(i + lora.r for i, _ in shapes)
    return act_bytes * B * T * (cfg.n_layer * per_layer + max(o for _, o in shapes) + max(i for i, _ in shapes)
                                + lora.r)


class LoraPass:
    """The adapters of one forward (and backward) of one batch: their weights, a sphere's
    LoraActivations, the micro-batch's dropout (None: none, as in evaluation) and, for the
    backward, the gradient row to write (written, never accumulated, like every gradient)."""

    def __init__(self, lora: LoraConfig, weights: AdapterTensors, acts: LoraActivations,
                 drop: Dropout | None = None, grads: AdapterTensors | None = None):
        self.lora, self.w, self.a, self.drop, self.g = lora, weights, acts, drop, grads
        self._index = {t: i for i, t in enumerate(lora.targets)}
        cfg = acts.config
        self._roles: dict[str, list[tuple[str, int]]] = {}  # role -> [(target, its first column)]
        for t in lora.targets:
            self._roles.setdefault(ROLES[cfg.arch][t], []).append((t, target_columns(cfg, t)))

    def adapts(self, layer: int, role: str) -> bool:
        """Whether the product of `role` (crystal.model's hooks) at `layer` has an adapter."""
        return any(self.w.site(layer, t) is not None for t, _ in self._roles.get(role, ()))

    def _scale_args(self, layer: int, target: str) -> tuple[int, int, float]:
        """The dropout op's (key, threshold, scale): s / (1 - p) on the kept elements."""
        s = self.lora.scale
        if self.drop is None:
            return 0, 0, s  # threshold 0 keeps every element: xd = s x
        key, threshold, scale = self.drop.site(layer, LORA_SITE + self._index[target])
        return key, threshold, s * scale

    def keys(self, n_layer: int) -> list[int]:
        """Every key its dropout ops use (the cuda backend stages them with the batch)."""
        if self.drop is None:
            return [0]
        return [self.drop.key(l, LORA_SITE + i) for l in range(n_layer) for i in range(len(self.lora.targets))]

    def forward(self, be, layer: int, role: str, x, out) -> None:
        """out += s drop(x) A^T B^T for each adapter on the product of `role` (x its input, out
        its output [B,T,W]; an adapter of a part of the product adds into its columns)."""
        for target, lo in self._roles.get(role, ()):
            site = self.w.site(layer, target)
            if site is None:
                continue
            At, Bt = site
            xd, h = self.a.xd[(layer, target)], self.a.h[(layer, target)]
            be.dropout(xd, x, *self._scale_args(layer, target))
            be.matmul_forward(h, xd, At, None)
            if Bt.shape[1] == out.shape[-1]:  # the whole product's output
                y = self.a.scratch(self.a.y, Bt.shape[1]).reshape(out.shape)
                be.matmul_forward(y, h, Bt, None)
                be.residual_forward(out, out, y)
            else:  # its columns [lo, lo + out) of the fused product, in place
                be.matmul_columns_forward(out, h, Bt, lo)

    def backward(self, be, layer: int, role: str, dout, dinp) -> None:
        """dA, dB of each adapter on the product of `role` written into the gradient row; dinp +=
        their input gradients (in target order)."""
        for target, lo in self._roles.get(role, ()):
            site = self.w.site(layer, target)
            if site is None:
                continue
            At, Bt = site
            gAt, gBt = self.g.site(layer, target)
            xd, h = self.a.xd[(layer, target)], self.a.h[(layer, target)]
            if Bt.shape[1] == dout.shape[-1]:
                be.matmul_backward(self.a.dh, gBt, None, dout, h, Bt)  # dh = dout B, dB^T = h^T dout
            else:  # the same on its columns of the fused product's gradient
                be.matmul_columns_backward(self.a.dh, gBt, dout, h, Bt, lo)
            dxd = self.a.scratch(self.a.dxd, At.shape[0]).reshape(dinp.shape)
            be.matmul_backward(dxd, gAt, None, self.a.dh, xd, At)  # dxd = dh A, dA^T = xd^T dh
            be.dropout(dxd, dxd, *self._scale_args(layer, target))  # through s drop(.): the same mask
            be.residual_forward(dinp, dinp, dxd)


# --- merging, identity, PEFT's files ----------------------------------------------------------------

def merge(layout: AdapterLayout, base_layout, base: np.ndarray, adapters: np.ndarray) -> np.ndarray:
    """The base parameters with every adapter merged in, as PEFT's merge_and_unload computes it:
    delta = (B @ A) * s in float32, transposed onto a Conv1D weight (GPT-2's [in, out]), added
    to W. A new buffer of base_layout; base is unchanged."""
    merged = np.array(base, dtype=np.float32)
    weights = base_layout.views(merged)
    views = layout.views(np.asarray(adapters, dtype=np.float32))
    s = np.float32(layout.lora.scale)
    for spec in layout.specs:
        if spec.kind != "A":
            continue
        path = spec.name[len(PEFT_PREFIX):-len(".lora_A.weight")]
        A, B = views[spec.name], views[PEFT_PREFIX + path + ".lora_B.weight"]
        delta = (np.ascontiguousarray(B) @ np.ascontiguousarray(A)) * s  # [out, in]
        W = weights[path + ".weight"]
        W += delta if layout.config.llama else delta.T
    return merged


def weights_sha256(base_layout, flat) -> str:
    """sha256 of a model's parameters: each tensor's float32 bytes in the layout's (HF) order,
    without the LM head's padding, so it names the weights, not the file or the buffer."""
    digest = hashlib.sha256()
    for name, v in base_layout.views(np.asarray(flat)).items():
        digest.update(np.ascontiguousarray(v, dtype="<f4").tobytes())
    return digest.hexdigest()


def peft_config(layout: AdapterLayout, base_path: str | None) -> dict:
    """adapter_config.json: what peft.PeftModel.from_pretrained(base, DIR) reads."""
    lora, alpha = layout.lora, layout.lora.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": lora.r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
            "fan_in_fan_out": not layout.config.llama,  # GPT-2's Conv1D weights are [in, out]
            "bias": "none", "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}
