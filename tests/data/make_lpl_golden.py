"""Reference numbers of the LPL loss from its authors' public code.

Usage: ``python tests/data/make_lpl_golden.py CODE_DIR OUT.json`` with the public code of the LPL
paper (Nat. Neurosci. 26:1906, 2023; commit 0210f55) exported into CODE_DIR, e.g.
``git -C <repo> archive 0210f55 | tar -x -C CODE_DIR``; run from the project root with locallearn
importable.

The code's loss module imports a training framework and its scheduler at the top; neither can be
installed beside this torch, and the loss does not use them. Minimal stand-ins are put in
``sys.modules`` before the import: a module base class that is ``torch.nn.Module`` with the
framework's ``save_hyperparameters`` (the constructor's arguments, keyword arguments included,
become ``self.hparams``) and a ``log`` that does nothing, and an empty scheduler name. The
code's own loss module, network and encoder then run unchanged.

The code's VGG-11 has fixed channels. To run it narrower, its encoder is built as is and its
eight blocks are replaced by blocks of the code's own block class with the channels of
``locallearn.nets.vgg.vgg11(WIDTH)`` and the max-pools read off the code's built blocks; their
weights are copied from that network. Each block's weight and bias are then multiplied by a
gain (recorded) that brings the mean over channels of the batch variance of the block's
globally pooled output to 1, so that the three terms of the loss have comparable sizes.
"""

import inspect
import json
import sys
import types

import torch
from torch import nn

CODE_DIR, OUT = sys.argv[1], sys.argv[2]
COMMIT = "0210f55"
N, WIDTH, SIDE = 8, 1 / 16, 32
SAMPLES = 6
#: (case, --no_pooling, pull_coeff, push_coeff, decorr_coeff)
CASES = (
    ("global", False, 1.0, 1.0, 10.0),
    ("global-pull", False, 1.0, 0.0, 0.0),
    ("global-push", False, 0.0, 1.0, 0.0),
    ("global-decorr", False, 0.0, 0.0, 1.0),
    ("none", True, 1.0, 1.0, 10.0),
)


class _Module(nn.Module):
    """Stand-in of the framework's module class: what the loss module uses of it."""

    def save_hyperparameters(self):
        found = dict(inspect.currentframe().f_back.f_locals)
        extra = found.pop("kwargs", {})
        for key in ("self", "__class__"):
            found.pop(key, None)
        self.hparams = types.SimpleNamespace(**found, **extra)

    def log(self, *args, **kwargs):
        pass


def _install_stand_ins():
    framework = types.ModuleType("pytorch_lightning")
    framework.LightningModule = _Module
    sched = types.ModuleType("pl_bolts.optimizers.lr_scheduler")
    sched.LinearWarmupCosineAnnealingLR = None  # configure_optimizers is not called here
    sys.modules["pytorch_lightning"] = framework
    sys.modules["pl_bolts"] = types.ModuleType("pl_bolts")
    sys.modules["pl_bolts.optimizers"] = types.ModuleType("pl_bolts.optimizers")
    sys.modules["pl_bolts.optimizers.lr_scheduler"] = sched


_install_stand_ins()
sys.path.insert(0, CODE_DIR)
from models.encoders import ConvBlock  # noqa: E402  (the paper's code, run, not copied)
from models.module import LPL  # noqa: E402

from locallearn.nets.vgg import vgg11  # noqa: E402


def stats(t, seed):
    flat = t.detach().flatten()
    idx = torch.randint(flat.numel(), (SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()),
            "index": idx.tolist(), "values": flat[idx].tolist()}


def views():
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(N, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    v2 = v1 + 0.5 * torch.randn(N, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    return v1, v2


def our_net():
    """vgg11(WIDTH, seed=0) in float64 with each block scaled to unit mean pooled variance."""
    net = vgg11(WIDTH, seed=0).double()
    h = torch.cat(views())
    gains = []
    with torch.no_grad():
        for block in net.blocks:
            z = block(h).mean(dim=(2, 3))
            gain = float(z.var(0).mean()) ** -0.5
            block.pre.weight.mul_(gain)
            block.pre.bias.mul_(gain)
            gains.append(gain)
            h = block(h)
    return net, gains


def code_model(net, no_pooling, pull, push, decorr):
    model = LPL(encoder="vgg", no_pooling=no_pooling, pull_coeff=pull, push_coeff=push,
                decorr_coeff=decorr, shuffle_positives=False, stale_estimates=False)
    encoder = model.network.encoder
    pools = [isinstance(b.module[2], nn.MaxPool2d) for b in encoder.blocks]
    blocks = []
    for ours, pool in zip(net.blocks, pools):
        conv = ours.pre
        block = ConvBlock(conv.in_channels, conv.out_channels, pooling=pool)
        block.module[0].load_state_dict(conv.state_dict())
        blocks.append(block)
    encoder.blocks = nn.ModuleList(blocks)
    return model.double()


net, gains = our_net()  # built in float32, as vgg11 is, then made float64
torch.set_default_dtype(torch.float64)  # the code stores the per-layer terms in this dtype
v1, v2 = views()
batch = ((v1, v2, None), None)
out = {"about": "", "commit": COMMIT, "n_images": N, "width_mult": WIDTH, "side": SIDE,
       "gains": gains, "cases": {}}
for case, no_pooling, pull, push, decorr in CASES:
    torch.manual_seed(0)  # the code draws a permutation every step (unused here)
    model = code_model(net, no_pooling, pull, push, decorr)
    with torch.no_grad():
        terms = [t.tolist() for t in model.loss_step(batch)]
    total = model.training_step(batch, 0)
    total.backward()
    grads = {}
    for level, block in enumerate(model.network.encoder.blocks):
        conv = block.module[0]
        for kind, p in (("weight", conv.weight), ("bias", conv.bias)):
            grads[f"blocks.{level}.pre.{kind}"] = stats(p.grad, 100 + 2 * level + (kind == "bias"))
    out["cases"][case] = {"no_pooling": no_pooling, "coefficients": [pull, push, decorr],
                          "pull": terms[0], "push": terms[1], "decorr": terms[2],
                          "total": float(total.detach()), "grads": grads}
    print(case, round(float(total.detach()), 6))
out["about"] = (
    f"Reference values of the LPL loss from running the public code of the LPL paper (commit "
    f"{COMMIT}; its models/module.py LPL.loss_step and training_step, its models/encoders.py "
    "VGG11Encoder forward and ConvBlock) in float64 (default dtype float64) with stand-ins for the "
    "training framework it imports. Network: the code's encoder with its blocks replaced by the "
    "code's ConvBlock at the channels of locallearn.nets.vgg.vgg11(width_mult, seed=0) (max-pools "
    "as in the code's blocks), weights copied from that network after multiplying each block's "
    "weight and bias by gains[l] (chosen in order so that the mean over channels of the batch "
    "variance of the block's globally pooled output over both views is 1). Views: g = "
    "torch.Generator().manual_seed(1); v1 = randn(n, 3, side, side, generator=g); v2 = v1 + 0.5 * "
    "randn(same shape, generator=g), float64. Cases: the code's no_pooling flag and its "
    "(pull_coeff, push_coeff, decorr_coeff); pull, push, decorr: the code's per-layer terms "
    "(loss_step); total: training_step's loss; grads: the gradients of total, per block of "
    "locallearn's names, summarised by sum, sum of squares and the values at flat indices drawn "
    "with torch.randint(numel, (6,), generator=manual_seed(100 + 2 * block + is_bias))."
)
with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1)
