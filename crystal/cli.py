"""`crystal` command line. User mistakes print `error: ...` on one line and exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from crystal.config import ARCHS, CUDA_GRAPHS, DEVICES, LR_SCHEDULES, OPTIMIZERS, PRECISIONS, PRESETS, resolve
from crystal.errors import CrystalError, NonFiniteError, SphereFailure
from crystal.plot import FORMATS as PLOT_FORMATS, MAX_SIZE as PLOT_MAX, MIN_SIZE as PLOT_MIN
from crystal.sample import MAX_SAMPLES, MAX_TOKENS

EXIT_USAGE = 2
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "arch", "n_kv_head", "head_dim", "intermediate_size",
               "rope_theta", "tie_word_embeddings", "attention_bias")
# What --resume may change: where and how fast the rest of the run computes, not what.
RESUME_FLAGS = ("device", "precision", "cuda_graphs", "spheres", "log_every", "stop_at", "checkpoint_every",
                "keep", "on_nonfinite", "shard_optimizer", "cores")
EXIT_NONFINITE = 3
MAX_PROMPT_BYTES = 16 << 20  # crystal sample --prompt-file: a prompt, not a corpus
DECODE_GRAPHS = ("off", "auto")  # crystal sample/serve --cuda-graphs: a failed capture decodes eagerly (crystal.decode_graphs)


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
              help="cuda precision: fp32, tf32 tensor cores for the matmuls, or bf16 mixed precision "
                   "(fp32 master weights; compute capability 8.0+); cpu is always fp32  [default: fp32]")
@click.option("--cuda-graphs", type=click.Choice(CUDA_GRAPHS), default=None,
              help="cuda: replay each step as CUDA graphs (N + 1 launches a step; products through "
                   "cuBLASLt); auto: where the capture works, else eager with a warning  [default: off]")
@click.option("--spheres", type=int, default=None, help="worker spheres around the root, 1-64  [default: 12]")
@click.option("--cores", type=int, default=None,
              help="cpu: at most this many spheres compute at once, the others wait for a core "
                   "(the core gate); 0: no gate  [default: the usable cores]")
@click.option("--data", type=str, default=None,
              help="text file (bytes), a directory from `crystal prepare`, or token shards: a token file or a "
                   "quoted glob of them (crystal's or llm.c's .bin)  [default: embedded Tiny Shakespeare]")
@click.option("--val-data", type=str, default=None,
              help="token shards (a file or a quoted glob) to validate on; every token of --data then trains  "
                   "[default: the data's own validation split]")
@click.option("--vocab-size", type=int, default=None,
              help="vocabulary of llm.c token shards, whose header has none  [default: the one their magic "
                   "names: 50257 (GPT-2, uint16) or 128256 (LLaMA 3, uint32)]")
@click.option("--val-fraction", type=float, default=None,
              help="tail of a text file held out for validation  [default: 0.1]")
@click.option("--preset", type=str, default=None, help=f"[default: small] {_preset_help()}")
@click.option("--n-layer", type=int, default=None, help="transformer blocks")
@click.option("--n-head", type=int, default=None, help="attention heads")
@click.option("--n-embd", type=int, default=None, help="embedding width (divisible by --n-head)")
@click.option("--block-size", type=int, default=None, help="maximum sequence length of the model")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="gpt2: LayerNorm, learned positions, GELU MLP; llama: RMSNorm, rotary positions, SwiGLU MLP, "
                   "grouped-query attention  [default: the preset's, gpt2 for small]")
@click.option("--n-kv-head", type=int, default=None,
              help="llama: key/value heads (grouped-query attention; 1: multi-query)  [default: --n-head]")
@click.option("--head-dim", type=int, default=None, help="llama: width of each head  [default: n_embd / n_head]")
@click.option("--intermediate-size", type=int, default=None,
              help="llama: SwiGLU width  [default: 8/3 n_embd rounded up to a multiple of 64]")
@click.option("--rope-theta", type=float, default=None, help="llama: rotary base  [default: 10000]")
@click.option("--tie-word-embeddings/--no-tie-word-embeddings", default=None,
              help="llama: the LM head is the token embedding  [default: tied]")
@click.option("--attention-bias/--no-attention-bias", default=None,
              help="llama: biases on q, k and v (Qwen2's; exported as a Qwen2ForCausalLM)  [default: none]")
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
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=None,
              help="after the warmup: cosine decay to --min-lr, or linear-cooldown: constant, then linear "
                   "to --min-lr over the last --cooldown-frac of the steps (modded-nanogpt's)  [default: cosine]")
@click.option("--cooldown-frac", type=float, default=None,
              help="linear-cooldown: fraction of the steps that cools down  [default: 0.4]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="adamw, or muon: Muon on the blocks' matrices, AdamW (--lr) on embeddings, biases and "
                   "norms  [default: adamw; small: muon]")
@click.option("--muon-lr", type=float, default=None, help="Muon's peak learning rate  [default: 0.02; small: 0.04]")
@click.option("--muon-momentum", type=float, default=None, help="Muon's momentum  [default: 0.95]")
@click.option("--muon-momentum-start", type=float, default=None,
              help="Muon's momentum at step 0, warmed up linearly to --muon-momentum  [default: 0.85]")
@click.option("--muon-momentum-warmup", type=int, default=None,
              help="steps of Muon's momentum warmup (0: none)  [default: 300]")
@click.option("--muon-nesterov/--no-muon-nesterov", default=None, help="Nesterov momentum  [default: on]")
@click.option("--muon-ns-steps", type=int, default=None, help="Newton-Schulz iterations  [default: 5]")
@click.option("--muon-weight-decay", type=float, default=None,
              help="decoupled weight decay on Muon's matrices, p *= 1 - lr wd  [default: 0]")
@click.option("--dropout", type=float, default=None,
              help="dropout probability while training: embeddings, attention probabilities and "
                   "residual branches (0 disables)")
@click.option("--seed", type=int, default=None, help="seed for initialization and data order")
@click.option("--log-every", type=int, default=None, help="print a progress line every N steps")
@click.option("--eval-every", type=int, default=None, help="validation loss every N steps (0: never)")
@click.option("--eval-batches", type=int, default=None, help="validation batches per evaluation  [default: 20]")
@click.option("--eval-task", type=str, default=None,
              help="a multiple-choice task in HellaSwag's JSON lines ({ctx, endings[4], label}) scored while "
                   "training: acc and acc_norm to metrics.jsonl and the views")
@click.option("--eval-task-every", type=int, default=None,
              help="--eval-task every N steps and at the last step  [default: at each --eval-every evaluation]")
@click.option("--checkpoint-every", type=int, default=None, help="resumable checkpoint every N steps (0: none)")
@click.option("--keep", type=int, default=None, help="resumable checkpoints to keep  [default: 3]")
@click.option("--stop-at", type=int, default=None, help="stop after this step, leaving a resumable checkpoint")
@click.option("--on-nonfinite", type=click.Choice(("stop", "skip")), default=None,
              help="a step with a non-finite loss or gradient: stop with exit 3, or skip its update  [default: stop]")
@click.option("--out", type=click.Path(), default=None, help="run directory  [default: runs/<preset>-<time>]")
@click.option("--overwrite", is_flag=True, help="allow --out to replace an existing run")
@click.option("--resume", "resume_dir", type=click.Path(), default=None,
              help="continue the run in this directory from its newest checkpoint")
@click.option("--init-from", type=click.Path(), default=None,
              help="start from this model's parameters, with a fresh optimizer: a Hugging Face GPT-2, Llama or "
                   "Qwen2 directory (config.json, model.safetensors or shards, tokenizer.json) or a crystal run; "
                   "the model's shape and tokenizer are its own  [default preset: finetune]")
@click.option("--lora-r", type=int, default=None,
              help="LoRA: train adapters of rank R on the frozen model of --init-from (0: full training)  "
                   "[default: 0; finetune-lora: 8]")
@click.option("--lora-alpha", type=float, default=None, help="LoRA: the adapters' scale is alpha / r  [default: 16]")
@click.option("--lora-dropout", type=float, default=None, help="LoRA: dropout on the adapters' input  [default: 0.05]")
@click.option("--lora-targets", type=str, default=None,
              help="LoRA: comma-separated projections to adapt (gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj; "
                   "llama: q, k, v, o, gate, up, down), or all  [default: gpt2 c_attn; llama q, v]")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="TOML file: preset = ..., [model] and [train] tables; flags override it")
@click.option("--print-config", is_flag=True, help="print the resolved config as TOML and exit")
@click.option("--dry-run", is_flag=True, help="print parameters, memory and FLOPs, then exit")
@click.option("--quiet", is_flag=True, help="no progress output; errors and the final summary only")
@click.option("--shard-optimizer/--no-shard-optimizer", default=None,
              help="several ranks: each rank keeps and updates the AdamW state of its share of the "
                   "parameters only (ZeRO-1), bitwise the same run  [default: on with 2+ ranks]")
@click.option("--comm-timeout", type=float, default=None,
              help="several ranks: seconds a rank waits for the others before it exits  [default: 60]")
@click.option("--watch", is_flag=True, help="serve the run's page (crystal watch) beside training on 127.0.0.1")
@click.option("--port", type=int, default=None, help="--watch: the page's port  [default: 8000]")
@click.option("--no-memory-check", is_flag=True,
              help="start even when the --dry-run memory estimate exceeds the memory available")
@click.option("--log", "log_to", type=click.Choice(("jsonl", "tensorboard")), default="jsonl", show_default=True,
              help="tensorboard: TensorBoard event files in the run directory too (metrics.jsonl is always written)")
def train(overwrite, resume_dir, config_file, print_config, dry_run, quiet, comm_timeout, watch, port, log_to,
          no_memory_check, **flags) -> None:
    """Train a GPT-2 or Llama model with data parallelism across a ring of spheres.

    Under mpiexec, srun or torchrun-style variables (RANK, WORLD_SIZE, ...), each process is a
    rank with its own ring; rank 0 writes the run directory and prints the progress."""
    from crystal.world import discover

    world = discover()
    if port is not None and not watch:
        raise CrystalError("--port is the port of --watch's page; give --watch too")
    try:
        _train(world, overwrite, resume_dir, config_file, print_config, dry_run, quiet, comm_timeout, flags,
               Outputs(watch, 8000 if port is None else port, log_to), memory_check=not no_memory_check)
    except SystemExit:  # an interrupted run: every rank agreed to stop after the same step
        raise
    except BaseException as e:
        if world.size > 1 and comm_started():
            _abort_ranks(world, e)
        raise


def comm_started() -> bool:
    """Whether other ranks may be waiting on this one (MPI or NCCL is up with peers): then a
    failure must end them."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].COMM_WORLD.Get_size() > 1
    return "cupyx.distributed" in sys.modules


