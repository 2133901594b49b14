"""Instruction data (issue 31, item 3): `crystal prepare --format alpaca|chat`, the per-token loss
mask beside the token ids, and the masked loss.

- Alpaca records are litgpt's SFT encoding (the Alpaca prompt, then the output and EOS); chat
  records are transformers' apply_chat_template ids, token for token, plus EOS; the mask is 1
  on the responses only.
- The masked loss equals transformers' loss with labels -100 on the prompt positions, and the
  step's loss is the mean over the step's unmasked targets (torch's cross_entropy with
  ignore_index); its gradient is the whole step's (a micro-batch without a target adds 0).
- Bitwise for 1, 3 and 12 spheres and across a stop and resume, on masked data.
- Bad input: one line, exit 2, no file changed.

The tiny GPT-2 and its tokenizer (with a ChatML-style chat template) are built here with
transformers, as test_serve builds them.
"""

import json
import os

import numpy as np
import pytest

from crystal.cli import main
from crystal.data import EOT, IGNORE, BatchIterator, DataSet, ByteTokenizer, default_corpus, load_dataset, read_tokens
from compare import rel_err
from test_bad_inputs import R, refused

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
from tiny_hf import save_tiny_gpt2  # noqa: E402
pytest.importorskip("jinja2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>"
            "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LINES = [s for s in default_corpus()[:40_000].decode().split("\n") if len(s) > 8]


def alpaca_records(n=40):
    return [{"instruction": f"Continue: {LINES[3 * i]}", "input": LINES[3 * i + 1] if i % 2 else "",
             "output": LINES[3 * i + 2]} for i in range(n)]


def chat_records(n=40):
    out = []
    for i in range(n):
        m = [{"role": "system", "content": "You are a player."}] if i % 3 == 0 else []
        m += [{"role": "user", "content": LINES[4 * i]}, {"role": "assistant", "content": LINES[4 * i + 1]}]
        if i % 2:  # a second turn
            m += [{"role": "user", "content": LINES[4 * i + 2]}, {"role": "assistant", "content": LINES[4 * i + 3]}]
        out.append({"messages": m})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 and its tokenizer with a chat template (hf), one without (plain), and the
    Alpaca (.json) and chat (.jsonl) data sets prepared with it."""
    root = tmp_path_factory.mktemp("instruct")
    save_tiny_gpt2(root, TEMPLATE, "hf")
    (root / "alpaca.json").write_text(json.dumps(alpaca_records()))
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_records()) + "\n")
    for fmt, src in (("alpaca", "alpaca.json"), ("chat", "chat.jsonl")):
        assert main(["prepare", str(root / src), "--out", str(root / fmt), "--format", fmt,
                     "--tokenizer", str(root / "hf"), "--val-fraction", "0.25"]) == 0
    return root


def hf_tokenizer(world):
    return transformers.AutoTokenizer.from_pretrained(str(world / "hf"))


def prepared(directory):
    """Token ids and masks, train then val, as one stream each."""
    ids = np.concatenate([read_tokens(directory / f"{s}.bin")[0] for s in ("train", "val")]).tolist()
    mask = np.concatenate([np.fromfile(directory / f"{s}.mask", np.uint8) for s in ("train", "val")]).tolist()
    return ids, mask


# --- rendering ---------------------------------------------------------------------------------

def test_alpaca_records_are_litgpts_encoding_with_the_prompt_masked(world):
    from crystal.instruct import alpaca_prompt

    tok, eos = hf_tokenizer(world), hf_tokenizer(world).eos_token_id
    ids, mask = [], []
    for r in alpaca_records():
        prompt = tok(alpaca_prompt(r["instruction"], r["input"]), add_special_tokens=False)["input_ids"]
        response = tok(r["output"], add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + response
        mask += [0] * len(prompt) + [1] * len(response)
    assert prepared(world / "alpaca") == (ids, mask)
    assert alpaca_prompt("Do.", "") == ("Below is an instruction that describes a task. Write a response that "
                                        "appropriately completes the request.\n\n### Instruction:\nDo.\n\n"
                                        "### Response:\n")
    assert alpaca_prompt("Do.", "This.").endswith("### Instruction:\nDo.\n\n### Input:\nThis.\n\n### Response:\n")
    meta = json.loads((world / "alpaca" / "meta.json").read_text())
    assert meta["records"] == {"train": 30, "val": 10, "truncated": 0, "dropped": 0}


def test_chat_records_are_apply_chat_template_token_for_token_and_only_assistant_turns_count(world):
    tok = hf_tokenizer(world)
    eos = tok.eos_token_id
    ids, mask = prepared(world / "chat")
    at = 0
    for r in chat_records():
        expected = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
        assert expected[-1] != eos  # the template ends a conversation with "\n": EOS follows
        expected.append(eos)
        got, m = ids[at:at + len(expected)], mask[at:at + len(expected)]
        at += len(expected)
        assert got == expected
        said = "".join(x["content"].strip() + "<|im_end|>" + EOT + "\n" for x in r["messages"] if x["role"] == "assistant")
        assert tok.decode([t for t, k in zip(got, m) if k]) == said + EOT  # the turns, their end, the EOS after
    assert at == len(ids)


def test_long_records_are_truncated_or_dropped(world, tmp_path):
    src = str(world / "alpaca.json")
    common = ["prepare", src, "--format", "alpaca", "--tokenizer", str(world / "hf"), "--max-seq-len", "160"]
    assert main([*common, "--out", str(tmp_path / "t")]) == 0
    assert main([*common, "--out", str(tmp_path / "d"), "--on-long", "drop"]) == 0
    t, d = (json.loads((tmp_path / x / "meta.json").read_text())["records"] for x in ("t", "d"))
    assert t["truncated"] > 0 and d["dropped"] > 0 and t["truncated"] + t["dropped"] == d["dropped"]
    assert d["train"] + d["val"] + d["dropped"] == 40
    ids, mask = prepared(tmp_path / "t")
    assert len(ids) == len(mask) and any(mask)


# --- the masked loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_the_masked_loss_equals_transformers_loss_with_labels_minus_100(world, fmt):
    from crystal import load_checkpoint

    ds = load_dataset(str(world / fmt))
    masked, plain = BatchIterator(ds.train, 3, 32, 0, mask=ds.train_mask), BatchIterator(ds.train, 3, 32, 0)
    for _ in range(4):  # the first batch with a prompt target and a response target
        (x, y), (_, every) = masked.next_batch(), plain.next_batch()  # the same windows; every target
        if (y == IGNORE).any() and (y >= 0).any():
            break
    assert (y == IGNORE).any() and (y >= 0).any() and np.array_equal(y[y >= 0], every[y >= 0])
    window = np.concatenate([x, every[:, -1:]], axis=1)  # the T + 1 tokens
    labels = np.concatenate([np.full((3, 1), -100), np.where(y >= 0, y, -100)], axis=1)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(world / "hf"), local_files_only=True).eval()
    with torch.no_grad():  # labels shifted inside: position t predicts labels[t + 1]
        expected = hf(input_ids=torch.tensor(window), labels=torch.tensor(labels)).loss.item()
    model = load_checkpoint(world / "hf")
    assert rel_err(model.loss(x, y), expected) <= 1e-5
    loss, grads = model.loss_and_grads(x, y)
    assert rel_err(loss, expected) <= 1e-5


def test_a_batch_without_targets_has_loss_0_and_gradient_0(world):
    from crystal import load_checkpoint

    model = load_checkpoint(world / "hf")
    x = np.arange(16).reshape(2, 8)
    loss, grads = model.loss_and_grads(x, np.full_like(x, IGNORE))
    assert loss == 0.0 and not any(g.any() for g in grads.values())


# --- training on masked data: the step's mean, sphere counts, resume ---------------------------

def masked_set(seed=0, n=6000):
    """Random byte tokens whose mask leaves whole windows without a target (about half of them)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, n).astype(np.uint16)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    mask[(np.arange(n) // 40) % 2 == 0] = 0  # runs of 40 prompt tokens: some 16-token windows hold none
    return DataSet(tokens[:5000], tokens[5000:], ByteTokenizer(), 256, "masked", 1000, "x", "",
                   mask[:5000], mask[5000:])


def test_the_step_loss_and_gradient_are_the_mean_over_the_steps_unmasked_targets():
    from crystal.config import resolve
    from crystal.model import GPT, init_params
    from crystal.trainer import train

    ds = masked_set()
    m, t = resolve("tiny", train_overrides=dict(steps=1, batch_size=1, seq_len=16, micro_batches=6, spheres=3,
                                                eval_every=0))
    batches = BatchIterator(ds.train, 1, 16, t.seed, mask=ds.train_mask)
    micro = [batches.next_batch() for _ in range(6)]
    counts = [int((y >= 0).sum()) for _, y in micro]
    assert 0 in counts and len(set(counts)) > 2  # a micro-batch with no target, and unequal counts
    x, y = np.concatenate([b[0] for b in micro]), np.concatenate([b[1] for b in micro])
    model = GPT(m, init_params(m, t.seed))
    logits = torch.tensor(model.logits(x), dtype=torch.float64)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size), torch.tensor(y, dtype=torch.long)
                                                 .reshape(-1), ignore_index=IGNORE).item()
    _, grads = model.loss_and_grads(x, y)  # one batch: the mean over all of the step's targets
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    r = train(m, t, dataset=ds)
    assert rel_err(r.losses[0], expected) <= 1e-6
    assert rel_err(r.history[0].grad_norm, norm) <= 1e-5


