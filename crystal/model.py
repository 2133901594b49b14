"""GPT-2 and Llama: parameter layout in one flat buffer, activations, forward and backward.

Written once against the backend op protocol (`crystal.backends.base`), so the same code runs
on numpy (cpu) and cupy (cuda) arrays, and once for both architectures: a block is the same
sequence of steps (norm, q|k|v product, attention, projection, residual + norm, MLP, projection,
residual + norm) and `BlockOps` picks each step's op by `cfg.arch` (GPT-2's LayerNorm, Conv1D
products and GELU; llama's RMSNorm, nn.Linear products, rotary positions, grouped-query
attention and SwiGLU). Parameters and gradients each live in one flat float32 buffer;
`ParamLayout` gives the Hugging Face name (GPT-2's, or Llama's / Qwen2's), shape and offset of
every tensor, so the reducer, the optimizer, the gradient norm and a checkpoint are each one pass
over one buffer, and a checkpoint *is* an HF state dict.

The tensor the LM head reads (GPT-2's tied wte, a tied llama's embed_tokens, an untied llama's
lm_head) holds `cfg.padded_vocab_size` rows in the buffer, the
vocabulary rounded up to a multiple of 64 as llm.c pads 50257 to 50304: the products of the LM
head get aligned shapes. The padding rows are zero and stay zero: the cross-entropy ops give
their logits probability 0 and gradient 0, so the LM head writes zero gradient rows, the encoder
adds only into real tokens' rows, and AdamW of a zero weight with zero gradient and zero moments
(eps > 0) is zero, weight decay included. Every name -> tensor view (`ParamLayout.views`,
checkpoints, `GPT.params`, exports) shows the vocab_size real rows only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crystal.backends.base import AdamWScalars
from crystal.config import ModelConfig
from crystal.dropout import ATTENTION_PROBS, ATTENTION_PROJ, EMBEDDING, MLP_PROJ, Dropout
from crystal.lora import AdapterLayout, LoraActivations, LoraConfig, LoraPass, check_backend, init_adapters, merge


# --- parameter layout ------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]  # the Hugging Face tensor's
    offset: int
    stored: tuple[int, ...]  # in the buffer: shape, or the token embedding's padded [Vp, C]

    @property
    def size(self) -> int:
        """Values of the tensor (its parameters)."""
        return math.prod(self.shape)

    @property
    def span(self) -> int:
        """Values it takes in the buffer (size, plus the padding rows after the real ones)."""
        return math.prod(self.stored)

    @property
    def decay(self) -> bool:
        """Weight decay applies to 2-D tensors only (matmul weights and embeddings)."""
        return len(self.shape) == 2


def param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes, in buffer order (gpt2_shapes or llama_shapes)."""
    return llama_shapes(cfg) if cfg.llama else gpt2_shapes(cfg)


def gpt2_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF GPT-2 names and shapes. Linear weights use Conv1D layout [in, out]."""
    V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embd
    shapes = [("transformer.wte.weight", (V, C)), ("transformer.wpe.weight", (T, C))]
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        shapes += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (C, 3 * C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    return shapes


def llama_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama / Qwen2 names and shapes. Linear weights use nn.Linear layout [out, in]. Buffer
    order makes fused products possible: q, k, v weights adjacent are one [(NH+2KV) hd, C]
    matrix (and their biases one vector), gate and up adjacent one [2I, C] matrix."""
    V, C, I = cfg.vocab_size, cfg.n_embd, cfg.mlp_size
    Q, KV = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    shapes = [("model.embed_tokens.weight", (V, C))]
    for l in range(cfg.n_layer):
        p = f"model.layers.{l}."
        shapes += [(p + "input_layernorm.weight", (C,)),
                   (p + "self_attn.q_proj.weight", (Q, C)), (p + "self_attn.k_proj.weight", (KV, C)),
                   (p + "self_attn.v_proj.weight", (KV, C))]
        if cfg.attention_bias:
            shapes += [(p + "self_attn.q_proj.bias", (Q,)), (p + "self_attn.k_proj.bias", (KV,)),
                       (p + "self_attn.v_proj.bias", (KV,))]
        shapes += [(p + "self_attn.o_proj.weight", (C, Q)), (p + "post_attention_layernorm.weight", (C,)),
                   (p + "mlp.gate_proj.weight", (I, C)), (p + "mlp.up_proj.weight", (I, C)),
                   (p + "mlp.down_proj.weight", (C, I))]
    shapes += [("model.norm.weight", (C,))]
    if not cfg.tied:
        shapes += [("lm_head.weight", (V, C))]
    return shapes


WTE = "transformer.wte.weight"


def head_name(cfg: ModelConfig) -> str:
    """The tensor the LM head's product reads (held with padding rows): GPT-2's wte, a tied
    llama's embed_tokens, or an untied llama's lm_head."""
    if not cfg.llama:
        return WTE
    return "model.embed_tokens.weight" if cfg.tied else "lm_head.weight"


