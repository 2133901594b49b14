"""LoRA (crystal.lora): adapters on a frozen GPT-2, against Hugging Face PEFT; the trainer's
contracts (bitwise across spheres and ranks, exact resume, the base untouched, adapter-sized
buffers); PEFT and merged exports; the refusals.

The base is a tiny random GPT-2 (32 wide, 2 layers, n_positions 16) that transformers builds and
saves here, with a byte-level BPE tokenizer trained here. Nothing comes from the hub.
"""

import dataclasses
import json
import os
import threading

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.cli import main
from crystal.config import ModelConfig, resolve
from crystal.data import EOT, default_corpus, load_dataset
from crystal.lora import AdapterLayout, LoraConfig, init_adapters
from crystal.model import LoraModel
from crystal.model import ParamLayout
from crystal.optim import AdamW
from crystal.pretrained import load_params, open_pretrained
from crystal.trainer import train

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
peft = pytest.importorskip("peft", reason="needs peft (the test extra)")

from compare import rel_err  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT-2 as transformers saves it, its tokenizer, and data prepared with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("lora")
    text = default_corpus()[:40_000].decode()
    (root / "input.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)
    hf_cfg = transformers.GPT2Config(vocab_size=len(fast), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "hf")
    fast.save_pretrained(root / "hf")
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(root / "hf")]) == 0
    pre = open_pretrained(root / "hf")
    return dict(root=root, hf=root / "hf", data=root / "data", config=pre.config, params=load_params(pre))


def lora_cfg(base, **train):
    over = dict(init_from=str(base["hf"]), data=str(base["data"]), seq_len=16, micro_batches=6, steps=3,
                spheres=1, warmup=0, eval_every=0, lora_dropout=0.05, lora_targets="all", lr=3e-3)
    over.update(train)
    return resolve("finetune-lora", dataclasses.asdict(base["config"]), over)