def _abort_ranks(world, e: BaseException) -> None:
    """Print this rank's failure like main() would, then end every rank (MPI_Abort)."""
    message, code = error_exit(e)
    if message:
        click.echo(f"error: rank {world.rank}: {message}", err=True)
    sys.stderr.flush()
    time.sleep(0.2)  # the launcher forwards the line before MPI_Abort tears the job down (seen lost under load)
    if "mpi4py.MPI" in sys.modules:
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)  # the launcher ends the other ranks
        time.sleep(2.0)  # MPI_Abort may return before the launcher acts: alive, this rank's abort stands
    os._exit(code)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run shows besides the terminal: the page (--watch, --port) and TensorBoard (--log)."""

    watch: bool = False
    port: int = 8000
    log: str = "jsonl"


def _train(world, overwrite, resume_dir, config_file, print_config, dry_run, quiet, comm_timeout, flags,
           outputs: Outputs = Outputs(), memory_check: bool = True):
    from crystal.backends import cuda_unavailable_reason, get_backend, resolve_device
    from crystal.checkpoint import RunDir, data_order_of
    from crystal.config import read_toml, to_toml
    from crystal.data import DATA_ORDER, load_dataset
    from crystal.pretrained import check_data_tokenizer, load_params, open_pretrained, require_tokenizer
    from crystal.trainer import train as run_training
    from crystal.world import DEFAULT_TIMEOUT_S, connect

    given = {k: v for k, v in flags.items() if v is not None}
    shard_vocab = given.pop("vocab_size", None)  # llm.c shards' vocabulary (the model's: the data's)
    pretrained = None  # --init-from's checkpoint
    if resume_dir is not None:
        fixed = sorted(set(given) - set(RESUME_FLAGS))
        if fixed or config_file or shard_vocab is not None:
            name = fixed[0].replace("_", "-") if fixed else "config" if config_file else "vocab-size"
            raise CrystalError(f"--resume continues a run with its own config; it cannot change --{name}")
        run_dir = RunDir(resume_dir, resume=True)
        model_cfg, cfg = run_dir.read_configs()
        _, cfg = resolve(cfg.preset, dataclasses.asdict(model_cfg),
                         {**dataclasses.asdict(cfg), "stop_at": None, **given}, derive=False)
        state = run_dir.load_state(model_cfg, _adapter_layout(model_cfg, cfg))
        if state.step >= cfg.steps and not (print_config or dry_run):  # nothing to train
            if world.is_root:
                _finish(run_dir, model_cfg, state, cfg.steps)
            return
    else:
        file_preset, file_model, file_train = read_toml(config_file) if config_file else (None, {}, {})
        init_from = given.get("init_from", file_train.get("init_from"))
        preset = given.pop("preset", None) or file_preset or ("finetune" if init_from is not None else "small")
        flag_model = {k: given.pop(k) for k in MODEL_FLAGS if k in given}
        if init_from is not None:  # the model, its shape and its tokenizer are the checkpoint's
            pretrained = open_pretrained(init_from)
            model_over = _init_model(pretrained, flag_model, file_model, {**file_train, **given})
            model_tok = require_tokenizer(pretrained)
        else:
            model_over = {**file_model, **flag_model}
        model_cfg, cfg = resolve(preset, model_over, {**file_train, **given})
        state = None
    # built before the data is read: --device cuda without a GPU fails fast
    backend = None if print_config or dry_run else get_backend(cfg.device, cfg.precision, world.local_rank,
                                                                  graphs=cfg.cuda_graphs != "off")
    comm = None
    if backend is not None:
        comm = connect(world, resolve_device(cfg.device),
                       DEFAULT_TIMEOUT_S if comm_timeout is None else comm_timeout)
    if resume_dir is not None:  # llm.c shards: the run's vocabulary
        shard_vocab = model_cfg.vocab_size
    elif shard_vocab is None and pretrained is not None:
        shard_vocab = pretrained.config.vocab_size
    given_vocab = shard_vocab if resume_dir is None and pretrained is None else None
    dataset = load_dataset(cfg.data, cfg.val_fraction, cfg.val_data, shard_vocab)
    if given_vocab is not None and given_vocab != dataset.vocab_size:
        raise CrystalError(f"--vocab-size {given_vocab}: the data's vocabulary is its own, {dataset.vocab_size} "
                           "(--vocab-size is for llm.c shards, whose header has none)")
    if pretrained is not None:  # the data must be in the model's tokens; the run keeps its tokenizer.json
        check_data_tokenizer(dataset, pretrained, model_tok)
        dataset.tokenizer = model_tok
    elif resume_dir is None:  # the model's vocabulary is the data's
        model_cfg, cfg = resolve(cfg.preset, {**model_over, "vocab_size": dataset.vocab_size},
                                 dataclasses.asdict(cfg))
    if print_config:
        click.echo(to_toml(model_cfg, cfg), nl=False)
        return
    if dry_run:
        if world.is_root:
            click.echo(format_dry_run(model_cfg, cfg, world.size))
        return
    data_order = DATA_ORDER
    if resume_dir is not None:
        _warn_if_data_changed(Path(resume_dir), dataset, world.is_root)
        data_order = data_order_of(Path(resume_dir))  # a run started before DATA_ORDER keeps its own
    else:  # train.json keeps where the data is from anywhere, and its hash
        cfg = dataclasses.replace(cfg, **{k: os.path.abspath(getattr(cfg, k))
                                          for k in ("data", "val_data", "eval_task") if getattr(cfg, k) is not None})
    task = None
    if cfg.eval_task is not None:  # read and tokenized before the run directory exists
        from crystal.data import TOKENIZER_FILE, run_tokenizer
        from crystal.tasks import load_task

        tok = dataset.tokenizer  # a resumed run: the tokenizer it keeps (--init-from's, on token shards)
        if resume_dir is not None and (Path(resume_dir) / TOKENIZER_FILE).exists():
            tok = run_tokenizer(Path(resume_dir))
        task = load_task(cfg.eval_task, tok, model_cfg.block_size)
    if memory_check:  # before anything large is allocated, and before the run directory exists
        from crystal.memory import available_bytes, check_fits, run_estimate

        device = resolve_device(cfg.device)
        check_fits(run_estimate(model_cfg, dataclasses.replace(cfg, device=device), world.size,
                                flash=cfg.precision == "bf16")["total"],
                   available_bytes(device), "GPU" if device == "cuda" else "host")
    root = world.is_root  # rank 0 alone writes the run directory and prints
    server = None
    if outputs.watch and root:  # bound before training, so a port in use stops nothing half-done
        from crystal.watch import bind, check_port

        check_port(outputs.port)
        server = bind("127.0.0.1", outputs.port)
    if root and cfg.device == "auto" and (reason := cuda_unavailable_reason()) and not quiet:
        click.echo(f"device auto: training on cpu ({reason})")
    init = None
    if pretrained is not None:  # read (and checked) before the run directory exists
        init = load_params(pretrained)
        if root and not quiet:
            click.echo(describe_init(pretrained, model_cfg))
        if cfg.lora_r:  # the base's path as train.json and checkpoints keep it: from anywhere
            cfg = dataclasses.replace(cfg, init_from=os.path.abspath(cfg.init_from))
    elif resume_dir is not None and cfg.lora_r:  # the frozen base (the trainer checks it is the checkpoint's)
        init = load_params(open_pretrained(cfg.init_from))
    if resume_dir is None and root:
        out_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = RunDir(out_dir, overwrite=overwrite)
    elif not root:
        run_dir = None
    view = make_view(run_dir.path if root else None, cfg.log_every, quiet or not root)
    if root:
        from crystal.dashboard import Tee
        from crystal.live_state import LiveStateView

        board = None
        if outputs.log == "tensorboard":
            from crystal.tensorboard_log import TensorBoardView

            board = TensorBoardView(run_dir.path)
        view = Tee(view, LiveStateView(run_dir.path), board)
        if server is not None:
            from crystal.watch import WatchServer

            server = WatchServer(run_dir.path, server)
            server.start()
            click.echo(f"watch: {server.url}", err=True)
    with StopSignals() as stop:
        try:
            result = run_training(model_cfg, cfg, run_dir, dataset=dataset, resume=state, backend=backend,
                                  on_start=view.start, on_step=view.step, on_eval=view.eval, on_task=view.task,
                                  should_stop=stop.requested, comm=comm, init=init, data_order=data_order, task=task,
                                  on_warning=lambda msg: click.echo(f"warning: {msg}", err=True) if root else None)
        except BaseException:
            with contextlib.suppress(OSError):  # the run's own error is the one to report (a full disk)
                view.close()
            raise
        else:
            view.close()
        finally:
            if server is not None:
                server.stop()
            if run_dir is not None:
                run_dir.close()  # releases the run's lock
    if root:
        click.echo(format_summary(result))
    if result.interrupted:
        signum = stop.signum or signal.SIGINT  # a rank may stop because another one was signalled
        if root:
            click.echo(f"interrupted by {signal.Signals(signum).name} after step "
                       f"{result.history[-1].step if result.history else '?'}; checkpoint {result.checkpoint}; "
                       f"continue with: crystal train --resume {run_dir.path}", err=True)
        raise SystemExit(128 + signum)


def _finish(run_dir, model_cfg, state, steps: int) -> None:
    """--resume of a run whose last checkpoint is its last step: nothing to train; a final model
    that could not be written (a full disk) is written now from that checkpoint, bitwise."""
    from crystal.model import ParamLayout

    from crystal.lora import ADAPTER_FILE

    final = run_dir.model_path if state.base is None else run_dir.path / ADAPTER_FILE
    if final.exists():
        click.echo(f"{run_dir.path} is finished (step {state.step} of {steps}); nothing to resume")
        return
    with run_dir:
        if state.base is None:
            run_dir.write_model(ParamLayout(model_cfg), state.params)
        else:
            _, cfg = run_dir.read_configs()
            run_dir.write_adapters(_adapter_layout(model_cfg, cfg), state.params, state.base)
    click.echo(f"{run_dir.path} is finished (step {state.step} of {steps}); wrote its missing "
               f"{final.name} from the checkpoint of step {state.step}")


def _adapter_layout(model_cfg, cfg):
    """A LoRA run's crystal.lora.AdapterLayout, or None (full training)."""
    from crystal.lora import AdapterLayout, LoraConfig

    lora = LoraConfig.of(cfg, model_cfg)
    return None if lora is None else AdapterLayout(model_cfg, lora)


