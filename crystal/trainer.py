"""The training loop: tokens -> batches -> spheres -> reducer -> optimizer -> checkpoint.

`train()` is what `crystal train` runs and what tests call directly. It owns nothing global:
the backend, the parameters, the sphere threads and the run directory all belong to one call.
A resumed run restores parameters, AdamW moments, the step and the data position, so its
remaining steps are bitwise the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from crystal.backends import get_backend
from crystal.checkpoint import RunDir, TrainState
from crystal import dropout
from crystal.config import TRAIN_LIMITS, ModelConfig, TrainConfig
from crystal.data import DATA_ORDER, BatchIterator, DataSet, eval_batches, load_dataset
from crystal.errors import CrystalError, GraphCaptureError, NonFiniteError
from crystal.model import ParamLayout, init_params, linear_products, loss_denominator, warm_up
from crystal.muon import Muon
from crystal.optim import AdamW, clip_scale, lr_at
from crystal.graphs import StepGraphs, graph_plan
from crystal.lora import AdapterLayout, LoraConfig, check_backend, init_adapters, target_shape, weights_sha256
from crystal.reducer import GradientReducer, pool_rows, tree_mean
from crystal.spheres import SphereSystem, computing_at_once, gate_cores, usable_cores
from crystal.tasks import Task, load_task, score
from crystal.world import Comm


@dataclass
class StepRecord:
    step: int  # 1-based: the number of optimizer steps taken
    loss: float  # mean over the step's micro-batches
    lr: float
    grad_norm: float  # global norm of the mean gradient, before clipping
    tokens_per_s: float
    ms_per_step: float
    elapsed: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TaskRecord:
    """A multiple-choice task scored during training (--eval-task; crystal.tasks)."""
    step: int
    task: str  # the task file's name
    task_acc: float  # the lowest summed loss of an ending is the label
    task_acc_norm: float  # the lowest mean loss per ending token is the label
    task_examples: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: ModelConfig
    train: TrainConfig  # resolved: steps filled in from --epochs when given
    params: np.ndarray  # final trainable buffer (host): the parameters (crystal.model.ParamLayout), or LoRA's adapters (crystal.lora.AdapterLayout)
    losses: list[float]  # this call's steps
    spheres: list[dict]
    root: dict
    data_name: str = ""
    wall_s: float = 0.0
    run_dir: str | None = None
    history: list[StepRecord] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    finished: bool = True  # False when stopped early by --stop-at or a signal
    checkpoint: str | None = None  # the last resumable checkpoint written
    interrupted: bool = False  # stopped by should_stop (a signal)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (--on-nonfinite skip)
    tasks: list[TaskRecord] = field(default_factory=list)  # --eval-task's scores


def resolve_steps(cfg: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """--epochs E overrides --steps: steps = E * batches per epoch / micro-batches (at least 1);
    the resolved config keeps steps and drops epochs so a resume reads the same number. The
    resolved count meets --steps' own limit (a train.json that --resume and eval refuse is never
    written)."""
    if cfg.epochs is None:
        return cfg
    steps = cfg.epochs * batches_per_epoch / cfg.micro_batches  # float: 1e300 epochs stay finite or inf
    if not steps <= TRAIN_LIMITS["steps"]:
        raise CrystalError(f"--epochs {cfg.epochs:.4g} is {steps:.3g} steps of {cfg.micro_batches} x "
                           f"{cfg.batch_size} sequences, above the limit of {TRAIN_LIMITS['steps']} steps")
    return dataclasses.replace(cfg, steps=max(1, int(steps)), epochs=None)


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: RunDir | None = None,
          dataset: DataSet | None = None, resume: TrainState | None = None, backend=None,
          on_start: Callable[[dict], None] | None = None,
          on_step: Callable[[StepRecord, SphereSystem], None] | None = None,
          on_eval: Callable[[int, float], None] | None = None,
          on_task: Callable[[TaskRecord], None] | None = None,
          should_stop: Callable[[], bool] | None = None, comm: Comm | None = None,
          init: np.ndarray | None = None, on_warning: Callable[[str], None] | None = None,
          data_order: int = DATA_ORDER, task: Task | None = None) -> TrainResult:
    """Train from scratch, from `init` (flat float32 parameters to start from, e.g. a released
    GPT-2's: fine-tuning), or continue from `resume`. `dataset` overrides cfg.data; `backend`
    overrides cfg.device (benchmarks pass a timed backend, tests an instrumented one).
    `should_stop` is asked after every step (signals): when it says so, the run writes a
    resumable checkpoint and returns with `interrupted` set. A non-finite loss or gradient norm
    raises NonFiniteError before the step is applied (cfg.on_nonfinite "skip": the step's
    update is skipped instead and logged).

    With `comm` of R > 1 ranks every rank calls train() with the same arguments except
    run_dir and the callbacks (rank 0's alone): each rank reads every batch (the iterator is
    the same everywhere), computes its range of the step's micro-batches on its own spheres,
    and the reducer's tree joins them. With the sharded optimizer (cfg.shard_optimizer, the
    default with ranks) each rank finishes the gradient, keeps the AdamW moments and updates the
    parameters of its span only, and the spans are all-gathered; without it the optimizer
    updates every rank's replica identically. Either way the bits are one process's.

    cfg.cuda_graphs (on a cuda backend made with graphs=True, one process): after one eager step,
    every step replays CUDA graphs (crystal.graphs), bitwise the eager steps. A capture that fails
    stops the run under "on" (CrystalError) and falls back to eager steps under "auto", with one
    `on_warning` line.

    `data_order`: how epochs shuffle the windows (crystal.shards.WindowOrder): a resumed run
    passes the one its train.json records (crystal.checkpoint.data_order_of).

    LoRA (cfg.lora_r > 0, crystal.lora): `init` is the frozen base (cfg.init_from's parameters) and
    the adapters are what trains: the reducer, the norm, AdamW and checkpoints hold the adapter
    buffer only. A resumed LoRA run refuses a base whose weights (sha256) are not the checkpoint's.

    cfg.eval_task: the task (crystal.tasks; `task`: it loaded already, else it is read here with the
    data's tokenizer) is scored with the current weights every cfg.eval_task_every steps (None:
    cfg.eval_every's) and at the last step; `on_task` gets each TaskRecord. Every rank scores its
    share of the task's batches (score_task); nothing the training computes changes."""
    if dataset is None:
        dataset = load_dataset(cfg.data, cfg.val_fraction, cfg.val_data, model_cfg.vocab_size)
    if dataset.vocab_size != model_cfg.vocab_size:
        raise CrystalError(f"the data's vocabulary has {dataset.vocab_size} tokens, "
                           f"the model {model_cfg.vocab_size}")
    batches = BatchIterator(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed,
                            model_cfg.vocab_size, what="the training split", order=data_order,
                            mask=dataset.train_mask)
    cfg = resolve_steps(cfg, batches.batches_per_epoch)
    if cfg.eval_task is not None and task is None:
        task = load_task(cfg.eval_task, dataset.tokenizer, model_cfg.block_size)
    task_every = cfg.eval_task_every if cfg.eval_task_every is not None else cfg.eval_every  # 0: the last step
    val = []
    if cfg.eval_every:
        if len(dataset.val) < cfg.batch_size * cfg.seq_len + 1:
            raise CrystalError(f"the validation split has {len(dataset.val)} tokens, too few for one "
                               "batch; raise --val-fraction or pass --eval-every 0")
        val = eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.eval_batches, data_order,
                           model_cfg.vocab_size, mask=dataset.val_mask)
    val_denom = loss_denominator(val) if val else None  # the val loss: a mean over every unmasked target
    be = backend if backend is not None else get_backend(cfg.device, cfg.precision)
    warm_up(be, model_cfg)  # every kernel compiled before a sphere starts

    layout = ParamLayout(model_cfg)
    lora = LoraConfig.of(cfg, model_cfg)  # None: every parameter trains
    trainable, base, base_id = layout, None, None  # base: the frozen model under LoRA
    if init is not None:
        if init.dtype != np.float32:
            raise ValueError(f"init must be float32, got {init.dtype}")
        layout.check(init, "init")  # a buffer of the layout, the LM head's padding rows zero
    if lora is not None:
        if init is None:
            raise ValueError("LoRA trains adapters on a given model: pass its parameters as init")
        check_backend(be, model_cfg, lora)
        trainable = AdapterLayout(model_cfg, lora)
        base_id = {"path": cfg.init_from, "sha256": weights_sha256(layout, init)}
        _check_base(resume, base_id)
        base = be.to_device(init)
    if resume is not None:
        start = resume.params
    elif lora is not None:
        start = init_adapters(trainable, cfg.seed)
    elif init is not None:  # bitwise the given parameters (the cpu backend trains them in place); fresh AdamW
        start = init
    else:
        start = init_params(model_cfg, cfg.seed)
    params = be.to_device(start)  # what trains: the parameters, or the adapters
    comm = comm if comm is not None else Comm()
    graphs = _graphs_wanted(cfg, be, comm, dataset.masked)
    rows = None
    if graphs:  # the graphs' fixed rows (crystal.graphs), at least the pool's own
        rows = max(pool_rows(cfg.micro_batches, cfg.spheres), graph_plan(cfg.micro_batches, cfg.spheres).rows)
    at_once = computing_at_once(cfg.spheres, cfg.cores, be.name)  # the core gate
    reducer = GradientReducer(be, trainable.size, cfg.micro_batches, comm, spheres=at_once, rows=rows,
                              shard=cfg.shard_optimizer is not False)
    optimizer = make_optimizer(be, trainable, cfg, reducer, comm)
    first = 0
    if resume is not None:
        if not (0 < resume.step <= cfg.steps):
            raise CrystalError(f"checkpoint step {resume.step} is outside this run's {cfg.steps} steps")
        optimizer.load_state(resume)  # the whole state, or this rank's shard of it
        optimizer.t = resume.adam_t
        batches.set_state(resume.data)
        first = resume.step
    if comm.size > 1:
        comm.meet(_fingerprint(model_cfg, cfg, be.to_host(params), first, base_id))
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    if run_dir is not None:
        if resume is None:
            run_dir.write_configs(model_cfg, dataclasses.replace(cfg, stop_at=None),
                                  dataset.tokenizer.to_json() if dataset.tokenizer is not None else None,
                                  dataset.sha256, data_order, base_id)
        else:
            run_dir.truncate_metrics(resume.step)
    if on_start is not None:
        on_start({"params": layout.n_params, "trainable": trainable.n_params,
                  "tokens": len(dataset.train), "val_tokens": len(dataset.val),
                  "data": dataset.name, "steps": cfg.steps, "first": first, "last": last,
                  "device": be.name, "config": cfg, "model": model_cfg, "ranks": comm.size})

    losses: list[float] = []
    history: list[StepRecord] = []
    val_losses: list[tuple[int, float]] = []
    task_records: list[TaskRecord] = []
    norms: list[float] = []
    checkpoint = None
    skipped = 0
    interrupted = False
    optimizer_s = 0.0
    t_start = time.perf_counter()
    launches_at_start = be.launches() if hasattr(be, "launches") else None
    blas = blas_threads_per_sphere(model_cfg, cfg, be, comm.size)
    with _blas_limits(be, blas), SphereSystem(be, model_cfg, layout, params if base is None else base, reducer,
                                              cfg.spheres, cfg.batch_size, cfg.seq_len, cores=_gate(cfg, be),
                                              pin=comm.size == 1 and be.name == "cpu",
                                              lora=None if lora is None else (lora, trainable, params)) as spheres:
        base = None  # the spheres hold what they read of it (cuda bf16: its bf16 copy alone)
        step_graphs = StepGraphs(spheres, optimizer, params, layout, cfg.grad_clip) if graphs else None
        for step in range(first, last):
            t0 = time.perf_counter()
            micro = [batches.next_batch() for _ in range(cfg.micro_batches)]  # all, on every rank
            denom = loss_denominator(micro)  # the step's unmasked targets / M (B*T without a mask)
            drops = dropout.for_step(cfg.dropout, cfg.seed, step, reducer.owned)
            lora_drops = dropout.for_step(lora.dropout, cfg.seed, step, reducer.owned) if lora else None
            lr = lr_at(step, cfg)
            done = step + 1
            replayed = None
            if step_graphs is not None and step > first:  # one eager step first: everything allocated
                optimizer.begin_step(lr)  # the device fills in the clipping factor and the skip flag
                try:
                    replayed = step_graphs.step(micro, drops, optimizer.scalars)
                except GraphCaptureError as e:
                    optimizer.t -= 1
                    if cfg.cuda_graphs == "on":
                        raise CrystalError(f"--cuda-graphs on: the capture failed ({e})") from None
                    _warn(on_warning, f"CUDA graph capture failed ({e}); training on without graphs")
                    step_graphs = None
            if replayed is not None:
                losses_m, norm = replayed
                loss = reducer.reduce_losses(losses_m)
            else:
                loss = reducer.reduce_losses(spheres.step(micro[reducer.owned.start:reducer.owned.stop], drops,
                                                          lora_drops, denom))
                norm = reducer.reduce(spheres.map)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # (a graph step skipped AdamW on the device)
                if replayed is not None:
                    optimizer.t -= 1
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(done, loss, norm, checkpoint or _latest(run_dir))
                skipped += 1
                if run_dir is not None:
                    run_dir.log({"step": done, "skipped": "non-finite loss or gradient norm"})
                continue
            if replayed is None:
                t_opt = time.perf_counter()
                optimizer.begin_step(lr, clip_scale(norm, cfg.grad_clip))
                compute = spheres.trainable  # params, or their bf16 copy: AdamW refreshes it in the same pass
                mine = reducer.my_chunks  # every chunk, or this rank's shard
                spheres.map(len(mine), lambda i, c: optimizer.update_chunk(mine[c], params, reducer.grad, compute))
                if isinstance(optimizer, Muon):  # each matrix whole, then (sharded) the all-gathers
                    optimizer.orthogonalize(params, reducer, spheres.map, compute)
                elif reducer.sharded:  # every rank's updated span to every rank, then its bf16 copy
                    reducer.gather_params(params)
                    if compute is not params:
                        be.compute_weights(params, out=compute)
                optimizer_s += time.perf_counter() - t_opt
            dt = time.perf_counter() - t0
            losses.append(loss)
            norms.append(norm)
            rec = StepRecord(done, loss, lr, norm, cfg.tokens_per_step / dt, dt * 1e3,
                             time.perf_counter() - t_start)
            history.append(rec)
            if run_dir is not None:
                run_dir.log(rec.to_json())
            if on_step is not None:
                on_step(rec, spheres)
            if val and (done % cfg.eval_every == 0 or done == cfg.steps):
                share = comm.share(len(val))
                val_loss = tree_mean(comm.gather(spheres.evaluate(val[share.start:share.stop], val_denom), len(val)))
                val_losses.append((done, val_loss))
                if run_dir is not None:
                    run_dir.log({"step": done, "val_loss": val_loss, "eval_batches": len(val)})
                if on_eval is not None:
                    on_eval(done, val_loss)
            if task is not None and (done == cfg.steps or (task_every and done % task_every == 0)):
                acc, acc_norm = score_task(task, spheres, comm)
                task_records.append(TaskRecord(done, task.name, acc, acc_norm, len(task.rows)))
                if run_dir is not None:
                    run_dir.log(task_records[-1].to_json())
                if on_task is not None:
                    on_task(task_records[-1])
            due = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            interrupted = should_stop is not None and should_stop()
            if comm.size > 1:  # every rank stops after the same step
                interrupted = comm.any(interrupted)
            stopping = (done == last and last < cfg.steps) or (interrupted and done < cfg.steps)
            if (due or stopping) and (run_dir is not None or reducer.sharded):  # --stop-at and signals leave one
                m, v, momentum = optimizer.gather_state(reducer)  # whole, on rank 0
                if run_dir is not None:
                    state = TrainState(done, be.to_host(params), m, v, batches.state(), optimizer.t, base_id,
                                       momentum=momentum)
                    checkpoint = str(run_dir.save_state(trainable, state, cfg.keep))
            if interrupted:
                last = done
                break
        sphere_summary = spheres.summary()
        active = spheres.active_spheres()
        per_micro_batch = spheres.launches_per_micro_batch
    wall = time.perf_counter() - t_start
    # the cpu's trained buffer itself, no copy: a copy here, with the pool, moments and activations
    # still held, was the run's peak RSS (one more parameter buffer); cuda's to_host is the copy
    host_params = np.asarray(be.to_host(params), dtype=np.float32)
    n = max(1, len(losses))
    root = {
        "spheres": cfg.spheres,
        "concurrent_spheres": spheres.concurrent,  # computing at once (the core gate)
        "blas_threads": blas,  # per computing sphere
        "active_spheres": active,
        "steps": len(losses),
        "grad_norm": norms[-1] if norms else float("nan"),
        "mean_grad_norm": sum(norms) / n,
        "wall_s": wall,
        "tokens_per_s": cfg.tokens_per_step * len(losses) / wall if wall > 0 else 0.0,
        "ms_per_step": 1e3 * wall / n,
        "optimizer": cfg.optimizer,
        "optimizer_ms_per_step": 1e3 * optimizer_s / n,  # the update on this rank (eager steps; sharded: the all-gathers too)
        "peak_rss_mib": _peak_rss_mib(),  # this process's (rank 0's, with ranks)
    }
    if launches_at_start is not None and losses:  # cuda: what Python issued (evaluation included)
        root.update(launches_per_micro_batch=per_micro_batch,
                    launches_per_step=round((be.launches() - launches_at_start) / len(losses), 1))
        root["cuda_graphs"] = bool(step_graphs is not None and step_graphs.steps)
        if root["cuda_graphs"]:
            root["graph_steps"] = step_graphs.steps
            root["graph_launches_per_step"] = round(step_graphs.launches / step_graphs.steps, 1)
    if comm.size > 1:
        root.update(ranks=comm.size, shard_optimizer=reducer.sharded, comm_s=comm.seconds,
                    comm_ms_per_step=1e3 * comm.seconds / n, comm_bytes_per_step=round(comm.bytes_sent / n))
    finished = last == cfg.steps
    if run_dir is not None:
        run_dir.write_spheres({"root": root, "spheres": sphere_summary})
        if finished:
            if lora is None:
                run_dir.write_model(layout, host_params)
            else:
                run_dir.write_adapters(trainable, host_params, base_id)
        run_dir.close()
    return TrainResult(model_cfg, cfg, host_params, losses, sphere_summary, root, dataset.name,
                       wall, str(run_dir.path) if run_dir else None, history, val_losses,
                       finished, checkpoint, interrupted and not finished, skipped, task_records)


def score_task(task: Task, spheres: SphereSystem, comm: Comm) -> tuple[float, float]:
    """(acc, acc_norm) of the task with the weights the spheres train now: each rank scores its
    share of the task's batches on its root thread (crystal.tasks.score: the same batches for any
    rank count, so the same result), and the hits are summed over the ranks."""
    r = score(spheres.scorer(), task, batches=comm.share(task.batches))
    hits = comm.allgather_values(np.array([r.hits, r.hits_norm], dtype=np.float64), "the exchange of task hits")
    hits = hits.sum(axis=0)
    return float(hits[0] / len(task.rows)), float(hits[1] / len(task.rows))


def make_optimizer(be, layout: ParamLayout, cfg: TrainConfig, reducer: GradientReducer, comm: Comm):
    """AdamW over the whole buffer, or Muon on the blocks' matrices with AdamW on the rest
    (crystal.muon), on the reducer's chunks and this rank's span."""
    if cfg.optimizer == "muon":
        from crystal.muon import warm_up as warm_up_muon

        warm_up_muon(be)
        return Muon(be, layout, cfg, reducer.chunks, span=reducer.span, comm=comm, sharded=reducer.sharded)
    return AdamW(be, layout, cfg, reducer.chunks, span=reducer.span)


def _gate(cfg: TrainConfig, be) -> int | None:
    """The core gate's tokens on the cpu (crystal.spheres.gate_cores); none on cuda, where a
    sphere mostly launches work on its stream."""
    return gate_cores(cfg.cores) if be.name == "cpu" else None


def _graphs_wanted(cfg: TrainConfig, be, comm: Comm, masked: bool = False) -> bool:
    """Whether this run captures CUDA graphs; "on" where they cannot run is a one-line error."""
    if cfg.cuda_graphs == "off":
        return False
    why = None
    if masked:  # the captured loss scale is 1/(B T); a masked step's depends on its batches
        why = "data without a loss mask (instruction data scales each step's loss by its own count)"
    elif cfg.lora_r:
        why = "full training (LoRA steps run eagerly)"
    elif cfg.optimizer != "adamw":
        why = "--optimizer adamw (Muon's steps run eagerly)"
    elif not getattr(be, "graphs", False):
        why = "a CUDA GPU (the device is cpu)" if be.name == "cpu" else "a backend made for graphs"
    elif comm.size > 1:
        why = "a single process (ranks exchange gradients through the host)"
    if why and cfg.cuda_graphs == "on":
        raise CrystalError(f"--cuda-graphs on needs {why}")
    return why is None


def _peak_rss_mib() -> float | None:
    """The process's peak resident memory so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _warn(on_warning: Callable[[str], None] | None, message: str) -> None:
    if on_warning is not None:
        on_warning(message)
    else:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_base(resume: TrainState | None, base_id: dict) -> None:
    """A resumed LoRA run continues on the base its checkpoint was trained on, bit for bit."""
    if resume is None:
        return
    theirs = (resume.base or {}).get("sha256")
    if theirs != base_id["sha256"]:
        raise CrystalError(f"the base model {base_id['path']} changed since the checkpoint was written "
                           f"(its weights' sha256 is {base_id['sha256'][:12]}, the checkpoint's "
                           f"{str(theirs)[:12]}); LoRA resumes on the same base only")


def _fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, params, first: int, base: dict | None = None) -> int:
    """What every rank must agree on: the model, the computation's config, the parameters (and
    the frozen base's identity under LoRA)."""
    import zlib

    what = dataclasses.replace(cfg, spheres=1, log_every=1, out=None, stop_at=None)
    text = repr((model_cfg, what, first, base)).encode()
    return zlib.crc32(np.ascontiguousarray(params).view(np.uint8), zlib.crc32(text))


def _latest(run_dir: RunDir | None) -> str | None:
    if run_dir is None:
        return None
    from crystal.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir.path)
    return str(ckpt) if ckpt else None


