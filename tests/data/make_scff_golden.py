"""Reference numbers of the SCFF rule from its authors' public code, run in float64.

Usage, from the project root with locallearn importable::

    mkdir -p /tmp/scffref
    git -C <contrastive-forward-forward checkout> archive a6fc0f8 ContrastFF_CIFAR.py config.json \\
        | tar -x -C /tmp/scffref
    python tests/data/make_scff_golden.py /tmp/scffref tests/data/scff_golden.json

The reference script is imported, not copied: the two packages it imports but never uses on
this path (a hyper-parameter search library and a vision dataset library) are replaced by empty
stand-ins in ``sys.modules`` first. Its
own layer constructor (``create_layer``, on its ``config.json`` with every channel count scaled by
``WIDTH``), its training pass (``train``, one batch, optimisers that do not step) and its probe
feature path (``test_readout``, with a read-out that records its input) produce every number; this
script only sets the weights, the batch and the negative shifts, and records what comes out.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import types
from pathlib import Path

import torch

CODE_DIR, OUT = Path(sys.argv[1]), Path(sys.argv[2])
COMMIT = "a6fc0f8be9fbd1ccef46f991ab33766f49e7637e"
N, SIDE, WIDTH = 6, 32, 1 / 8
SCALES = (1.5, 3.0, 3.0)  # weight scales that put the goodness near each layer's thresholds
SHIFTS = (2, 3, 5)  # the negative pairs' shift of each layer (where it pairs)
SAMPLES = 6


class _Anything:
    """Stands for any class or function of a stubbed package (never called on this path)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything


class _TrialPruned(Exception):
    pass


def _install_stubs() -> None:
    tv = _StubModule("torchvision")
    tv_transforms = _StubModule("torchvision.transforms")
    tv_transforms.transforms = tv_transforms
    tv.transforms = tv_transforms
    tv.datasets = _StubModule("torchvision.datasets")
    optuna = _StubModule("optuna")
    optuna.TrialPruned = _TrialPruned
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv_transforms,
                        "torchvision.datasets": tv.datasets, "optuna": optuna})


_install_stubs()
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(CODE_DIR))
import ContrastFF_CIFAR as ref  # noqa: E402  (the authors' code, run, not copied)

CONFIG = json.loads((CODE_DIR / "config.json").read_text())["CIFAR"]


def stats(t: torch.Tensor, seed: int) -> dict:
    flat = t.detach().double().flatten()
    idx = torch.randint(flat.numel(), (SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()),
            "index": idx.tolist(), "values": flat[idx].tolist()}


def scaled_layer_configs(width: float) -> list[dict]:
    out = []
    for k, lc in enumerate(CONFIG["layer_configs"]):
        lc = dict(lc)
        if k > 0:
            lc["ch_in"] = max(1, round(lc["ch_in"] * width))
        lc["channels"] = max(1, round(lc["channels"] * width))
        out.append(lc)
    return out


def build_layers(n_layers: int) -> tuple[list, list, list]:
    """The code's layers (``create_layer``) at ``WIDTH``, in float64, weights set as in
    ``about``."""
    nets, pools, extra = [], [], []
    g = torch.Generator().manual_seed(7)
    for k, (lc, oc) in enumerate(zip(scaled_layer_configs(WIDTH)[:n_layers],
                                     CONFIG["opt_configs"][:n_layers])):
        net, pool, extra_pool, _, _ = ref.create_layer(lc, oc, load_params=False, device="cpu")
        net.double()
        w, b = net.conv_layer.weight, net.conv_layer.bias
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5 * SCALES[k]
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) * 2 - 1)
                    / fan_in ** 0.5)
        nets.append(net)
        pools.append(pool)
        extra.append(extra_pool)
    return nets, pools, extra