def _warn_if_data_changed(run: Path, dataset, show: bool) -> None:
    """The tokens a run trained on are not the data's now (train.json's data_sha256)."""
    from crystal.checkpoint import data_sha256_of

    recorded = data_sha256_of(run)
    if show and recorded and recorded != dataset.sha256:
        click.echo(f"warning: {dataset.name} changed since {run} was trained on it (its tokens' sha256 "
                   "differs from train.json's)", err=True)


def _init_model(pre, flag_model: dict, file_model: dict, train: dict) -> dict:
    """The model settings of a run that starts from `pre`: its own. Flags cannot change them, a
    config file may only repeat them (as --print-config writes it), and --seq-len must fit."""
    if flag_model:
        name = next(iter(flag_model)).replace("_", "-")
        raise CrystalError(f"--init-from takes the model's shape from {pre.path}; it cannot take --{name}")
    model = dataclasses.asdict(pre.config)
    for k, v in file_model.items():
        if model.get(k) != v:
            raise CrystalError(f"[model] {k} = {v!r} is not the model of --init-from {pre.path} "
                               f"({k} = {model.get(k)!r}); leave it out")
    seq_len = train.get("seq_len")
    if isinstance(seq_len, int) and seq_len > pre.config.block_size:
        raise CrystalError(f"--seq-len {seq_len} is above n_positions {pre.config.block_size} of the model "
                           f"in {pre.path}")
    return model


