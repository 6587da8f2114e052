"""The training loop: stages in order, one process or many under ``torchrun``, resumable after a crash.

Distributed: under ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) a process group is
created (nccl on CUDA, gloo on CPU), each process reads its share of every epoch
(:class:`~torch.utils.data.DistributedSampler` order) and the stage objective is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` is per process.

Resume: a checkpoint (:mod:`visd.training.checkpoint`) holds the model, momentum encoder, optimizer,
scheduler, gradient scaler, every process's RNG states and the position (stage, epoch, batch,
step). Data order and augmentation are functions of ``(seed, stage, epoch, index)``, so a resumed
run continues with exactly the batches, crops and random numbers of an uninterrupted one; on the
CPU with ``deterministic: true`` the loss sequence is bit-identical.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from visd._distributed import ProcessGroup, join_process_group
from visd._io import atomic_write_text
from visd.errors import ConfigError, InputError
from visd.models.model import ViSDModel
from visd import _fault
from visd.training import checkpoint as ckpt
from visd.training.config import StageConfig, TrainConfig, lr_factor
from visd.training.data import (
    Collate,
    CTReportDataset,
    PreprocessCache,
    epoch_batches,
    make_loader,
)
from visd.training.logs import MetricsLog, progress_bar
from visd.training.manifest import read_manifest
from visd.training.stages import (
    StageObjective,
    configure_trainable,
    make_momentum,
    momentum_keys,
    set_train_modes,
    update_momentum,
)
from visd.training.summary import StageTally, format_summary
from visd.training.usage import OrganUsage

__all__ = ["train", "build_model", "make_optimizer", "Position", "SUMMARY_FILE"]

_TORCH_VERSION = torch.__version__  # a TorchVersion: compares with tuples

logger = logging.getLogger(__name__)

#: The per-stage summary (steps, mean loss per objective, organs used), written to ``output_dir`` at the end.
SUMMARY_FILE = "summary.json"

#: Settings that must not change between a run and its resumption.
_RESUME_KEYS = ("model", "stages", "seed", "precision", "batchnorm")


@dataclass
class Position:
    """Where a run stands: the next micro-batch to run is ``batch`` of ``epoch`` of ``stage``."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0
    stage_step: int = 0


def build_model(config: TrainConfig) -> ViSDModel:
    """The model of ``config.model``: a pretrained folder, or a new one seeded with ``config.seed``."""
    source = config.model
    if source.pretrained is not None:
        return ViSDModel.from_pretrained(source.pretrained)
    from visd.models.text import load_tokenizer

    visd_config = config.visd_config()
    assert visd_config is not None
    tokenizer = load_tokenizer(source.tokenizer, visd_config.text) if source.tokenizer else None
    torch.manual_seed(config.seed)
    return ViSDModel(visd_config, tokenizer=tokenizer)


