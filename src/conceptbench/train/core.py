"""The one training loop every method runs through.

`run_training` is what the workflow calls, with the method it built; `train` is the loop itself,
driving a `Method` (see method.py). Nothing here picks a method: the caller hands it in. The loop
owns device placement, mixed precision (autocast, GradScaler for fp16), gradient accumulation,
grad-norm clipping (or none), the LR schedule and its scaling by the batch (scale_lr), AdamW or 8-bit AdamW, checkpoints with resume, the
non-finite-loss guard, the progress bar and the loss log.

Randomness is a pure function of (seed, step, micro-batch): each micro-batch gets its own CPU
generator, and torch's global seed is reset to the same value, so a resumed run repeats an
uninterrupted one bit for bit on the CPU. The only host syncs in the loop are at log and
checkpoint points (and inside GradScaler.step for fp16).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .. import runtime
from ..config import ConfigError
from ..io import atomic_path, read_jsonl, tree_bytes, write_json, write_jsonl
from .checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint, spec_fingerprint
from .preempt import Preempted, StopRequest, stop_on_sigterm
from .method import Method, MethodError, TrainContext
from .settings import train_config

log = logging.getLogger(__name__)

StepHook = Callable[[int], None]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last finite loss."""


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, step, micro)."""
    state = np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def learning_rate(cfg: dict, method: Method) -> float:
    """The peak learning rate: train.learning_rate, times accumulation and batch with train.scale_lr.

    As diffusers' example scripts do with --scale_lr on one GPU (lr x gradient_accumulation_steps x
    train_batch_size); the batch is counted as the method's reference counts it (Method.scaled_batch).
    """
    lr = float(cfg["learning_rate"])
    if cfg["scale_lr"]:
        lr *= int(cfg["gradient_accumulation_steps"]) * method.scaled_batch(int(cfg["batch_size"]))
    return lr


def make_optimizer(cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                  weight_decay=cfg["adam_weight_decay"], eps=cfg["adam_epsilon"])
    if cfg["optimizer"] == "adamw":
        # fused: one kernel per step over all tensors, step counts kept on the device (no host reads)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if cfg["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.optimizer 'adamw8bit' needs bitsandbytes: pip install 'conceptbench[8bit]'; "
                              "or set train.optimizer to 'adamw'") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    raise ConfigError(f"unknown train.optimizer {cfg['optimizer']!r}; expected 'adamw' or 'adamw8bit'")


def trainable_tensors(groups: list[dict]) -> list[torch.Tensor]:
    """The tensors of all groups, checked: trainable, fp32, no tensor twice."""
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise MethodError("the method returned no trainable parameters")
    if len({id(p) for p in params}) != len(params):
        raise MethodError("a parameter appears in more than one param group")
    for p in params:
        if not p.requires_grad or p.dtype != torch.float32:
            raise MethodError(f"trainable tensors must be fp32 with requires_grad (got {p.dtype}, "
                              f"requires_grad={p.requires_grad})")
    return params


def restore(state: dict, params, optimizer, lr_scheduler, scaler, method: Method) -> None:
    """Put a checkpoint's state back into freshly built training objects."""
    with torch.no_grad():
        for p, saved in zip(params, state["trainable"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler.load_state_dict(state["scaler"])
    method.load_state_dict(state["method"])


def snapshot(step: int, fingerprint: str, seconds: float, params, optimizer, lr_scheduler, scaler,
             method: Method) -> dict:
    """Everything a resumed run needs, as tensors and plain types (loadable with weights_only=True)."""
    return dict(step=step, fingerprint=fingerprint, train_seconds=seconds,
                trainable=[p.detach().cpu() for p in params], optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(), scaler=scaler.state_dict(), method=method.state_dict())


class LossLog:
    """Per-step losses kept on the device until a log point, where they are checked and written."""

    def __init__(self, path: Path, total: int, rows: list[dict]):
        self.path, self.total, self.rows = path, total, rows
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss, lr)
        last = rows[-1] if rows else None
        self.last_finite = (last["step"], last["last_loss"]) if last else None

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, lr))

    def flush(self, elapsed: float) -> dict | None:
        """Sync, check every pending loss, append one row (window mean) to the log; return it."""
        if not self.pending:
            return None
        values = torch.stack([loss for _, loss, _ in self.pending]).float().cpu().tolist()
        for (step, _, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                last = ("none before it" if self.last_finite is None
                        else f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}")
                raise NonFiniteLoss(f"non-finite loss ({value}) at step {step} of {self.total}; {last}. "
                                    "Lower the learning rate or use fp32/bf16.")
            self.last_finite = (step, value)
        row = dict(step=self.pending[-1][0], loss=sum(values) / len(values), lr=self.pending[-1][2],
                   elapsed=round(elapsed, 4), last_loss=values[-1])
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.pending.clear()
        return row


def train(method: Method, ctx: TrainContext, cfg: dict, work_dir: Path,
          on_step_end: StepHook | None = None, stop: StopRequest | None = None) -> dict:
    """Run (or resume) the optimisation; returns the loop's part of the summary.

    `work_dir` holds checkpoint.pt and loss_log.jsonl. `on_step_end(step)` is called after each
    optimizer step and after that step's checkpoint (1-based step; tests raise in it to simulate a crash).
    Once `stop` is requested (SIGTERM, see preempt.py), the step in flight ends with a checkpoint and Preempted.
    """
    device, mp, seed = ctx.device, cfg["mixed_precision"], ctx.seed
    steps, accum = int(cfg["steps"]), int(cfg["gradient_accumulation_steps"])
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    runtime.reset_peak_memory(device)

    t_setup = time.perf_counter()
    torch.manual_seed(seed)  # what setup draws (e.g. peft's LoRA init uses the global generator) follows the seed
    method.setup(ctx)
    groups = method.param_groups()
    params = trainable_tensors(groups)
    lr = learning_rate(cfg, method)
    if lr != cfg["learning_rate"]:
        log.info("scale_lr: learning rate %g x %d accumulation x batch %g = %g", cfg["learning_rate"],
                 cfg["gradient_accumulation_steps"], method.scaled_batch(int(cfg["batch_size"])), lr)
    optimizer = make_optimizer({**cfg, "learning_rate": lr}, groups)
    # A step is one optimizer update, except where the method's step is an epoch of several (DDPO): the
    # loop, its generators and its checkpoints count updates; the config's step counts stay steps.
    per_step = int(method.updates_per_step())
    if per_step < 1:
        raise MethodError(f"{method.name}: updates_per_step() must be at least 1 (got {per_step})")
    updates = steps * per_step
    lr_scheduler = get_scheduler(cfg["lr_scheduler"], optimizer, num_warmup_steps=cfg["lr_warmup_steps"] * per_step,
                                 num_training_steps=updates)
    scaler = runtime.grad_scaler(device, mp)
    setup_seconds = time.perf_counter() - t_setup

    fingerprint = spec_fingerprint(ctx.spec)
    state = load_checkpoint(work_dir, fingerprint)
    start, spent, rows = 0, 0.0, []
    log_file = work_dir / "loss_log.jsonl"
    if state is not None:
        restore(state, params, optimizer, lr_scheduler, scaler, method)
        start, spent = state["step"], state["train_seconds"]
        rows = [r for r in read_jsonl(log_file) if r["step"] <= start] if log_file.exists() else []
        log.info("resuming %s from step %d of %d", method.name, start, updates)
    write_jsonl(log_file, rows)
    losses = LossLog(log_file, updates, rows)

    every_log, every_ckpt = int(cfg["log_every"]) * per_step, int(cfg["checkpoint_every"]) * per_step
    bar = tqdm(total=updates, initial=start, desc=f"train {method.name}", mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for step in range(start, updates):
        total = None
        for micro in range(accum):
            g = step_generator(seed, step, micro)
            torch.manual_seed(g.initial_seed())  # any incidental global randomness is per-step too
            with torch.no_grad(), runtime.autocast(device, mp):
                batch = method.batch(step, g)
            with runtime.autocast(device, mp):
                loss = method.loss(batch, g)
            scaler.scale(loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if cfg["max_grad_norm"] is not None:  # null: no clipping
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        lr = lr_scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            method.after_step(step)

        done = step + 1
        losses.add(done, total / accum, lr)
        bar.update(1)
        stopping = stop is not None and stop.requested and done < updates  # SIGTERM: checkpoint, then stop
        ckpt_due = (every_ckpt > 0 and done % every_ckpt == 0 and done < updates) or stopping
        if done % every_log == 0 or done == updates or ckpt_due:
            row = losses.flush(spent + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{row['last_loss']:.4g}", lr=f"{lr:.3g}")
        if ckpt_due:
            seconds = spent + time.perf_counter() - t0
            save_checkpoint(work_dir, snapshot(done, fingerprint, seconds, params, optimizer, lr_scheduler,
                                               scaler, method))
        if stopping:
            unit = f" (optimizer updates, {per_step} per train step)" if per_step > 1 else ""
            raise Preempted(f"SIGTERM after step {done} of {updates}{unit}: checkpoint saved in {work_dir}; "
                            f"a rerun resumes from step {done}")
        if on_step_end is not None:
            on_step_end(done)
    bar.close()
    runtime.synchronize(device)
    peak, peak_source = runtime.peak_memory(device)
    return dict(
        trainable_params=sum(p.numel() for p in params),
        steps=steps,
        updates=updates,
        resumed_from_step=start,
        train_seconds=round(spent + time.perf_counter() - t0, 4),
        setup_seconds=round(setup_seconds, 4),
        final_loss=losses.last_finite[1] if losses.last_finite else None,
        peak_mem_bytes=peak,
        peak_mem_source=peak_source,
        device=str(device),
        mixed_precision=mp,
    )


def run_training(method: Method, spec: dict, base_model: Path, data_dir: Path, class_dir: Path | None,
                 artifact_dir: Path, work_dir: Path, log_path: Path, summary_path: Path, *, threads: int | None = None,
                 device: str | None = None, on_step_end: StepHook | None = None,
                 inputs: dict | None = None, model_options: dict | None = None) -> dict:
    """Train `method` (built from spec["args"] by the caller, e.g. registry.build) on the dataset and write
    the artifact, the loss log and the summary.

    Checkpoints live in `work_dir` (not in `artifact_dir`, which Snakemake deletes when a job fails);
    a rerun with the same spec resumes from the last one, which is removed once the artifact is saved.
    `data_dir` may be None for methods that make their own data (DDPO). `device` defaults to CUDA
    when available; `threads` caps torch's CPU threads. `inputs` holds all the rule's named inputs
    (methods with more than one image folder read theirs from it); `model_options` how the scoring models
    among them are built, by role (DDPO's reward CLIP: config.clip_options).
    """
    runtime.set_threads(threads)
    cfg = train_config(spec)
    ctx = TrainContext(spec=spec, base_model=Path(base_model), data_dir=Path(data_dir) if data_dir else None,
                       class_dir=Path(class_dir) if class_dir else None, device=runtime.pick_device(device),
                       mixed_precision=cfg["mixed_precision"], gradient_checkpointing=cfg["gradient_checkpointing"],
                       inputs={k: Path(v) for k, v in (inputs or {}).items()},
                       model_options=dict(model_options or {}))
    with stop_on_sigterm() as stop:
        summary = train(method, ctx, cfg, Path(work_dir), on_step_end=on_step_end, stop=stop)

    t = time.perf_counter()
    with atomic_path(artifact_dir) as tmp:
        tmp.mkdir()
        method.save(tmp)
    summary["save_seconds"] = round(time.perf_counter() - t, 4)
    summary["artifact_bytes"] = tree_bytes(artifact_dir)
    summary.update({k: spec.get(k) for k in ("experiment", "variant", "method", "seed")})
    write_jsonl(log_path, read_jsonl(Path(work_dir) / "loss_log.jsonl"))
    write_json(summary_path, summary)
    remove_checkpoint(work_dir)
    return summary