def describe_init(pre, model_cfg) -> str:
    """One line: what the run starts from."""
    from crystal.model import ParamLayout

    files = ", ".join(str(f.relative_to(pre.path)) for f in pre.weights)
    notes = "".join(f"; {n}" for n in pre.notes)
    return (f"init from {pre.path}: {ParamLayout(model_cfg).n_params:,} parameters ({describe_model(model_cfg)}) "
            f"from {files}{notes}; fresh optimizer state")


def describe_model(cfg) -> str:
    """The model's shape in words, then its architecture and what only a llama has."""
    core = f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, vocab {cfg.vocab_size}, block {cfg.block_size}"
    if not cfg.llama:
        return f"{core} (gpt2)"
    rope = f"rope theta {cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope += (f", {cfg.rope_scaling} scaling x{cfg.rope_factor:g} (low {cfg.rope_low_freq_factor:g}, high "
                 f"{cfg.rope_high_freq_factor:g}, original {cfg.rope_original_max_position})")
    return (f"{core} (llama: {cfg.kv_heads} KV heads, head {cfg.head_size} wide, SwiGLU {cfg.mlp_size}, {rope}, "
            f"{'tied' if cfg.tied else 'untied'} head{', q/k/v biases' if cfg.attention_bias else ''})")


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop after the current step (with a checkpoint); a second
    one exits at once, touching no file (checkpoints are atomic, so none is left damaged)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"{signal.Signals(signum).name}: stopping after this step "
                         "(again to quit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_view(out_dir: Path, log_every: int, quiet: bool):
    """The live ring on a terminal, plain lines when stdout is not one, nothing when quiet."""
    from crystal.dashboard import LiveView, PlainView, QuietView

    if quiet:
        return QuietView(out_dir, log_every)
    if sys.stdout.isatty():
        return LiveView()
    return PlainView(out_dir, log_every)


def format_dry_run(model_cfg, cfg, ranks: int = 1) -> str:
    from crystal.config import VOCAB_MULTIPLE
    from crystal.memory import run_estimate
    from crystal.model import ParamLayout, flops_per_token

    layout = ParamLayout(model_cfg)
    bf16 = cfg.precision == "bf16"
    flash = bf16 and _cudnn_reason() is None
    shard = ranks > 1 and cfg.shard_optimizer is not False

    from crystal.spheres import computing_at_once, gate_cores, usable_cores

    at_once = computing_at_once(cfg.spheres, cfg.cores, cfg.device)  # cpu: the core gate

    def estimate(sharded: bool) -> dict:
        return run_estimate(model_cfg, cfg, ranks, flash, sharded)

    mem = estimate(shard)
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    mib = {k: f"{v / 2**20:,.1f} MiB" for k, v in mem.items()}
    lines = [
        f"model: {describe_model(model_cfg)}",
        f"parameters: {layout.n_params:,}" + (
            f" (+{layout.size - layout.n_params:,} zeros in memory: the LM head's vocabulary padded "
            f"{model_cfg.vocab_size:,} -> {model_cfg.padded_vocab_size:,}, a multiple of {VOCAB_MULTIPLE}; "
            "in no file)" if layout.size > layout.n_params else ""),
        *_released_vocabulary(model_cfg, cfg, ranks, flash, shard),
        f"tokens per step: {cfg.tokens_per_step:,} ({cfg.micro_batches} micro-batches x "
        f"{cfg.batch_size} x {cfg.seq_len})",
        f"FLOPs per token: {fpt / 1e6:,.2f} M; per step: {fpt * cfg.tokens_per_step / 1e9:,.2f} G",
    ]
    if cfg.device != "cuda":  # the core gate (a cpu run; auto on a machine without a GPU)
        cores = gate_cores(cfg.cores)
        if cores is not None and cores < cfg.spheres:
            lines.append(f"spheres: {cfg.spheres}, at most {cores} computing at once on the cpu ("
                         + (f"--cores {cfg.cores})" if cfg.cores else f"{cores} usable cores; --cores N to change)"))
        else:
            lines.append(f"spheres: {cfg.spheres}, all computing at once on the cpu ({usable_cores()} usable cores"
                         + ("; --cores 0: no gate)" if cfg.cores == 0 else ")"))
    if bf16:
        lines.append("precision: bf16 activations and weight copy, fp32 master weights, gradients and moments; "
                     + ("attention: cuDNN flash ([B,NH,T] statistics)" if flash else
                        f"attention: cuBLAS + softmax ([B,NH,T,T] in bf16; no cuDNN: {_cudnn_reason()})"))
    where = ""
    if ranks > 1:
        where = f" per rank ({ranks} ranks, {'sharded' if shard else 'replicated'} optimizer)"
    lines.append(
        f"memory{where}: params {mib['params']} | "
        f"grads ({mem['grads'] / mem['params']:.3g} buffers) {mib['grads']} | "
        f"AdamW moments {mib['adamw_moments']} | "
        + (f"Muon momentum {mib['muon_momentum']} | " if "muon_momentum" in mem else "")
        + (f"Muon exchange {mib['muon_exchange']} | " if mem.get("muon_exchange") else "")
        + (f"bf16 weights {mib['weights_bf16']} | " if bf16 else "")
        + f"activations {mib['activations_per_sphere']} per "
        f"sphere x {at_once}{' computing at once' if at_once < cfg.spheres else ''} = {mib['activations']} | "
        f"total {mib['total']}")
    if cfg.optimizer == "muon":
        lines.append(_muon_dry_run(model_cfg, cfg, ranks, shard))
    if cfg.lora_r:
        lines.append(_lora_dry_run(model_cfg, cfg, mem))
    if ranks > 1:  # the other choice, for comparison
        other = estimate(not shard)
        lines.append(f"memory per rank with{'out' if shard else ''} --shard-optimizer: grads "
                     f"{other['grads'] / 2**20:,.1f} MiB | AdamW moments {other['adamw_moments'] / 2**20:,.1f} MiB | "
                     f"total {other['total'] / 2**20:,.1f} MiB")
    if cfg.cuda_graphs != "off" and ranks == 1:  # the graphs' fixed rows (crystal.graphs), if more than the pool's
        from crystal.graphs import graph_plan
        from crystal.reducer import pool_rows

        rows = graph_plan(cfg.micro_batches, cfg.spheres).rows
        extra = max(0, rows - pool_rows(cfg.micro_batches, cfg.spheres)) * mem["params"]
        lines.append(f"cuda graphs: {cfg.spheres} sphere graphs + the root's; gradient rows {rows}"
                     + (f" (+{extra / 2**20:,.1f} MiB over the pool; total {(mem['total'] + extra) / 2**20:,.1f} MiB)"
                        if extra else ""))
    return "\n".join(lines)


