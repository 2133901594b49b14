"""Text generation from a trained model: temperature and top-k sampling, deterministic per seed.

Each new token is drawn from the logits at the last position of the (at most block_size) context.
The context is placed at the start of a fixed [1, block_size] window: attention is causal, so
the padding after it cannot change those logits, and one activation buffer serves every length.
The softmax subtracts the largest logit before dividing by the temperature, so any temperature
> 0 is safe: as it goes to 0 the draw becomes the argmax (its ties drawn uniformly), never NaN.
"""

from __future__ import annotations

import numpy as np

from crystal.errors import CrystalError

MAX_TOKENS = 100_000  # a bound on one generation (the text is returned when it is complete)


def generate(model, prompt: list[int], n_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> list[int]:
    """prompt + n_tokens sampled ids. temperature 0 is greedy (argmax)."""
    if not 0 <= n_tokens <= MAX_TOKENS:
        raise CrystalError(f"--tokens must be in [0, {MAX_TOKENS:,}], got {n_tokens}")
    if not (temperature >= 0) or temperature == float("inf"):
        raise CrystalError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise CrystalError(f"--top-k must be >= 1, got {top_k}")
    if seed < 0:
        raise CrystalError(f"--seed must be >= 0, got {seed}")
    V, T = model.config.vocab_size, model.config.block_size
    if any(not (0 <= t < V) for t in prompt):
        raise CrystalError(f"prompt token ids must be in [0, {V})")
    rng = np.random.default_rng(seed)
    ids = list(prompt)
    window = np.zeros((1, T), dtype=np.int32)
    for _ in range(n_tokens):
        ctx = ids[-T:]
        window[0, :len(ctx)] = ctx
        logits = model.logits(window)[0, len(ctx) - 1].astype(np.float64)
        if not np.isfinite(logits).all():
            raise CrystalError(f"the model's logits are not finite at token {len(ids) - len(prompt) + 1} "
                               "(NaN or inf weights in the checkpoint?)")
        if temperature == 0:
            ids.append(int(np.argmax(logits)))
            continue
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the argmax to -inf
            logits = (logits - logits.max()) / temperature  # <= 0, the argmax 0: exp never overflows
        if top_k is not None and top_k < V:
            kth = np.partition(logits, V - top_k)[V - top_k]
            logits[logits < kth] = -np.inf
        p = np.exp(logits)
        ids.append(int(rng.choice(V, p=p / p.sum())))
    return ids