def _param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and scalars (LAVIS/fVLM convention)."""
    chosen = {id(p) for p in params}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in chosen:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, params: list[torch.nn.Parameter], stage: StageConfig) -> torch.optim.AdamW:
    """The stage's AdamW over ``params``, with :func:`_param_groups`; PyTorch's fused implementation
    where it has one for the parameters' device (CUDA; the CPU from torch 2.4): one pass over each
    parameter instead of one per operation (0.10 s against 0.33 s a step for the full-size model on
    2 CPU cores). The update is the same formula; float rounding may differ in the last bit."""
    devices = {p.device.type for p in params}
    fused = bool(params) and devices <= ({"cuda", "cpu"} if _TORCH_VERSION >= (2, 4) else {"cuda"})
    return torch.optim.AdamW(
        _param_groups(model, params, stage.weight_decay), lr=stage.lr, betas=stage.betas, eps=stage.eps, fused=fused or None
    )


def _check_resume(config: TrainConfig, state: dict[str, Any], world: int) -> None:
    old = json.loads(state["config"])
    new = config.model_dump(mode="json")
    changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(
            f"cannot resume: the config's {changed} differ from the checkpoint's. Resume with the original "
            "config, or start a new run in another output_dir."
        )
    if int(state["world_size"]) != world:
        raise ConfigError(
            f"cannot resume a run of {state['world_size']} processes with {world}; run torchrun with "
            f"--nproc_per_node {state['world_size']}"
        )


class _Run:
    """State shared by the stages of one ``train`` call."""

    def __init__(self, config: TrainConfig, env: ProcessGroup, resume: bool) -> None:
        self.config, self.env = config, env
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.start = time.monotonic()
        self.state: dict[str, Any] | None = None
        self.position = Position()
        self.summaries: list[dict[str, Any]] = []  # StageTally.summary() of the finished stages
        self.written: list[Path] = []  # checkpoints this call wrote in the current stage
        if env.rank == 0:
            ckpt.remove_temporaries(self.ckpt_dir)
        env.barrier()
        found = ckpt.latest_checkpoint(self.ckpt_dir) if resume else None
        step = torch.tensor([found[1]["position"]["step"] if found else -1], dtype=torch.int64, device=self._comm())
        if env.world > 1:  # every process resumes from rank 0's choice
            dist.broadcast(step, 0)
        if int(step) >= 0:
            path = ckpt.checkpoint_path(self.ckpt_dir, int(step))
            self.state = found[1] if found and found[0] == path else ckpt.load_checkpoint(path)
            _check_resume(config, self.state, env.world)
            self.position = Position(**self.state["position"])
            self.summaries = list(self.state.get("summaries") or [])
            logger.info("resuming from %s (%s)", path, self.position)
        elif resume:
            logger.warning("--resume: no checkpoint in %s, starting a new run", self.ckpt_dir)
        elif ckpt.list_checkpoints(self.ckpt_dir):
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints; pass --resume to continue that run or choose another output_dir"
            )
        self.model = build_model(config).to(env.device)
        if self.state is not None:
            self.model.load_state_dict(self.state["model"])
        else:
            random.seed(config.seed + env.rank)
            np.random.seed(config.seed + env.rank)
            torch.manual_seed(config.seed + env.rank)
        if config.batchnorm == "sync":
            if env.device.type != "cuda":
                raise ConfigError("batchnorm: sync needs CUDA (SyncBatchNorm); use 'batch' or 'running' on the CPU")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.set_grad_checkpointing(config.gradient_checkpointing)
        self.records = read_manifest(config.data.manifest, self.model.organs)
        cache_dir = config.data.cache_dir or str(self.out / "cache")
        self.cache = PreprocessCache(cache_dir, self.model.config, config.data.mask_format, config.data.cache_dtype)
        self.log = MetricsLog(
            self.out, resume_step=self.position.step if self.state else None,
            tensorboard=config.tensorboard, enabled=env.rank == 0,
        )

    def _comm(self) -> torch.device:
        nccl = self.env.world > 1 and dist.get_backend() == "nccl"
        return self.env.device if nccl else torch.device("cpu")

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, position: Position, objects: dict[str, Any]) -> None:
        rng = ckpt.gather_rng_states(self.env.device)
        if self.env.rank == 0:
            state = {
                "format": ckpt.FORMAT,
                "version": ckpt.VERSION,
                "config": self.config.to_json(),
                "world_size": self.env.world,
                "position": asdict(position),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "rng": rng,
                "summaries": self.summaries,
                **objects,
            }
            path = ckpt.atomic_save(state, ckpt.checkpoint_path(self.ckpt_dir, position.step), step=position.step)
            self.written.append(path)
            ckpt.prune_checkpoints(self.ckpt_dir, self.config.keep_checkpoints)
            logger.info("saved %s", path)
        self.env.barrier()

    def _remove_written(self) -> None:
        """Delete the checkpoints this call wrote in the current stage (a stage that trained nothing)."""
        if self.env.rank == 0:
            for path in self.written:
                path.unlink(missing_ok=True)
                logger.info("removed %s", path)
        self.written = []
        self.env.barrier()

    def _scan_shapes(self) -> list[tuple[int, ...]]:
        """``(D, H, W)`` of the first preprocessed scans (for error hints; they are cached by now)."""
        return [tuple(self.cache.load(r)[0].shape) for r in self.records[:8]]

    def _reduce(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(metrics)
        values = torch.stack([metrics[n].detach().float().reshape(()) for n in names]).to(self._comm())
        if self.env.world > 1:
            dist.all_reduce(values)
            values = values / self.env.world
        return dict(zip(names, values.cpu().tolist()))

    # -- stages ------------------------------------------------------------------------------------
    def run(self) -> Path:
        for si, stage in enumerate(self.config.stages):
            if si < self.position.stage:
                continue
            self.run_stage(si, stage)
        export = self.out / "model"
        if self.env.rank == 0:
            self.model.set_grad_checkpointing(False)
            self.model.eval().save_pretrained(export)
            logger.info("exported the trained model to %s", export)
            atomic_write_text(self.out / SUMMARY_FILE, json.dumps(self.summaries, indent=2) + "\n")
            logger.info("training summary:\n%s", format_summary(self.summaries))
        self.env.barrier()
        self.log.close()
        return export

    def run_stage(self, si: int, stage: StageConfig) -> None:
        config, env, model = self.config, self.env, self.model
        pos = self.position
        resuming = self.state is not None and pos.stage == si
        params = configure_trainable(model, stage)
        dataset = CTReportDataset(
            self.records, self.cache, seed=config.seed + 7919 * si, views=stage.views, flip_prob=config.data.flip_prob
        )
        tokenizer = model.tokenizer if "alignment" in stage.objectives else None
        if "alignment" in stage.objectives and tokenizer is None:
            raise ConfigError("the alignment objective needs a tokenizer: the model has none (set model.tokenizer)")
        collate = Collate(tokenizer, model.config.text.max_length)
        accum = stage.grad_accum_steps
        order_seed = config.seed + si
        per_epoch = len(epoch_batches(dataset, stage.batch_size, 0, order_seed, env.rank, env.world)) // accum
        if per_epoch == 0:
            raise InputError(
                f"stage {stage.label!r}: {len(dataset)} scans cannot fill one step of batch_size {stage.batch_size} x "
                f"{env.world} processes x grad_accum_steps {accum}; lower batch_size or add scans"
            )
        total = per_epoch * stage.epochs if stage.max_steps is None else min(per_epoch * stage.epochs, stage.max_steps)
        optimizer = make_optimizer(model, params, stage)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, stage.warmup_steps, stage.lr, stage.min_lr)
        )
        fp16 = config.precision == "fp16"
        if fp16 and env.device.type != "cuda":
            raise ConfigError("precision: fp16 needs CUDA; use bf16 or fp32 on the CPU")
        scaler = torch.amp.GradScaler(env.device.type, enabled=fp16)
        momentum = make_momentum(model) if "disease" in stage.objectives else None
        objective = StageObjective(model, stage)
        wrapped = DistributedDataParallel(objective) if env.world > 1 else objective
        stage_step = 0
        self.written = []
        tally = StageTally(stage.label, stage.objectives, model.organs,
                           self.state.get("tally") if resuming and self.state is not None else None)
        if resuming:
            assert self.state is not None
            if self.state.get("optimizer") is not None:
                optimizer.load_state_dict(self.state["optimizer"])
                scheduler.load_state_dict(self.state["scheduler"])
                scaler.load_state_dict(self.state["scaler"])
            if momentum is not None and self.state.get("momentum") is not None:
                momentum.load_state_dict(self.state["momentum"])
            ckpt.set_rng_state(self.state["rng"][env.rank], env.device)
            stage_step = pos.stage_step
        else:
            pos = Position(stage=si, epoch=0, batch=0, step=pos.step, stage_step=0)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

        def objects() -> dict[str, Any]:
            return {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "momentum": {k: v.detach().cpu() for k, v in momentum.state_dict().items()} if momentum else None,
                "tally": tally.to_state(),
            }

        bar = progress_bar(total, stage_step, stage.label, enabled=env.rank == 0 and config.progress_bar)
        step = pos.step
        epoch = pos.epoch
        while stage_step < total:
            batches = epoch_batches(dataset, stage.batch_size, epoch, order_seed, env.rank, env.world)[: per_epoch * accum]
            first = pos.batch if (resuming and epoch == pos.epoch) else 0
            loader = make_loader(
                dataset, batches[first:], collate, num_workers=config.data.num_workers,
                pin_memory=config.data.pin_memory and env.device.type == "cuda",
                seed=config.seed * 1_000_003 + si * 10_007 + epoch,
            )
            sums: dict[str, torch.Tensor] = {}
            usage = OrganUsage()
            for i, batch in enumerate(loader, start=first):
                batch = batch.to(env.device, non_blocking=True)
                last = (i + 1) % accum == 0
                set_train_modes(model, stage, config.batchnorm)
                with ExitStack() as stack:
                    if env.world > 1 and not last:
                        stack.enter_context(wrapped.no_sync())
                    amp = torch.autocast(env.device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype))
                    with amp:
                        keys = momentum_keys(model, momentum, batch) if momentum is not None else (None, None)
                        out = wrapped(batch, *keys)
                    scaler.scale(out.loss / accum).backward()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach() / accum
                usage = usage + out.usage  # summed over micro-batches
                if not last:
                    continue
                if stage.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if momentum is not None:
                    update_momentum(model, momentum, stage.momentum)
                step, stage_step = step + 1, stage_step + 1
                bar.update(1)
                metrics = self._reduce(sums)
                tally.add(metrics, usage)
                for obj in usage.unused_objectives():
                    logger.warning("step %d [%s]: the %s objective %s", step, stage.label, obj,
                                   usage.describe(obj, model.organs))
                if stage_step % config.log_every == 0 or stage_step == total:
                    row = {"step": step, "stage": stage.label, "epoch": epoch, "batch": i + 1, "lr": lr, **metrics,
                           **usage.columns(), "elapsed_s": round(time.monotonic() - self.start, 3)}
                    self.log.write(row)
                    logger.info("step %d [%s] loss %.5f lr %.3g", step, stage.label, metrics.get("loss", float("nan")), lr)
                sums, usage = {}, OrganUsage()
                finished = stage_step >= total
                if stage_step == config.organ_check_steps or (finished and stage_step < config.organ_check_steps):
                    if tally.failure(model.config) is not None:
                        self._remove_written()
                        raise tally.failure(model.config, self._scan_shapes())
                end_of_epoch = i + 1 == len(batches)
                if not finished and step % config.checkpoint_every == 0:
                    nxt = Position(si, epoch + 1, 0, step, stage_step) if end_of_epoch else (
                        Position(si, epoch, i + 1, step, stage_step)
                    )
                    self.save(nxt, objects())
                _fault.kill_if_armed("after_step", step)
                if finished:
                    break
            epoch += 1
        bar.close()
        self.summaries.append(tally.summary())
        self.position = Position(si + 1, 0, 0, step, 0)
        self.state = None
        self.save(self.position, {"optimizer": None, "scheduler": None, "scaler": None, "momentum": None, "tally": None})


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run ``config``'s stages; returns the folder of the exported model (``<output_dir>/model``).

    Under ``torchrun`` every process calls this. With ``resume``, the newest checkpoint in
    ``<output_dir>/checkpoints`` is continued (a fresh run starts when there is none); without it,
    existing checkpoints are an error, so a run is never overwritten by accident. At the end,
    ``<output_dir>/summary.json`` holds per stage the steps, the mean loss of each objective and the
    organs it used (:meth:`visd.training.summary.StageTally.summary`).

    Raises:
        InputError: an objective used no organ in the first ``config.organ_check_steps`` steps of a
            stage (the message says why; the checkpoints this call wrote in that stage are removed).

    While it runs, ``config.deterministic`` turns on ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (and deterministic cuDNN); the previous settings are restored afterwards.
    """
    env = join_process_group(config.device, config.backend)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        if config.deterministic:
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        run = _Run(config, env, resume)
        try:
            return run.run()
        finally:
            run.log.close()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
        if env.created:
            dist.destroy_process_group()