def _lora_dry_run(model_cfg, cfg, mem: dict) -> str:
    """LoRA: what trains, and the adapter-sized buffers (the gradient pool, the moments)."""
    from crystal.model import ParamLayout

    layout = _adapter_layout(model_cfg, cfg)
    n, total = layout.n_params, ParamLayout(model_cfg).n_params
    lora = layout.lora
    return (f"LoRA: r {lora.r}, alpha {lora.alpha:g} (scale {lora.scale:g}), dropout {lora.dropout:g} on "
            f"{', '.join(lora.targets)} of {model_cfg.n_layer} layers: {n:,} trainable parameters "
            f"({100 * n / total:.3f}% of {total:,}, the base frozen); gradient pool "
            f"{mem['grads'] / 2**20:,.2f} MiB ({mem['grads'] // (4 * n)} x {n:,} floats), AdamW moments "
            f"{mem['adamw_moments'] / 2**20:,.2f} MiB ({mem['adamw_moments'] // 4:,} floats)")


def _released_vocabulary(model_cfg, cfg, ranks: int, flash: bool, shard: bool) -> list[str]:
    """A line for a preset of a released model's shape (its ModelConfig holds the released
    vocabulary) trained on data of another vocabulary: its figures at the released one."""
    from crystal.config import ModelConfig
    from crystal.memory import run_estimate
    from crystal.model import ParamLayout, flops_per_token

    preset = PRESETS.get(cfg.preset)
    V = preset.model.vocab_size if preset else ModelConfig.vocab_size
    if V in (ModelConfig.vocab_size, model_cfg.vocab_size):
        return []
    released = dataclasses.replace(model_cfg, vocab_size=V)
    total = run_estimate(released, cfg, ranks, flash, shard)["total"]
    return [f"at the released vocabulary of {V:,} tokens (the data's is {model_cfg.vocab_size:,}): parameters "
            f"{ParamLayout(released).n_params:,}; FLOPs per token {flops_per_token(released, cfg.seq_len) / 1e6:,.2f} M; "
            f"memory total {total / 2**20:,.1f} MiB"]


def _muon_dry_run(model_cfg, cfg, ranks: int, shard: bool) -> str:
    """--optimizer muon: who updates what, the optimizer's memory by role, Newton-Schulz's FLOPs."""
    from crystal.model import ParamLayout
    from crystal.muon import muon_matrices, muon_parameters, ns_flops_per_step

    layout = ParamLayout(model_cfg)
    k, n = muon_parameters(layout), layout.size
    mib = lambda floats: f"{4 * floats / 2**20:,.1f} MiB"  # noqa: E731
    flops = ns_flops_per_step(layout, cfg.muon("ns_steps"))
    per = f"; {'each rank its own matrices' if shard else 'every rank all of them'}" if ranks > 1 else ""
    bf16 = ", bf16 products" if cfg.precision == "bf16" else ""
    kept = "; a rank keeps its span's moments and its own matrices' momentum" if shard else ""
    return (f"optimizer: Muon on {len(muon_matrices(layout))} matrices ({k:,} params: momentum {mib(k)}), "
            f"AdamW on {n - k:,} params (two moments {mib(2 * (n - k))}){kept}; "
            f"Newton-Schulz {flops / 1e9:,.3f} GFLOPs per step ({cfg.muon('ns_steps')} iterations{bf16}{per})")


def _cudnn_reason() -> str | None:
    """Why cuDNN flash attention is not available here (None when it is)."""
    from crystal.backends.cudnn_attention import unavailable_reason

    return "CRYSTAL_CUDNN=0" if os.environ.get("CRYSTAL_CUDNN", "1") == "0" else unavailable_reason()


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
    if r.get("launches_per_step") is not None:
        lines.append(f"launches from Python (kernels, library calls, cupy ops): "
                     f"{r['launches_per_micro_batch']} per micro-batch, {r['launches_per_step']:,.0f} per step")
    if result.losses:
        tail = result.losses[-20:]
        lines.append(f"trained {r['steps']} steps in {r['wall_s']:.1f} s; final loss {result.losses[-1]:.4f} "
                     f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f})")
    if result.val_losses:
        lines.append(f"val loss {result.val_losses[-1][1]:.4f} at step {result.val_losses[-1][0]}")
    if result.tasks:
        t = result.tasks[-1]
        lines.append(f"{t.task}: acc {t.task_acc:.4f} | acc_norm {t.task_acc_norm:.4f} | {t.task_examples:,} "
                     f"examples at step {t.step}")
    if result.finished and result.run_dir:
        if result.train.lora_r:
            lines.append(f"saved adapters: {Path(result.run_dir) / 'adapter_model.safetensors'} (LoRA on "
                         f"{result.train.init_from}; crystal export --format peft|hf)")
        else:
            lines.append(f"saved model: {Path(result.run_dir) / 'model.safetensors'}")
    elif result.checkpoint:
        lines.append(f"stopped at step {result.history[-1].step if result.history else '?'}; checkpoint "
                     f"{result.checkpoint}; continue with: crystal train --resume {result.run_dir}")
    return "\n".join(lines)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=str)
@click.option("--out", required=True, type=click.Path(), help="directory for train.bin, val.bin, tokenizer.json")
@click.option("--tokenizer", default="bytes", show_default=True,
              help="bytes, bpe (trained on the inputs), or a tokenizer.json file or a directory holding one "
                   "(e.g. a Hugging Face GPT-2 directory: the tokenizer of the model to fine-tune)")
@click.option("--vocab-size", type=int, default=None, help="BPE vocabulary size  [default: 1024]")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="tail held out for validation (of the tokens; of the records for alpaca and chat)")
@click.option("--shard-tokens", type=int, default=None,
              help="write each split as shards train_000000.bin, ... of this many tokens (alpaca/chat: a mask "
                   "file beside each)  [default: one file each, or shards of 100,000,000 tokens for a larger split]")
