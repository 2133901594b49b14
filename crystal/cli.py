"""`crystal` command line. User mistakes print `error: ...` on one line and exit 2."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import click

from crystal.config import DEVICES, PRECISIONS, PRESETS, resolve
from crystal.errors import CrystalError

EXIT_USAGE = 2
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")
# What --resume may change: where and how fast the rest of the run computes, not what.
RESUME_FLAGS = ("device", "precision", "spheres", "log_every", "stop_at", "checkpoint_every", "keep")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crystal", prog_name="crystal")
def cli() -> None:
    """crystal: train GPT-2-style models on a ring of spheres (CPU threads or CUDA streams)."""


def _preset_help() -> str:
    return "; ".join(f"{name}: {p.about}" for name, p in PRESETS.items())


@cli.command()
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="cpu, cuda, or auto (cuda when a usable GPU is present)  [default: auto]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="cuda matmul precision: fp32, or tf32 tensor cores; cpu is always fp32  [default: fp32]")
@click.option("--spheres", type=int, default=None, help="worker spheres around the root, 1-64  [default: 12]")
@click.option("--data", type=str, default=None,
              help="text file (bytes) or a directory from `crystal prepare`  [default: embedded Tiny Shakespeare]")
@click.option("--val-fraction", type=float, default=None,
              help="tail of a text file held out for validation  [default: 0.1]")
@click.option("--preset", type=str, default=None, help=f"[default: small] {_preset_help()}")
@click.option("--n-layer", type=int, default=None, help="transformer blocks")
@click.option("--n-head", type=int, default=None, help="attention heads")
@click.option("--n-embd", type=int, default=None, help="embedding width (divisible by --n-head)")
@click.option("--block-size", type=int, default=None, help="maximum sequence length of the model")
@click.option("--batch-size", type=int, default=None, help="sequences per micro-batch")
@click.option("--seq-len", type=int, default=None, help="tokens per sequence (<= --block-size)")
@click.option("--micro-batches", type=int, default=None, help="micro-batches per optimizer step (gradient accumulation)")
@click.option("--steps", type=int, default=None, help="optimizer steps")
@click.option("--epochs", type=float, default=None, help="passes over the training split (overrides --steps)")
@click.option("--lr", type=float, default=None, help="peak learning rate")
@click.option("--min-lr", type=float, default=None, help="final learning rate of the cosine decay  [default: lr/10]")
@click.option("--warmup", type=int, default=None, help="linear warmup steps")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay on 2-D weights")
@click.option("--beta1", type=float, default=None, help="AdamW beta1  [default: 0.9]")
@click.option("--beta2", type=float, default=None, help="AdamW beta2  [default: 0.95]")
@click.option("--eps", type=float, default=None, help="AdamW epsilon  [default: 1e-8]")
@click.option("--grad-clip", type=float, default=None, help="global gradient-norm clip (0 disables)")
@click.option("--seed", type=int, default=None, help="seed for initialization and data order")
@click.option("--log-every", type=int, default=None, help="print a progress line every N steps")
@click.option("--eval-every", type=int, default=None, help="validation loss every N steps (0: never)")
@click.option("--eval-batches", type=int, default=None, help="validation batches per evaluation  [default: 20]")
@click.option("--checkpoint-every", type=int, default=None, help="resumable checkpoint every N steps (0: none)")
@click.option("--keep", type=int, default=None, help="resumable checkpoints to keep  [default: 3]")
@click.option("--stop-at", type=int, default=None, help="stop after this step, leaving a resumable checkpoint")
@click.option("--out", type=click.Path(), default=None, help="run directory  [default: runs/<preset>-<time>]")
@click.option("--overwrite", is_flag=True, help="allow --out to replace an existing run")
@click.option("--resume", "resume_dir", type=click.Path(), default=None,
              help="continue the run in this directory from its newest checkpoint")
def train(overwrite, resume_dir, **flags) -> None:
    """Train a GPT-2-style model with data parallelism across a ring of spheres."""
    from crystal.backends import cuda_unavailable_reason, get_backend
    from crystal.checkpoint import RunDir
    from crystal.data import load_dataset
    from crystal.trainer import train as run_training

    given = {k: v for k, v in flags.items() if v is not None}
    if resume_dir is not None:
        fixed = sorted(set(given) - set(RESUME_FLAGS))
        if fixed:
            raise CrystalError(f"--resume continues a run with its own config; it cannot change "
                               f"--{fixed[0].replace('_', '-')}")
        run_dir = RunDir(resume_dir, resume=True)
        model_cfg, cfg = run_dir.read_configs()
        _, cfg = resolve(cfg.preset, dataclasses.asdict(model_cfg),
                         {**dataclasses.asdict(cfg), "stop_at": None, **given})
        state = run_dir.load_state(model_cfg)
    else:
        preset = given.pop("preset", "small")
        model_over = {k: given.pop(k) for k in MODEL_FLAGS if k in given}
        model_cfg, cfg = resolve(preset, model_over, given)
        state = None
    get_backend(cfg.device, cfg.precision)  # fail fast (--device cuda without a GPU) before reading data
    if cfg.device == "auto" and (reason := cuda_unavailable_reason()):
        click.echo(f"device auto: training on cpu ({reason})")
    dataset = load_dataset(cfg.data, cfg.val_fraction)
    if resume_dir is None:
        # the model's vocabulary is the data's
        model_cfg, cfg = resolve(cfg.preset, {**model_over, "vocab_size": dataset.vocab_size},
                                 dataclasses.asdict(cfg))
        out_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = RunDir(out_dir, overwrite=overwrite)
    progress = ProgressPrinter(run_dir.path, cfg.log_every)
    result = run_training(model_cfg, cfg, run_dir, dataset=dataset, resume=state,
                          on_start=progress.start, on_step=progress.step, on_eval=progress.eval)
    click.echo(format_summary(result))


class ProgressPrinter:
    """Plain progress lines: a header, then one line every `log_every` steps (and the last)."""

    def __init__(self, out_dir: Path, log_every: int):
        self.out_dir, self.log_every, self.steps = out_dir, log_every, 0

    def start(self, info: dict) -> None:
        c, m = info["config"], info["model"]
        self.steps = info["steps"]
        click.echo(f"crystal: preset {c.preset} ({m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
                   f"vocab {m.vocab_size}, {info['params'] / 1e6:.2f}M params) on {info['device']} "
                   f"with {c.spheres} spheres")
        click.echo(f"data: {info['data']} ({info['tokens']:,} train / {info['val_tokens']:,} val tokens); "
                   f"{c.steps} steps x {c.micro_batches} micro-batches x {c.batch_size} x {c.seq_len} "
                   f"tokens; run: {self.out_dir}")
        if info["first"]:
            click.echo(f"resuming after step {info['first']}")

    def step(self, rec, spheres) -> None:
        if rec.step % self.log_every and rec.step not in (1, self.steps):
            return
        click.echo(f"step {rec.step:>{len(str(self.steps))}}/{self.steps} | loss {rec.loss:.4f} | "
                   f"lr {rec.lr:.2e} | norm {rec.grad_norm:.3f} | {rec.tokens_per_s:,.0f} tok/s | "
                   f"{rec.ms_per_step:.1f} ms/step")

    def eval(self, step: int, val_loss: float) -> None:
        click.echo(f"step {step:>{len(str(self.steps))}}/{self.steps} | val loss {val_loss:.4f}")


def format_summary(result) -> str:
    """The end-of-run report: per-sphere table, root totals, where the model went."""
    lines = ["", f"{'sphere':>6} {'batches':>8} {'avg loss':>9} {'busy %':>7} {'tokens/s':>10}"]
    for s in result.spheres:
        avg = f"{s['avg_loss']:.4f}" if s["avg_loss"] is not None else "-"
        lines.append(f"{s['sphere']:>6} {s['batches']:>8} {avg:>9} {100 * s['utilization']:>6.1f}% "
                     f"{s['tokens_per_s']:>10,.0f}")
    r = result.root
    lines.append(f"{'root':>6} active spheres {r['active_spheres']}/{r['spheres']} | total grad norm "
                 f"{r['grad_norm']:.4f} (mean {r['mean_grad_norm']:.4f}) | {r['tokens_per_s']:,.0f} tok/s | "
                 f"{r['ms_per_step']:.1f} ms/step")
    if result.losses:
        tail = result.losses[-20:]
        lines.append(f"trained {r['steps']} steps in {r['wall_s']:.1f} s; final loss {result.losses[-1]:.4f} "
                     f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f})")
    if result.val_losses:
        lines.append(f"val loss {result.val_losses[-1][1]:.4f} at step {result.val_losses[-1][0]}")
    if result.finished and result.run_dir:
        lines.append(f"saved model: {Path(result.run_dir) / 'model.safetensors'}")
    elif result.checkpoint:
        lines.append(f"stopped at step {result.history[-1].step if result.history else '?'}; checkpoint "
                     f"{result.checkpoint}; continue with: crystal train --resume {result.run_dir}")
    return "\n".join(lines)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="directory for train.bin, val.bin, tokenizer.json")
@click.option("--tokenizer", type=click.Choice(("bytes", "bpe")), default="bytes", show_default=True)
@click.option("--vocab-size", type=int, default=1024, show_default=True, help="BPE vocabulary size")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="tail held out for validation")
def prepare(inputs, out, tokenizer, vocab_size, val_fraction) -> None:
    """Tokenize text files into a data directory for `crystal train --data`."""
    from crystal.data import prepare as run_prepare

    t0 = time.perf_counter()
    meta = run_prepare(list(inputs), out, tokenizer, vocab_size, val_fraction)
    click.echo(f"prepared {out}: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, "
               f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
               f"in {time.perf_counter() - t0:.1f} s")


@cli.command(name="eval")
@click.argument("run", type=click.Path())
@click.option("--data", type=str, default=None, help="data to evaluate on  [default: the run's]")
@click.option("--batches", type=int, default=None, help="validation batches  [default: the run's --eval-batches]")
def eval_cmd(run, data, batches) -> None:
    """Validation loss and bits per byte of a trained run."""
    from crystal.checkpoint import load_checkpoint, read_train_config
    from crystal.data import load_dataset
    from crystal.trainer import evaluate

    cfg = read_train_config(Path(run) / "train.json")
    if batches is not None:
        if batches < 1:
            raise CrystalError(f"--batches must be positive, got {batches}")
        cfg = dataclasses.replace(cfg, eval_batches=batches)
    model = load_checkpoint(run)
    dataset = load_dataset(data if data is not None else cfg.data, cfg.val_fraction)
    if dataset.vocab_size != model.config.vocab_size:
        raise CrystalError(f"the data's vocabulary ({dataset.vocab_size}) is not the model's "
                           f"({model.config.vocab_size})")
    loss, n = evaluate(model, dataset, cfg)
    bpb = loss / math.log(2) / dataset.bytes_per_token
    click.echo(f"val loss {loss:.4f} | {bpb:.4f} bits per byte | {n} batches x {cfg.batch_size} x "
               f"{cfg.seq_len} tokens of {dataset.name}")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--prompt", default="\n", show_default=False, help="text to continue  [default: a newline]")
@click.option("--tokens", type=int, default=200, show_default=True, help="tokens to generate")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 is greedy")
@click.option("--top-k", type=int, default=None, help="sample among the k most likely tokens")
@click.option("--seed", type=int, default=0, show_default=True)
def sample(run, prompt, tokens, temperature, top_k, seed) -> None:
    """Generate text from a trained run (deterministic for a seed)."""
    from crystal.checkpoint import load_checkpoint
    from crystal.data import run_tokenizer
    from crystal.sample import generate

    model = load_checkpoint(run)
    tok = run_tokenizer(Path(run))
    prompt_ids = [int(i) for i in tok.encode(prompt or "\n")]
    if not prompt_ids:
        prompt_ids = [int(i) for i in tok.encode("\n")]
    ids = generate(model, prompt_ids, tokens, temperature, top_k, seed)
    click.echo(tok.decode(ids))


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(("hf",)), default="hf", show_default=True)
@click.option("--out", required=True, type=click.Path(), help="directory to write")
def export(run, fmt, out) -> None:
    """Export a run for Hugging Face transformers (GPT2LMHeadModel + tokenizer)."""
    from crystal.checkpoint import export_hf

    path = export_hf(run, out)
    click.echo(f"exported {run} to {path} (config.json, model.safetensors, tokenizer.json)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the click group; user errors become one line on stderr and exit 2."""
    try:
        rv = cli.main(args=argv, prog_name="crystal", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        return 0
    except CrystalError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    except click.exceptions.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return EXIT_USAGE
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