def the_batch() -> torch.Tensor:
    return torch.randn(N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def seed_drawing(shift: int) -> int:
    """A global seed after which the code's ``randperm(N - 1) + 1`` starts with ``shift``."""
    for seed in range(10_000):
        torch.manual_seed(seed)
        if int(torch.randperm(N - 1)[0]) + 1 == shift:
            return seed
    raise RuntimeError(f"no seed draws shift {shift}")


class FixedShifts:
    """Wraps the code's pair builder: before each call, seeds the global generator so that its
    own draw gives the next shift of ``shifts``; checks the pairs it returns."""

    def __init__(self, original, shifts: list[int]):
        self.original, self.shifts, self.calls = original, list(shifts), 0

    def __call__(self, x1, x2, p=2):
        shift = self.shifts[self.calls]
        self.calls += 1
        torch.manual_seed(seed_drawing(shift))
        pos, neg = self.original(x1, x2, p=p)
        assert torch.equal(neg, torch.cat([x1, x2.roll(-shift, 0)], 1)), "unexpected shift"
        return pos, neg


class NoStep:
    """An optimiser that clears gradients but never steps (the gradients are the record)."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


class NoSchedule:
    def step(self):
        pass

    def get_last_lr(self):
        return [0.0]


def run_train(concat: list[int], freezelayer: int, shifts: list[int]) -> dict:
    """One batch of the code's ``train`` on ``len(concat)`` layers with flags ``concat``; the
    layers from ``freezelayer`` on learn (the ones below are frozen as when loaded)."""
    n_layers = len(concat)
    nets, pools, extra = build_layers(n_layers)
    for net, flag in zip(nets, concat):
        net.concat = flag
    for net in nets[:freezelayer]:
        for p in net.parameters():
            p.requires_grad = False
    opt = CONFIG["opt_configs"][:n_layers]
    losses: list[float] = []
    original_backward = torch.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        losses.append(float(self.detach()))
        return original_backward(self, *args, **kwargs)

    pair_builder = ref.get_pos_neg_batch_imgcats
    ref.get_pos_neg_batch_imgcats = FixedShifts(pair_builder, shifts)
    torch.Tensor.backward = recording_backward
    x = the_batch()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ref.train(nets, "cpu", [NoStep(n.parameters()) for n in nets],
                      [NoSchedule() for _ in nets], [o["th1"] for o in opt],
                      [o["th2"] for o in opt], (1, 2, 3), (1, 2, 3), 1, pools, 1, 1,
                      [o["lamda"] for o in opt], freezelayer, [10**9] * n_layers, extra, False,
                      [0, 1, 2], False, [(x, x, x, x)], None, None, None, True, True, False,
                      1, 1, None)
    finally:
        torch.Tensor.backward = original_backward
        ref.get_pos_neg_batch_imgcats = pair_builder
    assert len(losses) == n_layers - freezelayer
    grads = {}
    for k in range(freezelayer, n_layers):
        layer = nets[k].conv_layer
        grads[f"layer{k + 1}"] = {"weight": stats(layer.weight.grad, 100 + 2 * k),
                                  "bias": stats(layer.bias.grad, 101 + 2 * k)}
    drawn: list[int | None] = []
    it = iter(shifts)
    for flag in concat:
        drawn.append(next(it) if flag else None)
    return {"concat": concat, "trained_from": freezelayer, "shifts": drawn,
            "losses": losses, "grads": grads}


class Recorder(torch.nn.Module):
    """A read-out that records the features it is given."""

    def __init__(self):
        super().__init__()
        self.features = None

    def forward(self, z):
        self.features = z.detach().clone()
        return torch.zeros(z.shape[0], 10, dtype=z.dtype)


def probe_features() -> dict:
    nets, pools, extra = build_layers(3)
    for net in nets:
        net.concat = 1  # the published evaluation: every layer pairs the image with itself
    cfg = ref.EvaluationConfig(device="cpu", dims=(1, 2, 3), dims_in=(1, 2, 3),
                               dims_out=(1, 2, 3), stdnorm_out=True, out_dropout=0.0,
                               Layer_out=[0, 1, 2], pre_std=True, all_neurons=False)
    recorder = Recorder()
    labels = torch.zeros(N, dtype=torch.long)
    with contextlib.redirect_stdout(io.StringIO()):
        ref.test_readout(recorder, nets, pools, extra, [(the_batch(), labels)],
                         torch.nn.CrossEntropyLoss(), cfg, 0, "golden")
    f = recorder.features
    return {"dim": int(f.shape[1]), "features": stats(f, 300),
            "per_image_cubes": f.pow(3).sum(1).tolist(), "per_image_max": f.amax(1).tolist()}


def init_weights() -> dict:
    """The code's own initial weights (float32) of the three layers at ``WIDTH``, made in order
    after ``torch.manual_seed(0)``, as its script makes them after its seed."""
    torch.manual_seed(0)
    out = {}
    for k, (lc, oc) in enumerate(zip(scaled_layer_configs(WIDTH), CONFIG["opt_configs"])):
        net, *_ = ref.create_layer(lc, oc, load_params=False, device="cpu")
        out[f"layer{k + 1}"] = {"weight": stats(net.conv_layer.weight, 400 + 2 * k),
                                "bias": stats(net.conv_layer.bias, 401 + 2 * k)}
    return out


runs = {
    "all_111": run_train([1, 1, 1], 0, [SHIFTS[0], SHIFTS[1], SHIFTS[2]]),
    "all_101": run_train([1, 0, 1], 0, [SHIFTS[0], SHIFTS[2]]),
    "all_110": run_train([1, 1, 0], 0, [SHIFTS[0], SHIFTS[1]]),
    "stage1": run_train([1], 0, [SHIFTS[0]]),
    "stage2": run_train([1, 0], 1, [SHIFTS[0]]),
    "stage3": run_train([1, 1, 1], 2, [SHIFTS[0], SHIFTS[1], SHIFTS[2]]),
}
for name, rec in runs.items():
    print(name, [round(v, 8) for v in rec["losses"]])
out = {
    "about": (
        f"Reference values of the SCFF rule from running its authors' public code "
        f"(contrastive-forward-forward @ {COMMIT}, ContrastFF_CIFAR.py and config.json, CIFAR "
        f"section) in float64, made by tests/data/make_scff_golden.py with torch "
        f"{torch.__version__}. Layers: the code's create_layer on config.json with every "
        f"channel count times width_mult (3-12-48-192), cast to float64, weights set to "
        f"(2 U - 1) sqrt(6 / (fan_in + fan_out)) * scales[k] and biases to (2 U - 1) / "
        f"sqrt(fan_in), U uniform from one torch.Generator().manual_seed(7) in the order "
        f"w1, b1, w2, b2, w3, b3. Batch: torch.randn(n_images, 3, side, side, generator="
        f"manual_seed(1), float64), passed to the code's train() as one batch (the same tensor "
        f"for its four loader slots) with thresholds and lambdas from config.json, a = b = 1, "
        f"p = 1, optimisers that clear but never step. The negative shift of each pairing layer "
        f"is fixed (shifts; null: the layer does not pair) by seeding the global generator "
        f"before the code's own randperm draw. runs: all_*: every layer learns (trained_from 0) "
        f"with the concat flags named; stage1..3: the published greedy stages (flags [1], "
        f"[1,0], [1,1,1]; only the last layer learns, the ones below frozen). losses: the "
        f"loss of each learning layer (the value on which the code calls backward); grads: "
        f"sum, sum of squares and seeded entries of each learning layer's weight and bias "
        f"gradient. probe: the code's test_readout feature vector (every layer paired with "
        f"itself, extra AvgPool(2, 2, ceil), per-sample standardisation, the three layers "
        f"concatenated) on the same layers and batch: sum, sum of squares and seeded entries (in "
        f"the code's channel-major order), and per image the sum of cubes and the largest value "
        f"(order-free). init: the code's own float32 initial "
        f"weights at this width, after torch.manual_seed(0), layers made in order."
    ),
    "commit": COMMIT,
    "n_images": N,
    "side": SIDE,
    "width_mult": WIDTH,
    "scales": list(SCALES),
    "weight_seed": 7,
    "thresholds_pos": [o["th1"] for o in CONFIG["opt_configs"]],
    "thresholds_neg": [o["th2"] for o in CONFIG["opt_configs"]],
    "lambdas": [o["lamda"] for o in CONFIG["opt_configs"]],
    "runs": runs,
    "probe": probe_features(),
    "init": init_weights(),
}
OUT.write_text(json.dumps(out, indent=1) + "\n")