@click.option("--text-field", default=None, help="text: the field of a .jsonl line or .parquet row that holds its "
              "document  [default: text]")
@click.option("--workers", type=int, default=None, help="text: processes that encode  [default: the usable cores]")
@click.option("--bpe-train-bytes", type=int, default=None,
              help="bpe: train on at most this many bytes of the inputs, a seeded sample of them beyond  "
                   "[default: 268435456 (256 MiB)]")
@click.option("--format", "fmt", type=click.Choice(("text", "alpaca", "chat")), default="text", show_default=True,
              help="text, or instruction records (FILE.json array or FILE.jsonl): alpaca "
                   "{instruction, input?, output} or chat {messages: [{role, content}]}, the loss on the "
                   "responses only (needs --tokenizer DIR; chat: its chat_template)")
@click.option("--max-seq-len", type=int, default=None,
              help="alpaca/chat: most tokens a record may have (see --on-long)  [default: no limit]")
@click.option("--on-long", type=click.Choice(("truncate", "drop")), default=None,
              help="alpaca/chat: a record above --max-seq-len keeps its first tokens, or is dropped  "
                   "[default: truncate]")
def prepare(inputs, out, tokenizer, vocab_size, val_fraction, shard_tokens, text_field, workers,
            bpe_train_bytes, fmt, max_seq_len, on_long) -> None:
    """Tokenize text (or instruction records) into a data directory for `crystal train --data`.

    INPUTS: text files (one document each), .jsonl files (one document a line, in --text-field),
    .parquet files (one a row), directories of them, or quoted globs. Between documents goes
    the tokenizer's <|endoftext|>, where it has one. With --format alpaca or chat: .json or
    .jsonl files of records (the loss on their responses only)."""
    from crystal.data import DEFAULT_BPE_TRAIN_BYTES, prepare as run_prepare

    if vocab_size is not None and tokenizer not in ("bytes", "bpe"):
        raise CrystalError(f"--vocab-size trains a bpe tokenizer; --tokenizer {tokenizer} has its own vocabulary")
    if bpe_train_bytes is not None and tokenizer != "bpe":
        raise CrystalError("--bpe-train-bytes is for --tokenizer bpe, which is trained here")
    t0 = time.perf_counter()
    if fmt == "text":
        if max_seq_len is not None or on_long is not None:
            raise CrystalError("--max-seq-len and --on-long bound instruction records (--format alpaca or chat)")
        meta = run_prepare(list(inputs), out, tokenizer, 1024 if vocab_size is None else vocab_size, val_fraction,
                           shard_tokens, text_field="text" if text_field is None else text_field, workers=workers,
                           bpe_train_bytes=DEFAULT_BPE_TRAIN_BYTES if bpe_train_bytes is None else bpe_train_bytes,
                           progress=sys.stderr)
    else:
        from crystal.instruct import prepare_instruct

        if vocab_size is not None or bpe_train_bytes is not None:
            flag = "--vocab-size" if vocab_size is not None else "--bpe-train-bytes"
            raise CrystalError(f"{flag} trains a bpe tokenizer; --format {fmt} needs the model's own (--tokenizer DIR)")
        if text_field is not None:
            raise CrystalError(f"--text-field names a text's field; --format {fmt} reads its records' own fields")
        if workers is not None:
            raise CrystalError(f"--workers is for --format text; --format {fmt} encodes its records in one process")
        meta = prepare_instruct(list(inputs), out, fmt, tokenizer, val_fraction, max_seq_len, on_long or "truncate",
                                shard_tokens)
    kind = f"tokenizer {meta['tokenizer_from']}" if "tokenizer_from" in meta else f"{meta['tokenizer']} tokenizer"
    if "bpe_sample" in meta:
        s = meta["bpe_sample"]
        kind += f" (trained on a seeded sample of {s['bytes']:,} of the {s['of_bytes']:,} input bytes)"
    records = ""
    if "records" in meta:
        r, n = meta["records"], meta["response_tokens"]
        records = (f", {r['train']:,} train / {r['val']:,} val records ({r['truncated']:,} truncated, "
                   f"{r['dropped']:,} dropped), {n['train']:,} / {n['val']:,} response tokens")
    click.echo(f"prepared {out}: {kind}, vocab {meta['vocab_size']}, "
               f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens{records} "
               f"({len(meta['train_shards'])} + {len(meta['val_shards'])} files) in {time.perf_counter() - t0:.1f} s")


@cli.group(name="data")
def data_group() -> None:
    """Data sets: check the token files training does not read whole."""


@data_group.command(name="verify")
@click.argument("path", type=str)
@click.option("--val-data", type=str, default=None, help="token shards to validate on, checked too")
@click.option("--vocab-size", type=int, default=None,
              help="vocabulary of llm.c token shards  [default: the one their magic names]")
def data_verify(path, val_data, vocab_size) -> None:
    """Read every token of PATH (a prepared directory, a token file or a quoted glob of shards):
    every id below the vocabulary, and a prepared directory's token sha256 against meta.json
    (instruction data: every mask byte 0 or 1, the masks' sha256 too)."""
    from crystal.data import verify

    t0 = time.perf_counter()
    s = verify(path, vocab_size, val_data)
    click.echo(f"{path}: ok, {s['parts']} token arrays, {s['train_tokens']:,} train / {s['val_tokens']:,} val "
               f"tokens, vocab {s['vocab_size']}: {s['checked']} ({time.perf_counter() - t0:.1f} s)")


@cli.command(name="eval")
@click.argument("run", type=click.Path())
@click.option("--data", type=str, default=None, help="data to evaluate on  [default: the run's]")
@click.option("--batches", type=int, default=None, help="validation batches  [default: the run's --eval-batches]")
@click.option("--task", type=str, default=None,
              help="a multiple-choice task in HellaSwag's JSON lines ({ctx, endings[4], label}): acc and acc_norm "
                   "instead of the validation loss")
@click.option("--limit", type=int, default=None, help="--task: its first N examples only  [default: all]")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True,
              help="--task: where the model runs")
