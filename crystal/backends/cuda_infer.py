"""The cuda backend's inference ops (crystal.generate): kernels/kv_cache.cu.

The ops of crystal.backends.cpu_infer, on the calling thread's stream: the embedding at each
sequence's position (no position embeddings for llama), the rotary rotation at each sequence's
positions (llama), the store of the new keys and values (KV heads) followed by attention
against the cache (one block per query row, reading its KV head in place; the scores in a
float32 scratch of [B*NH*T, capacity]), the gather of one row per sequence, and the copy of a
cache row into other rows (device to device: cupy's copyto). fp32 and bf16 (the `_bf16` twins:
bf16 activations and cache, float32 scores, rotary tables and math).
"""

from __future__ import annotations

import contextlib
import math

from crystal.backends.kernels import grid_1d, grid_rows


class CudaInferenceOps:
    def __init__(self, be):
        self.be = be

    def threads(self, decode: bool):
        return contextlib.nullcontext()  # host threads play no part

    def embed_at(self, out, idx, wte, wpe, pos) -> None:
        be, (B, T) = self.be, idx.shape
        C = wte.shape[1]
        be._launch(be._k("embed_at"), grid_1d(B * T * C, be.block), out, idx, wte, wpe, pos, B * T, T, C)

    def rope_at(self, qkv, cos, sin, pos, n_head: int, n_kv_head: int) -> None:
        """In place; cos, sin float32 [>= pos[b] + T, hd/2] (the model's whole table)."""
        be, (B, T, W) = self.be, qkv.shape
        hd = W // (n_head + 2 * n_kv_head)
        be._launch(be._k("rope_at"), grid_1d(B * T * (n_head + n_kv_head) * (hd // 2), be.block), qkv, cos, sin,
                   pos, B, T, n_head, n_kv_head, hd)

    def kv_attention(self, out, qkv, k, v, pos, n_head: int, n_kv_head: int | None = None) -> None:
        """n_kv_head None: n_head (GPT-2). k, v: [B, KV, cap, hd]."""
        be, (B, T, W) = self.be, qkv.shape
        NH, KV = n_head, n_head if n_kv_head is None else n_kv_head
        hd, cap = W // (NH + 2 * KV), k.shape[2]
        be._launch(be._k("kv_store"), grid_1d(B * T * KV * hd, be.block), k, v, qkv, pos, B, T, NH, KV, hd, cap)
        scores = be._scratch("kv_scores", (B * NH * T * cap,), "float32")
        be._launch(be._k("kv_attention"), grid_rows(B * NH * T), out, qkv, k, v, scores, pos, B, T, NH, KV,
                   hd, cap, 1.0 / math.sqrt(hd))

    def gather_rows(self, out, x, rows) -> None:
        be, (B, T, C) = self.be, x.shape
        be._launch(be._k("gather_rows"), grid_1d(B * C, be.block), out, x, rows, B, T, C)

    def copy_rows(self, dst, src) -> None:
        """dst[...] = src, src [1, ...] broadcast over dst's rows (strided views of one layer's k or
        v): device to device, on the calling thread's stream."""
        self.be._count()
        self.be._issue(self.be.cp.copyto, dst, src)
