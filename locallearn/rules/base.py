"""The rule abstraction: given a batch, fill ``.grad`` of every parameter the rule trains.

The optimiser then steps as usual, so every ``torch.optim`` optimiser, scheduler and
data-parallel wrapper works unchanged. A rule may own parameters (prediction matrices ``B``) and
buffers (fixed random feedback matrices); they live in the rule module and are saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from locallearn.nets.base import BlockNet


@dataclass
class Batch:
    """What the training loop hands to a rule.

    Attributes:
        x: network input.
        y: labels (``None`` where a rule must not see them).
        views: two augmented versions of ``x`` for self-supervised rules, else ``None``.
        generator: the run's random generator (negatives, masks), for reproducibility.
        block_views: one pair of views per block (views that differ in what each block should
            become invariant to), or ``None``.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    generator: torch.Generator | None = None
    block_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class NoOptions:
    """The ``rule.options`` of a rule that has none."""


class Rule(nn.Module):
    """Base class of learning rules.

    Class attributes:
        name: the rule's config name.
        uses_labels: whether labels reach the encoder (supervised rules).
        view_kind: which two-view augmentation the loop must supply (``None``: none).
        trains_codes: whether the rule trains blocks that output discrete codes (a block with
            ``emits_codes = True``, which no gradient crosses); such blocks take no other rule,
            and such a rule takes no other network (:func:`check_fits`).
        Options: the typed dataclass of the rule's ``rule.options``, the one place of every
            setting the rule reads (an unknown key or a bad value is a one-line error).

    A rule is made from its config section by :meth:`from_config` (see
    :func:`locallearn.rules.build_rule`).
    """

    name: ClassVar[str] = "rule"
    uses_labels: ClassVar[bool] = True
    view_kind: str | None = None
    trains_codes: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    @classmethod
    def from_config(cls, cfg: Any, options: Any, seed: int, **task_info: Any) -> Rule:
        """The rule of config section ``cfg``, its typed ``options``, the
        run's ``seed`` and facts of the task (``s``: the RHM branching factor)."""
        return cls()

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        """Create rule-owned parameters and buffers for ``net`` (called once, before training)."""

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        """Parameters this rule fills ``.grad`` for (the optimiser's parameters)."""
        return list(net.parameters()) + list(self.parameters())

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        """Fill ``.grad`` (accumulating into zeroed grads) and return metrics with ``loss``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ block by block
    # A rule whose every block learns from its own activity (and its own block's context) can
    # run a contiguous range of blocks on its own process: ``locallearn.parallel`` pipelines
    # them. Such a rule implements the three methods below (and :meth:`pipeline_refusal` returns
    # ``None``); its ``compute_grads`` is ``blocks_grads`` over every block, so a pipelined run
    # does exactly the arithmetic of a one-process run.

    def pipeline_refusal(self) -> str | None:
        """Why this rule cannot train its blocks on separate processes (``None``: it can)."""
        return f"rule {self.name} does not learn block by block"

    def layerwise_refusal(self) -> str | None:
        """Why a layer-wise schedule (``layerwise.epochs``: blocks trained one after the other,
        those below frozen) does not fit this rule (``None``: it does); by default the rule must
        learn block by block, as for a pipeline."""
        return self.pipeline_refusal()

    def data_parallel_refusal(self) -> str | None:
        """Why this rule cannot split a batch across data-parallel ranks (``None``: it can,
        each rank's part giving its gradient and the ranks averaging them)."""
        return None

    def length_refusal(self) -> str | None:
        """Why a finished run of this rule cannot be extended to more epochs (its schedule
        depends on the run's length, so the extended run would not be the longer run);
        ``None``: it can."""
        return None

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """What block 0 receives for ``batch``: its input(s) and whatever the blocks draw at
        random for it (negatives), drawn here in the order of a one-process step."""
        raise NotImplementedError

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Fill ``.grad`` of blocks ``start..stop-1`` and of their rule-owned parameters from
        ``carry`` (what block ``start`` receives: detached tensors, numbers); return their metrics
        (``loss``: the running total of every block so far) and what block ``stop`` receives."""
        raise NotImplementedError

    def frozen_carry(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> dict[str, Any]:
        """What block ``stop`` receives from ``carry`` (block ``start``'s) when blocks
        ``start..stop-1`` do not learn (the frozen blocks below a greedy schedule's block).

        The default runs :meth:`blocks_grads` and drops the gradients it filled and the losses
        it added to the running ``loss``; a rule overrides it with a forward pass without
        gradients."""
        params = [p for level in range(start, stop)
                  for p in list(net.blocks[level].parameters()) + self.block_parameters(level)]
        saved = [p.grad for p in params]
        _, out = self.blocks_grads(net, carry, start, stop)
        for p, g in zip(params, saved):
            p.grad = g
        if "loss" in carry:
            out["loss"] = carry["loss"]
        return out

    def block_parameters(self, level: int) -> list[nn.Parameter]:
        """The rule-owned parameters that belong to block ``level`` (its prediction matrices)."""
        return []

    # ------------------------------------------------------------------ late signals from the top
    # A rule whose blocks learn from a signal of the top block can run with that signal late
    # (``parallel.feedback_delay``, :mod:`locallearn.delay`): it implements the block-range
    # methods above (``frozen_carry`` as a forward pass), :meth:`feedback_signal`, and
    # :meth:`delay_refusal` returning ``None``; its ``blocks_grads`` reads the signal from the
    # carry's ``feedback``.

    #: set by the loop when the signal comes late: ``start_carry`` then leaves ``feedback`` empty
    late_feedback: bool = False

    def delay_refusal(self) -> str | None:
        """Why this rule's blocks have no signal from the top that may arrive late (``None``:
        they have one)."""
        return f"rule {self.name} sends its blocks no signal from the top"

    def feedback_signal(self, net: BlockNet, carry: dict[str, Any]) -> tuple[Any, dict]:
        """The signal the top sends down for the batch of ``carry`` (what the top block's output
        carries), and metrics of the top; may fill ``.grad`` of what learns at the top at once."""
        raise NotImplementedError

    def with_feedback(self, carry: dict[str, Any], signal: Any) -> dict[str, Any]:
        """``carry`` with the signal from the top that its blocks learn from."""
        return {**carry, "feedback": signal}

    def upgrade_state(self, net: BlockNet, checkpoint_format: int) -> None:
        """Bring state loaded from a checkpoint of an earlier ``checkpoint_format`` (see
        :data:`locallearn.train.CHECKPOINT_FORMAT`) up to date; the default changes nothing."""

    def reference_rule(self) -> Rule:
        """The backprop counterpart this rule is compared with (gradient alignment).

        Label-driven rules (:class:`~locallearn.rules.backprop.SupervisedRule`): backprop of the
        cross-entropy. Self-supervised rules: their loss on the top block backpropagated through
        every block (BP-SSL), sharing this rule's parameters (prediction matrices). A rule
        without one raises ValueError.
        """
        raise ValueError(f"rule {self.name} has no backprop reference to be compared with")


class StepsBlockByBlock:
    """Mixin (listed before :class:`Rule`) of the rules whose step is the block-range protocol
    over every block: ``compute_grads`` is ``blocks_grads`` from block 0 to the top, so a
    one-process run does exactly the arithmetic of a pipelined one."""

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        metrics, _ = self.blocks_grads(  # type: ignore[attr-defined]
            net, self.start_carry(net, batch), 0, len(net.blocks))  # type: ignore[attr-defined]
        return metrics


class TopLossReference(Rule):
    """Base of the BP-SSL references of layer-wise rules: the local rule's loss on the top block,
    backpropagated through every block, with the local rule's own parameters (prediction
    matrices). Subclasses write ``compute_grads``."""

    name: ClassVar[str] = "top-loss-backprop"
    uses_labels: ClassVar[bool] = False

    def __init__(self, local: Rule) -> None:
        super().__init__()
        self.local = [local]  # a list, so that the local rule is not registered as a submodule
        self.name = f"top-loss-backprop({local.name})"  # type: ignore[misc]
        self.view_kind = local.view_kind

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return self.local[0].trained_parameters(net)

    def reference_rule(self) -> Rule:
        """End-to-end backprop already: its own reference."""
        return self


def relu_grad(a: torch.Tensor) -> torch.Tensor:
    """Derivative of ReLU at pre-activation ``a`` (0 at 0)."""
    return (a > 0).to(a.dtype)


def ce_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the batch-mean cross-entropy w.r.t. the logits: ``(softmax - onehot) / N``."""
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (torch.softmax(logits, 1) - onehot) / logits.shape[0]


def check_fits(net: BlockNet, rule: Rule, net_kind: str) -> None:
    """Raise a one-line ValueError when ``rule`` cannot train ``net``: a network whose blocks
    output discrete codes takes only a rule that trains codes, and such a rule no other network."""
    codes = any(getattr(block, "emits_codes", False) for block in net.blocks)
    if codes == rule.trains_codes:
        return
    if codes:
        why = ("its blocks output discrete codes, which no gradient crosses, and "
               f"rule.name={rule.name} learns from gradients")
    else:
        why = (f"rule.name={rule.name} trains blocks that output discrete codes and "
               f"net.kind={net_kind} has none")
    raise ValueError(f"net.kind={net_kind} does not fit rule.name={rule.name}: {why}")


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, note: str = "",
) -> None:
    """Raise the one-line ValueError ``NAME=VALUE is invalid: must be ...`` when ``value`` is
    outside the range (NaN always is); ``note`` is appended in brackets."""
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if above and below:
        return
    if high is None:
        want = f"{'>' if low_open else '>='} {low:g}"
    elif low is None:
        want = f"{'<' if high_open else '<='} {high:g}"
    else:
        want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name}={value} is invalid: must be {want}" + (f" ({note})" if note else ""))