class ParamLayout:
    """Names, shapes and offsets of every tensor in the flat parameter buffer.

    size: the buffer's length (the LM head's padding rows included); n_params: the model's
    parameters (the Hugging Face tensors' values, what a checkpoint holds)."""

    def __init__(self, cfg: ModelConfig):
        self.config = cfg
        self.specs: list[ParamSpec] = []
        self.head = head_name(cfg)
        self.blocks = "model.layers." if cfg.llama else "transformer.h."  # the blocks' name prefix
        offset = 0
        for name, shape in param_shapes(cfg):
            stored = (cfg.padded_vocab_size, *shape[1:]) if name == self.head else shape
            spec = ParamSpec(name, shape, offset, stored)
            self.specs.append(spec)
            offset += spec.span
        self.size = offset
        self.n_params = sum(s.size for s in self.specs)
        self.by_name = {s.name: s for s in self.specs}
        head = self.by_name[self.head]
        self.padding = (head.offset + head.size, head.offset + head.span)  # [start, end) of the zero rows

    def views(self, flat) -> dict:
        """name -> view into `flat` (numpy or cupy), HF shapes (the real rows), no copies."""
        return {s.name: flat[s.offset:s.offset + s.size].reshape(s.shape) for s in self.specs}

    def zeros(self) -> np.ndarray:
        """A zero float32 buffer (host): what every parameter buffer starts from, so that its
        padding rows are zero."""
        return np.zeros(self.size, dtype=np.float32)

    def check(self, flat, what: str = "flat parameter buffer") -> None:
        """ValueError unless `flat` (host) is a buffer of this layout with zero padding rows."""
        if np.shape(flat) != (self.size,):
            raise ValueError(f"{what} has shape {list(np.shape(flat))}, the layout needs [{self.size}] "
                             f"({self.n_params} parameters and the LM head's padding)")
        lo, hi = self.padding
        if bool(flat[lo:hi].any()):
            raise ValueError(f"{what}: the LM head's padding rows {self.config.vocab_size}.."
                             f"{self.config.padded_vocab_size - 1} must be zero")

    def unpadded(self, flat: np.ndarray) -> np.ndarray:
        """The tensors' values in buffer order without the padding (a host copy): a flat
        buffer as files hold it (the AdamW moments of a checkpoint)."""
        lo, hi = self.padding
        return np.concatenate([flat[:lo], flat[hi:]])

    def padded(self, values: np.ndarray) -> np.ndarray:
        """The inverse of `unpadded`: a new buffer, zero padding rows."""
        lo, hi = self.padding
        flat = self.zeros()
        flat[:lo], flat[hi:] = values[:lo], values[lo:]
        return flat

    def decay_ranges(self) -> np.ndarray:
        """[K,3] int64 rows (start, end, decay 0/1) covering the buffer, merged where adjacent
        (the padding rows are the embedding's: decayed, and zero times the decay stays zero)."""
        rows: list[list[int]] = []
        for s in self.specs:
            if rows and rows[-1][2] == int(s.decay) and rows[-1][1] == s.offset:
                rows[-1][1] = s.offset + s.span
            else:
                rows.append([s.offset, s.offset + s.span, int(s.decay)])
        return np.array(rows, dtype=np.int64)


NORM_WEIGHTS = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight")  # GPT-2's LayerNorms; llama's RMSNorms
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")  # the products that join the residual


def init_params(cfg: ModelConfig, seed: int) -> np.ndarray:
    """GPT-2's init, for either arch: N(0, 0.02) matrices (embeddings and an untied LM head
    included), the residual projections (GPT-2's c_proj; llama's o_proj and down_proj) scaled by
    1/sqrt(2 n_layer), zero biases, norm weights (LayerNorm, RMSNorm) one. transformers inits a
    Llama with N(0, 0.02) everywhere; the residual scaling is GPT-2's (and litgpt's, nanoGPT's)
    and keeps the residual stream's variance flat in depth for a model trained from scratch.
    Deterministic for a seed, in buffer order; the LM head's padding rows zero."""
    layout = ParamLayout(cfg)
    flat = layout.zeros()
    rng = np.random.default_rng(seed)
    views = layout.views(flat)
    for s in layout.specs:
        v = views[s.name]
        if s.name.endswith(NORM_WEIGHTS):
            v[...] = 1.0
        elif len(s.shape) == 1:
            v[...] = 0.0
        else:
            std = 0.02
            if s.name.endswith(RESIDUAL_PROJECTIONS):
                std /= math.sqrt(2 * cfg.n_layer)
            v[...] = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(std)
    return flat


# --- named views: one block definition, two name sets ------------------------------------------

@dataclass
class LayerTensors:
    """One block's tensors by role. Biases and LayerNorm's b are None where the arch has none; a
    llama's qkv_w (and qkv_b) is its q, k, v projections as one matrix, fc_w its gate and up."""

    ln1_w: object
    ln1_b: object
    qkv_w: object
    qkv_b: object
    attproj_w: object
    attproj_b: object
    ln2_w: object
    ln2_b: object
    fc_w: object
    fc_b: object
    fcproj_w: object
    fcproj_b: object


# role -> the tensors behind it, adjacent in the buffer (one view); () where the arch has none
_GPT2_LAYER = {
    "ln1_w": ("ln_1.weight",), "ln1_b": ("ln_1.bias",),
    "qkv_w": ("attn.c_attn.weight",), "qkv_b": ("attn.c_attn.bias",),
    "attproj_w": ("attn.c_proj.weight",), "attproj_b": ("attn.c_proj.bias",),
    "ln2_w": ("ln_2.weight",), "ln2_b": ("ln_2.bias",),
    "fc_w": ("mlp.c_fc.weight",), "fc_b": ("mlp.c_fc.bias",),
    "fcproj_w": ("mlp.c_proj.weight",), "fcproj_b": ("mlp.c_proj.bias",),
}
_LLAMA_LAYER = {
    "ln1_w": ("input_layernorm.weight",), "ln1_b": (),
    "qkv_w": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_b": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),  # attention_bias only
    "attproj_w": ("self_attn.o_proj.weight",), "attproj_b": (),
    "ln2_w": ("post_attention_layernorm.weight",), "ln2_b": (),
    "fc_w": ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc_b": (),
    "fcproj_w": ("mlp.down_proj.weight",), "fcproj_b": (),
}


