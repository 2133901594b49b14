"""`crystal` command line. User mistakes print `error: ...` on one line and exit 2."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from crystal.config import DEVICES, PRESETS, resolve
from crystal.errors import CrystalError

EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crystal", prog_name="crystal")
def cli() -> None:
    """crystal: train GPT-2-style models on a ring of spheres (CPU threads or CUDA streams)."""


def _preset_help() -> str:
    return "; ".join(f"{name}: {p.about}" for name, p in PRESETS.items())


@cli.command()
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="cpu, cuda, or auto (cuda when a usable GPU is present)  [default: auto]")
@click.option("--precision", type=click.Choice(("fp32", "tf32")), default=None,
              help="cuda matmul precision (TF32 tensor cores or full fp32); cpu is always fp32  [default: fp32]")
@click.option("--spheres", type=int, default=None, help="worker spheres around the root, 1-64  [default: 12]")
@click.option("--data", type=str, default=None, help="text file to train on (bytes)  [default: embedded Tiny Shakespeare]")
@click.option("--preset", type=str, default="small", show_default=True, help=_preset_help())
@click.option("--n-layer", type=int, default=None, help="transformer blocks")
@click.option("--n-head", type=int, default=None, help="attention heads")
@click.option("--n-embd", type=int, default=None, help="embedding width (divisible by --n-head)")
@click.option("--block-size", type=int, default=None, help="maximum sequence length of the model")
@click.option("--batch-size", type=int, default=None, help="sequences per micro-batch")
@click.option("--seq-len", type=int, default=None, help="tokens per sequence (<= --block-size)")
@click.option("--micro-batches", type=int, default=None, help="micro-batches per optimizer step (gradient accumulation)")
@click.option("--steps", type=int, default=None, help="optimizer steps")
@click.option("--epochs", type=float, default=None, help="train for this many passes over the data (overrides --steps)")
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
@click.option("--out", type=click.Path(), default=None, help="run directory  [default: runs/<preset>-<time>]")
@click.option("--overwrite", is_flag=True, help="allow --out to replace a finished run")
def train(device, precision, spheres, data, preset, n_layer, n_head, n_embd, block_size, batch_size, seq_len,
          micro_batches, steps, epochs, lr, min_lr, warmup, weight_decay, beta1, beta2, eps,
          grad_clip, seed, log_every, out, overwrite) -> None:
    """Train a GPT-2-style model with data parallelism across a ring of spheres."""
    from crystal.checkpoint import RunDir

    model_cfg, cfg = resolve(
        preset,
        dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size),
        dict(device=device, precision=precision, spheres=spheres, data=data, batch_size=batch_size, seq_len=seq_len,
             micro_batches=micro_batches, steps=steps, epochs=epochs, lr=lr, min_lr=min_lr,
             warmup=warmup, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
             grad_clip=grad_clip, seed=seed,
             log_every=log_every, out=out),
    )
    from crystal.backends import cuda_unavailable_reason, get_backend
    from crystal.data import load_tokens
    from crystal.trainer import train as run_training

    get_backend(cfg.device, cfg.precision)  # fail fast (--device cuda without a GPU) before reading data
    if cfg.device == "auto" and (reason := cuda_unavailable_reason()):
        click.echo(f"device auto: training on cpu ({reason})")
    tokens, data_name = load_tokens(cfg.data)
    out_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = RunDir(out_dir, overwrite=overwrite)

    progress = ProgressPrinter(out_dir, cfg.log_every)
    result = run_training(model_cfg, cfg, run_dir, tokens=tokens, data_name=data_name,
                          on_start=progress.start, on_step=progress.step)
    click.echo(format_summary(result))


class ProgressPrinter:
    """Plain progress lines: a header, then one line every `log_every` steps (and the last)."""

    def __init__(self, out_dir: Path, log_every: int):
        self.out_dir, self.log_every, self.steps = out_dir, log_every, 0

    def start(self, info: dict) -> None:
        c, m = info["config"], info["model"]
        self.steps = info["steps"]
        click.echo(f"crystal: preset {c.preset} ({m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
                   f"{info['params'] / 1e6:.2f}M params) on {info['device']} with {c.spheres} spheres")
        click.echo(f"data: {info['data']} ({info['tokens']:,} tokens); {c.steps} steps x "
                   f"{c.micro_batches} micro-batches x {c.batch_size} x {c.seq_len} tokens; "
                   f"run: {self.out_dir}")

    def step(self, rec, spheres) -> None:
        if rec.step % self.log_every and rec.step not in (1, self.steps):
            return
        click.echo(f"step {rec.step:>{len(str(self.steps))}}/{self.steps} | loss {rec.loss:.4f} | "
                   f"lr {rec.lr:.2e} | norm {rec.grad_norm:.3f} | {rec.tokens_per_s:,.0f} tok/s | "
                   f"{rec.ms_per_step:.1f} ms/step")


def format_summary(result) -> str:
    """The end-of-run report: per-sphere table, root totals, where the model went."""
    lines = ["", f"{'sphere':>6} {'batches':>8} {'avg loss':>9} {'busy %':>7} {'tokens/s':>10}"]
    for s in result.spheres:
        avg = f"{s['avg_loss']:.4f}" if s["avg_loss"] is not None else "-"
        lines.append(f"{s['sphere']:>6} {s['batches']:>8} {avg:>9} {100 * s['utilization']:>6.1f}% "
                     f"{s['tokens_per_s']:>10,.0f}")
    r = result.root
    tail = result.losses[-20:]
    lines += [
        f"{'root':>6} active spheres {r['active_spheres']}/{r['spheres']} | total grad norm "
        f"{r['grad_norm']:.4f} (mean {r['mean_grad_norm']:.4f}) | {r['tokens_per_s']:,.0f} tok/s | "
        f"{r['ms_per_step']:.1f} ms/step",
        f"trained {r['steps']} steps in {r['wall_s']:.1f} s; final loss {result.losses[-1]:.4f} "
        f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f})",
    ]
    if result.run_dir:
        lines.append(f"saved model: {Path(result.run_dir) / 'model.safetensors'}")
    return "\n".join(lines)


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
