"""LoRA on a Llama (crystal.lora): adapters on q, k, v, o, gate, up, down of a frozen tiny
LlamaForCausalLM against Hugging Face PEFT (the q, k, v adapters add into their columns of the
fused q|k|v product, gate and up into gate|up), the PEFT and merged exports, and the trainer's
bitwise contract across sphere counts.

The base is a tiny random Llama (GQA: 4 query heads on 2 KV heads, untied head) that
transformers builds and saves here, with a byte-level BPE tokenizer trained here.
"""

import dataclasses
import os

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.cli import main
from crystal.config import resolve
from crystal.data import EOT, default_corpus, load_dataset
from crystal.lora import AdapterLayout, LoraConfig, target_columns
from crystal.model import LoraModel
from crystal.optim import AdamW
from crystal.pretrained import load_checkpoint, load_params, open_pretrained
from crystal.trainer import train

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
peft = pytest.importorskip("peft", reason="needs peft (the test extra)")

from compare import rel_err  # noqa: E402
from test_lora import batch  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama as transformers saves it, its tokenizer, and data prepared with it."""
    from test_llama_hf import train_tokenizer

    root = tmp_path_factory.mktemp("lora_llama")
    text = default_corpus()[:40_000].decode()
    (root / "input.txt").write_text(text, encoding="utf-8")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text), eos_token=EOT, bos_token=EOT)
    hf_cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():  # the norms away from one, so their input gradients mean something
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    fast.save_pretrained(root / "hf")
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(root / "hf")]) == 0
    pre = open_pretrained(root / "hf")
    return dict(root=root, hf=root / "hf", data=root / "data", config=pre.config, params=load_params(pre))


def hf_llama(base):
    m = transformers.LlamaForCausalLM.from_pretrained(base["hf"])
    m.config._attn_implementation = "eager"
    return m.float().eval()


def peft_model(base, lora: LoraConfig, adapters: np.ndarray):
    """transformers' Llama with the base's weights, wrapped by PEFT with the given adapters."""
    pm = peft.get_peft_model(hf_llama(base), peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                             lora_dropout=lora.dropout,
                                                             target_modules=list(lora.targets)))
    named = dict(pm.named_parameters())
    for k, v in AdapterLayout(base["config"], lora).state_dict(adapters).items():
        named[k.replace(".weight", ".default.weight")].data.copy_(torch.tensor(v))
    return pm, named


def peft_loss(pm, x, y):
    logits = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y.reshape(-1)).long())


def test_the_targets_columns_in_the_fused_products(base):
    cfg = base["config"]  # q|k|v: 4 query heads, 2 KV heads of 8; gate|up: 48 each
    assert [target_columns(cfg, t) for t in ALL] == [0, 32, 48, 0, 0, 48, 0]


@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj")])
def test_loss_adapter_gradients_and_ten_adamw_steps_match_peft(base, targets):
    lora = LoraConfig(4, 8.0, 0.0, targets)
    layout = AdapterLayout(base["config"], lora)
    adapters = (np.random.default_rng(0).standard_normal(layout.size) * 0.1).astype(np.float32)  # B nonzero
    before = base["params"].copy()
    ours = LoraModel(base["config"], base["params"], lora, adapters)
    pm, named = peft_model(base, lora, adapters)
    x, y = batch()
    loss, grads = ours.loss_and_grads(x, y)
    ref = peft_loss(pm, x, y)
    ref.backward()
    assert abs(loss - ref.item()) < 1e-6
    assert len(grads) == 2 * len(targets) * base["config"].n_layer
    for k, g in grads.items():
        assert rel_err(g, named[k.replace(".weight", ".default.weight")].grad.numpy()) < 1e-5, k
    # ten AdamW steps: crystal's AdamW on the adapter buffer, torch's on PEFT's parameters
    cfg = dataclasses.replace(resolve("finetune-lora", dataclasses.asdict(base["config"]),
                                      dict(init_from=str(base["hf"])))[1], lr=1e-2, weight_decay=0.01)
    opt = AdamW(CpuBackend(), layout, cfg)
    topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=0.01)
    gflat = layout.zeros()
    for step in range(10):
        x, y = batch(seed=10 + step)
        _, grads = ours.loss_and_grads(x, y)
        for k, g in layout.views(gflat).items():
            g[...] = grads[k]
        opt.step(ours.adapters, gflat, 1e-2)
        topt.zero_grad()
        peft_loss(pm, x, y).backward()
        topt.step()
    x, y = batch(seed=99)
    with torch.no_grad():
        assert abs(ours.loss(x, y) - peft_loss(pm, x, y).item()) < 1e-4
    assert base["params"].tobytes() == before.tobytes()


# --- the trainer and the run directory ------------------------------------------------------------------

def lora_cfg(base, **train):
    over = dict(init_from=str(base["hf"]), data=str(base["data"]), seq_len=16, micro_batches=6, steps=3,
                spheres=1, warmup=0, eval_every=0, lora_dropout=0.1, lora_targets="all", lr=3e-3)
    over.update(train)
    return resolve("finetune-lora", dataclasses.asdict(base["config"]), over)


def test_llama_lora_runs_are_bitwise_identical_on_1_and_3_spheres(base):
    data = load_dataset(str(base["data"]), 0.1)
    before = base["params"].copy()
    one, three = (train(*lora_cfg(base, spheres=s), dataset=data, init=base["params"]) for s in (1, 3))
    assert one.losses == three.losses
    assert one.params.tobytes() == three.params.tobytes()
    assert one.params.shape == (AdapterLayout(one.model, LoraConfig.of(one.train, one.model)).size,)
    assert base["params"].tobytes() == before.tobytes()


def test_peft_export_loads_in_peft_with_crystal_logits_and_hf_export_is_the_merged_model(base, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "finetune-lora", "--init-from", str(base["hf"]), "--data", str(base["data"]),
                 "--seq-len", "16", "--micro-batches", "2", "--spheres", "2", "--warmup", "0", "--eval-every", "0",
                 "--lora-targets", "q,v,gate,down", "--lr", "1e-2", "--steps", "3", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    x, _ = batch(seed=7)
    ours = load_checkpoint(run).logits(x)
    pm = peft.PeftModel.from_pretrained(hf_llama(base), tmp_path / "peft")
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
        merged = pm.merge_and_unload()(input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
        exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")(
            input_ids=torch.tensor(x, dtype=torch.long)).logits.numpy()
    base_logits = load_checkpoint(base["hf"]).logits(x)
    assert rel_err(ours, base_logits) > 1e-4  # the adapters trained
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(exported, merged) < 1e-6


@pytest.mark.parametrize("flags, message", [
    (["--lora-targets", "c_attn"], "not a projection of a llama block"),  # GPT-2's name
    (["--lora-targets", "q,bogus"], "'bogus' is not a projection of a llama block"),
    (["--lora-targets", "q", "--lora-r", "17"], None),  # q_proj [32, 32]: rank 17 fits
    (["--lora-targets", "q,k", "--lora-r", "17"], "above the rank of k_proj ([32, 16]"),  # k_proj: 2 KV heads of 8
    (["--lora-targets", "gate,down", "--lora-r", "33"], "above the rank of gate_proj ([32, 48]"),
])
def test_bad_llama_lora_settings_are_one_line(base, flags, message, capsys, tmp_path):
    argv = ["train", "--preset", "finetune-lora", "--init-from", str(base["hf"]), "--data", str(base["data"]),
            "--seq-len", "16", "--out", str(tmp_path / "r"), "--quiet", "--dry-run", *flags]
    capsys.readouterr()
    if message is None:
        assert main(argv) == 0
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_emulated_cuda_adapters_on_every_target_match_the_cpu(precision):
    """q, k, v, gate, up (column blocks of the fused q|k|v and gate|up products: cuBLASLt with the
    fused width as leading dimension) and o, down (whole products) on the cuda backend's host code
    and CPU-emulated kernels, with dropout: fp32 within float32 tolerances; bf16 (activations and
    the weight copies bf16, the adapter gradients float32) by cosine."""
    from emu.backend import EmulatedCudaBackend
    from lt_standin import LtStandIn

    from crystal.config import ModelConfig
    from crystal.dropout import Dropout
    from crystal.model import init_params

    cfg = ModelConfig(arch="llama", vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                      intermediate_size=32, tie_word_embeddings=False)
    lora = LoraConfig(4, 8.0, 0.2, ALL)
    adapters = (np.random.default_rng(2).standard_normal(AdapterLayout(cfg, lora).size) * 0.2).astype(np.float32)
    x, y = batch(seed=5, B=2, T=8, V=64)
    drop = Dropout(0.2, 1, 0, 0)
    be = EmulatedCudaBackend("bf16", lt=LtStandIn(), flash=False) if precision == "bf16" else EmulatedCudaBackend()
    loss_c, grads_c = LoraModel(cfg, init_params(cfg, 1), lora, adapters).loss_and_grads(x, y, drop)
    loss_g, grads_g = LoraModel(cfg, init_params(cfg, 1), lora, adapters, backend=be).loss_and_grads(x, y, drop)
    assert abs(loss_g - loss_c) / loss_c < (2e-2 if precision == "bf16" else 1e-5)
    assert len(grads_c) == 2 * len(ALL) and all(np.abs(g).max() > 0 for g in grads_c.values())
    for k, g in grads_c.items():
        if precision == "fp32":
            assert rel_err(grads_g[k], g) < 1e-4, k
        else:
            assert cosine(grads_g[k], g) >= 0.99, k
    # the column-block products ran on the fused products in place: the fused q|k|v width as ld
    assert precision == "bf16" or be._lt_bindings.counts["matmul"] == 3 * 5  # 5 column targets: 1 forward, 2 backward


def test_column_targets_on_cuda_without_nvmath_are_one_line_before_a_pass(monkeypatch):
    """fp32 runs load cuBLASLt for the column-block products only: without nvmath-python, one line
    naming the targets, from the backend check (before any memory is used); whole products pass."""
    import sys

    from emu.backend import EmulatedCudaBackend

    from crystal.config import ModelConfig
    from crystal.errors import CrystalError
    from crystal.lora import check_backend

    cfg = ModelConfig(arch="llama", vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                      intermediate_size=32, tie_word_embeddings=False)
    be = EmulatedCudaBackend()
    be._lt_bindings = None  # as a GPU's fp32 backend starts: no cuBLASLt loaded
    monkeypatch.setitem(sys.modules, "nvmath.bindings", None)  # as if not installed
    check_backend(be, cfg, LoraConfig(4, 8.0, 0.0, ("o_proj", "down_proj")))
    with pytest.raises(CrystalError, match=r"LoRA on q_proj, v_proj \(a part of a fused product\) needs "
                                           r"nvmath-python") as e:
        check_backend(be, cfg, LoraConfig(4, 8.0, 0.0, ("q_proj", "v_proj", "o_proj")))
    assert "\n" not in str(e.value)
