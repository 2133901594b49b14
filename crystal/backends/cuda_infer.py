"""The cuda backend's inference ops (crystal.generate): kernels/kv_cache.cu.

The same three ops as crystal.backends.cpu_infer, on the calling thread's stream: the
embedding at each sequence's position, the store of the new keys and values followed by
attention against the cache (one block per query row; the scores in a float32 scratch of
[B*NH*T, capacity]), and the gather of one row per sequence. fp32 and bf16 (the `_bf16`
twins: bf16 activations and cache, float32 scores and math).
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

    def kv_attention(self, out, qkv, k, v, pos, n_head: int) -> None:
        be, (B, T, C3) = self.be, qkv.shape
        hs, cap = C3 // 3 // n_head, k.shape[2]
        be._launch(be._k("kv_store"), grid_1d(B * T * C3 // 3, be.block), k, v, qkv, pos, B, T, n_head, hs, cap)
        scores = be._scratch("kv_scores", (B * n_head * T * cap,), "float32")
        be._launch(be._k("kv_attention"), grid_rows(B * n_head * T), out, qkv, k, v, scores, pos, B, T, n_head,
                   hs, cap, 1.0 / math.sqrt(hs))

    def gather_rows(self, out, x, rows) -> None:
        be, (B, T, C) = self.be, x.shape
        be._launch(be._k("gather_rows"), grid_1d(B * C, be.block), out, x, rows, B, T, C)