def _joined(layout: ParamLayout, flat, names: list[str]):
    """One view of tensors adjacent in the buffer, stacked on their first axis (q|k|v, gate|up);
    None for no tensors."""
    if not names:
        return None
    specs = [layout.by_name[n] for n in names]
    for a, b in zip(specs, specs[1:]):
        assert a.offset + a.span == b.offset, f"{a.name} and {b.name} are not adjacent in the buffer"
    lo, hi = specs[0].offset, specs[-1].offset + specs[-1].span
    return flat[lo:hi].reshape(sum(s.shape[0] for s in specs), *specs[0].shape[1:])


class Tensors:
    """Named views of a flat buffer (parameters or their gradients) for forward/backward.

    wte: the token embedding the encoder reads (GPT-2's, a tied llama's: [Vp, C] with the
    padding rows; an untied llama's: [V, C]); head: the tensor the LM head reads ([Vp, C]: wte
    when tied); wpe: GPT-2's position embedding (None for llama). be (the weights, llama): the
    rotary table goes onto this backend once, as cos, sin [block_size, hd/2] (crystal.rope)."""

    def __init__(self, layout: ParamLayout, flat, be=None):
        cfg = layout.config
        v = layout.views(flat)
        self.flat = flat
        head = layout.by_name[layout.head]
        self.head = flat[head.offset:head.offset + head.span].reshape(head.stored)  # [Vp, C]: padding rows too
        self.cos = self.sin = None
        if cfg.llama:
            self.wte = self.head if cfg.tied else v["model.embed_tokens.weight"]
            self.wpe, self.lnf_w, self.lnf_b = None, v["model.norm.weight"], None
            prefix, roles = "model.layers.{}.", _LLAMA_LAYER
            if be is not None:
                from crystal.rope import rope_table

                self.cos, self.sin = (be.to_device(t) for t in rope_table(cfg))
        else:
            self.wte = self.head
            self.wpe = v["transformer.wpe.weight"]
            self.lnf_w, self.lnf_b = v["transformer.ln_f.weight"], v["transformer.ln_f.bias"]
            prefix, roles = "transformer.h.{}.", _GPT2_LAYER
        self.layers = [
            LayerTensors(**{role: _joined(layout, flat, [prefix.format(l) + n for n in names
                                                        if prefix.format(l) + n in layout.by_name])
                            for role, names in roles.items()})
            for l in range(cfg.n_layer)
        ]


# --- activations -----------------------------------------------------------------------------

class Activations:
    """Every buffer one forward/backward of a [B,T] batch needs, allocated once, by role (the
    arch's only: a llama has no norm means). Activations and their gradients are in the
    backend's act_dtype (float32, or bf16 under --precision bf16); norm statistics and the
    per-token losses are always float32.

      qkv      [B,T,qkv_size]   q|k|v heads (GPT-2: 3C; llama: (NH + 2 KV) hd, q and k rotated)
      atty     [B,T,NH hd]      the attention's output, before its projection
      fch      [B,T,4C | 2I]    the MLP's first product (GPT-2: before GELU; llama: gate|up)
      fch_act  [B,T,4C | I]     GELU(fch) | SwiGLU(gate, up), the input of the MLP's projection

    lora: a crystal.lora.AdapterLayout: the adapters' activations too (`self.lora`)."""

    def __init__(self, be, cfg: ModelConfig, B: int, T: int, lora=None):
        C, L, NH, V = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.padded_vocab_size
        H, QKV, M = NH * cfg.head_size, cfg.qkv_size, cfg.mlp_size
        up = 2 * M if cfg.llama else M  # gate|up, or c_fc's
        self.B, self.T = B, T
        act, f32 = be.act_dtype, np.float32
        att_shape, att_dtype = be.attention_saved(B, NH, T, cfg.head_size)

        def per_layer(shape, dtype=act):
            return [be.empty(shape, dtype) for _ in range(L)]

        def means():  # LayerNorm's mean (GPT-2); RMSNorm saves none
            return [None] * L if cfg.llama else per_layer((B, T), f32)

        self.encoded = be.empty((B, T, C), act)
        self.ln1 = per_layer((B, T, C))
        self.ln1_mean, self.ln1_rstd = means(), per_layer((B, T), f32)
        self.qkv = per_layer((B, T, QKV))
        self.att = per_layer(att_shape, att_dtype)
        self.atty = per_layer((B, T, H))
        self.attproj = per_layer((B, T, C))
        self.res2 = per_layer((B, T, C))
        self.ln2 = per_layer((B, T, C))
        self.ln2_mean, self.ln2_rstd = means(), per_layer((B, T), f32)
        self.fch = per_layer((B, T, up))
        self.fch_act = per_layer((B, T, M))
        self.fcproj = per_layer((B, T, C))
        self.res3 = per_layer((B, T, C))
        self.lnf, self.lnf_rstd = be.empty((B, T, C), act), be.empty((B, T), f32)
        self.lnf_mean = None if cfg.llama else be.empty((B, T), f32)
        # [B,T,Vp]: softmax probs after a forward with targets, then dlogits (0 in the padding columns)
        self.logits = be.empty((B, T, V), act)
        self.losses = be.empty((B, T), f32)
        # backward scratch, reused by every layer
        self.dres = be.empty((B, T, C), act)  # gradient of the residual stream
        self.dln = be.empty((B, T, C), act)
        self.datty = be.empty((B, T, H), act)
        self.dqkv = be.empty((B, T, QKV), act)
        self.dfch = be.empty((B, T, up), act)
        # d fch_act: GPT-2's GELU backward runs in place in dfch; SwiGLU's reads it beside dfch
        self.dfch_act = be.empty((B, T, M), act) if cfg.llama else self.dfch
        self.lora = None
        if lora is not None:
            self.lora = LoraActivations(be, lora, B, T)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in products) + 12 n_layer T NH hd (the PaLM
    convention; attention over full T x T; the model's FLOPs: the LM head's padding rows are not
    counted). Parameters in products: all but the tables that are only looked up, GPT-2's
    position embedding and an untied llama's token embedding (a tied one is the LM head's
    product, counted once). GQA's smaller k/v products count through their parameters."""
    lookup = (0 if cfg.tied else cfg.vocab_size * cfg.n_embd) if cfg.llama else cfg.block_size * cfg.n_embd
    return 6 * (ParamLayout(cfg).n_params - lookup) + 12 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_size


