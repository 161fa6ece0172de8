"""Reference numbers of SoftHebb's update from its authors' single-file reference code.

Usage: ``python tests/data/make_softhebb_golden.py REF_DIR OUT.json`` with the reference file
``demo.py`` of the SoftHebb paper's public code (ICLR 2023, commit
f4252307633ba38a26ab52504f5fd40352f5a6fd) in REF_DIR; run from the project
root with locallearn importable. The reference imports torchvision only for its dataset class,
which is not used here: a stand-in module is put in its place before the import.

The reference network (three blocks of batch norm, SoftHebb convolution, triangle and pool) runs
one unsupervised step in float64 on a seeded batch of 10 images, its batch norms in training mode
as in its training loop; recorded per block: the normalised update ``dW`` it stores in ``.grad``,
the per-neuron rates of its learning-rate scheduler, the weights after its optimiser's step, the
batch norms' running statistics, and the flattened top-block output in eval mode after the step.
"""

import json
import sys
import types

import torch

REF_DIR, OUT = sys.argv[1], sys.argv[2]
# the reference passes torch 1.7's `verbose` argument to the scheduler base, which newer torch
# releases no longer take: drop it (it only switched printing on)
_base_init = torch.optim.lr_scheduler.LRScheduler.__init__
torch.optim.lr_scheduler.LRScheduler.__init__ = (
    lambda self, optimizer, last_epoch=-1, verbose=False: _base_init(self, optimizer, last_epoch))
stub = types.ModuleType("torchvision")
stub.datasets = types.SimpleNamespace(CIFAR10=object)  # the reference's dataset base class
sys.modules["torchvision"] = stub
sys.path.insert(0, REF_DIR)
import demo  # noqa: E402  (the reference code, run, not copied)

N, SIDE, SAMPLES = 10, 32, 8


def stats(t, seed):
    flat = t.detach().flatten()
    idx = torch.randint(flat.numel(), (SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()),
            "index": idx.tolist(), "values": flat[idx].tolist()}


torch.manual_seed(0)
model = demo.DeepSoftHebb().double()
convs = [model.conv1, model.conv2, model.conv3]
bns = [model.bn1, model.bn2, model.bn3]
g = torch.Generator().manual_seed(3)
with torch.no_grad():
    for conv in convs:  # the reference's initial scale, drawn here from a seeded generator
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64)
                          * 25 / fan_in ** 0.5)
initial = [conv.weight.detach().clone() for conv in convs]
x = torch.rand(N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

opt = demo.TensorLRSGD([{"params": convs[0].parameters(), "lr": -0.08},
                        {"params": convs[1].parameters(), "lr": -0.005},
                        {"params": convs[2].parameters(), "lr": -0.01}], lr=0)
sched = demo.WeightNormDependentLR(opt, power_lr=0.5)
rates = [group["lr"].detach().clone() for group in opt.param_groups]
model.train()
opt.zero_grad()
with torch.no_grad():
    model(x)
updates = [conv.weight.grad.detach().clone() for conv in convs]
opt.step()
model.eval()
with torch.no_grad():
    h = x
    for conv, bn, act, pool in zip(convs, bns, [model.activ1, model.activ2, model.activ3],
                                   [model.pool1, model.pool2, model.pool3]):
        h = pool(act(conv(bn(h))))

out = {
    "about": ("SoftHebb reference demo.py (public code of arXiv 2209.11883 at commit f425230), "
              "float64, torch " + torch.__version__ + "; one training step of DeepSoftHebb on "
              "torch.rand(10, 3, 32, 32) seeded 1, weights N(0,1)*25/sqrt(fan_in) drawn from a "
              "generator seeded 3 in the order conv1, conv2, conv3; optimiser TensorLRSGD with "
              "rates -0.08, -0.005, -0.01 and WeightNormDependentLR(power 0.5)"),
    "n_images": N, "side": SIDE, "init_seed": 3, "input_seed": 1,
    "blocks": [],
    "top_eval": stats(h, 100),
}
for k in range(3):
    out["blocks"].append({
        "initial_weight": stats(initial[k], 10 + k),
        "update": stats(updates[k], 20 + k),
        "rates": stats(-rates[k], 30 + k),  # the reference stores them as negative rates
        "weight_after": stats(convs[k].weight, 40 + k),
        "running_mean": stats(bns[k].running_mean, 50 + k),
        "running_var": stats(bns[k].running_var, 60 + k),
    })
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", OUT)
