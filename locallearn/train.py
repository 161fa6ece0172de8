"""The one training loop, for every rule and every task.

Per epoch: shuffle with the run's generator, hand batches to the rule (which fills ``.grad``),
step the optimiser and the (per-step) schedule, evaluate, append one JSON line to
``metrics.jsonl``, and checkpoint every ``checkpoint_every`` epochs and at the end. A run started
again in the same output directory resumes from its last checkpoint; on CPU it ends bit-identical
to an uninterrupted run (the generator, the global RNG, optimiser and schedule are restored).
Started again on a finished run (its checkpoint at the last epoch and its ``summary.json``), the
loop does nothing: it returns the summary as it is, with ``already_finished`` set in the
returned mapping only.

With ``probe_every`` (in epochs, fractions allowed) the loop also calls the task's optional
``curve_probe(net)`` hook on that schedule, between steps, and logs its metrics in a row with
``epoch``, ``step`` and ``seconds`` (the training time so far; probes excluded).
``precision=bf16`` runs the rule's step under autocast; ``compile=true`` compiles every block of
the network.

Files in the output directory: ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoint.pt``, ``summary.json`` (written when the run ends); see :mod:`locallearn.runfiles`.

The loop is handed a task (:class:`locallearn.task.Task`) and builds the rule by its name
(:func:`locallearn.rules.build_rule`); it knows neither's kind. The task of a config is built by
:mod:`locallearn.experiments.tasks`, and :func:`locallearn.experiments.runs.run` is the entry
point that builds both and trains.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from locallearn import distributed as ddp
from locallearn.config import first_difference, to_dict
from locallearn.delay import DelayedSteps, enable_delay
from locallearn.errors import RunError
from locallearn.nets.base import BlockNet
from locallearn.optim import build_optimizer, restore_schedule
from locallearn.rules import build_rule
from locallearn.rules.base import Rule, check_fits
from locallearn.runfiles import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    SUMMARY,
    check_out_dir,
    write_durably,
    write_json_atomic,
    write_text_atomic,
)
from locallearn.schema import (
    RunConfig,
    build_config,
    migrate_config,
    without_runtime_keys,
)
from locallearn.task import Task
from locallearn.tracking import Tracker, open_trackers
from locallearn.tracking import require as require_tracker

#: Version of the checkpoint layout. 2: image rules' prediction matrices act on pooled features
#: flattened position-major (earlier checkpoints are upgraded when loaded).
CHECKPOINT_FORMAT = 2


def _comparable(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config without the keys a resumed run may change: the runtime keys (but not
    those of them that change the result) and ``epochs`` (a larger value extends a run; it
    continues from its last checkpoint)."""
    return {k: v for k, v in without_runtime_keys(raw).items() if k != "epochs"}