def linear_products(cfg: ModelConfig, rows: int) -> tuple[tuple[int, int, int, bool], ...]:
    """(rows, in, out, True) of every product of a llama micro-batch of `rows` tokens: q|k|v,
    o_proj, gate|up, down_proj and the LM head, all nn.Linear x @ w.T (True: the orientation of
    the cpu's lm_head_* ops, which its linear_* products are), for
    crystal.backends.cpu.blas_threads_agree (GPT-2's: crystal.backends.cpu.product_shapes)."""
    C, H, M = cfg.n_embd, cfg.n_head * cfg.head_size, cfg.mlp_size
    return ((rows, C, cfg.qkv_size, True), (rows, H, C, True), (rows, C, 2 * M, True), (rows, M, C, True),
            (rows, C, cfg.padded_vocab_size, True))


class _ShapeOnly:
    """A backend stand-in whose buffers take no memory: for counting Activations' bytes.
    bf16: 2-byte activations; flash: attention saves [B,NH,T] statistics, not [B,NH,T,T]."""

    name = "shape-only"

    def __init__(self, bf16: bool = False, flash: bool = False):
        self.act_dtype = np.float16 if bf16 else np.float32  # float16: any 2-byte type counts alike
        self.flash = flash

    def empty(self, shape, dtype=np.float32):
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)

    def attention_saved(self, B, n_head, T, head_size):
        return ((B, n_head, T), np.float32) if self.flash else ((B, n_head, T, T), self.act_dtype)


def activation_bytes(cfg: ModelConfig, B: int, T: int, precision: str = "fp32", flash: bool = False) -> int:
    """Bytes of one sphere's Activations for [B, T] batches (each buffer once), plus per-sphere
    attention scratch: one head's [T,T] score gradients and dropped probabilities on the cpu
    (fp32/tf32), the [B,NH,T,T] score gradients of the cuBLAS attention path in bf16, nothing
    with flash attention."""
    bf16 = precision == "bf16"
    acts = Activations(_ShapeOnly(bf16, flash and bf16), cfg, B, T)
    total, seen = 0, set()
    for v in vars(acts).values():
        for x in (v if isinstance(v, list) else [v]):
            if hasattr(x, "shape") and id(x) not in seen:
                seen.add(id(x))
                total += math.prod(x.shape) * x.dtype.itemsize
    if not bf16:
        return total + 4 * 2 * T * T
    return total + (0 if flash else 2 * B * cfg.n_head * T * T)


# --- the block's ops, GPT-2's and llama's side by side ------------------------------------------

