"""What a pipeline cannot run: one-line errors, before the data loads where they can be."""

from __future__ import annotations

from locallearn.delay import enable_delay
from locallearn.parallel.split import check_split
from locallearn.schema import RunConfig

__all__ = ["check_pipeline", "check_rule", "check_settings"]


def check_rule(cfg: RunConfig, rule) -> None:
    """A one-line ValueError when ``rule`` cannot be pipelined (it needs a signal from above
    on the same batch: ``parallel.feedback_delay`` lets it come late)."""
    enable_delay(rule, cfg.parallel.feedback_delay)
    reason = rule.pipeline_refusal()
    if reason is not None:
        raise ValueError(f"parallel.stages={cfg.parallel.stages} cannot pipeline this run: "
                         f"{reason}; valid: parallel.stages=1")


def check_settings(cfg: RunConfig) -> None:
    """One-line ValueErrors for settings a pipeline cannot honour (known before data loads)."""
    if cfg.align_every:
        raise ValueError(f"align_every={cfg.align_every} needs every block in one process; "
                         "valid with parallel.stages > 1: align_every=0")
    if cfg.optim.name == "lars":
        raise ValueError("optim.name=lars (two parameter groups: weights and the rest) does not "
                         "run pipelined; valid with parallel.stages > 1: adam, adamw, sgd")
    if cfg.max_seconds is not None:
        raise ValueError(f"max_seconds={cfg.max_seconds:g} does not run pipelined (each stage "
                         "would spend the budget at its own epoch); valid with "
                         "parallel.stages > 1: max_seconds=null")
    if cfg.layerwise.epochs is not None:
        raise ValueError("layerwise.epochs (a layer-wise schedule) does not run pipelined: a "
                         "greedy schedule trains one block at a time; valid with "
                         "parallel.stages > 1: layerwise.epochs=null")
    streams = getattr(cfg.data, "streams", None)  # image data; the RHM never streams
    if streams is not None and streams():
        raise ValueError("parallel.stages > 1 cannot stream its data (every stage would decode "
                         "a part of each batch that only stage 0 uses); valid with streamed "
                         "data: parallel.stages=1 (data parallel: torchrun without "
                         "parallel.stages)")
    if not float(cfg.probe_every).is_integer():
        raise ValueError(f"probe_every={cfg.probe_every:g} would probe inside an epoch, while "
                         "the stages are at different steps; valid with parallel.stages > 1: "
                         "whole epochs (0, 1, 2, ...)")


def check_pipeline(cfg: RunConfig, rule, n_blocks: int, world: int) -> None:
    """One-line ValueErrors for a pipeline that cannot run (in the order a user meets them)."""
    k = cfg.parallel.stages
    check_rule(cfg, rule)
    if k > n_blocks:
        raise ValueError(f"parallel.stages={k} is more than the network's {n_blocks} blocks; "
                         f"valid: 1 to {n_blocks}")
    if cfg.parallel.split is not None:
        check_split(cfg.parallel.split, n_blocks)
    check_settings(cfg)
    if world % k:
        raise ValueError(
            f"parallel.stages={k} needs {k} processes, one per stage, or a multiple of {k} for "
            f"replicas of every stage (torchrun --nproc_per_node={k} -m locallearn run ...); "
            f"this run has {world}"
        )
    if world > k:
        why = rule.data_parallel_refusal()
        if why is not None:
            raise ValueError(f"{world // k} replicas of each stage do not fit "
                             f"rule.name={rule.name}: {why}")
        if cfg.parallel.feedback_delay:
            raise ValueError(f"parallel.feedback_delay={cfg.parallel.feedback_delay} does not "
                             f"run with replicas of the stages; valid: {k} processes")