@pytest.mark.parametrize("shard", [False, True])
def test_masked_runs_on_two_thread_ranks_are_bitwise_the_single_process(shard):
    import threading

    from crystal.config import resolve
    from crystal.trainer import train
    from thread_ranks import ThreadComm, run_ranks

    ds = masked_set()
    m, t = resolve("tiny", train_overrides=dict(steps=3, batch_size=1, seq_len=16, micro_batches=6, spheres=2,
                                                eval_every=3, eval_batches=3, shard_optimizer=shard))
    one = train(m, t, dataset=ds)
    shared = {"barrier": threading.Barrier(2)}
    two = run_ranks(2, lambda i: train(m, t, dataset=ds, comm=ThreadComm(i, 2, shared)), shared)
    for r in two:
        assert r.params.tobytes() == one.params.tobytes()
        assert r.losses == one.losses and r.val_losses == one.val_losses != []


def test_masked_runs_are_bitwise_for_1_3_and_12_spheres_and_across_a_resume(world, tmp_path):
    common = ["train", "--preset", "tiny", "--data", str(world / "chat"), "--steps", "4", "--seq-len", "16",
              "--checkpoint-every", "2", "--eval-every", "2", "--eval-batches", "2", "--quiet"]
    assert main([*common, "--spheres", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--spheres", "3", "--stop-at", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--spheres", "12", "--quiet"]) == 0
    one, resumed = ((tmp_path / r / "model.safetensors").read_bytes() for r in ("one", "resumed"))
    assert one == resumed
    lines = [[json.loads(s) for s in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "resumed")]
    strip = [[{k: v for k, v in d.items() if k in ("step", "loss", "val_loss", "grad_norm")} for d in ls] for ls in lines]
    assert strip[0] == strip[1] and any("val_loss" in d for d in strip[0])
    assert main(["eval", str(tmp_path / "one")]) == 0  # crystal eval: the masked val loss


