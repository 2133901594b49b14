"""Instruction tuning in minutes on 2 cores (issue 31): a small chat data set, a small
pretrained crystal model, LoRA and a full fine-tune, the val loss on held-out responses before
and after, and greedy answers before and after. Every step is the `crystal` command a user types
(printed as it runs).

Usage (from the repository root):
    python bench/example_instruct.py [--out DIR] [--records 400] [--pretrain-steps 600] [--steps 300]
                                     [--lora-targets all] [--lora-lr 3e-3] [--full-lr 3e-4] [--json OUT]

1. Pretraining: the embedded Tiny Shakespeare, a byte-level BPE of 512 tokens trained on it by
   `crystal prepare --tokenizer bpe`, the `small` preset (4 layers, 128 wide, T = 64) for
   --pretrain-steps steps. A model that knows some English and the tokenizer's merges; it has
   never seen a question or an answer.
2. The chat data: --records conversations made here deterministically (seed 0) from four
   templated tasks: capital cities ("What is the capital of Peru?" -> "The capital of Peru is
   Lima."), sums of two numbers, reversing a list of words, and two-turn chats asking a capital
   then a sum. A third of them open with a system message. The tokenizer directory is the
   pretrained run's tokenizer.json plus a tokenizer_config.json whose chat_template renders
   "Q: ...\\nA: ...<|endoftext|>\\n" turns (plain text: the Shakespeare BPE has no ChatML tokens),
   eos_token <|endoftext|>. `crystal prepare --format chat` holds the last 20% of the records
   out: the validation loss is the mean over their assistant turns' tokens only (the mask).
   The held-out records ask new sums, new word lists and capitals phrased in ways the
   training records may not have used for that country.
3. LoRA: `--preset finetune-lora` (r 8, alpha 16, dropout 0.05, 16 sequences a step, AdamW betas
   0.9/0.999, weight decay 0.01, cosine to 0, no clipping) with --steps steps and a 10% warmup
   instead of the preset's 5 epochs and 100 warmup steps, --seq-len 64 (the base's context), and
   by default adapters on every GPT-2 projection (--lora-targets all) at lr 3e-3: on a 128-wide
   model that has 300 steps, the preset's c_attn at lr 1e-3 (litgpt's 7B defaults) learns little
   (bench/RESULTS.md has both).
4. The full fine-tune: `--preset finetune` (dropout 0.1, constant lr after the warmup) with the
   same 16 sequences a step (the same batches as LoRA), steps and warmup, at lr 3e-4 (--full-lr)
   instead of 3e-5.
5. `crystal eval RUN --data chat` on the base and both runs (the same fixed validation windows,
   every one of the split), and `crystal sample RUN --prompt ... --temperature 0` on held-out
   questions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"

# Q/A turns as plain text; the generation prompt is "A:" so that an assistant turn " text<eos>\n"
# continues it (what `prepare --format chat` needs to find the response tokens).
TEMPLATE = ("{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}{{ eos_token }}\n"
            "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Poland", "Warsaw"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Japan", "Tokyo"),
            ("China", "Beijing"), ("India", "Delhi"), ("Peru", "Lima"), ("Chile", "Santiago"),
            ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Russia", "Moscow"),
            ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Turkey", "Ankara"),
            ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen")]
ASK_CAPITAL = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."]
WORDS = ["apple", "river", "stone", "cloud", "horse", "bread", "light", "sword", "crown", "night", "water",
         "king", "queen", "fire", "green", "moon", "house", "bird", "door", "tree"]
SYSTEM = "You answer in one short sentence."


def qa(rng: random.Random, kind: str) -> tuple[str, str]:
    """One question and its answer of a task."""
    if kind == "capital":
        country, city = rng.choice(CAPITALS)
        return rng.choice(ASK_CAPITAL).format(country), f"The capital of {country} is {city}."
    if kind == "sum":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def make_records(n: int, seed: int = 0) -> list[dict]:
    """n conversations, a deterministic function of (n, seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        kind = ("capital", "sum", "reverse", "two turns")[i % 4]
        for k in (("capital", "sum") if kind == "two turns" else (kind,)):
            q, a = qa(rng, k)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages})
    rng.shuffle(out)  # every task in the held-out tail
    return out


def crystal(*args: str, log: list) -> str:
    """Run `crystal ARGS` (this checkout's), echo and record it, return its stdout."""
    shown = "crystal " + " ".join(a if re.fullmatch(r"[\w./:=,+-]+", a) else json.dumps(a) for a in args)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "crystal.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shown}\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    log.append({"command": shown, "seconds": round(time.perf_counter() - t0, 1)})
    return done.stdout


