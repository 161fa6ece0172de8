"""Layer-parallel training: groups of blocks on their own processes, pipelined.

A block trained by a local rule needs nothing from the blocks above it, so the blocks of a network
can be cut into ``K`` contiguous groups (*stages*), each on its own process (and device), that
train at the same time on consecutive batches: stage ``k`` works on batch ``t`` while stage
``k + 1`` works on batch ``t - 1``. Stage 0 reads the data and makes the views; every stage runs
its blocks' local losses on what the stage below sent (detached activations, the views each
block needs, the negatives drawn for the batch), fills ``.grad`` of its blocks and of their
prediction matrices, steps its own optimiser, and sends its blocks' output to the next stage.
Nothing is sent backward, except a late signal from the top (``parallel.feedback_delay``,
:mod:`locallearn.delay`), which the last stage sends down to every other.

Launch with ``torchrun --nproc_per_node=K -m locallearn run CONFIG parallel.stages=K`` (gloo on
CPUs, NCCL on GPUs); a multiple ``K * D`` of processes runs ``D`` replicas of every stage, which
average their gradients. Modules: :mod:`~locallearn.parallel.stage_trainer` (the loop of a
stage), :mod:`~locallearn.parallel.late_signals` (its epoch with late signals from the top),
:mod:`~locallearn.parallel.checks` (what a pipeline refuses), :mod:`~locallearn.parallel.messages`
(what goes between processes), :mod:`~locallearn.parallel.stage_optimizer`,
:mod:`~locallearn.parallel.travelling_rng` (the run's generator when stages above 0 draw from it)
and :mod:`~locallearn.parallel.split` (which blocks each stage gets, and the speed-up model).
"""
