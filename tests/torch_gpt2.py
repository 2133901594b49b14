"""A plain PyTorch GPT-2, built from crystal's HF-named parameters: the reference for tests."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def torch_params(params: dict[str, np.ndarray], dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=True) for k, v in params.items()}


def dropped(x: torch.Tensor, drop, layer: int, site: int) -> torch.Tensor:
    """x times crystal's dropout multiplier (mask / (1 - p)) for that site, or x itself."""
    if drop is None:
        return x
    from crystal.dropout import keep_mask

    keep = keep_mask(drop.key(layer, site), drop.threshold, x.numel()).reshape(x.shape)
    scale = torch.tensor(np.float32(drop.scale), dtype=x.dtype)
    return torch.where(torch.as_tensor(keep, device=x.device), x * scale, torch.zeros((), dtype=x.dtype))


def torch_forward(p: dict[str, torch.Tensor], cfg, idx: np.ndarray, sdpa: bool = False, drop=None) -> torch.Tensor:
    """Logits [B,T,V] of GPT-2 (pre-LN, tanh GELU, tied head) for token ids idx [B,T].
    sdpa: attention through F.scaled_dot_product_attention (fused; what nanoGPT uses).
    drop: a crystal.dropout.Dropout, applied where crystal applies it, with its masks."""
    from crystal.dropout import ATTENTION_PROBS, ATTENTION_PROJ, EMBEDDING, MLP_PROJ

    assert not (sdpa and drop), "dropout on the attention probabilities needs the explicit path"

    dev = p["transformer.wte.weight"].device
    idx = idx.to(dev) if torch.is_tensor(idx) else torch.as_tensor(np.asarray(idx), dtype=torch.long, device=dev)
    B, T = idx.shape
    C, NH, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
    hs = C // NH
    x = dropped(p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T], drop, 0, EMBEDDING)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    for l in range(cfg.n_layer):
        h = f"transformer.h.{l}."
        y = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        qkv = y @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))
        if sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = dropped(att, drop, l, ATTENTION_PROBS) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + dropped(y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"], drop, l, ATTENTION_PROJ)
        y = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        y = F.gelu(y @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + dropped(y @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"], drop, l, MLP_PROJ)
    x = F.layer_norm(x, (C,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return x @ p["transformer.wte.weight"].T


def torch_loss_and_grads(params, cfg, idx, targets, dtype=torch.float64, drop=None):
    p = torch_params(params, dtype)
    logits = torch_forward(p, cfg, idx, drop=drop)
    tg = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1))
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in p.items()}, logits.detach().numpy()