class BlockOps:
    """The backend ops each step of a block maps to, chosen by the arch:

                  GPT-2                                  llama
      norm        LayerNorm (w, b; saves mean, rstd)     RMSNorm (w; saves rstd)
      product     Conv1D: x @ w[in, out] + b             nn.Linear: x @ w[out, in].T (+ b)
      positions   learned wpe, added by the encoder      rotary, on q and k after the q|k|v product
      attention   n_head heads of q, k and v             grouped-query: n_kv_head heads of k and v
      mlp         gelu(x @ c_fc)                         silu(x @ gate) * (x @ up), one gate|up product

    GPT-2's calls are exactly the ops' GPT-2 calls (no llama keyword reaches them)."""

    def __init__(self, be, cfg: ModelConfig):
        self.be, self.llama, self.n_head = be, cfg.llama, cfg.n_head
        self.kv = {"n_kv_head": cfg.kv_heads} if cfg.llama else {}

    def norm(self, out, mean, rstd, inp, w, b, eps):
        if self.llama:
            self.be.rmsnorm_forward(out, rstd, inp, w, eps)
        else:
            self.be.layernorm_forward(out, mean, rstd, inp, w, b, eps)

    def residual_norm(self, res, out, mean, rstd, a, b, w, bias, eps):
        """res = a + b, out = norm(res)."""
        if self.llama:
            self.be.residual_rmsnorm_forward(res, out, rstd, a, b, w, eps)
        else:
            self.be.residual_layernorm_forward(res, out, mean, rstd, a, b, w, bias, eps)

    def norm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd):
        """dinp += ...; dw (and db) written."""
        if self.llama:
            self.be.rmsnorm_backward(dinp, dw, dout, inp, w, rstd)
        else:
            self.be.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd)

    def product(self, out, inp, w, bias):
        if self.llama:
            self.be.linear_forward(out, inp, w, bias)
        else:
            self.be.matmul_forward(out, inp, w, bias)

    def product_backward(self, dinp, dw, dbias, dout, inp, w):
        if self.llama:
            self.be.linear_backward(dinp, dw, dbias, dout, inp, w)
        else:
            self.be.matmul_backward(dinp, dw, dbias, dout, inp, w)

    def attention(self, out, att, qkv, drop):
        self.be.attention_forward(out, att, qkv, self.n_head, drop, **self.kv)

    def attention_backward(self, dqkv, dout, qkv, att, drop, out):
        self.be.attention_backward(dqkv, dout, qkv, att, self.n_head, drop, out=out, **self.kv)

    def mlp(self, act, pre, inp, w, bias):
        """pre = the MLP's first product of inp, act = its activation (GELU; SwiGLU of gate|up)."""
        if self.llama:
            self.be.linear_forward(pre, inp, w, bias)
            self.be.swiglu_forward(act, pre)
        else:
            self.be.matmul_gelu_forward(act, pre, inp, w, bias)

    def activation(self, act, pre):
        """act = GELU(pre) | SwiGLU(gate|up of pre): `mlp` after its product (LoRA adds between)."""
        if self.llama:
            self.be.swiglu_forward(act, pre)
        else:
            self.be.gelu_forward(act, pre)

    def mlp_backward(self, dpre, pre, dact):
        """d pre (written) from d act."""
        if self.llama:
            self.be.swiglu_backward(dpre, pre, dact)
        else:
            self.be.gelu_backward(dpre, pre, dact)


def _rotary(cfg: ModelConfig, w: Tensors, T: int):
    """A llama's (cos, sin) rows 0..T-1, or None (GPT-2)."""
    if not cfg.llama:
        return None
    if w.cos is None:
        raise ValueError("a llama's weights need the rotary table: Tensors(layout, flat, backend)")
    return w.cos[:T], w.sin[:T]


# --- forward and backward ----------------------------------------------------------------------

def loss_denominator(batches) -> float:
    """What each of these batches' loss sum is divided by (`forward`'s denom) so that the mean of
    their losses (tree_mean, over len(batches)) is the mean over every target of them all that is
    not ignored (>= 0): N / len(batches), N that count (at least 1: batches with no target left
    give loss 0 and gradient 0). Counted on the host from the batches (x, y) before any forward.
    A step's micro-batches: the dloss scale len/N, then the reducer's 1/M, weigh every unmasked
    target of the step alike, whichever micro-batch, sphere or rank holds it. Without ignored
    targets N / len is exactly B*T, so the bits are those of the plain per-batch mean."""
    n = sum(int(np.count_nonzero(np.asarray(y) >= 0)) for _, y in batches)
    return max(n, 1) / len(batches)


