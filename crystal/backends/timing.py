"""TimedBackend: any backend, with wall time accumulated per op family (for step breakdowns).

Each thread adds to its own counters (no lock on the hot path); `breakdown()` sums them. On
cuda the times are host-side launch times unless the caller synchronizes; on cpu they are the
ops' real compute times.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

FAMILIES = {
    "encoder_forward": "encoder", "encoder_backward": "encoder",
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "matmul_forward": "matmul", "matmul_backward": "matmul", "matmul_gelu_forward": "matmul",
    "lm_head_forward": "matmul", "lm_head_backward": "matmul",
    "attention_forward": "attention", "attention_backward": "attention",
    "gelu_forward": "gelu", "gelu_backward": "gelu",
    "rmsnorm_forward": "rmsnorm", "rmsnorm_backward": "rmsnorm", "residual_rmsnorm_forward": "rmsnorm",
    "linear_forward": "matmul", "linear_backward": "matmul",
    "rope_forward": "rope", "rope_backward": "rope",
    "swiglu_forward": "swiglu", "swiglu_backward": "swiglu",
    "residual_forward": "residual", "dropout": "dropout", "residual_layernorm_forward": "layernorm",
    "crossentropy_forward_backward": "loss",
    "crossentropy_forward": "loss", "crossentropy_backward": "loss", "sum_losses": "loss",
    "add_inplace": "reducer", "scale_inplace": "reducer", "reduce_slots": "reducer",
    "sum_squares": "optimizer", "adamw_update": "optimizer",
}


class TimedBackend:
    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self._local = threading.local()
        self._all: list[dict] = []
        self._lock = threading.Lock()

    def _counters(self) -> dict:
        c = getattr(self._local, "counters", None)
        if c is None:
            c = self._local.counters = defaultdict(float)
            with self._lock:
                self._all.append(c)
        return c

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        family = FAMILIES.get(name)
        if family is None:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._counters()[family] += time.perf_counter() - t0

        return timed

    @property
    def warm(self) -> bool:
        return self.inner.warm

    @warm.setter
    def warm(self, value: bool) -> None:
        self.inner.warm = value

    def reset(self) -> None:
        with self._lock:
            for c in self._all:
                c.clear()

    def breakdown(self) -> dict[str, float]:
        """Seconds per op family, summed over every thread."""
        total: dict[str, float] = defaultdict(float)
        with self._lock:
            for c in self._all:
                for k, v in c.items():
                    total[k] += v
        return dict(total)
