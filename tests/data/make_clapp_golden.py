"""Reference numbers of the CLAPP / CLAPP++ layer-wise loss from the paper's public code.

Usage: ``python tests/data/make_clapp_golden.py PAPER_CODE_DIR OUT.json`` with the paper's public
code (arXiv 2601.21683, commit c4ea488e26be1bae01272b4e83349403221f5f26) checked out in
PAPER_CODE_DIR; run from the project root with locallearn importable.
"""

import json
import sys

import torch

CODE_DIR, OUT = sys.argv[1], sys.argv[2]  # sys.argv is rewritten below for the code's parser
sys.path.insert(0, CODE_DIR)
from vision.arg_parser import arg_parser  # noqa: E402  (the paper's code, run, not copied)
from vision.models.SSLLoss import CPLoss  # noqa: E402

from locallearn.nets.vgg import vgg6  # noqa: E402

N, WIDTH, SIDE = 5, 1 / 16, 32
SAMPLES = 6


def stats(t, seed):
    flat = t.detach().flatten()
    idx = torch.randint(flat.numel(), (SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()),
            "index": idx.tolist(), "values": flat[idx].tolist()}


out = {"about": "", "n_images": N, "width_mult": WIDTH, "side": SIDE, "rules": {}}
for name, pool in (("clapp", None), ("clapp++", "4-4-4-2-2-1")):
    sys.argv = ["x", "--asymmetric_W_pred"] + (["--customize_loss_pool", pool] if pool else [])
    opt = arg_parser.parse_args()
    opt.device = torch.device("cpu")
    torch.manual_seed(0)
    net = vgg6(WIDTH, seed=0).double()
    x = torch.randn(2 * N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    h, h_list = x, []
    for block in net.blocks:
        h = block(h.detach())
        h_list.append(h)
    loss_mod = CPLoss(opt, [tuple(t.shape) for t in h_list]).double()
    Ws = []
    pooled = loss_mod.process_reps([t.detach() for t in h_list])
    for i, W in enumerate(loss_mod.W_k):
        d = W.weight.shape[0]
        g = torch.Generator().manual_seed(10 + i)
        norm2 = float((pooled[i] ** 2).sum(1).mean())  # scores of order 1.5: both hinge branches
        with torch.no_grad():
            W.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) * 1.5 / norm2)
        Ws.append(W.weight)
    torch.set_default_dtype(torch.float64)  # the code keeps per-block losses in this dtype
    loss_dict, *_ = loss_mod(h_list)
    torch.set_default_dtype(torch.float32)
    losses = loss_dict["loss"][0]
    losses.sum().backward()
    # how many hinge terms are active (a check that the numbers test both branches)
    rec = {"block_losses": losses.tolist(), "pools": pool,
           "net_grads": {k: stats(p.grad, 100 + j) for j, (k, p) in
                         enumerate(net.named_parameters())},
           "B_grads": [stats(W.grad, 200 + i) for i, W in enumerate(Ws)],
           "B_dims": [W.shape[0] for W in Ws], "B_channels": [t.shape[1] for t in h_list]}
    out["rules"][name] = rec
    print(name, [round(v, 6) for v in losses.tolist()])
out["about"] = (
    "Reference values of the layer-wise CLAPP (global pooling) and CLAPP++ (pool sizes "
    "4-4-4-2-2-1) hinge losses from running the public code of arXiv 2601.21683 (its CPLoss with "
    "--asymmetric_W_pred and its default next-sample negatives) in float64 on: the VGG-6 of "
    "locallearn.nets.vgg.vgg6(width_mult, seed=0) in float64, 2N views "
    "torch.randn(2N, 3, side, side, generator=manual_seed(1)) stacked [view1; view2], each "
    "block's input detached, and prediction matrices W_l = randn(D, D, generator=manual_seed("
    "10 + l)) * 1.5 / mean_rows(|p_l|^2) (p_l: the pooled block output) in the code's "
    "channel-major flattening "
    "of the pooled map. block_losses: the "
    "code's per-block loss (mean over the 2N rows); net_grads and B_grads: the gradients of their "
    "sum, summarised by sum, sum of squares and the values at seeded flat indices."
)
with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1)