# --- bad input ---------------------------------------------------------------------------------

def _write(root, name, records, jsonl=False):
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    (root / name).write_text(text)


BAD = {
    "alpaca record without output": ("a.json", [{"instruction": "x"}], "alpaca", "hf", "has no 'output' text"),
    "alpaca output not a text": ("a.json", [{"instruction": "x", "output": 3}], "alpaca", "hf", "'output'"),
    "alpaca record with an empty output": ("a.json", [{"instruction": "x", "output": ""}], "alpaca", "hf",
                                           "no response tokens"),
    "chat record without messages": ("c.jsonl", [{"text": "x"}], "chat", "hf", "no 'messages'"),
    "chat message without a role": ("c.jsonl", [{"messages": [{"content": "x"}]}], "chat", "hf", "'role'"),
    "chat record with no assistant turn": ("c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}], "chat",
                                           "hf", "no response tokens"),
    "a role the template does not know": ("c.jsonl", [{"messages": [{"role": "tool", "content": "x"},
                                                                    {"role": "assistant", "content": "y"}]}],
                                          "chat", "hf", "unknown role tool"),
    "no chat_template": ("c.jsonl", chat_records(2), "chat", "plain", "no chat_template"),
    "the bytes tokenizer": ("a.json", alpaca_records(2), "alpaca", "bytes", "needs --tokenizer DIR"),
    "not an array": ("a.json", {"instruction": "x"}, "alpaca", "hf", "JSON array"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_instruction_records_are_refused_with_one_line(case, world, tmp_path, capsys):
    name, records, fmt, tokenizer, message = BAD[case]
    _write(tmp_path, name, records, jsonl=name.endswith(".jsonl"))
    tok = tokenizer if tokenizer == "bytes" else str(world / tokenizer)
    [line] = refused(tmp_path, ["prepare", f"{R}/{name}", "--format", fmt, "--tokenizer", tok, "--out", f"{R}/out"],
                     capsys)
    assert message in line and not (tmp_path / "out").exists()


def test_a_data_set_whose_masks_leave_no_target_or_do_not_match_is_refused(world, tmp_path, capsys):
    import shutil

    from crystal.shards import open_mask_file, sample_sha256

    shutil.copytree(world / "alpaca", tmp_path / "d")
    mask = tmp_path / "d" / "train.mask"
    mask.write_bytes(bytes(mask.stat().st_size))  # all prompt: the sampled sha256 differs
    argv = ["train", "--preset", "tiny", "--data", f"{R}/d", "--steps", "1", "--out", f"{R}/run"]
    assert "sampled sha256" in refused(tmp_path, argv, capsys)[0]
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    [shard] = meta["train_shards"]
    shard["mask_sample_sha256"] = sample_sha256(open_mask_file(mask, shard["tokens"]))
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    # the sample now matches: data verify reads every mask byte, whose sha256 is not meta.json's
    assert "sha256 of their tokens or masks differs" in refused(tmp_path, ["data", "verify", f"{R}/d"], capsys)[0]
    meta["response_tokens"]["train"] = 0
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    assert "no response token" in refused(tmp_path, argv, capsys)[0]
    mask.write_bytes(b"\x01")
    assert "mask bytes" in refused(tmp_path, argv, capsys)[0]


def test_sharded_instruction_data_gives_the_unsharded_batches_and_verifies(world, tmp_path, capsys):
    """--shard-tokens: a mask file beside each token shard, mapped; the batches (inputs and
    masked targets) are those of the one-file data set, windows crossing shards included; crystal
    data verify reads every id and mask byte; a mask byte that is not 0 or 1 is refused in a batch."""
    from crystal.data import verify

    assert main(["prepare", str(world / "alpaca.json"), "--out", str(tmp_path / "s"), "--format", "alpaca",
                 "--tokenizer", str(world / "hf"), "--val-fraction", "0.25", "--shard-tokens", "500"]) == 0
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert len(meta["train_shards"]) > 2 and all((tmp_path / "s" / s["mask"]).stat().st_size == s["tokens"]
                                                 for s in meta["train_shards"] + meta["val_shards"])
    one, sharded = load_dataset(str(world / "alpaca")), load_dataset(str(tmp_path / "s"))
    assert sharded.sha256 == one.sha256 and len(sharded.train_mask.parts) == len(meta["train_shards"])
    assert sharded.bytes_per_token == one.bytes_per_token
    a, b = (BatchIterator(d.train, 4, 32, 0, mask=d.train_mask) for d in (one, sharded))
    for _ in range(a.batches_per_epoch):
        (x, y), (x2, y2) = a.next_batch(), b.next_batch()
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert "every mask byte 0 or 1" in verify(str(tmp_path / "s"))["checked"]
    bad = np.array(sharded.train_mask)
    bad[:] = 2
    with pytest.raises(Exception, match="is not 0 or 1"):
        BatchIterator(sharded.train, 4, 32, 0, mask=bad).next_batch()


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2"], "--workers is for --format text"),
    (["--text-field", "body"], "--text-field names a text's field"),
    (["--vocab-size", "300"], "--vocab-size trains a bpe tokenizer"),
])
def test_text_options_are_refused_with_instruction_formats(flags, message, world, tmp_path, capsys):
    argv = ["prepare", str(world / "alpaca.json"), "--format", "alpaca", "--tokenizer", str(world / "hf"),
            "--out", f"{R}/out", *flags]
    [line] = refused(tmp_path, argv, capsys)
    assert message in line and not (tmp_path / "out").exists()