def forward(be, cfg: ModelConfig, w: Tensors, a: Activations, idx, targets=None,
            drop: Dropout | None = None, grad: bool = False, loss_out=None, lora=None,
            denom: float | None = None):
    """Logits into a.logits; with targets, also the loss: the cross-entropies' sum over the
    targets / denom (default B*T, the mean when no target is ignored; a target < 0 is ignored
    and adds 0; see `loss_denominator`), returned as a float.
    grad (training, with targets): a.logits ends as d loss / d logits instead, computed in the
    same pass as the loss, which is what `backward` starts from.
    drop: this micro-batch's dropout (training only), applied in place to the embedding sum and
    to each projection's output before it joins the residual stream, and to the attention
    probabilities inside the attention op (a.att keeps them undropped for the backward).
    Each residual addition is fused with the norm that reads its sum (the next layer's first
    norm, or the final norm after the last layer). loss_out (a device float64[1]): the losses'
    sum goes there and nothing is read back (a CUDA-graph step; the mean is sum / (B T));
    returns None. lora: a crystal.lora.LoraPass: each adapted projection's output gets its
    adapter's term, added to the product's output (or its columns: a llama's q, k, v of the
    q|k|v product, gate, up of gate|up) before anything reads it (rotary, the activation)."""
    B, T = idx.shape
    denom = B * T if denom is None else denom
    NH, KV, eps = cfg.n_head, cfg.kv_heads, cfg.layer_norm_epsilon
    ops, rotary = BlockOps(be, cfg), _rotary(cfg, w, T)
    be.encoder_forward(a.encoded, idx, w.wte, None if w.wpe is None else w.wpe[:T])
    if drop:
        drop.apply(be, a.encoded, a.encoded, 0, EMBEDDING)
    x = a.encoded
    if w.layers:
        p = w.layers[0]
        ops.norm(a.ln1[0], a.ln1_mean[0], a.ln1_rstd[0], x, p.ln1_w, p.ln1_b, eps)
    else:
        ops.norm(a.lnf, a.lnf_mean, a.lnf_rstd, x, w.lnf_w, w.lnf_b, eps)
    for l, p in enumerate(w.layers):
        ops.product(a.qkv[l], a.ln1[l], p.qkv_w, p.qkv_b)
        if lora:
            lora.forward(be, l, "qkv", a.ln1[l], a.qkv[l])
        if rotary:  # llama: q and k heads rotated in place (v untouched)
            be.rope_forward(a.qkv[l], *rotary, NH, KV)
        ops.attention(a.atty[l], a.att[l], a.qkv[l], drop and drop.site(l, ATTENTION_PROBS))
        ops.product(a.attproj[l], a.atty[l], p.attproj_w, p.attproj_b)
        if lora:
            lora.forward(be, l, "attproj", a.atty[l], a.attproj[l])
        if drop:  # attproj is not read by the backward, so it is dropped in place
            drop.apply(be, a.attproj[l], a.attproj[l], l, ATTENTION_PROJ)
        ops.residual_norm(a.res2[l], a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], x, a.attproj[l], p.ln2_w, p.ln2_b, eps)
        if lora and lora.adapts(l, "fc"):  # the adapter joins before the activation: no fused product
            ops.product(a.fch[l], a.ln2[l], p.fc_w, p.fc_b)
            lora.forward(be, l, "fc", a.ln2[l], a.fch[l])
            ops.activation(a.fch_act[l], a.fch[l])
        else:
            ops.mlp(a.fch_act[l], a.fch[l], a.ln2[l], p.fc_w, p.fc_b)
        ops.product(a.fcproj[l], a.fch_act[l], p.fcproj_w, p.fcproj_b)
        if lora:
            lora.forward(be, l, "fcproj", a.fch_act[l], a.fcproj[l])
        if drop:
            drop.apply(be, a.fcproj[l], a.fcproj[l], l, MLP_PROJ)
        if l + 1 < len(w.layers):  # res3 = res2 + fcproj, then the next layer's first norm of it
            q = w.layers[l + 1]
            ops.residual_norm(a.res3[l], a.ln1[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1],
                              a.res2[l], a.fcproj[l], q.ln1_w, q.ln1_b, eps)
        else:  # ... or the final norm after the last layer
            ops.residual_norm(a.res3[l], a.lnf, a.lnf_mean, a.lnf_rstd, a.res2[l], a.fcproj[l],
                              w.lnf_w, w.lnf_b, eps)
        x = a.res3[l]
    be.lm_head_forward(a.logits, a.lnf, w.head)  # [B,T,Vp]; the padding columns are not logits
    if targets is None:
        return None
    V = cfg.vocab_size  # the softmax over the first V columns; the others get probability and gradient 0
    if grad:  # losses and dlogits = (softmax - onehot) / denom in one pass, in place of the logits
        be.crossentropy_forward_backward(a.losses, a.logits, a.logits, targets, 1.0 / denom, V)
    else:
        be.crossentropy_forward(a.losses, a.logits, a.logits, targets, V)
    if loss_out is not None:
        be.sum_losses(a.losses, out=loss_out)
        return None
    return be.sum_losses(a.losses) / denom


def backward(be, cfg: ModelConfig, w: Tensors, g: Tensors | None, a: Activations, idx, targets,
             drop: Dropout | None = None, lora=None):
    """Gradient of the mean loss of the last `forward(..., targets, drop, grad=True)` into every
    tensor of g (drop: the same as the forward's).

    Every gradient tensor is written (not accumulated), so g needs no zeroing beforehand; the LM
    head's padding rows of g.head are written zero (their dlogits columns are zero). The token
    embedding's gradient is the LM head's plus the encoder's scatter when tied; untied, it is
    zeroed here and then takes the scatter alone.

    g None: the model is frozen (LoRA: `lora`, the forward's LoraPass, writes its adapters'
    gradients into its row): input gradients only, no weight gradient is computed, and the
    backward stops at the first layer's adapters, below which nothing trains."""
    B, T = idx.shape
    NH, KV = cfg.n_head, cfg.kv_heads
    ops, rotary = BlockOps(be, cfg), _rotary(cfg, w, T)
    frozen = g is None
    if frozen:
        g = _Frozen(cfg.n_layer)
    be.lm_head_backward(a.dln, g.head, a.logits, a.lnf, w.head)
    last = a.res3[-1] if a.res3 else a.encoded
    be.zero(a.dres)
    ops.norm_backward(a.dres, g.lnf_w, g.lnf_b, a.dln, last, w.lnf_w, a.lnf_mean, a.lnf_rstd)
    for l in reversed(range(cfg.n_layer)):
        p, q = w.layers[l], g.layers[l]
        x = a.res3[l - 1] if l > 0 else a.encoded
        # a.dres holds d res3[l]; res3 = res2 + drop(fcproj)
        dproj = _through_dropout(be, drop, a, l, MLP_PROJ)
        ops.product_backward(a.dfch_act, q.fcproj_w, q.fcproj_b, dproj, a.fch_act[l], p.fcproj_w)
        if lora:
            lora.backward(be, l, "fcproj", dproj, a.dfch_act)
        ops.mlp_backward(a.dfch, a.fch[l], a.dfch_act)
        ops.product_backward(a.dln, q.fc_w, q.fc_b, a.dfch, a.ln2[l], p.fc_w)
        if lora:
            lora.backward(be, l, "fc", a.dfch, a.dln)
        ops.norm_backward(a.dres, q.ln2_w, q.ln2_b, a.dln, a.res2[l], p.ln2_w, a.ln2_mean[l], a.ln2_rstd[l])
        # a.dres holds d res2[l]; res2 = x + drop(attproj)
        dproj = _through_dropout(be, drop, a, l, ATTENTION_PROJ)
        ops.product_backward(a.datty, q.attproj_w, q.attproj_b, dproj, a.atty[l], p.attproj_w)
        if lora:
            lora.backward(be, l, "attproj", dproj, a.datty)
        ops.attention_backward(a.dqkv, a.datty, a.qkv[l], a.att[l], drop and drop.site(l, ATTENTION_PROBS),
                               a.atty[l])
        if rotary:  # llama: d of the unrotated q and k (the transpose rotation), in place
            be.rope_backward(a.dqkv, *rotary, NH, KV)
        ops.product_backward(a.dln, q.qkv_w, q.qkv_b, a.dqkv, a.ln1[l], p.qkv_w)
        if lora:
            lora.backward(be, l, "qkv", a.dqkv, a.dln)
        if frozen and l == 0:
            return  # nothing below the first layer's input trains
        ops.norm_backward(a.dres, q.ln1_w, q.ln1_b, a.dln, x, p.ln1_w, a.ln1_mean[l], a.ln1_rstd[l])
    if frozen:
        return
    if drop:  # encoded = drop(wte[idx] + wpe)
        drop.apply(be, a.dres, a.dres, 0, EMBEDDING)
    if not cfg.tied:  # an untied embedding's gradient is the scatter alone
        be.zero(g.wte)
    be.encoder_backward(g.wte[:cfg.vocab_size], g.wpe, a.dres, idx)  # the real tokens' rows


