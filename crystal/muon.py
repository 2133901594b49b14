"""Muon on the blocks' matrices, AdamW on everything else: `--optimizer muon`.

Muon (MomentUm Orthogonalized by Newton-Schulz; Keller Jordan, modded-nanogpt) as its reference
writes it (KellerJordan/Muon muon.py, modded-nanogpt train_gpt.py), for one matrix W with
gradient G at step t:

    g   = s G                             (s: the step's clipping factor, as AdamW's)
    M   = mu_t M + (1 - mu_t) g           (momentum; M starts at 0)
    U   = mu_t M + (1 - mu_t) g           (Nesterov; without it U = M)
    O   = NS_k(U)                         (k quintic Newton-Schulz iterations, below)
    W   = W (1 - lr_t wd) - lr_t max(1, out/in)^0.5 O

NS_k: X = U / (|U|_F + 1e-7) on the wide orientation (U^T when U has more rows than columns),
then k times A = X X^T, B = b A + c A A, X = a X + B X with (a, b, c) = NS_COEFFS; the result
has U's singular vectors and singular values near 1 (in about [0.7, 1.2], not exactly 1: the
reference's coefficients trade convergence for slope at zero). out/in is the matrix's output over
input size: the reference's rows/cols of a torch Linear weight [out, in] (a llama's); GPT-2's
weights are Conv1D [in, out], so it is cols/rows there. mu_t warms up from momentum_start to
momentum over momentum_warmup steps (crystal.optim.momentum_at); lr_t = muon_lr x (the
schedule's lr / lr).

Which tensors. Muon: every 2-D tensor inside the blocks (attention c_attn and c_proj, MLP c_fc
and c_proj). The fused c_attn [C, 3C] is orthogonalized as three [C, C] blocks q, k, v (the
reference's separate q, k, v weights; its later fused qkv weight is orthogonalized per block as
a batch too): each is one linear map, and orthogonalizing the fused matrix would couple their
scales (q and k set the attention's temperature, v the values'). AdamW (--lr, its own learning
rate, crystal's betas and weight decay): the token and position embeddings (the tied LM head is
the token embedding: the embedding's rule), biases and LayerNorm weights. A llama's blocks give
Muon q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj, each its own matrix
(nn.Linear [out, in]: out/in = rows/cols); an untied lm_head goes to AdamW with the embedding
(the reference's rule for the head), as do the RMSNorm weights and Qwen2's q/k/v biases.

State, and nothing more: AdamW's m and v of AdamW's tensors alone, and one momentum buffer M of
Muon's tensors, each packed in buffer order (crystal.optim.Packing). A checkpoint holds them as
adamw.m, adamw.v (the LM head's padding rows left out) and muon.momentum; a checkpoint of the
previous layout (M inside a whole-buffer adamw.m, adamw.v zero there) is read and converted.

Order of work. AdamW runs on the reducer's chunks, in the chunk pass. Then the spheres compute
the momentum of each tensor (elementwise: U written over its finished gradient in place), then
orthogonalize each matrix whole (`orthogonalize`). Every product is one BLAS / cuBLAS call with
a fixed thread count on the cpu, so the bits are the same for any sphere count and across a
resume. On cuda under --precision bf16, Newton-Schulz's products take bf16 inputs with float32
accumulation (cuBLASLt), as the reference's bf16 iteration; X, A and B stay float32 between the
products (each rounded to bf16 once as a product's input); fp32 and tf32 runs keep float32
products.

Ranks. Replicated: every rank runs every tensor. Sharded (--shard-optimizer, ZeRO-1): rank r
keeps AdamW's m, v and the finished gradient of its span (crystal.reducer) and runs AdamW's
chunk pass there; Muon's tensors are dealt to ranks in buffer order as R contiguous groups
balanced by size (`owner_blocks`), each owner keeps the momentum of its own tensors, every rank
sends each owner the finished gradient over the part of the owner's block its span holds (one
all-to-all), the parameter all-gather of the spans follows, each owner computes the momentum
and orthogonalizes and updates its whole matrices, and one more all-gather gives every rank the
owners' blocks. Each matrix's U, and so its update, is bitwise the single process's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from crystal.config import TrainConfig
from crystal.errors import CrystalError
from crystal.model import ParamLayout, ParamSpec
from crystal.optim import AdamW, Packing, gather_packed, momentum_at

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the reference's quintic (a, b, c)


@dataclass(frozen=True)
class MuonMatrix:
    """One matrix Muon orthogonalizes: columns [col, col + cols) of a 2-D tensor [rows, ld] at
    `offset` of the flat buffer (c_attn's q, k or v block; the whole tensor otherwise)."""

    name: str
    offset: int
    rows: int
    ld: int
    col: int
    cols: int
    linear: bool = False  # nn.Linear layout [out, in] (llama); else Conv1D [in, out] (GPT-2)

    def view(self, flat, base: int = 0):
        """The matrix in `flat`, a buffer that starts at element `base` of the parameters'."""
        at = self.offset - base
        return flat[at:at + self.rows * self.ld].reshape(self.rows, self.ld)[:, self.col:self.col + self.cols]

    @property
    def scale(self) -> float:
        """max(1, out/in)^0.5 (Conv1D [in, out]: out/in = cols/rows; nn.Linear: rows/cols)."""
        out_in = self.rows / self.cols if self.linear else self.cols / self.rows
        return max(1.0, out_in) ** 0.5

    def ns_flops(self, steps: int) -> int:
        """FLOPs of `steps` Newton-Schulz iterations on it (r <= n: X X^T, A A, B X)."""
        r, n = sorted((self.rows, self.cols))
        return steps * (2 * r * r * n + 2 * r * r * r + 2 * r * r * n)


def muon_tensors(layout: ParamLayout) -> list[ParamSpec]:
    """The tensors Muon updates: every 2-D tensor inside the blocks (either arch), in buffer order."""
    return [s for s in layout.specs if s.name.startswith(layout.blocks) and len(s.shape) == 2]


def muon_matrices(layout: ParamLayout) -> list[MuonMatrix]:
    """The matrices Muon orthogonalizes, in buffer order: GPT-2's c_attn as its q, k, v blocks (a
    llama's q, k, v, gate and up are tensors of their own)."""
    out, linear = [], layout.config.llama
    for s in muon_tensors(layout):
        rows, ld = s.shape
        if s.name.endswith("attn.c_attn.weight"):
            c = ld // 3
            out += [MuonMatrix(f"{s.name}[{part}]", s.offset, rows, ld, i * c, c) for i, part in enumerate("qkv")]
        else:
            out.append(MuonMatrix(s.name, s.offset, rows, ld, 0, ld, linear))
    return out


def optimizer_ranges(layout: ParamLayout) -> tuple[np.ndarray, np.ndarray]:
    """([K,3] AdamW rows (start, end, decay), [J,3] Muon rows (start, end, 0)): the buffer split
    between the two optimizers, adjacent rows of one kind merged."""
    muon = {s.name for s in muon_tensors(layout)}
    rows: dict[bool, list[list[int]]] = {True: [], False: []}
    for s in layout.specs:
        kind, decay = s.name in muon, 0 if s.name in muon else int(s.decay)
        r = rows[kind]
        if r and r[-1][1] == s.offset and r[-1][2] == decay:
            r[-1][1] = s.offset + s.span
        else:  # span: the LM head's padding rows go with wte to AdamW (zero stays zero there)
            r.append([s.offset, s.offset + s.span, decay])
    as_array = lambda r: np.array(r, dtype=np.int64).reshape(-1, 3)  # noqa: E731
    return as_array(rows[False]), as_array(rows[True])


def owner_blocks(layout: ParamLayout, ranks: int) -> list[tuple[int, int]]:
    """Each rank's [lo, hi) of the buffer whose Muon tensors it orthogonalizes (sharded): Muon's
    tensors in buffer order cut into `ranks` contiguous groups, each cut where the running size
    first reaches r/R of the total (whole tensors; an empty block (lo, lo) for a rank without)."""
    tensors = muon_tensors(layout)
    total = sum(s.size for s in tensors)
    groups: list[list[ParamSpec]] = [[] for _ in range(ranks)]
    done = 0
    for s in tensors:
        r = min(ranks - 1, (2 * done + s.size) * ranks // (2 * total))  # the group of its midpoint
        groups[r].append(s)
        done += s.size
    blocks, at = [], tensors[0].offset if tensors else 0
    for g in groups:
        if g:
            blocks.append((g[0].offset, g[-1].offset + g[-1].size))
            at = blocks[-1][1]
        else:
            blocks.append((at, at))
    return blocks


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, max(lo, hi))


class Muon:
    """Muon on `muon_matrices`, AdamW (crystal.optim.AdamW, its ranges only) on the rest; the
    AdamW interface the trainer drives (begin_step, update_chunk, t, the state's load_state and
    gather_state), plus `orthogonalize` after the chunk pass. chunks, span: the reducer's (see
    AdamW); comm, sharded: the ranks'.

    State: AdamW's m and v of its own tensors (packed, crystal.optim.Packing) and `momentum`,
    Muon's buffer of the tensors this rank orthogonalizes (every one, or an owner's block
    sharded), packed in buffer order; the exchange buffer `u` of an owner's block when sharded."""

    def __init__(self, be, layout: ParamLayout, cfg: TrainConfig, chunks: list[tuple[int, int]] | None = None,
                 span: tuple[int, int] | None = None, comm=None, sharded: bool = False):
        self.be, self.cfg, self.layout = be, cfg, layout
        adamw_rows, muon_rows = optimizer_ranges(layout)
        self.adamw = AdamW(be, layout, cfg, chunks, span, ranges=adamw_rows)
        self.m, self.v = self.adamw.m, self.adamw.v
        self.packing = Packing(muon_rows)  # Muon's momentum over the whole buffer
        self.matrices = muon_matrices(layout)
        self.steps, self.nesterov = cfg.muon("ns_steps"), cfg.muon("nesterov")
        self.comm, self.sharded = comm, sharded and comm is not None and comm.size > 1
        self.blocks = owner_blocks(layout, comm.size) if self.sharded else None
        self.block = self.blocks[comm.rank] if self.sharded else (0, layout.size)
        lo, hi = self.block
        self.mine = [k for k, mat in enumerate(self.matrices) if lo <= mat.offset < hi]  # orthogonalized here
        self.at = self.packing.at(lo)
        self.momentum = be.zeros(self.packing.at(hi) - self.at)
        # the tensors whose momentum this rank keeps: (offset, size, packed start, rows [[0, size, 0]])
        self.tensors = [(s.offset, s.size, self.packing.at(s.offset) - self.at,
                         np.array([[0, s.size, 0]], dtype=np.int64))
                        for s in muon_tensors(layout) if lo <= s.offset < hi]
        if self.sharded:
            self._plan(layout)
        self.mu = self.lr = 0.0
        self.decay = 1.0

    # --- the AdamW interface ---
    @property
    def t(self) -> int:
        return self.adamw.t

    @t.setter
    def t(self, value: int) -> None:
        self.adamw.t = value

    @property
    def scalars(self):
        return self.adamw.scalars

    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        """The step's scalars: AdamW's at lr, Muon's at muon_lr x lr / --lr (the same schedule)
        with the momentum of its 0-based step t - 1 (steps applied so far, as AdamW counts)."""
        self.adamw.begin_step(lr, grad_scale)
        self.grad_scale = grad_scale
        self.mu = momentum_at(self.t - 1, self.cfg)
        self.lr = self.cfg.muon("lr") * lr / self.cfg.lr
        self.decay = 1.0 - self.lr * self.cfg.muon("weight_decay")

    def update_chunk(self, c: int, params, grads, compute=None) -> None:
        """AdamW on chunk c's AdamW rows (Muon's rows wait for `orthogonalize`)."""
        self.adamw.update_chunk(c, params, grads, compute)

    def step(self, params, grads, lr: float, grad_scale: float = 1.0) -> None:
        """One whole step on one process (tests): the chunk pass, then every tensor and matrix."""
        self.begin_step(lr, grad_scale)
        for c in range(len(self.adamw.chunk_runs)):
            self.update_chunk(c, params, grads)
        for j in range(len(self.tensors)):
            self.update_momentum(j, grads)
        for k in self.mine:
            self.update_matrix(k, params, grads)

    # --- the matrices ---
    def update_momentum(self, j: int, u, base: int = 0) -> None:
        """Momentum of this rank's tensor j; its gradient in u (a buffer starting at element `base`
        of the parameters') becomes the update U."""
        offset, size, p, rows = self.tensors[j]
        self.be.muon_momentum(self.momentum[p:p + size], u[offset - base:offset - base + size], rows, self.mu,
                              self.nesterov, self.grad_scale)

    def update_matrix(self, k: int, params, u, base: int = 0) -> None:
        """W = W decay - lr scale NS(U) for matrix k; u: U's buffer, starting at element `base`."""
        mat = self.matrices[k]
        self.be.muon_orthogonal_update(mat.view(params), mat.view(u, base), self.steps, NS_COEFFS,
                                       self.decay, self.lr * mat.scale)

    def orthogonalize(self, params, reducer, map_items, compute=None) -> None:
        """After the chunk pass: the momentum of every tensor, then every matrix (replicated), or
        the owners' (sharded: their gradient blocks first, one all-to-all), run by the spheres
        through map_items(n, work(i, item)); then every rank's parameters are the step's (sharded:
        the parameter all-gathers) and compute, a bf16 weight copy, is refreshed."""
        u, base = reducer.grad, 0
        if self.sharded:
            x = self._exchange
            self.comm.alltoallv(reducer.grad, x["send_counts"], x["send_displs"], self.u, x["recv_counts"],
                                x["recv_displs"], x["block"])
            reducer.gather_params(params)  # AdamW's spans (Muon's tensors still the last step's everywhere)
            u, base = self.u, self.block[0]
        map_items(len(self.tensors), lambda i, j: self.update_momentum(j, u, base))
        map_items(len(self.mine), lambda i, j: self.update_matrix(self.mine[j], params, u, base))
        if self.sharded:
            self.comm.allgatherv(params, [hi - lo for lo, hi in self.blocks], [lo for lo, _ in self.blocks],
                                 "the Muon all-gather")
        if compute is not None and compute is not params:
            self.be.compute_weights(params, out=compute)

    def _plan(self, layout: ParamLayout) -> None:
        """The sharded exchange: rank r's span of the gradient goes, cut by owner block, to the owners."""
        R, rank = self.comm.size, self.comm.rank
        from crystal.reducer import shard_spans

        spans = shard_spans(layout.size, R)
        span = spans[rank]
        cuts = [[_overlap(spans[r], self.blocks[o]) for o in range(R)] for r in range(R)]
        self._exchange = dict(
            send_counts=[hi - lo for lo, hi in cuts[rank]], send_displs=[lo - span[0] for lo, _ in cuts[rank]],
            recv_counts=[hi - lo for lo, hi in (cuts[r][rank] for r in range(R))],
            recv_displs=[lo - self.block[0] for lo, _ in (cuts[r][rank] for r in range(R))],
            block=max(hi - lo for row in cuts for lo, hi in row))
        self.u = self.be.empty(exchange_floats(self.block))

    # --- the state ---
    def state_buffers(self) -> list:
        """Every buffer the optimizer keeps (its memory: `optimizer_memory` counts the same)."""
        return self.adamw.state_buffers() + [self.momentum] + ([self.u] if self.sharded else [])

    def load_state(self, state) -> None:
        """This rank's part of a checkpoint's state (crystal.checkpoint.TrainState: AdamW's m and v
        and Muon's momentum, each packed over the whole run). A checkpoint of the previous
        layout (momentum None: Muon's momentum in m at its matrices, v zero there) is read as it."""
        m, v, momentum = state.m, state.v, state.momentum
        if momentum is None:
            adamw = self.adamw.packing
            if self.packing.pack(v).any():
                raise CrystalError("the checkpoint holds AdamW's second moments on Muon's matrices "
                                   "(a run with --optimizer adamw); this run's optimizer is muon")
            m, v, momentum = adamw.pack(m), adamw.pack(v), self.packing.pack(m)
        self.adamw.load_state(dataclasses.replace(state, m=m, v=v, momentum=None))
        self.momentum[...] = self.be.to_device(momentum[self.at:self.at + self.momentum.size])

    def gather_state(self, reducer) -> tuple:
        """(m, v, momentum): the whole run's state on the host of rank 0 (None on the others)."""
        m, v, _ = self.adamw.gather_state(reducer)
        return m, v, gather_packed(self.be, reducer, self.momentum, self.packing, self.blocks)


def exchange_floats(block: tuple[int, int]) -> int:
    """The sharded owner's receive buffer: its block of the gradient, AdamW's rows inside it too."""
    return max(1, block[1] - block[0])


def optimizer_memory(layout: ParamLayout, optimizer: str, ranks: int = 1, shard: bool = False) -> dict:
    """Bytes of the optimizer's buffers on its largest rank (what `state_buffers` allocates):
    adamw_moments (m and v of AdamW's elements in the rank's span), muon_momentum (of the tensors
    it orthogonalizes), muon_exchange (sharded: an owner's gradient block)."""
    from crystal.reducer import shard_spans

    sharded = shard and ranks > 1
    spans = shard_spans(layout.size, ranks) if sharded else [(0, layout.size)]
    if optimizer != "muon":
        return {"adamw_moments": max(2 * 4 * (hi - lo) for lo, hi in spans), "muon_momentum": 0, "muon_exchange": 0}
    adamw_rows, muon_rows = optimizer_ranges(layout)
    adamw, muon = Packing(adamw_rows), Packing(muon_rows)
    blocks = owner_blocks(layout, ranks) if sharded else [(0, layout.size)]
    per_rank = [{"adamw_moments": 2 * 4 * (adamw.at(hi) - adamw.at(lo)),
                 "muon_momentum": 4 * (muon.at(b_hi) - muon.at(b_lo)),
                 "muon_exchange": 4 * exchange_floats((b_lo, b_hi)) if sharded else 0}
                for (lo, hi), (b_lo, b_hi) in zip(spans, blocks)]
    return max(per_rank, key=lambda r: sum(r.values()))


# --- the checkpoint's optimizer state (optim.safetensors) of a Muon run ---

def state_shapes(layout: ParamLayout) -> dict[str, tuple[int]]:
    """Its tensors: AdamW's moments of AdamW's tensors, packed in buffer order without the LM
    head's padding rows, and Muon's momentum of its matrices, packed in buffer order."""
    adamw_rows, muon_rows = optimizer_ranges(layout)
    lo, hi = layout.padding
    n = Packing(adamw_rows).size - (hi - lo)
    return {"adamw.m": (n,), "adamw.v": (n,), "muon.momentum": (Packing(muon_rows).size,)}


def state_tensors(layout: ParamLayout, m: np.ndarray, v: np.ndarray, momentum: np.ndarray) -> dict[str, np.ndarray]:
    """optim.safetensors' tensors from the packed state (the padding rows' moments are zero: left out)."""
    lo, hi = _packed_padding(layout)
    return {"adamw.m": np.concatenate([m[:lo], m[hi:]]), "adamw.v": np.concatenate([v[:lo], v[hi:]]),
            "muon.momentum": np.ascontiguousarray(momentum)}


def state_from_tensors(layout: ParamLayout, tensors: dict[str, np.ndarray]) -> tuple:
    """(m, v, momentum), packed, from optim.safetensors' tensors (shapes checked by the caller)."""
    lo, hi = _packed_padding(layout)
    pad = np.zeros(hi - lo, np.float32)
    m, v = (np.concatenate([tensors[k][:lo], pad, tensors[k][lo:]]) for k in ("adamw.m", "adamw.v"))
    return m, v, tensors["muon.momentum"]


def _packed_padding(layout: ParamLayout) -> tuple[int, int]:
    """The LM head's padding rows (AdamW's: the head is an embedding) in AdamW's packed state."""
    packing = Packing(optimizer_ranges(layout)[0])
    return packing.at(layout.padding[0]), packing.at(layout.padding[1])


def ns_flops_per_step(layout: ParamLayout, steps: int) -> int:
    """Newton-Schulz FLOPs of one optimizer step (every matrix, all ranks together)."""
    return sum(m.ns_flops(steps) for m in muon_matrices(layout))


def muon_parameters(layout: ParamLayout) -> int:
    return sum(s.size for s in muon_tensors(layout))


def warm_up(be) -> None:
    """Compile Muon's ops once (a sphere then never compiles): both orientations, strided rows."""
    grads, m = be.to_device(np.linspace(-1, 1, 24, dtype=np.float32)), be.zeros(24)
    be.muon_momentum(m, grads, np.array([[0, 24, 0]], dtype=np.int64), 0.9, True, 1.0)
    p = be.zeros((4, 6))
    be.muon_orthogonal_update(p[:, :3], grads.reshape(4, 6)[:, 3:], 1, NS_COEFFS, 1.0, 0.1)  # c_attn's blocks
    be.muon_orthogonal_update(p[:2, :], grads[:12].reshape(2, 6), 1, NS_COEFFS, 1.0, 0.1)  # whole matrices
    be.synchronize()