def val_loss(run: Path, data: Path, log: list) -> float:
    out = crystal("eval", str(run), "--data", str(data), "--batches", "100000", log=log)  # the whole split
    print(f"  {out.strip()}")
    return float(re.search(r"val loss ([0-9.]+)", out).group(1))


def answer(run: Path, prompt: str, log: list) -> str:
    out = crystal("sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-tokens", "24", log=log)
    assert out.startswith(prompt), out
    return out[len(prompt):].removesuffix("\n")  # what the model added (sample ends its output with a newline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="working directory (default: a temporary one, removed)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (LoRA and full)")
    ap.add_argument("--lora-targets", default="all", help="the finetune-lora preset's is c_attn")
    ap.add_argument("--lora-lr", default="3e-3", help="the finetune-lora preset's is 1e-3")
    ap.add_argument("--full-lr", default="3e-4", help="the finetune preset's is 3e-5")
    ap.add_argument("--spheres", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(args.out or tmp), args)


def run(w: Path, args) -> None:
    from crystal.chat import ChatTemplate
    from crystal.data import default_corpus

    t0 = time.perf_counter()
    w.mkdir(parents=True, exist_ok=True)
    log: list = []
    sp = ["--spheres", str(args.spheres), "--quiet"]

    # 1. a small pretrained model and its tokenizer
    (w / "corpus.txt").write_bytes(default_corpus())
    crystal("prepare", str(w / "corpus.txt"), "--out", str(w / "text"), "--tokenizer", "bpe", "--vocab-size", "512",
            log=log)
    crystal("train", "--preset", "small", "--data", str(w / "text"), "--steps", str(args.pretrain_steps),
            "--warmup", "50", "--eval-every", str(args.pretrain_steps), "--out", str(w / "base"), *sp, log=log)

    # 2. the chat data, with the base's tokenizer and a chat template
    tok = w / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_bytes((w / "base" / "tokenizer.json").read_bytes())
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT, "chat_template": TEMPLATE}, indent=1))
    records = make_records(args.records)
    (w / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    crystal("prepare", str(w / "chat.jsonl"), "--format", "chat", "--tokenizer", str(tok), "--out", str(w / "chat"),
            "--val-fraction", "0.2", log=log)
    meta = json.loads((w / "chat" / "meta.json").read_text())

    # 3, 4. LoRA and the full fine-tune
    common = ["--init-from", str(w / "base"), "--data", str(w / "chat"), "--seq-len", "64", "--micro-batches", "16",
              "--steps", str(args.steps), "--warmup", str(max(1, args.steps // 10)), "--eval-every", str(args.steps),
              "--eval-batches", "100000", *sp]
    crystal("train", "--preset", "finetune-lora", *common, "--lora-targets", args.lora_targets, "--lr", args.lora_lr,
            "--out", str(w / "lora"), log=log)
    crystal("train", "--preset", "finetune", *common, "--lr", args.full_lr, "--out", str(w / "full"), log=log)

    # 5. held-out figures
    runs = {"base": w / "base", "lora": w / "lora", "full": w / "full"}
    losses = {k: val_loss(r, w / "chat", log) for k, r in runs.items()}
    template = ChatTemplate(TEMPLATE, {"eos_token": EOT})
    held_out = records[len(records) - meta["records"]["val"]:]
    picked = [next(r for r in held_out if re.match(p, r["messages"][-2]["content"]) and len(r["messages"]) <= 3)
              for p in (r"What is the capital", r"Which city|Name the", r"What is \d", r"Reverse")]
    samples = []
    for r in picked:
        prompt = template.render(r["messages"][:-1], add_generation_prompt=True)
        got = {k: answer(run_dir, prompt, log) for k, run_dir in runs.items()}
        samples.append({"prompt": prompt, "expected": " " + r["messages"][-1]["content"], **got})
        print(json.dumps(samples[-1]))

    lora_info = json.loads((w / "lora" / "adapter_config.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg()[0], "command": " ".join(["python", "bench/example_instruct.py",
                                                                         *sys.argv[1:]]),
        "records": meta["records"], "response_tokens": meta.get("response_tokens"),
        "lora": {"r": lora_info.get("r"), "alpha": lora_info.get("lora_alpha"),
                 "targets": lora_info.get("target_modules"), "lr": float(args.lora_lr)},
        "full_lr": float(args.full_lr),
        "val_loss": losses, "samples": samples, "commands": log,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: result[k] for k in ("val_loss", "wall_s", "records")}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