def add_metrics(sums: dict[str, float], counts: dict[str, int], metrics: dict[str, float],
                n: int) -> None:
    """Add one batch's metrics, weighted by its size ``n``, to an epoch's running sums (each
    key counts the examples of the batches that reported it)."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + value * n
        counts[key] = counts.get(key, 0) + n


def _out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return isinstance(err, MemoryError) or (oom is not None and isinstance(err, oom))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; a device that is absent is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is not available on this machine; valid: cpu, auto")
    return torch.device(name)


def saved_cuda_rng(saved: Any, device: torch.device) -> torch.Tensor | None:
    """The CUDA random state a checkpoint holds for a run on ``device`` (``None``: nothing to
    restore). Checkpoints hold the run's GPU's state; older ones hold a list of every GPU that
    was visible, of which the run's own (its index, else the first) is taken."""
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, (list, tuple)):
        if not saved:
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        return saved[index] if index < len(saved) else saved[0]
    return saved


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """One run of one rule on one task, written into ``out_dir``.

    Under ``torchrun`` (data parallel), every rank builds the same run, takes its part of each
    global batch, and the gradients are averaged before the optimiser steps; rank 0 writes.
    """

    def __init__(self, cfg: RunConfig, task: Task, out_dir: str | Path):
        self.cfg = cfg
        self.task = task
        self.out = check_out_dir(out_dir)
        self.device = resolve_device(ddp.local_device(cfg.device))
        self.rank, self.world = ddp.rank(), ddp.world_size()
        self.main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.net: BlockNet = task.build_net()
        self.rule: Rule = build_rule(cfg.rule, cfg.seed, **task.rule_info)
        task.check_rule(self.rule)
        check_fits(self.net, self.rule, cfg.net.kind)
        if self.world > 1 and cfg.parallel.stages == 1:
            why = self.rule.data_parallel_refusal()
            if why is not None:
                raise ValueError(f"data parallel (torchrun without parallel.stages) does not fit "
                                 f"rule.name={self.rule.name}: {why}")
        self.delay = cfg.parallel.feedback_delay
        if self.delay:
            self._check_delay()
        self.rule.setup(self.net, task.sample_input())
        self.rule.to(self.device)
        if cfg.compile:
            self.net.compile_blocks()
        if cfg.probe_every > 0:
            if not task.has_curve_probe:
                raise ValueError(
                    f"probe_every={cfg.probe_every:g} needs a task with a probe during training "
                    "(image datasets); valid here: 0"
                )
        self.params = self.rule.trained_parameters(self.net)
        ddp.broadcast_params(list(self.params) + list(self.rule.buffers()))
        self.windows = self._layerwise_windows()
        self.param_blocks = self.block_params()
        #: the kept inputs and queued signals of a one-process run with late signals
        self.delayed = (DelayedSteps(self.rule, len(self.net.blocks), self.delay)
                        if self.delay and cfg.parallel.stages == 1 else None)
        self.opt, self.sched = build_optimizer(
            cfg, self.params, self._steps_per_epoch(), self.param_blocks,
            [int(w[0]) for w in self.windows] if self.windows else None)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.step = 0  # optimiser steps so far
        self.seconds = 0.0  # training steps
        self.eval_seconds = 0.0  # evaluations, alignment and final metrics (the probe)
        self.history: list[dict[str, Any]] = []
        self.tracker: Tracker | None = None  # TensorBoard / W&B (``log``), on rank 0
        self._tracked = 0  # rows of history already logged to the trackers
        for name in cfg.log.trackers() if self.main else ():
            require_tracker(name)  # a missing package is bad input, found before training
        self.first_loss: float | None = None  # of the run's first batch (the blow-up guard)
        self.saved_epoch: int | None = None  # epoch of the checkpoint on disk
        self._epoch_t0 = time.perf_counter()
        self._epoch_probe = 0.0  # probe seconds inside the current epoch

    def _check_delay(self) -> None:
        """One-line ValueErrors for ``parallel.feedback_delay`` on a run that cannot have it."""
        d = self.delay
        enable_delay(self.rule, d)
        if self.world > 1 and self.cfg.parallel.stages == 1:
            raise ValueError(f"parallel.feedback_delay={d} does not run data parallel; valid: "
                             "one process, or parallel.stages > 1")
        if self.cfg.layerwise.epochs is not None or self.cfg.align_every:
            raise ValueError(f"parallel.feedback_delay={d} trains every block on late signals; "
                             "valid with it: layerwise.epochs=null, align_every=0")

    # ------------------------------------------------------------------ blocks
    def block_params(self) -> list[list[torch.nn.Parameter]]:
        """The parameters of each block: the network's and the rule's own of that block."""
        return [list(block.parameters()) + self.rule.block_parameters(k)
                for k, block in enumerate(self.net.blocks)]

    def _layerwise_windows(self) -> list[tuple[int, float]] | None:
        """Each block's ``(first epoch, end epoch)`` under ``layerwise.epochs`` (``None``: no
        layer-wise schedule); a rule that does not learn block by block is refused."""
        lw = self.cfg.layerwise
        if lw.epochs is None:
            return None
        n = len(self.net.blocks)
        if len(lw.epochs) != n:
            raise ValueError(f"layerwise.epochs={lw.epochs} gives {len(lw.epochs)} counts for a "
                             f"network of {n} blocks; give one per block")
        why = self.rule.layerwise_refusal()
        if why is not None:
            raise ValueError(f"layerwise.epochs needs a rule that learns block by block: {why}")
        return lw.windows()

    def active_blocks(self, epoch: int) -> list[int]:
        """The blocks that train in ``epoch`` (0-based) of a layer-wise schedule."""
        assert self.windows is not None
        return [k for k, (a, b) in enumerate(self.windows) if a <= epoch < b]

    def layerwise_grads(self, batch: Any) -> dict[str, float]:
        """Fill ``.grad`` of the blocks that train in this epoch: the frozen blocks below them
        only pass their output up, the others above the lowest trained block keep no gradient
        (the optimiser skips parameters without one)."""
        active = self.active_blocks(self.epoch)
        lo, hi = min(active), max(active) + 1
        carry = self.rule.start_carry(self.net, batch)
        if lo > 0:
            carry = self.rule.frozen_carry(self.net, carry, 0, lo)
        metrics, _ = self.rule.blocks_grads(self.net, carry, lo, hi)
        for k in range(lo, hi):
            if k not in active:
                for p in self.param_blocks[k]:
                    p.grad = None
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "format": CHECKPOINT_FORMAT,
            "seconds": self.seconds,
            "eval_seconds": self.eval_seconds,
            "net": self.net.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": None if self.sched is None else self.sched.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # the run's own GPU only: a run resumes where fewer or other GPUs are visible
            "cuda_rng": (torch.cuda.get_rng_state(self.device)
                         if self.device.type == "cuda" else None),
            "history": self.history,
            "first_loss": self.first_loss,
            # the run's identity: a checkpoint is never continued under another config
            "config": to_dict(self.cfg),
        }

    def save_checkpoint(self) -> None:
        if self.main:
            state = self.state()
            write_durably(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self.saved_epoch = self.epoch
        ddp.barrier()

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        try:
            # on the CPU first: RNG states must stay CPU byte tensors; load_state_dict moves the
            # rest
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file: one line and the way out
            raise self._unreadable(path, err) from None
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            self._refuse_another_run(self._normalised(state["config"]), to_dict(self.cfg),
                                     f" (its {CHECKPOINT} records it)")
        try:
            self.net.load_state_dict(state["net"])
            self.rule.load_state_dict(state["rule"])
            self.rule.upgrade_state(self.net, state.get("format", 1))
            self.opt.load_state_dict(state["optimizer"])
            if self.sched is not None and state["scheduler"] is not None:
                restore_schedule(self.sched, state["scheduler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            cuda_rng = saved_cuda_rng(state.get("cuda_rng"), self.device)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            self.epoch = int(state["epoch"])
            self.step = int(state.get("step", 0))
            self.seconds = state["seconds"]
            self.eval_seconds = state.get("eval_seconds", 0.0)
            self.history = list(state["history"])
            self.first_loss = state.get("first_loss")
        except Exception as err:  # noqa: BLE001 - any unreadable file: one line and the way out
            raise self._unreadable(path, err) from None
        self.saved_epoch = self.epoch
        return True

    @staticmethod
    def _unreadable(path: Path, err: BaseException) -> ValueError:
        what = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        return ValueError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {what}); move it "
            "aside to start this run again from scratch, or restore it from a copy"
        )

    def _write_metrics(self) -> None:
        if not self.main:
            return
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        write_text_atomic(self.out / METRICS, lines)
        if self.tracker is not None:  # the rows not logged yet, to TensorBoard / W&B
            for row in self.history[self._tracked:]:
                self.tracker.log(row, int(row.get("step", self.step)))
        self._tracked = len(self.history)

    # ------------------------------------------------------------------ the loop
    def prepare_output(self) -> bool:
        """Create the output directory; return True when a checkpoint was resumed.

        A directory that holds a run of another config is a ValueError naming the first key
        that differs. ``epochs`` may differ: a larger value extends the run (it continues from
        its last checkpoint, as a run started with that many epochs would), a smaller one than
        the checkpoint's is an error, and so is a new length under the cosine schedule (which
        anneals over the run's length) or for a rule whose schedule depends on it
        (:meth:`~locallearn.rules.base.Rule.length_refusal`).
        """
        new = to_dict(self.cfg)
        cfg_text = yaml.safe_dump(new, sort_keys=False)
        cfg_path = self.out / CONFIG
        if cfg_path.exists() and (self.out / CHECKPOINT).exists():
            self._refuse_another_run(self._saved_config(cfg_path), new)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        ddp.barrier()
        resumed = self.load_checkpoint()
        if resumed and self.epoch > self.cfg.epochs:
            raise ValueError(
                f"the run in {str(self.out)!r} has trained {self.epoch} epochs; "
                f"epochs={self.cfg.epochs} would shorten it (give epochs >= {self.epoch} to "
                "extend it)"
            )
        if self.main:
            write_text_atomic(cfg_path, cfg_text)
        if resumed:
            self._write_metrics()  # drop lines written after the checkpoint
        return resumed

    def _refuse_another_run(self, old: dict[str, Any], new: dict[str, Any],
                            where_from: str = "") -> None:
        """A ValueError when the run in the output directory (its config ``old``) is not this
        run (``new``): another config, or another length where the length may not change."""
        where = first_difference(_comparable(old), _comparable(new))
        if where is not None:
            raise ValueError(
                f"output directory {str(self.out)!r} holds a run of another config{where_from} "
                f"(differs at {where}); choose another --out, or remove it to start again"
            )
        why = ("optim.schedule=cosine anneals over the run's length"
               if self.cfg.optim.schedule == "cosine" else self.rule.length_refusal())
        if old.get("epochs") != self.cfg.epochs and why:
            raise ValueError(
                f"epochs={self.cfg.epochs} differs from the run in {str(self.out)!r} "
                f"(epochs={old.get('epochs')}) and {why}; start a new run with another --out"
            )

    @staticmethod
    def _saved_config(path: Path) -> dict[str, Any]:
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            old = None
        if not isinstance(old, dict):
            raise ValueError(
                f"{str(path)!r} is not a readable config; move the run directory aside to "
                "start again"
            )
        return Trainer._normalised(old)

    @staticmethod
    def _normalised(old: dict[str, Any]) -> dict[str, Any]:
        """A saved config as today's code writes it (migrated, missing keys at defaults)."""
        old = migrate_config(copy.deepcopy(old))
        try:  # keys a version did not write (added since) take their defaults
            return to_dict(build_config(copy.deepcopy(old)))
        except ValueError:
            return old

    @property
    def label(self) -> str:
        """The run's name in progress bars and summaries (``label``, else the rule's name)."""
        return self.cfg.label or self.rule.name

    def run(self) -> dict[str, Any]:
        """Train to the end (resuming if possible) and return the summary.

        Bad input found before training starts is a ValueError; a failure once it has started
        (an error inside a step, a diverging loss, running out of memory) is a
        :class:`~locallearn.errors.RunError` that says what is kept.
        """
        resumed = self.prepare_output()
        done = self.finished_summary() if resumed else None
        if done is not None:
            return {**done, "already_finished": True}
        try:
            return self._train_and_summarise()
        except RunError:
            raise
        except (ValueError, RuntimeError, MemoryError) as err:
            what = str(err).splitlines()[0] if str(err) else type(err).__name__
            where = f"{self.label} failed at epoch {self.epoch + 1}"
            if ddp.peer_timeout(err):
                raise RunError(
                    f"{where} on rank {self.rank}: another process of the run did not answer "
                    f"within parallel.timeout={self.cfg.parallel.timeout:g} s (frozen or "
                    f"dead); {self._kept()}"
                ) from None
            if _out_of_memory(err):
                raise RunError(
                    f"{where}: out of memory ({what[:200]}); lower batch_size, or use "
                    f"micro-batches or a smaller net; {self._kept()}"
                ) from None
            raise RunError(f"{where}: {type(err).__name__}: {what}; {self._kept()}") from None

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of this run when it has already finished (after :meth:`prepare_output`)."""
        path = self.out / SUMMARY
        if not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if not isinstance(summary, dict) or summary.get("epochs") != self.epoch:
            return None
        if self.epoch < self.cfg.epochs and not summary.get("stopped_early"):
            return None  # epochs= larger: the run is extended
        return summary

    def _kept(self) -> str:
        """What a failed run leaves behind, truthfully."""
        if self.saved_epoch is None:
            return (f"no checkpoint was saved, so starting it again in {str(self.out)!r} "
                    "starts from scratch")
        return (f"its checkpoint of epoch {self.saved_epoch} is kept in {str(self.out)!r} "
                "(starting it again resumes from there)")

    def _train_and_summarise(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.main and cfg.log.trackers():
            self.tracker = open_trackers(cfg.log, self.out, self.label, to_dict(cfg))
            self._tracked = len(self.history)  # a resumed run logs from its checkpoint on
        try:
            summary = self._train_and_summarise_rows()
            if self.tracker is not None:
                self.tracker.log(summary, self.step, prefix="final/")
            return summary
        finally:
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None

    def _train_and_summarise_rows(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.epoch == 0 and not self.history:
            row = self.evaluate(0, {})
            if cfg.probe_every > 0:
                row.update(self.curve_probe())
            self.history.append(row)
            self._write_metrics()
        bar = tqdm(
            total=cfg.epochs, initial=self.epoch, disable=not (cfg.progress and self.main),
            desc=self.label, unit="epoch", leave=False,
        )
        stopped_early = False
        try:
            while self.epoch < cfg.epochs:
                if self._reached_stop():
                    stopped_early = True
                    break
                self._epoch_t0 = time.perf_counter()
                self._epoch_probe = 0.0
                if self.windows is not None and self.epoch > 0 and (
                        self.active_blocks(self.epoch) != self.active_blocks(self.epoch - 1)):
                    self.first_loss = None  # other blocks train: the guard's loss is theirs
                train_metrics = self.train_epoch()
                self.seconds += time.perf_counter() - self._epoch_t0 - self._epoch_probe
                self.epoch += 1
                last = self.epoch == cfg.epochs
                if self.epoch % cfg.eval_every == 0 or last:
                    row = self.evaluate(self.epoch, train_metrics)
                else:  # not evaluated: the training metrics, and where on the time axis
                    row = {"epoch": self.epoch, **train_metrics,
                           "seconds": round(self.seconds, 3)}
                row["step"] = self.step
                if self._probe_due(self.epoch - 1 / self._batches_per_epoch(), self.epoch):
                    row.update(self.curve_probe())
                self.history.append(row)
                self._write_metrics()
                if self.epoch % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                 if k in ("loss", "test_accuracy")})
        finally:
            bar.close()
        if stopped_early or self.epoch == cfg.epochs:
            self.save_checkpoint()
        summary = self.summary(stopped_early)
        summary.update(self.final_metrics())
        # the peak of the whole process, the final metrics (the probe's features) included
        summary["final_peak_rss_mib"] = round(peak_rss_mib(), 1)
        if self.main:
            write_json_atomic(self.out / SUMMARY, summary)
        return summary

    def final_metrics(self) -> dict[str, Any]:
        """The task's metrics of the final network (e.g. the linear probe of image encoders),
        once at the end; they join the summary (with the updated ``eval_seconds``)."""
        self.opt.zero_grad(set_to_none=True)  # training is over: the probe gets their memory
        self.net.eval()
        t0 = time.perf_counter()
        out = self.task.final_metrics(self.net, self.rule, self.out)
        self.eval_seconds += time.perf_counter() - t0
        return {**out, "eval_seconds": round(self.eval_seconds, 3)}

    def _reached_stop(self) -> bool:
        budget = self.cfg.max_seconds
        # the training time budget, checked at the end of an epoch; data-parallel ranks follow
        # rank 0's clock
        if budget is not None and ddp.decide(self.seconds >= budget):
            return True
        thr = self.cfg.stop_train_loss
        if thr is None or not self.history:
            return False
        row = self.history[-1]
        # the task's training loss where it reports one (the RHM read-out), else the rule's own;
        # an epoch left without evaluation (eval_every > 1) waits for the next evaluation
        if "train_loss" in row:
            loss = row["train_loss"]
        elif any("train_loss" in r for r in self.history):
            return False
        else:
            loss = row.get("loss")
        return loss is not None and loss < thr

    # ------------------------------------------------------------------ probes during training
    def _batches_per_epoch(self) -> int:
        return max(int(self.task.steps_per_epoch(self.cfg.batch_size)), 1)

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch: one per batch, and ``feedback_delay`` more that drain
        the blocks' kept batches (:mod:`locallearn.delay`)."""
        return self._batches_per_epoch() + self.delay

    def _probe_due(self, before: float, after: float) -> bool:
        """Whether a multiple of ``probe_every`` lies in the epochs ``(before, after]``."""
        every = self.cfg.probe_every
        if every <= 0:
            return False
        return math.floor(after / every + 1e-9) > math.floor(before / every + 1e-9)

    def optimizer_step(self) -> None:
        """Step the optimiser and the (per-step) schedule (locallearn.optim); count the step."""
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.step += 1

    def curve_metrics(self) -> dict[str, Any]:
        """The task's probe of the current encoder."""
        return dict(self.task.curve_probe(self.net))

    def curve_probe(self) -> dict[str, Any]:
        """:meth:`curve_metrics` in eval mode, with its cost in ``curve_seconds``."""
        t0 = time.perf_counter()
        was_training = self.net.training
        self.net.eval()
        metrics = self.curve_metrics()
        self.net.train(was_training)
        spent = time.perf_counter() - t0
        self.eval_seconds += spent
        self._epoch_probe += spent
        return {**metrics, "curve_seconds": round(spent, 3)}

    def autocast(self):
        """bf16 autocast on the run's device when ``precision=bf16`` (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def _grads(self, batch: Any) -> dict[str, float]:
        """Fill ``.grad`` for one batch: the rule's step, its step on late signals, or the
        layer-wise schedule's."""
        if self.delayed is not None:
            metrics = self.delayed.step(self.net, batch)
            if self.step == 0 and self.main:
                print(f"locallearn: the blocks keep up to {self.delay + 1} batches of their "
                      f"inputs for parallel.feedback_delay={self.delay}: "
                      f"{self.delayed.kept_mib():.2f} MiB", file=sys.stderr, flush=True)
            return metrics
        if self.windows is None:
            return self.rule.compute_grads(self.net, batch)
        return self.layerwise_grads(batch)

    def _drain(self, sums: dict[str, float], counts: dict[str, int]) -> None:
        """The steps that apply the batches still kept at the end of an epoch (late signals)."""
        while self.delayed is not None and self.delayed.pending():
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                metrics, n = self.delayed.drain(self.net)
            if "loss" in metrics:
                self._check_loss(metrics["loss"])
            self.optimizer_step()
            add_metrics(sums, counts, metrics, n)

    def train_epoch(self) -> dict[str, float]:
        self.net.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_batches = self._batches_per_epoch()
        batches = self.task.batches(self.generator, self.cfg.batch_size, self.rule.view_kind)
        for i, batch in enumerate(batches):
            n = batch.x.shape[0]
            if self.world > 1:  # this rank's part of the global batch
                batch = ddp.shard_batch(batch, self.rank, self.world)
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                metrics = self._grads(batch)
            if self.world > 1:
                ddp.average_grads(self.params, batch.x.shape[0])
                metrics = ddp.average_metrics(metrics, batch.x.shape[0])
                if n % self.world:  # uneven parts may have drawn unevenly from the generator
                    ddp.sync_generator(self.generator)
            if "loss" in metrics:  # a step with late signals may have no loss yet
                self._check_loss(metrics["loss"])
            self.optimizer_step()
            add_metrics(sums, counts, metrics, n)
            position = self.epoch + (i + 1) / n_batches
            if i + 1 < n_batches and self._probe_due(self.epoch + i / n_batches, position):
                seconds = self.seconds + time.perf_counter() - self._epoch_t0 - self._epoch_probe
                row = self.curve_probe()
                self.history.append({"epoch": round(position, 4), "step": self.step,
                                     "seconds": round(seconds, 3), **row})
                self._write_metrics()
        self._drain(sums, counts)
        return {key: value / counts[key] for key, value in sums.items()}

    def _check_loss(self, loss: float) -> None:
        """Stop a diverging run: a loss that is not finite, or that grew beyond
        ``stop_loss_factor`` times the run's first batch loss (when that was > 0)."""
        if not math.isfinite(loss):
            raise RunError(
                f"{self.label} diverged at epoch {self.epoch + 1}: the loss is {loss}; lower "
                f"optim.lr; {self._kept()}"
            )
        if self.first_loss is None:
            self.first_loss = loss
            return
        factor = self.cfg.stop_loss_factor
        if factor is not None and self.first_loss > 0 and loss > factor * self.first_loss:
            raise RunError(
                f"{self.label} diverged at epoch {self.epoch + 1}: the loss grew to {loss:.4g}, "
                f"more than stop_loss_factor={factor:g} times its first value "
                f"{self.first_loss:.4g}; lower optim.lr (or set stop_loss_factor=null to train "
                f"on); {self._kept()}"
            )

    def evaluate(self, epoch: int, train_metrics: dict[str, float]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.net.eval()
        metrics = self.task.evaluate(self.net, self.rule)
        every = self.cfg.align_every
        if every and epoch % every == 0:
            for row in self.alignment():
                metrics[f"align_block{row['block']}"] = row["cosine_mean"]
        self.eval_seconds += time.perf_counter() - t0
        return {"epoch": epoch, "step": self.step, **train_metrics, **metrics,
                "seconds": round(self.seconds, 3)}

    def alignment(self, n_batches: int | None = None, seed: int | None = None) -> list[dict]:
        """Per-block alignment of the rule with its backprop reference on a few batches.

        Uses its own generator (from ``seed``, by default the run's seed and epoch), so training
        draws the same random numbers with or without it.
        """
        from locallearn.eval.alignment import alignment

        n = n_batches or self.cfg.align_batches
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch if seed is None
                                            else seed)
        rng = torch.get_rng_state()
        it = self.task.batches(gen, self.cfg.batch_size, self.rule.view_kind)
        batches = [b for _, b in zip(range(n), it)]
        rows = alignment(self.rule, self.net, batches)
        torch.set_rng_state(rng)
        for p in self.params:
            p.grad = None
        return rows

    def summary(self, stopped_early: bool) -> dict[str, Any]:
        last = self.history[-1]
        evals = [r for r in self.history if "test_accuracy" in r]
        best = max(evals, key=lambda r: r["test_accuracy"]) if evals else last
        return {
            "rule": self.rule.name,
            "label": self.label,
            #: how test accuracies are read out: through the net's own trained read-out, or a
            #: linear read-out fitted on the frozen features of a rule that never sees labels
            "readout": "end-to-end" if self.rule.uses_labels else "linear (frozen features)",
            "rule_config": to_dict(self.cfg.rule),
            "test_accuracy": last.get("test_accuracy"),
            "test_loss": last.get("test_loss"),
            "train_accuracy": last.get("train_accuracy"),
            "train_loss": last.get("train_loss"),
            "best_test_accuracy": best.get("test_accuracy"),
            "best_epoch": best.get("epoch"),
            "chance": self.task.chance,
            "epochs": self.epoch,
            "stopped_early": stopped_early,
            "seconds": round(self.seconds, 3),
            "eval_seconds": round(self.eval_seconds, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "seed": self.cfg.seed,
            "host": platform.node(),
            "torch": torch.__version__,
            **self.task.info,
        }