class _Frozen:
    """The gradients of a frozen model (LoRA's base): every weight-gradient argument None."""

    head = wte = wpe = lnf_w = lnf_b = None

    def __init__(self, n_layer: int):
        self.layers = [LayerTensors(**{k: None for k in _GPT2_LAYER})] * n_layer


def _through_dropout(be, drop: Dropout | None, a: Activations, layer: int, site: int):
    """d proj for res = x + drop(proj): drop(d res) in a.dln (free until the projection's own
    backward writes it), or a.dres itself without dropout."""
    if not drop:
        return a.dres
    drop.apply(be, a.dln, a.dres, layer, site)
    return a.dln


# --- a model you can hold: parameters + config, for the Python API ------------------------------

class GPT:
    """A GPT-2 or llama model on a backend: `.config`, `.params` (name -> array views), `.logits`,
    `.loss_and_grads`. Activation buffers are cached per batch shape. `flat`: a buffer of
    ParamLayout(config) (init_params, crystal.checkpoint.read_params), padding rows zero."""

    def __init__(self, config: ModelConfig, flat: np.ndarray, backend=None):
        from crystal.backends import get_backend

        self.config = config
        self.layout = ParamLayout(config)
        self.layout.check(flat)
        self.backend = backend or get_backend("cpu")
        self.flat = self.backend.to_device(np.ascontiguousarray(flat, dtype=np.float32))
        self.params = self.layout.views(self.flat)
        self._tensors = Tensors(self.layout, self.backend.compute_weights(self.flat), self.backend)
        self._acts: dict[tuple[int, int], Activations] = {}

    @classmethod
    def init(cls, config: ModelConfig, seed: int = 0, backend=None) -> "GPT":
        return cls(config, init_params(config, seed), backend)

    def _check(self, idx, targets: bool = False) -> np.ndarray:
        """[B, T] int32 token ids (targets: an id < 0 is an ignored target)."""
        idx = np.asarray(idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        if idx.ndim != 2 or idx.shape[1] < 1:
            raise ValueError(f"token ids must have shape [B, T], got {idx.shape}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        if idx.size and ((idx.min() < 0 and not targets) or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})"
                             + (" (or < 0: ignored)" if targets else ""))
        return np.ascontiguousarray(idx, dtype=np.int32)

    def _activations(self, B: int, T: int) -> Activations:
        if (B, T) not in self._acts:
            self._acts[(B, T)] = Activations(self.backend, self.config, B, T)
        return self._acts[(B, T)]

    def logits(self, idx) -> np.ndarray:
        idx = self._check(idx)
        a = self._activations(*idx.shape)
        be = self.backend
        forward(be, self.config, self._tensors, a, be.to_device(idx))
        return np.array(be.to_host(a.logits[..., :self.config.vocab_size]), dtype=np.float32)  # the real tokens

    def loss(self, idx, targets, denom: float | None = None) -> float:
        """Mean cross-entropy of next-token predictions over the targets not ignored (< 0:
        ignored, PyTorch's ignore_index), forward only. denom: divide the sum by it instead (see
        loss_denominator)."""
        idx, targets = self._check_pair(idx, targets)
        be = self.backend
        a = self._activations(*idx.shape)
        denom = loss_denominator([(idx, targets)]) if denom is None else denom
        return forward(be, self.config, self._tensors, a, be.to_device(idx), be.to_device(targets), denom=denom)

    def token_losses(self, idx, targets) -> np.ndarray:
        """[B, T] float32: the cross-entropy of each next-token prediction (forward only)."""
        idx, targets = self._check_pair(idx, targets)
        be = self.backend
        a = self._activations(*idx.shape)
        forward(be, self.config, self._tensors, a, be.to_device(idx), be.to_device(targets))
        return np.array(be.to_host(a.losses), dtype=np.float32).reshape(idx.shape)

    def _check_pair(self, idx, targets):
        idx, targets = self._check(idx), self._check(targets, targets=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets {targets.shape} must match idx {idx.shape}")
        return idx, targets

    def loss_and_grads(self, idx, targets, drop: Dropout | None = None) -> tuple[float, dict]:
        """Mean cross-entropy (over the targets not ignored, as `loss`) and its gradient per
        parameter name (with drop: under that micro-batch's dropout masks)."""
        idx, targets = self._check_pair(idx, targets)
        be = self.backend
        a = self._activations(*idx.shape)
        gflat = be.empty(self.layout.size)
        grads = Tensors(self.layout, gflat)
        didx, dtgt = be.to_device(idx), be.to_device(targets)
        loss = forward(be, self.config, self._tensors, a, didx, dtgt, drop, grad=True,
                       denom=loss_denominator([(idx, targets)]))
        backward(be, self.config, self._tensors, grads, a, didx, dtgt, drop)
        host = np.array(be.to_host(gflat), dtype=np.float32)
        return loss, {k: v.copy() for k, v in self.layout.views(host).items()}


class LoraModel:
    """A frozen model with adapters on a backend, for the Python API and tests: `.loss`,
    `.loss_and_grads` (the adapters' gradients by PEFT name, PEFT's shapes), `.merged()`."""

    def __init__(self, config: ModelConfig, base: np.ndarray, lora: LoraConfig, adapters: np.ndarray | None = None,
                 backend=None, seed: int = 0):
        from crystal.backends import get_backend

        self.config, self.lora = config, lora
        self.base_layout, self.layout = ParamLayout(config), AdapterLayout(config, lora)
        self.base_layout.check(base)
        self.backend = be = backend or get_backend("cpu")
        check_backend(be, config, lora)
        self.base = be.to_device(np.ascontiguousarray(base, dtype=np.float32))
        if adapters is None:
            adapters = init_adapters(self.layout, seed)
        self.layout.check(adapters)
        self.adapters = be.to_device(np.ascontiguousarray(adapters, dtype=np.float32))
        self._w = Tensors(self.base_layout, be.compute_weights(self.base), be)
        self._aw = self.layout.tensors(be.compute_weights(self.adapters))
        self._acts: dict = {}

    def _pass(self, idx, drop=None, grads=None):
        B, T = np.shape(idx)
        if (B, T) not in self._acts:
            self._acts[(B, T)] = Activations(self.backend, self.config, B, T, self.layout)
        a = self._acts[(B, T)]
        return a, LoraPass(self.lora, self._aw, a.lora, drop, grads)

    def loss(self, idx, targets, denom: float | None = None) -> float:
        """Mean cross-entropy over the targets not ignored (< 0), as GPT.loss (denom: as its)."""
        be = self.backend
        a, lp = self._pass(idx)
        denom = loss_denominator([(idx, targets)]) if denom is None else denom
        return forward(be, self.config, self._w, a, be.to_device(idx), be.to_device(targets), lora=lp, denom=denom)

    def loss_and_grads(self, idx, targets, drop: Dropout | None = None) -> tuple[float, dict]:
        """Mean cross-entropy (over the targets not ignored) and d loss / d (each A and B); drop:
        the micro-batch's LoRA dropout."""
        be = self.backend
        gflat = be.empty(self.layout.size)
        a, lp = self._pass(idx, drop, self.layout.tensors(gflat))
        didx, dtgt = be.to_device(idx), be.to_device(targets)
        loss = forward(be, self.config, self._w, a, didx, dtgt, grad=True, lora=lp,
                       denom=loss_denominator([(idx, targets)]))
        backward(be, self.config, self._w, None, a, didx, dtgt, lora=lp)
        return loss, self.layout.state_dict(be.to_host(gflat))

    def merged(self) -> np.ndarray:
        """The base parameters with the adapters merged in (host)."""
        be = self.backend
        return merge(self.layout, self.base_layout, be.to_host(self.base), be.to_host(self.adapters))


def warm_up(be, cfg: ModelConfig | None = None) -> None:
    """Compile every kernel of `be` before a sphere starts: a tiny GPT-2's forward, backward and
    the flat-buffer ops, once per backend (be.warm); with a llama `cfg`, also a tiny llama of its
    kind (q/k/v biases or not, tied or not: the ops' argument types), on every call (compiled
    once per backend, a pass costs microseconds after that). The model drives it, so the ops need
    not know the model."""
    if not be.warm:
        _warm_model(be, ModelConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8), flat_ops=True)
        be.warm = True
    if cfg is not None and cfg.llama:
        tiny = ModelConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8, arch="llama", n_kv_head=1,
                           intermediate_size=8, tie_word_embeddings=cfg.tie_word_embeddings,
                           attention_bias=cfg.attention_bias)
        _warm_model(be, tiny)


def _warm_model(be, cfg: ModelConfig, flat_ops: bool = False) -> None:
    layout = ParamLayout(cfg)
    flat = be.to_device(init_params(cfg, 0))
    w, gflat = Tensors(layout, be.compute_weights(flat), be), be.empty(layout.size)
    g = Tensors(layout, gflat)
    a = Activations(be, cfg, 1, 3)
    idx = be.to_device(np.array([[1, 2, 3]], dtype=np.int32))
    forward(be, cfg, w, a, idx, idx)  # evaluation's loss
    forward(be, cfg, w, a, idx, idx, grad=True)  # training's loss and dlogits
    backward(be, cfg, w, g, a, idx, idx)
    if flat_ops:
        m, v = be.zeros(layout.size), be.zeros(layout.size)
        be.add_inplace(gflat, gflat)
        be.scale_inplace(gflat, 0.5)
        be.sum_squares(gflat)
        be.adamw_update(flat, gflat, m, v, layout.decay_ranges(),
                        AdamWScalars.of(1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 1.0))
    be.synchronize()
