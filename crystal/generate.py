"""Inference with a KV cache: prefill a batch of prompts in one forward, then decode one token a
step per sequence against the cached keys and values.

This is its own path beside training, not a mode of it (DESIGN.md, "Model families, inference
and adapters"): it reads the model's parameter buffer (the views the training forward reads,
crystal.model.Tensors, the llama rotary table included) and calls the same backend ops for
everything that is row by row (the norms, the products, GELU and SwiGLU, residual additions, the
LM head), but keeps none of training's activations: one small workspace per batch shape, reused
by every layer, and a KV cache per layer, allocated once per request batch. Four ops are
inference's own (the backend's inference ops: crystal.backends.cpu_infer,
crystal.backends.cuda_infer): the embedding at each sequence's own position, the rotary
rotation at each sequence's own positions (llama), attention against the cache (which also
stores the new keys and values; grouped-query attention reads each KV head in place), and the
gather of one row per sequence for the LM head.

Sequences of different lengths share a batch: the prefill right-pads them to the longest
(causal attention keeps the padding out of every real position, and the padding's cache
entries are overwritten before any query can reach them), and each decode step places each
sequence's token at its own position. The logits are those of the full forward of each
sequence (tested within 1e-5), restricted to the tokenizer's vocabulary (the first
config.vocab_size columns; the LM head's tensor may hold padding rows beyond them).

Architectures: a block is a function of (ops, weights, workspace, cache, positions); `BLOCKS`
maps an architecture name to its block, side by side as the training forward's steps:

    GPT-2 (gpt2_block)                         Llama, Qwen2 (llama_block)
    embedding + position embedding            embedding (positions are rotations)
    LayerNorm                                  RMSNorm
    q|k|v = Conv1D product + bias              q|k|v = nn.Linear product (+ bias: Qwen2)
                                               q, k rotated at positions pos[b] + t
    attention over the cache, NH heads         GQA over a cache of KV heads
    c_proj, residual + LayerNorm               o_proj, residual + RMSNorm
    gelu(x @ c_fc), c_proj                     silu(x @ gate) * (x @ up) (one gate|up product), down_proj
    final LayerNorm, tied head                 final RMSNorm, tied or untied head

The cache holds [batch, KV heads, capacity, head_dim] per layer for k and for v
(`kv_cache_shape`): a GQA model's cache is NH / KV times smaller than its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystal.config import ModelConfig
from crystal.errors import CrystalError
from crystal.model import BlockOps


def inference_ops(be):
    """The backend's inference ops: embed_at, rope_at, kv_attention, gather_rows, and threads(decode), the
    context a forward runs in (the cpu's BLAS thread limit)."""
    if be.name == "cpu":
        from crystal.backends.cpu_infer import CpuInferenceOps

        return CpuInferenceOps(be)
    from crystal.backends.cuda_infer import CudaInferenceOps  # cuda, and its emulation in the tests

    return CudaInferenceOps(be)


def kv_cache_shape(cfg: ModelConfig, batch: int, capacity: int) -> tuple[int, int, int, int]:
    """The shape of one layer's k (and of its v): [batch, KV heads, capacity, head_size] (GPT-2:
    KV heads = n_head, head_size = n_embd / n_head)."""
    return (batch, cfg.kv_heads, capacity, cfg.head_size)


def kv_cache_bytes(cfg: ModelConfig, batch: int, capacity: int, itemsize: int = 4) -> int:
    """Bytes of the KV cache KVCache.allocate makes for `batch` sequences of up to `capacity`
    positions: a key and a value of KV heads x head_size numbers per position, per layer
    (2 x n_layer x batch x capacity x n_kv_head x head_size x itemsize; GPT-2: n_embd per
    position)."""
    return 2 * cfg.n_layer * int(np.prod(kv_cache_shape(cfg, batch, capacity))) * itemsize


@dataclass
class KVCache:
    """Per layer, k and v [batch, KV heads, capacity, head_size] in the backend's activation dtype."""

    k: list
    v: list
    capacity: int

    @classmethod
    def allocate(cls, be, cfg: ModelConfig, batch: int, capacity: int) -> "KVCache":
        shape = kv_cache_shape(cfg, batch, capacity)
        return cls([be.zeros(shape, be.act_dtype) for _ in range(cfg.n_layer)],
                   [be.zeros(shape, be.act_dtype) for _ in range(cfg.n_layer)], capacity)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.k, *self.v))

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of sequences start..stop-1 (views: contiguous, batch is the leading axis)."""
        return KVCache([a[start:stop] for a in self.k], [a[start:stop] for a in self.v], self.capacity)


class Workspace:
    """The buffers of one inference forward over [B, T] tokens, reused by every layer (the
    arch's widths: q|k|v is (NH + 2 KV) head_size wide, the attention's output NH head_size, the
    MLP's first product 4C (GPT-2) or gate|up 2I (llama), its activation 4C or I)."""

    def __init__(self, be, cfg: ModelConfig, B: int, T: int, vocab_rows: int):
        C, act, f32 = cfg.n_embd, be.act_dtype, np.float32
        I = cfg.mlp_size
        self.x, self.res = be.empty((B, T, C), act), be.empty((B, T, C), act)  # the residual stream
        self.ln = be.empty((B, T, C), act)
        self.mean, self.rstd = be.empty((B, T), f32), be.empty((B, T), f32)  # mean: LayerNorm's only
        self.qkv = be.empty((B, T, cfg.qkv_size), act)
        self.atty = be.empty((B, T, cfg.n_head * cfg.head_size), act)
        self.proj = be.empty((B, T, C), act)
        self.fch = be.empty((B, T, 2 * I if cfg.llama else I), act)
        self.fch_act = be.empty((B, T, I), act)
        self.last, self.last_ln = be.empty((B, C), act), be.empty((B, C), act)  # one row per sequence
        self.last_mean, self.last_rstd = be.empty((B,), f32), be.empty((B,), f32)
        self.logits = be.empty((B, vocab_rows), act)


def gpt2_block(be, ops, cfg: ModelConfig, w, p, next_norm, ws: Workspace, k, v, pos) -> None:
    """One GPT-2 block on ws.x (whose ln_1 is already in ws.ln): attention over the cache, MLP,
    each residual addition fused with the layernorm that reads its sum; next_norm: (w, b) of
    the next block's ln_1, or None after the last block (ws.x then holds the final stream)."""
    eps = cfg.layer_norm_epsilon
    be.matmul_forward(ws.qkv, ws.ln, p.qkv_w, p.qkv_b)
    ops.kv_attention(ws.atty, ws.qkv, k, v, pos, cfg.n_head)
    be.matmul_forward(ws.proj, ws.atty, p.attproj_w, p.attproj_b)
    be.residual_layernorm_forward(ws.res, ws.ln, ws.mean, ws.rstd, ws.x, ws.proj, p.ln2_w, p.ln2_b, eps)
    be.matmul_gelu_forward(ws.fch_act, ws.fch, ws.ln, p.fc_w, p.fc_b)
    be.matmul_forward(ws.proj, ws.fch_act, p.fcproj_w, p.fcproj_b)
    if next_norm is None:
        be.residual_forward(ws.x, ws.res, ws.proj)
    else:
        be.residual_layernorm_forward(ws.x, ws.ln, ws.mean, ws.rstd, ws.res, ws.proj, *next_norm, eps)


def llama_block(be, ops, cfg: ModelConfig, w, p, next_norm, ws: Workspace, k, v, pos) -> None:
    """One llama block on ws.x (whose input_layernorm is already in ws.ln): q, k rotated at their
    positions (w.cos, w.sin: the model's rotary table), grouped-query attention over the cache,
    the SwiGLU MLP, each residual addition fused with the RMSNorm that reads its sum; next_norm:
    (w, None) of the next block's input_layernorm, or None after the last block."""
    NH, KV, eps = cfg.n_head, cfg.kv_heads, cfg.layer_norm_epsilon
    be.linear_forward(ws.qkv, ws.ln, p.qkv_w, p.qkv_b)  # q|k|v in one product (biases: Qwen2's)
    ops.rope_at(ws.qkv, w.cos, w.sin, pos, NH, KV)  # token (b, t) rotated by position pos[b] + t
    ops.kv_attention(ws.atty, ws.qkv, k, v, pos, NH, KV)
    be.linear_forward(ws.proj, ws.atty, p.attproj_w, p.attproj_b)  # o_proj (no bias)
    be.residual_rmsnorm_forward(ws.res, ws.ln, ws.rstd, ws.x, ws.proj, p.ln2_w, eps)
    be.linear_forward(ws.fch, ws.ln, p.fc_w, p.fc_b)  # gate|up in one product
    be.swiglu_forward(ws.fch_act, ws.fch)  # silu(gate) * up
    be.linear_forward(ws.proj, ws.fch_act, p.fcproj_w, p.fcproj_b)  # down_proj
    if next_norm is None:
        be.residual_forward(ws.x, ws.res, ws.proj)
    else:
        be.residual_rmsnorm_forward(ws.x, ws.ln, ws.rstd, ws.res, ws.proj, next_norm[0], eps)


BLOCKS = {"gpt2": gpt2_block, "llama": llama_block}


def forward(be, ops, cfg: ModelConfig, w, ws: Workspace, cache: KVCache, idx, pos, rows) -> None:
    """Logits of one row per sequence into ws.logits: tokens idx [B,T] at positions pos[b] + t
    (their keys and values go into the cache), rows[b] the row of sequence b to predict from.
    The first and the final norm are the arch's (BlockOps.norm: LayerNorm or RMSNorm); the LM
    head reads w.head (the token embedding when tied, a llama's lm_head when not)."""
    block, norm, eps = BLOCKS[cfg.arch], BlockOps(be, cfg).norm, cfg.layer_norm_epsilon
    ops.embed_at(ws.x, idx, w.wte, w.wpe, pos)  # w.wpe None (llama): the token's embedding alone
    if w.layers:
        norm(ws.ln, ws.mean, ws.rstd, ws.x, w.layers[0].ln1_w, w.layers[0].ln1_b, eps)
    for l, p in enumerate(w.layers):
        nxt = w.layers[l + 1] if l + 1 < len(w.layers) else None
        block(be, ops, cfg, w, p, None if nxt is None else (nxt.ln1_w, nxt.ln1_b), ws, cache.k[l], cache.v[l], pos)
    ops.gather_rows(ws.last, ws.x, rows)
    norm(ws.last_ln, ws.last_mean, ws.last_rstd, ws.last, w.lnf_w, w.lnf_b, eps)
    be.lm_head_forward(ws.logits, ws.last_ln, w.head)


class Decoder:
    """A batch of `batch` sequences decoded together against one KV cache of `capacity`
    positions (at most block_size), allocated here once. On a cuda backend made for graphs
    (`--cuda-graphs`), decode steps are replayed as CUDA graphs unless graphs=False. `lengths[b]`: positions of sequence b
    in the cache. Every call returns host float32 logits [rows, vocab_size] (a copy)."""

    def __init__(self, model, batch: int, capacity: int | None = None, graphs: bool | None = None):
        cfg = model.config
        capacity = cfg.block_size if capacity is None else capacity
        if not 1 <= capacity <= cfg.block_size:
            raise ValueError(f"capacity {capacity} must be in [1, block_size {cfg.block_size}]")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.model, self.config, self.batch = model, cfg, batch
        self.be = model.backend
        self.ops = inference_ops(self.be)
        self.weights = model._tensors  # the views the training forward reads (fp32, or the bf16 copy)
        self.cache = KVCache.allocate(self.be, cfg, batch, capacity)
        self.lengths = np.zeros(batch, dtype=np.int64)
        self._work: dict[tuple[int, int], Workspace] = {}
        # graphs: decode steps replayed as CUDA graphs (crystal.decode_graphs), on a cuda backend
        # made for graphs (be.graphs: its products capturable; None: whenever it is); elsewhere eager
        self.graphs = None
        if graphs is not False and getattr(self.be, "graphs", False):
            from crystal.decode_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, forward)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def _workspace(self, B: int, T: int) -> Workspace:
        if (B, T) not in self._work:
            self._work[(B, T)] = Workspace(self.be, self.config, B, T, self.weights.head.shape[0])
        return self._work[(B, T)]

    def release_workspaces(self) -> None:
        """Forget the workspaces of every shape but the decode steps' [B, 1] (a server that
        refills prompts of many lengths would otherwise keep one per length)."""
        self._work = {k: w for k, w in self._work.items() if k[1] == 1}

    def _run(self, cache: KVCache, idx: np.ndarray, pos: np.ndarray, rows: np.ndarray,
             step: bool = False) -> np.ndarray:
        be, (B, T) = self.be, idx.shape
        ws = self._workspace(B, T)
        if step and self.graphs is not None:  # a decode step: rows 0..B-1, every row's own 0
            self.graphs.run(ws, idx, pos)
        else:
            dev = [be.to_device(np.ascontiguousarray(a, dtype=np.int32)) for a in (idx, pos, rows)]
            with self.ops.threads(decode=T == 1):
                forward(be, self.ops, self.config, self.weights, ws, cache, *dev)
        return np.array(be.to_host(ws.logits[:, :self.config.vocab_size]), dtype=np.float32)  # a copy

    def _check_tokens(self, seqs) -> None:
        V = self.config.vocab_size
        for s in seqs:
            if len(s) and not all(0 <= int(t) < V for t in s):
                raise CrystalError(f"token ids must be in [0, {V})")

    def prefill(self, prompts: list) -> np.ndarray:
        """Every sequence's prompt (1..capacity tokens each) in one forward, right-padded to the
        longest; the logits after each prompt's last token, [batch, V]. The same prompt in every
        row (n samples of one prompt) is computed once, in row 0, and shared (`share`): its
        logits and cache are bitwise those of the prompt prefilled alone."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        if lens.min() < 1 or lens.max() > self.capacity:
            raise ValueError(f"prompt lengths must be in [1, {self.capacity}], got {lens.min()}..{lens.max()}")
        self._check_tokens(prompts)
        if self.batch > 1 and all(np.array_equal(p, prompts[0]) for p in prompts[1:]):
            # one prompt continued by every sequence (n samples of it): computed once, in row 0
            # (the forward of the prompt drawn alone), then its keys and values copied
            logits = self._run(self.cache.rows(0, 1), np.asarray(prompts[0])[None, :], np.zeros(1), lens[:1] - 1)
            self.lengths[0] = lens[0]
            self.share(0, range(1, self.batch))
            return np.repeat(logits, self.batch, axis=0)
        idx = np.zeros((self.batch, int(lens.max())), dtype=np.int32)
        for b, p in enumerate(prompts):
            idx[b, :len(p)] = p
        logits = self._run(self.cache, idx, np.zeros(self.batch), lens - 1)
        self.lengths[:] = lens
        return logits

    def refill(self, row: int, tokens) -> np.ndarray:
        """Sequence `row`'s cache recomputed from `tokens` alone (a context that slides); the
        logits after its last token, [V]."""
        n = len(tokens)
        if not 1 <= n <= self.capacity:
            raise ValueError(f"a refill takes 1..{self.capacity} tokens, got {n}")
        self._check_tokens([tokens])
        logits = self._run(self.cache.rows(row, row + 1), np.asarray(tokens)[None, :], np.zeros(1), np.array([n - 1]))
        self.lengths[row] = n
        return logits[0]

    def share(self, src: int, rows) -> None:
        """Sequences `rows` continue sequence src's context: its cache (positions
        0..lengths[src]-1 of every layer's k and v) is copied into their rows (ops.copy_rows, one
        copy per layer, k and v, and run of adjacent rows), and its length. Several sequences of
        one prompt share its prefill this way: the prompt is computed once, in one row."""
        rows = sorted({int(r) for r in rows})
        if any(not 0 <= r < self.batch for r in rows) or src in rows or not 0 <= src < self.batch:
            raise ValueError(f"cannot share row {src} into rows {rows} of a batch of {self.batch}")
        n = int(self.lengths[src])
        for a, b in _adjacent_runs(rows):
            for layer in (*self.cache.k, *self.cache.v):
                self.ops.copy_rows(layer[a:b, :, :n], layer[src:src + 1, :, :n])
        self.lengths[rows] = n

    def decode(self, tokens, active=None) -> np.ndarray:
        """One token per sequence at its next position; the logits after it, [len(tokens), V].
        Where active[b] is False, tokens[b] is ignored and row b sits out (position -1 for the ops:
        its cache and length stay as they are; its logits row is meaningless). Fewer tokens than
        the batch decode rows 0..len(tokens)-1 only; the rows after them are not computed."""
        B = len(tokens)
        if not 1 <= B <= self.batch:
            raise ValueError(f"decode takes 1..{self.batch} tokens, got {B}")
        active = np.ones(B, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        lengths = self.lengths[:B]  # a view: the increment below lands in self.lengths
        if np.any(lengths[active] >= self.capacity):
            raise ValueError("a sequence's cache is full: refill it with a shorter context first")
        idx = np.where(active, np.asarray(tokens, dtype=np.int64), 0)
        self._check_tokens([idx])
        pos = np.where(active, lengths, -1)
        cache = self.cache if B == self.batch else self.cache.rows(0, B)
        logits = self._run(cache, idx[:, None], pos, np.zeros(B), step=True)
        lengths[active] += 1
        return logits


def _adjacent_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs of adjacent rows: [1, 2, 3, 6] -> [(1, 4), (6, 7)]."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
