"""The RHM classification task: data on the device, hierarchical CNN, test accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from locallearn.data.rhm import RHM
from locallearn.data.rhm_views import block_view_pairs, two_views
from locallearn.eval.probe import batched_features, fit_linear_probe
from locallearn.nets.base import BlockNet
from locallearn.nets.clusterer import predictor_clusterer_net
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.rules.base import Batch, Rule
from locallearn.schema import RunConfig, resolve_size
from locallearn.task import Task


def uniform_inputs(rhm: RHM) -> bool:
    """Whether every token string is equally likely: each level's rules use every s-tuple
    (``m = v**(s-1)``, ``n_classes * m = v**s``), so the inputs carry no trace of the tree."""
    return rhm.m == rhm.v ** (rhm.s - 1) and rhm.n_classes * rhm.m == rhm.v**rhm.s


#: ``net.kind`` values of RHM runs
RHM_NETS = ("hier-cnn", "predictor-clusterer")


class RHMTask(Task):
    """Class prediction on an RHM dataset drawn without replacement."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        d = cfg.data
        self.cfg = cfg
        self.device = device
        self.rhm = RHM(d.v, d.n_classes, d.m, d.s, d.L, d.seed_rules)
        self.n_train = resolve_size(d.train_size, self.rhm.P_star, "data.train_size")
        if self.n_train < 1:
            raise ValueError(f"data.train_size={d.train_size!r} is invalid: gives no samples")
        seed_sample = cfg.seed if d.seed_sample is None else d.seed_sample
        train, test = self.rhm.sample(self.n_train, d.test_size, seed_sample)
        self.train = train.to(device)
        self.test = test.to(device)
        self.chance = 1.0 / d.n_classes
        self.rule_info: dict[str, Any] = {
            "s": d.s, "steps_per_epoch": self.steps_per_epoch(cfg.batch_size), "epochs": cfg.epochs,
        }
        self.info: dict[str, Any] = {
            "train_size": self.n_train,
            "test_size": len(test),
            "P_star": self.rhm.P_star,
            "P_max": self.rhm.P_max,
            "train_size_over_P_star": self.n_train / self.rhm.P_star,
        }

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rhm.one_hot(tokens, self.cfg.data.whiten)

    def build_net(self) -> BlockNet:
        c = self.cfg
        if c.net.kind not in RHM_NETS:
            raise ValueError(
                f"net.kind={c.net.kind!r} does not fit data.name=rhm; valid: {', '.join(RHM_NETS)}"
            )
        seed = c.seed if c.net.seed is None else c.net.seed
        d = c.data
        if c.net.kind == "predictor-clusterer":
            net = predictor_clusterer_net(d.v, d.s, d.L, c.net.width, d.n_classes, seed)
        else:
            net = hier_cnn(d.v, d.s, d.L, c.net.width, d.n_classes, c.net.bias, seed)
        return net.to(self.device)

    def sample_input(self) -> torch.Tensor:
        return self.encode(self.train.tokens[:2])

    def check_rule(self, rule: Rule) -> None:
        view = getattr(rule, "view", None)
        if view == "siblings" and self.rhm.L < 2:
            raise ValueError("rule.view=siblings needs data.L >= 2 (a block with siblings)")
        if not rule.uses_labels and uniform_inputs(self.rhm):
            d = self.cfg.data
            raise ValueError(
                f"rule.name={self.cfg.rule.name} learns without labels, but data.m={d.m} = "
                f"v**(s-1) and n_classes*m = {d.n_classes * d.m} = v**s make every input string "
                "equally likely (nothing to learn from the inputs); use m < v**(s-1) or "
                "n_classes*m < v**s, or a supervised rule"
            )

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_train // batch_size)

    def batches(
        self, generator: torch.Generator, batch_size: int, view_kind: str | None
    ) -> Iterator[Batch]:
        perm = torch.randperm(self.n_train, generator=generator).to(self.device)
        for start in range(0, self.n_train, batch_size):
            idx = perm[start : start + batch_size]
            tokens = self.train.tokens[idx]
            views = block_views = None
            if view_kind == "synonyms-per-block":
                block_views = block_view_pairs(self.rhm, tokens, generator, self.cfg.data.whiten)
            elif view_kind is not None:
                views = two_views(
                    self.rhm, tokens, view_kind, generator, self.cfg.data.whiten,
                    self.cfg.data.mask_fraction,
                )
            yield Batch(self.encode(tokens), self.train.labels[idx], views, generator, block_views)

    @torch.no_grad()
    def logits(self, net: BlockNet, tokens: torch.Tensor) -> torch.Tensor:
        chunks = [tokens[i : i + 4096] for i in range(0, len(tokens), 4096)]
        return torch.cat([net(self.encode(t)) for t in chunks])

    def fit_readout(self, net: BlockNet) -> None:
        """Fit the read-out on the frozen top block with the training labels."""
        feats = batched_features(lambda x: net.encode(self.encode(x)), self.train.tokens)
        w, b = fit_linear_probe(
            feats, self.train.labels, self.cfg.data.n_classes,
            self.cfg.probe.weight_decay, self.cfg.probe.steps,
        )
        ro = net.readout
        with torch.no_grad():
            ro.weight.copy_(w / ro.scale if hasattr(ro, "scale") else w)
            ro.bias.copy_(b)

    def final_metrics(self, net: BlockNet, rule: Rule, out_dir: Path) -> dict[str, Any]:
        """Nothing beyond the last evaluation."""
        return {}

    def evaluate(self, net: BlockNet, rule: Rule) -> dict[str, float]:
        if not rule.uses_labels:
            self.fit_readout(net)
        out: dict[str, float] = {}
        for split, data in (("train", self.train), ("test", self.test)):
            if len(data) == 0:
                continue
            logits = self.logits(net, data.tokens)
            out[f"{split}_loss"] = float(F.cross_entropy(logits, data.labels))
            out[f"{split}_accuracy"] = float((logits.argmax(1) == data.labels).float().mean())
        return out