def eval_cmd(run, data, batches, task, limit, device) -> None:
    """Validation loss and bits per byte of a trained run, or (--task) its accuracy on a
    multiple-choice task. RUN: a run directory, or (--task) a Hugging Face GPT-2 directory too."""
    from crystal.checkpoint import data_order_of, read_train_config
    from crystal.pretrained import load_checkpoint
    from crystal.data import load_dataset
    from crystal.trainer import evaluate

    if task is not None:
        if data is not None or batches is not None:
            raise CrystalError("--task scores a task file; --data and --batches are for the validation loss")
        return _eval_task(run, task, limit, device)
    if limit is not None:
        raise CrystalError("--limit is the number of --task examples; give --task FILE")
    if batches is not None and batches < 1:
        raise CrystalError(f"--batches must be positive, got {batches}")
    model = load_checkpoint(run)
    cfg = read_train_config(Path(run) / "train.json", model.config)  # validated against the model
    if batches is not None:
        cfg = dataclasses.replace(cfg, eval_batches=batches)
    dataset = load_dataset(data if data is not None else cfg.data, cfg.val_fraction,
                           cfg.val_data if data is None else None, model.config.vocab_size)
    if data is None:
        _warn_if_data_changed(Path(run), dataset, True)
    if dataset.vocab_size != model.config.vocab_size:
        raise CrystalError(f"the data's vocabulary ({dataset.vocab_size}) is not the model's "
                           f"({model.config.vocab_size})")
    loss, n = evaluate(model, dataset, cfg, data_order_of(Path(run)))  # the run's own val batches
    per_byte = dataset.bytes_per_token  # None: token shards, whose text is not known
    bpb = f" | {loss / math.log(2) / per_byte:.4f} bits per byte" if per_byte else ""
    click.echo(f"val loss {loss:.4f}{bpb} | {n} batches x {cfg.batch_size} x "
               f"{cfg.seq_len} tokens of {dataset.name}")


def _eval_task(run: str, task: str, limit: int | None, device: str) -> None:
    from crystal.backends import get_backend
    from crystal.pretrained import checkpoint_tokenizer, load_checkpoint
    from crystal.tasks import read_task, score, tokenize
    from crystal.trainer import _blas_limits

    if limit is not None and limit < 1:
        raise CrystalError(f"--limit must be a positive number of examples, got {limit}")
    examples = read_task(task)[:limit]  # checked before the model is read
    model = load_checkpoint(run, get_backend(device))
    scored = tokenize(task, examples, checkpoint_tokenizer(run, model.config), model.config.block_size)
    t0, tty = time.perf_counter(), sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\r{task}: {done:,} / {total:,} examples ({done / (time.perf_counter() - t0):,.1f}/s)\x1b[K")
            sys.stderr.flush()

    with _blas_limits(model.backend):
        r = score(model.token_losses, scored, progress)
    if tty:
        sys.stderr.write("\n")
    click.echo(f"{task}: acc {r.acc:.4f} | acc_norm {r.acc_norm:.4f} | {r.examples:,} examples "
               f"({time.perf_counter() - t0:.1f} s)")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--prompt", default=None, help="text to continue  [default: a newline]")
@click.option("--prompt-file", type=str, default=None, help="read the prompt from FILE (- : standard input)")
@click.option("--max-tokens", "--tokens", "max_tokens", type=int, default=200, show_default=True,
              help=f"new tokens per sample, at most {MAX_TOKENS:,} (fewer at end-of-text or a --stop text)")
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="0 is greedy; any value > 0 is valid, and as it nears 0 sampling nears greedy")
@click.option("--top-k", type=int, default=None, help="sample among the k most likely tokens")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="sample among the most likely tokens whose probability reaches P, in (0, 1]")
@click.option("--stop", multiple=True, help="end a sample before this text (repeatable)")
@click.option("--num-samples", type=int, default=1, show_default=True,
              help=f"samples decoded together as one batch, 1-{MAX_SAMPLES}; sample i is --seed + i's")
@click.option("--seed", type=int, default=0, show_default=True, help=">= 0")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="where to decode (cuda: fp32, kernels/kv_cache.cu)")
@click.option("--cuda-graphs", type=click.Choice(DECODE_GRAPHS), default="off", show_default=True,
              help="cuda: replay decode steps as CUDA graphs (auto: where the capture works, else eagerly)")
@click.option("--dry-run", is_flag=True, help="print the model, the prompt's tokens and the KV cache's size, then exit")
def sample(run, prompt, prompt_file, max_tokens, temperature, top_k, top_p, stop, num_samples, seed,
           device, cuda_graphs, dry_run) -> None:
    """Generate text from a trained run, printed as it is decoded (deterministic for a seed).

    RUN is a run directory, a Hugging Face GPT-2 directory, or a .safetensors file with the
    model's config.json and tokenizer.json beside it."""
    from crystal.pretrained import checkpoint_tokenizer, load_checkpoint
    from crystal.sample import SamplingParams, prompt_tokens, sample_text

    text = _prompt_text(prompt, prompt_file)
    params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, tuple(stop))
    params.check()  # before the model loads
    for s in stop:
        _utf8_option("--stop", s)
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise CrystalError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {num_samples}")
    if dry_run:  # no tensor is read, nothing is allocated
        from crystal.pretrained import checkpoint_config

        cfg = checkpoint_config(run)
        ids = prompt_tokens(checkpoint_tokenizer(run, cfg), text)
        click.echo(format_sample_dry_run(cfg, len(ids), num_samples, max_tokens))
        return
    from crystal.backends import get_backend

    model = load_checkpoint(run, get_backend(device, graphs=cuda_graphs != "off"))
    tok = checkpoint_tokenizer(run, model.config)
    sample_text(model, tok, prompt_tokens(tok, text), params, num_samples)


def format_sample_dry_run(model_cfg, prompt_len: int, num_samples: int, max_tokens: int) -> str:
    """`crystal sample --dry-run`: the KV cache the decoder would allocate (crystal.sample.
    cache_capacity positions for each of the num_samples rows; crystal.generate.kv_cache_bytes,
    fp32 as `crystal sample` decodes on either device) beside the parameters."""
    from crystal.generate import kv_cache_bytes
    from crystal.model import ParamLayout
    from crystal.sample import cache_capacity

    capacity = cache_capacity([prompt_len], max_tokens, model_cfg.block_size)
    cache = kv_cache_bytes(model_cfg, num_samples, capacity)
    per_position = kv_cache_bytes(model_cfg, 1, 1)
    params = 4 * ParamLayout(model_cfg).size
    kept = f", its last {model_cfg.block_size} kept" if prompt_len > model_cfg.block_size else ""
    return "\n".join([
        f"model: {describe_model(model_cfg)}",
        f"prompt: {prompt_len:,} tokens{kept}; {num_samples} sample(s) x up to {max_tokens:,} new tokens",
        f"KV cache: {num_samples} sequence(s) x {capacity:,} positions x {per_position:,} bytes "
        f"(2 x {model_cfg.n_layer} layers x {model_cfg.kv_heads * model_cfg.head_size} fp32) = {cache / 2**20:,.1f} MiB ({cache:,} bytes)",
        f"memory: params {params / 2**20:,.1f} MiB | KV cache {cache / 2**20:,.1f} MiB | "
        f"total {(params + cache) / 2**20:,.1f} MiB (+ one forward's activations)",
    ])


def _utf8_option(name: str, value: str) -> None:
    try:  # click hands undecodable argv bytes over as lone surrogates
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CrystalError(f"{name} is not valid UTF-8 text (character {e.start})") from None