def evaluate(model, dataset: DataSet, cfg: TrainConfig, data_order: int = DATA_ORDER) -> tuple[float, int]:
    """Mean loss of a model on the run's fixed validation batches, in the training's order.
    Returns (loss, number of batches)."""
    if len(dataset.val) < cfg.batch_size * cfg.seq_len + 1:
        raise CrystalError(f"the validation split has {len(dataset.val)} tokens, too few for one batch")
    val = eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.eval_batches, data_order,
                       model.config.vocab_size, mask=dataset.val_mask)
    denom = loss_denominator(val)  # the mean over every unmasked target, as training's evaluation
    with _blas_limits(model.backend):
        losses = [model.loss(x, y, denom) for x, y in val]
    return tree_mean(losses), len(val)


def _blas_limits(be, threads: int = 1):
    """CPU: `threads` BLAS threads per caller for the run (crystal.backends.cpu.blas_threads)."""
    if be.name == "cpu":
        from crystal.backends.cpu import blas_threads

        return blas_threads(threads)
    return contextlib.nullcontext()


def blas_threads_per_sphere(model_cfg: ModelConfig, cfg: TrainConfig, be, ranks: int = 1) -> int:
    """CPU, one process: the cores left over when fewer spheres than cores compute at once, split
    among them (2 for 1 sphere on 2 cores), where the BLAS gives the run's products bitwise the
    same values at that thread count as at 1 (checked here: the bits must not depend on the
    sphere count); otherwise, with ranks, and on cuda: 1."""
    if be.name != "cpu" or ranks > 1:
        return 1
    # threads per computing sphere: the gate's cores (never more than the usable ones) split among them
    n = min(gate_cores(cfg.cores) or usable_cores(), usable_cores()) // computing_at_once(cfg.spheres, cfg.cores)
    if n <= 1:
        return 1
    from crystal.backends.cpu import blas_threads_agree, newton_schulz_threads_agree, product_shapes

    rows = cfg.batch_size * cfg.seq_len
    shapes = (linear_products(model_cfg, rows) if model_cfg.llama
              else product_shapes(model_cfg.n_embd, model_cfg.vocab_size, rows))
    lora = LoraConfig.of(cfg, model_cfg)
    if lora is not None:  # the adapters' products: x A^T [rows, in -> r], h B^T [rows, r -> out] (matmul_*)
        ends = {target_shape(model_cfg, t) for t in lora.targets}
        shapes += tuple(sorted({(rows, i, lora.r, False) for i, _ in ends}
                               | {(rows, lora.r, o, False) for _, o in ends}))
    agree = blas_threads_agree(n, shapes)
    if agree and cfg.optimizer == "muon":  # Muon's Newton-Schulz products too
        from crystal.muon import NS_COEFFS, muon_matrices

        shapes = tuple(sorted({(m.rows, m.cols) for m in muon_matrices(ParamLayout(model_cfg))}))
        agree = newton_schulz_threads_agree(n, shapes, cfg.muon("ns_steps"), NS_COEFFS)
    return n if agree else 1