def test_lora_on_masked_data_takes_the_masked_mean_and_is_bitwise_for_1_and_3_spheres(world, tmp_path):
    """LoRA (issue 31 item 1) on instruction data: the first step's loss (B = 0: the base's
    output) is the full fine-tune's masked mean, and the adapters are bitwise for 1 and 3 spheres."""
    common = ["train", "--init-from", str(world / "hf"), "--data", str(world / "chat"), "--seq-len", "16",
              "--batch-size", "2", "--micro-batches", "3", "--steps", "2", "--warmup", "0", "--eval-every", "2",
              "--eval-batches", "2", "--quiet"]
    for out, more in (("full", []), ("l1", ["--lora-r", "4", "--spheres", "1"]),
                      ("l3", ["--lora-r", "4", "--spheres", "3"])):
        assert main([*common, *more, "--out", str(tmp_path / out)]) == 0
    losses = {r: [json.loads(s) for s in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("full", "l1", "l3")}
    first = {r: next(d["loss"] for d in ls if "loss" in d) for r, ls in losses.items()}
    assert rel_err(first["l1"], first["full"]) <= 1e-6
    assert (tmp_path / "l1" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "l3" / "adapter_model.safetensors").read_bytes()


# --- the instruction-tuning pipeline end to end (bench/example_instruct.py in miniature) -------

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"), ("Cuba", "Havana"),
            ("Egypt", "Cairo"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")]


def qa_records(n=48):
    """Templated questions and answers: a capital city or a sum, some with a system turn."""
    out = []
    for i in range(n):
        country, city = CAPITALS[(5 * i) % len(CAPITALS)]
        q, a = ((f"Capital of {country}?", f"The capital is {city}.") if i % 2 else
                (f"What is {i % 7} plus {i % 5}?", f"It is {i % 7 + i % 5}."))
        sys_turn = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        out.append({"messages": [*sys_turn, {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def test_chat_data_to_a_lora_run_to_a_peft_adapter_end_to_end(world, tmp_path, capsys):
    """crystal prepare --format chat -> crystal train --lora-r on the masked data -> the val loss
    on the held-out responses drops (crystal eval, the same fixed windows as the base's) ->
    crystal export --format peft -> PeftModel.from_pretrained(base, DIR) gives crystal's logits."""
    peft = pytest.importorskip("peft", reason="needs peft (the test extra)")
    from crystal import load_checkpoint
    from crystal.checkpoint import read_train_config
    from crystal.trainer import evaluate

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_records()))
    assert main(["prepare", str(tmp_path / "qa.jsonl"), "--format", "chat", "--tokenizer", str(world / "hf"),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.25"]) == 0
    run = tmp_path / "lora"
    assert main(["train", "--preset", "finetune-lora", "--init-from", str(world / "hf"),
                 "--data", str(tmp_path / "data"), "--lora-r", "4", "--lora-targets", "all", "--lora-dropout", "0", "--lr", "1e-2", "--warmup", "0",
                 "--steps", "12", "--seq-len", "16", "--batch-size", "4", "--micro-batches", "2", "--spheres", "2",
                 "--eval-every", "12", "--eval-batches", "1000", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    after = float(capsys.readouterr().out.split()[2])  # "val loss X | ..."
    data = load_dataset(str(tmp_path / "data"))
    before, n = evaluate(load_checkpoint(world / "hf"), data, read_train_config(run / "train.json"))
    print(f"val loss of the held-out responses: {before:.4f} -> {after:.4f} ({n} windows)")
    assert n > 4 and after < before - 0.5, (before, after)

    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    x = read_tokens(tmp_path / "data" / "val.bin")[0][:32].astype(np.int64).reshape(2, 16)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(world / "hf"), local_files_only=True)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(x)).logits.numpy()
    assert rel_err(load_checkpoint(run).logits(x), theirs) <= 1e-5