def _prompt_text(prompt: str | None, prompt_file: str | None) -> str:
    """--prompt, or the UTF-8 text of --prompt-file (- : standard input), which must not be empty."""
    if prompt is not None and prompt_file is not None:
        raise CrystalError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        prompt = "\n" if prompt is None else prompt
        _utf8_option("--prompt", prompt)
        return prompt
    name = "standard input" if prompt_file == "-" else prompt_file
    try:
        if prompt_file == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            from crystal.atomic import check_regular

            check_regular(Path(prompt_file))
            with open(prompt_file, "rb") as f:
                data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise CrystalError(f"cannot read --prompt-file {name}: {e.strerror or e}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise CrystalError(f"--prompt-file {name} is larger than {MAX_PROMPT_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CrystalError(f"--prompt-file {name} is not UTF-8 text (byte {e.start})") from None
    if not text:
        raise CrystalError(f"--prompt-file {name} is empty")
    return text


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(("hf", "peft")), default="hf", show_default=True,
              help="hf: the whole model (a LoRA run's adapters merged in); peft: a LoRA run's adapters as "
                   "PEFT's adapter_config.json + adapter_model.safetensors")
@click.option("--out", required=True, type=click.Path(),
              help="directory to write: new or empty (an export never replaces files)")
def export(run, fmt, out) -> None:
    """Export a run for Hugging Face transformers (GPT2LMHeadModel + tokenizer) or PEFT."""
    from crystal.pretrained import export_hf, export_peft
    from crystal.runlock import check_free

    check_free(out)  # a run being written there: refused naming its writer
    if fmt == "peft":
        path = export_peft(run, out)
        click.echo(f"exported {run} to {path} (adapter_config.json, adapter_model.safetensors)")
        return
    path = export_hf(run, out)
    click.echo(f"exported {run} to {path} (config.json, model.safetensors, tokenizer.json)")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help=f"image file to write, its format by its suffix: {', '.join('.' + f for f in PLOT_FORMATS)}")
@click.option("--width", type=int, default=1200, show_default=True, help=f"pixels, {PLOT_MIN[0]}-{PLOT_MAX:,}")
@click.option("--height", type=int, default=800, show_default=True, help=f"pixels, {PLOT_MIN[1]}-{PLOT_MAX:,}")
def plot(runs, out, width, height) -> None:
    """Loss curves (against step and time) and per-sphere bars of one or more runs, as an image."""
    from crystal.plot import plot_runs

    plot_runs([Path(r) for r in runs], Path(out), width, height)
    click.echo(f"wrote {out} ({width}x{height})")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface, with a warning)")
@click.option("--port", type=int, default=8000, show_default=True)
def watch(run, host, port) -> None:
    """The sphere ring, curves and sphere table of RUN in a browser, live while it trains."""
    from crystal.watch import WatchServer, bind, check_port, host_warning

    check_port(port)
    if (warning := host_warning(host)) is not None:
        click.echo(warning, err=True)
    server = WatchServer(run, bind(host, port), host)
    click.echo(f"watching {run} at {server.url} (Ctrl-C stops)")
    server.serve()


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (another: every machine that reaches it, with a warning)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
@click.option("--max-batch", type=int, default=16, show_default=True,
              help="sequences decoded together (the KV cache's rows, allocated at start); bounds n")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="where to decode")
@click.option("--cuda-graphs", type=click.Choice(DECODE_GRAPHS), default="off", show_default=True,
              help="cuda: replay decode steps as CUDA graphs (auto: where the capture works, else eagerly)")
def serve(run, host, port, api_key, max_batch, device, cuda_graphs) -> None:
    """An OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) for RUN.

    RUN is a run directory or a Hugging Face GPT-2 directory (chat needs its tokenizer's
    chat_template). The running requests are decoded together as one batch."""
    from crystal.serve import Server, ServedModel, host_warning
    from crystal.watch import bind, check_port

    check_port(port)
    if not 1 <= max_batch <= MAX_SAMPLES:
        raise CrystalError(f"--max-batch must be in [1, {MAX_SAMPLES}], got {max_batch}")
    if api_key is not None and (not api_key or api_key != api_key.strip() or not api_key.isprintable()):
        raise CrystalError("--api-key must be a non-empty printable text without surrounding spaces")
    if not Path(run).exists():
        raise CrystalError(f"{run} does not exist: give a run directory or a Hugging Face GPT-2 directory")
    sock = bind(host, port)
    from crystal.backends import get_backend

    from crystal.serve import Limits

    limits = Limits(max_batch=max_batch, max_n=min(Limits.max_n, max_batch))
    server = Server(ServedModel(run, get_backend(device, graphs=cuda_graphs != "off")), sock, host, api_key, limits)
    if (warning := host_warning(host, api_key)) is not None:
        click.echo(warning, err=True)
    dec = server.worker.decoder
    click.echo(f"serving {server.served.name} at {server.url} (Ctrl-C stops); KV cache "
               f"{dec.cache.nbytes / 2**20:,.1f} MiB: {dec.batch} sequences x {dec.capacity} positions")
    server.serve()


@cli.command()
def info() -> None:
    """Versions, BLAS, cores, numba threading, GPU and nvcc of this machine."""
    from crystal.info import describe

    for key, value in describe().items():
        click.echo(f"{key + ':':<16} {value}")


def error_exit(e: BaseException) -> tuple[str | None, int]:
    """The one-line message (None: nothing to print) and exit status of an exception."""
    message, code = _message_and_status(e)
    return (one_line(message) if message else message), code


def one_line(message: str) -> str:
    """A message as one printable line: control characters (a user's value may hold a newline
    or a carriage return) are written as Python escapes, so an error never spans two lines."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in message)


def _message_and_status(e: BaseException) -> tuple[str | None, int]:
    if isinstance(e, click.exceptions.NoArgsIsHelpError):
        return None, 0
    if isinstance(e, CrystalError):
        return str(e), EXIT_USAGE
    if isinstance(e, SphereFailure) and isinstance(e.error, CrystalError):  # e.g. cuDNN refusing a shape
        return str(e.error), EXIT_USAGE
    if isinstance(e, NonFiniteError):
        return str(e), EXIT_NONFINITE
    if isinstance(e, click.exceptions.ClickException):
        return e.format_message(), EXIT_USAGE
    if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
        return "interrupted", 130
    if isinstance(e, SystemExit):  # an interrupted run: 130 (SIGINT) or 143 (SIGTERM)
        return None, e.code if isinstance(e.code, int) else 1
    if _out_of_space(e):
        return f"cannot write {e.filename or 'a file'}: {e.strerror}", EXIT_USAGE
    return f"{type(e).__name__}: {e}", 1


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _out_of_space(e: BaseException) -> bool:
    """A write that the disk refused (full, over quota): the machine's to fix, not a bug in
    crystal; a run directory's own writes say more (crystal.checkpoint.RunDir)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the click group; user errors become one line on stderr and exit 2."""
    try:
        rv = cli.main(args=argv, prog_name="crystal", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        return 0
    except (CrystalError, NonFiniteError, click.exceptions.ClickException, click.exceptions.Abort,
            KeyboardInterrupt, SystemExit, OSError) as e:
        if isinstance(e, OSError) and not _out_of_space(e):
            raise
        message, code = error_exit(e)
        if message:
            click.echo(f"error: {message}", err=True)
        return code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