def peft_model(base, lora: LoraConfig, adapters: np.ndarray):
    """transformers' GPT-2 with the base's weights, wrapped by PEFT with the given adapters."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(base["hf"])
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.targets), fan_in_fan_out=True))
    named = dict(pm.named_parameters())
    for k, v in AdapterLayout(base["config"], lora).state_dict(adapters).items():
        named[k.replace(".weight", ".default.weight")].data.copy_(torch.tensor(v))
    return pm, named


def batch(seed=1, B=2, T=16, V=300):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32)


# --- against PEFT ------------------------------------------------------------------------------------

def test_loss_adapter_gradients_and_ten_adamw_steps_match_peft(base):
    lora = LoraConfig(4, 8.0, 0.0, ALL)
    layout = AdapterLayout(base["config"], lora)
    rng = np.random.default_rng(0)
    adapters = (rng.standard_normal(layout.size) * 0.1).astype(np.float32)  # B nonzero: every gradient is
    ours = LoraModel(base["config"], base["params"], lora, adapters)
    pm, named = peft_model(base, lora, adapters)
    x, y = batch()
    loss, grads = ours.loss_and_grads(x, y)
    logits = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y.reshape(-1)).long())
    ref.backward()
    assert abs(loss - ref.item()) < 1e-6
    for k, g in grads.items():
        assert rel_err(g, named[k.replace(".weight", ".default.weight")].grad.numpy()) < 1e-5, k
    # ten AdamW steps: crystal's AdamW on the adapter buffer, torch's on PEFT's parameters
    cfg = dataclasses.replace(lora_cfg(base)[1], lr=1e-2, weight_decay=0.01, beta2=0.999)
    be = CpuBackend()
    opt = AdamW(be, layout, cfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    topt = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.999), eps=cfg.eps, weight_decay=0.01)
    gflat = layout.zeros()
    for step in range(10):
        x, y = batch(seed=10 + step)
        _, grads = ours.loss_and_grads(x, y)
        for k, g in layout.views(gflat).items():
            g[...] = grads[k]
        opt.step(ours.adapters, gflat, 1e-2)
        topt.zero_grad()
        logits = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y.reshape(-1)).long()).backward()
        topt.step()
    x, y = batch(seed=99)
    logits = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y.reshape(-1)).long())
    assert abs(ours.loss(x, y) - ref.item()) < 1e-4


def test_adapter_dropout_gradients_match_autograd_with_the_same_masks(base):
    """LoRA dropout: crystal's masks (crystal.dropout, sites LORA_SITE + target) applied in torch."""
    from crystal.dropout import Dropout, keep_mask
    from crystal.lora import LORA_SITE, PEFT_PREFIX, module_path
    from torch_gpt2 import torch_params

    lora = LoraConfig(4, 8.0, 0.3, ("c_attn", "mlp.c_proj"))
    layout = AdapterLayout(base["config"], lora)
    adapters = (np.random.default_rng(3).standard_normal(layout.size) * 0.1).astype(np.float32)
    drop = Dropout(0.3, 5, 2, 1)
    x, y = batch(seed=4)
    loss, grads = LoraModel(base["config"], base["params"], lora, adapters).loss_and_grads(x, y, drop)

    cfg = base["config"]
    p = torch_params(ParamLayout(cfg).views(base["params"]))
    ad = {k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float64, requires_grad=True)
          for k, v in layout.views(adapters).items()}

    def proj(l, target, inp, w, b):
        out = inp @ w + b
        path = PEFT_PREFIX + module_path(cfg, l, target)
        if path + ".lora_A.weight" not in ad:
            return out
        i = lora.targets.index(target)
        keep = torch.as_tensor(keep_mask(drop.key(l, LORA_SITE + i), drop.threshold, inp.numel()).reshape(inp.shape))
        xd = torch.where(keep, inp / (1 - 0.3), torch.zeros((), dtype=inp.dtype))
        return out + lora.scale * (xd @ ad[path + ".lora_A.weight"].T) @ ad[path + ".lora_B.weight"].T

    import torch.nn.functional as F

    idx = torch.as_tensor(x, dtype=torch.long)
    h = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:16]
    C, NH = cfg.n_embd, cfg.n_head
    for l in range(cfg.n_layer):
        pre = f"transformer.h.{l}."
        z = F.layer_norm(h, (C,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], 1e-5)
        q, k, v = proj(l, "c_attn", z, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"]).split(C, dim=2)
        q, k, v = (t.view(2, 16, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, C)
        h = h + z @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        z = F.layer_norm(h, (C,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], 1e-5)
        z = F.gelu(z @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"], approximate="tanh")
        h = h + proj(l, "mlp.c_proj", z, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
    h = F.layer_norm(h, (C,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], 1e-5)
    ref = F.cross_entropy((h @ p["transformer.wte.weight"].T).reshape(-1, cfg.vocab_size),
                          torch.as_tensor(y.reshape(-1), dtype=torch.long))
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    for k, g in grads.items():
        assert rel_err(g, ad[k].grad.numpy()) < 1e-4, k


# --- the trainer --------------------------------------------------------------------------------------

class CountingBackend(CpuBackend):
    """The cpu backend, recording the weight gradients each backward op is asked for."""

    def __init__(self):
        super().__init__()
        self.dw, self.lock = [], threading.Lock()

    def _note(self, op, *dws):
        with self.lock:
            self.dw.append((op, [None if d is None else d.shape for d in dws]))

    def matmul_backward(self, dinp, dw, dbias, dout, inp, w):
        self._note("matmul", dw, dbias)
        super().matmul_backward(dinp, dw, dbias, dout, inp, w)

    def lm_head_backward(self, dinp, dwte, dlogits, inp, wte):
        self._note("lm_head", dwte)
        super().lm_head_backward(dinp, dwte, dlogits, inp, wte)

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd):
        self._note("layernorm", dw, db)
        super().layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd)

    def encoder_backward(self, dwte, dwpe, dout, idx):
        self._note("encoder", dwte, dwpe)
        super().encoder_backward(dwte, dwpe, dout, idx)


@pytest.fixture(scope="module")
def runs(base):
    """The same LoRA run on 1, 3 and 12 spheres (4 steps of 6 micro-batches, adapter dropout on)."""
    data = load_dataset(str(base["data"]), 0.1)
    return {s: train(*lora_cfg(base, spheres=s, steps=4), dataset=data, init=base["params"]) for s in (1, 3, 12)}


def test_no_weight_gradient_of_a_frozen_tensor_is_ever_computed(base):
    from crystal.model import warm_up

    be = CountingBackend()
    warm_up(be)  # its full-model backward compiles the kernels; then the run alone is counted
    be.dw.clear()
    model_cfg, cfg = lora_cfg(base, steps=1, micro_batches=1)
    train(model_cfg, cfg, backend=be, init=base["params"])
    r = cfg.lora_r
    adapter_shapes = {(i, r) for i, _ in ((32, 0), (128, 0))} | {(r, o) for o in (96, 32, 128)}
    ops = [op for op, _ in be.dw]
    assert "encoder" not in ops and ops.count("lm_head") >= 1
    for op, shapes in be.dw:
        if op == "matmul":
            assert shapes[1] is None and (shapes[0] is None or shapes[0] in adapter_shapes), shapes
        else:
            assert shapes == [None] * len(shapes), (op, shapes)
    # every base product computed its input gradient only: 4 frozen + 8 adapter products a layer
    assert sum(1 for op, s in be.dw if op == "matmul" and s[0] is None) == 4 * 2


@pytest.mark.parametrize("spheres", [3, 12])
def test_lora_runs_are_bitwise_identical_for_any_sphere_count(runs, spheres):
    assert runs[spheres].losses == runs[1].losses
    assert runs[spheres].params.tobytes() == runs[1].params.tobytes()


def test_lora_on_two_ranks_is_bitwise_one_process(base, runs):
    from thread_ranks import ThreadComm, run_ranks

    data = load_dataset(str(base["data"]), 0.1)
    shared = {"barrier": threading.Barrier(2)}
    model_cfg, cfg = lora_cfg(base, spheres=2, steps=4)
    out = run_ranks(2, lambda i: train(model_cfg, cfg, dataset=data, init=base["params"],
                                       comm=ThreadComm(i, 2, shared)), shared)
    for r in out:
        assert r.losses == runs[1].losses and r.params.tobytes() == runs[1].params.tobytes()


def test_the_gradient_pool_and_adamw_hold_adapter_sized_buffers_only(base):
    seen = {}

    def on_step(rec, spheres):
        seen.update(pool=spheres.reducer.pool.shape, rows=[g.flat.shape for g in spheres.row_grads])

    model_cfg, cfg = lora_cfg(base, steps=1)
    train(model_cfg, cfg, init=base["params"], on_step=on_step)
    n = AdapterLayout(model_cfg, LoraConfig.of(cfg, model_cfg)).size
    assert seen["pool"][1] == n and set(seen["rows"]) == {(n,)}
    assert n < ParamLayout(model_cfg).n_params / 4


def test_a_short_fine_tune_lowers_the_loss_and_leaves_the_base_untouched(base):
    before = base["params"].copy()
    model_cfg, cfg = lora_cfg(base, steps=12, lr=1e-2, lora_dropout=0.0)
    r = train(model_cfg, cfg, init=base["params"])
    assert np.mean(r.losses[-3:]) < np.mean(r.losses[:3]) - 0.05
    assert base["params"].tobytes() == before.tobytes()


# --- run directories: resume, exports, sample --------------------------------------------------------

def argv(base, out, *more):
    return ["train", "--preset", "finetune-lora", "--init-from", str(base["hf"]), "--data", str(base["data"]),
            "--seq-len", "16", "--micro-batches", "4", "--spheres", "2", "--warmup", "0", "--eval-every", "0",
            "--lora-targets", "c_attn,mlp.c_proj", "--lr", "3e-3", "--out", str(out), "--quiet", *more]


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(argv(base, out, "--steps", "4", "--checkpoint-every", "2")) == 0
    return out


def test_a_lora_run_resumes_bitwise_and_holds_adapters_not_the_model(base, lora_run, tmp_path):
    assert main(argv(base, tmp_path / "r", "--steps", "4", "--checkpoint-every", "2", "--stop-at", "2")) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    for name in ("adapter_model.safetensors", "metrics.jsonl"):
        a, b = (lora_run / name).read_bytes(), (tmp_path / "r" / name).read_bytes()
        assert a == b if name != "metrics.jsonl" else [json.loads(l)["loss"] for l in a.splitlines()] == \
            [json.loads(l)["loss"] for l in b.splitlines()]
    assert not (lora_run / "model.safetensors").exists()
    state = json.loads((lora_run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["base_model"]["path"] == str(base["hf"]) and len(state["base_model"]["sha256"]) == 64
    assert set(os.listdir(lora_run / "checkpoints" / "step-00000004")) == {
        "adapter_model.safetensors", "optim.safetensors", "state.json"}


def test_resume_refuses_a_base_that_changed(base, tmp_path, capsys):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(base["hf"], hf)
    run = tmp_path / "r"
    more = ["--steps", "4", "--checkpoint-every", "2", "--stop-at", "2"]
    assert main(argv(dict(base, hf=hf), run, *more)) == 0
    m = transformers.GPT2LMHeadModel.from_pretrained(hf)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    m.save_pretrained(hf)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changed" in err and "sha256" in err
    assert main(["sample", str(run), "--max-tokens", "2"]) == 2  # the adapters belong to the old base


def test_peft_export_loads_in_peft_with_crystal_logits_and_hf_export_is_the_merged_model(base, lora_run, tmp_path):
    from crystal.pretrained import load_checkpoint

    assert main(["export", str(lora_run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(lora_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    x, _ = batch(seed=7)
    ours = load_checkpoint(lora_run).logits(x)
    hf = transformers.GPT2LMHeadModel.from_pretrained(base["hf"])
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
        merged = pm.merge_and_unload()(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
        exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")(
            input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(exported, merged) < 1e-6
    # the run directory itself is a PEFT adapter directory
    pm2 = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base["hf"]), lora_run)
    with torch.no_grad():
        assert rel_err(pm2(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy(), theirs) == 0


def test_sample_and_eval_work_on_a_lora_run(lora_run, capsys):
    assert main(["sample", str(lora_run), "--max-tokens", "4", "--temperature", "0"]) == 0
    assert main(["eval", str(lora_run), "--batches", "1"]) == 0
    assert "val loss" in capsys.readouterr().out


def test_dry_run_prints_the_adapter_sized_buffers(base, capsys):
    assert main(argv(base, "unused", "--dry-run")) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("LoRA:"))
    n = AdapterLayout(base["config"], LoraConfig(8, 16.0, 0.05, ("c_attn", "mlp.c_proj"))).size
    assert f"{n:,} trainable parameters" in line and "gradient pool" in line and "AdamW moments" in line


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "4"], "--init-from"),
    (["--lora-alpha", "8"], "needs --lora-r"),
    (["--lora-r", "0", "--lora-dropout", "0.1"], "needs --lora-r"),
    (["--lora-r", "-1"], ">= 0"),
    (["--lora-r", "1.5"], "not a valid integer"),
    (["--lora-targets", "c_attn"], "needs --lora-r"),  # LoRA flags on a run that trains every weight
    (["--preset", "finetune-lora"], "--init-from"),  # the LoRA preset with no model to adapt
])
def test_bad_lora_flags_without_a_base_are_one_line(flags, message, capsys):
    assert main(["train", "--preset", "tiny", "--dry-run", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("flags, message", [
    (["--lora-targets", "q_proj"], "not a projection of a gpt2 block"),
    (["--lora-targets", "q"], "not a projection of a gpt2 block"),  # a Llama alias
    (["--lora-targets", "c_attn,c_fc,bogus"], "'bogus' is not a projection"),
    (["--lora-targets", ","], "names no projection"),
    (["--lora-r", "33"], "above the rank"),
    (["--lora-r", "0"], "--lora-targets needs --lora-r"),  # r 0 is no LoRA: the targets make no sense
    (["--lora-alpha", "0"], "positive number"),
    (["--lora-dropout", "1"], "[0, 1)"),
    (["--optimizer", "muon"], "AdamW"),
])
def test_bad_lora_settings_are_one_line(base, flags, message, capsys, tmp_path):
    assert main(argv(base, tmp_path / "r", "--dry-run", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags", [["--lora-r", "4"], ["--lora-targets", "c_fc"], ["--lora-dropout", "0.2"]])
def test_lora_flags_on_a_resume_are_one_line_and_change_nothing(lora_run, flags, capsys):
    before = {f: f.read_bytes() for f in sorted(lora_run.rglob("*")) if f.is_file()}
    assert main(["train", "--resume", str(lora_run), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot change --lora-" in err
    assert {f: f.read_bytes() for f in sorted(lora_run.rglob("*")) if f.is_file()} == before


def test_peft_export_of_a_full_run_is_refused(base, tmp_path, capsys):
    run = tmp_path / "full"
    assert main(["train", "--init-from", str(base["hf"]), "--data", str(base["data"]), "--seq-len", "16",
                 "--steps", "1", "--micro-batches", "1", "--spheres", "1", "--eval-every", "0", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_init_is_peft_kaiming_uniform_and_b_zero(base):
    layout = AdapterLayout(base["config"], LoraConfig(8, 16.0, 0.0, ALL))
    views = layout.views(init_adapters(layout, 3))
    for s in layout.specs:
        v = views[s.name]
        if s.kind == "B":
            assert not v.any()
        else:
            assert np.abs(v).max() <= 1 / np.sqrt(s.shape[1]) and np.abs(v).max() > 0.5 / np.sqrt(s.shape[1])


# --- the cuda backend, emulated (tests/emu): fp32 and bf16 ----------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_emulated_cuda_adapters_match_the_cpu(precision):
    """The same ops on the cuda backend's host code and CPU-emulated kernels (bf16: activations and
    the weight copies in bf16, the adapter gradients float32)."""
    from emu.backend import EmulatedCudaBackend
    from lt_standin import LtStandIn
    from crystal.dropout import Dropout
    from crystal.model import init_params

    cfg = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    lora = LoraConfig(4, 8.0, 0.2, ALL)
    layout = AdapterLayout(cfg, lora)
    adapters = (np.random.default_rng(2).standard_normal(layout.size) * 0.2).astype(np.float32)
    be = EmulatedCudaBackend("bf16", lt=LtStandIn(), flash=False) if precision == "bf16" else EmulatedCudaBackend()
    x, y = batch(seed=5, B=2, T=8, V=64)
    drop = Dropout(0.2, 1, 0, 0)
    loss_c, grads_c = LoraModel(cfg, init_params(cfg, 1), lora, adapters).loss_and_grads(x, y, drop)
    loss_g, grads_g = LoraModel(cfg, init_params(cfg, 1), lora, adapters, backend=be).loss_and_grads(x, y, drop)
    tol = 2e-2 if precision == "bf16" else 1e-5
    assert abs(loss_g - loss_c) / loss_c < tol
    for k, g in grads_c.items():
        assert rel_err(grads_g[k], g) < (0.1 if precision == "bf16" else 1e-4), k
