"""The image presets on a GPU: speed, peak memory, a falling loss, and the time of 300 epochs.

For each paper preset (``configs/images/<preset>.yaml``: VGG-6 at full width, batch 32 pairs,
AdamW) and each precision (``fp32``, ``bf16`` autocast) it trains on CIFAR-10-shaped data held on
the GPU (smooth random colour fields, 32x32, a fresh image at every draw of an epoch; the views are
the presets' own augmentations, computed on the device) through the library's training loop, and
prints:

- pairs/s over ``--steps`` timed steps (after ``--warmup`` steps that also absorb compilation);
- the peak ``torch.cuda.max_memory_allocated`` of the timed steps;
- the mean loss of the first and of the last tenth of the timed steps, and whether it fell;
- the projected time of the paper's 300 epochs of CIFAR-10 (50,000 images, 1,563 steps each);
- with ``--compile``: the same with ``compile=true``, and the relative difference from the
  uncompiled run (same seed, same views) of the mean loss of steps 2-11. The first step's loss
  is no test: ``B`` starts at zero, where the loss is a constant and the encoder's gradient
  zero; from the second step on the loss depends on the encoder's forward and backward pass.

Without a CUDA GPU it prints one line and exits 0. ``--device cpu`` runs the same code on the
CPU (use a small ``--width`` and few steps: it checks the script, not a GPU).

    python benchmarks/gpu_check.py [--presets clapp++ bp-infonce ...] [--steps 300]
        [--warmup 20] [--precision fp32 bf16] [--compile] [--width 1.0] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("clapp", "clapp++", "clapp++dfb", "clapp++both", "bp-clapp++", "bp-infonce", "ff",
           "infonce")
CIFAR_TRAIN = 50_000
PAPER_EPOCHS = 300


class SyntheticCifar:
    """A CIFAR-10-shaped task on the device: smooth random colour fields, 10 fake classes."""

    chance = 0.1

    def __init__(self, cfg, device: torch.device, n_images: int, seed: int = 0):
        from locallearn.data.augment import SSLViews
        from locallearn.data.images import dataset_info

        self.cfg = cfg
        self.device = device
        self.rule_info: dict = {}
        self.info: dict = {}
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n_images, 3, 4, 4, generator=gen)
        fine = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear",
                                               align_corners=False)
        noise = 0.1 * torch.randn(n_images, 3, 32, 32, generator=gen)
        self.images = ((fine + noise).clamp(0, 1) * 255).to(torch.uint8).to(device)
        info = dataset_info("cifar10")
        self.mean, self.std = info.mean, info.std
        self.views = SSLViews("cifar10", mean=self.mean, std=self.std).to(device)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """As the image task's: the constants stay on the device (no copy per step)."""
        from locallearn.data.augment import normalize

        return normalize(images, None, self.views.mean, self.views.std)

    def build_net(self):
        from locallearn.nets.vgg import vgg6

        c = self.cfg
        net = vgg6(c.net.width_mult, bias=c.net.bias, seed=c.seed).to(self.device)
        return net.to(memory_format=torch.channels_last) if c.net.channels_last else net

    def sample_input(self) -> torch.Tensor:
        return self.transform(self.images[:2])

    def check_rule(self, rule) -> None:
        return None

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.images.shape[0] // batch_size

    def batches(self, generator, batch_size, view_kind):
        from locallearn.rules.base import Batch

        n = self.images.shape[0]
        perm = torch.randperm(n, generator=generator).to(self.device)
        for start in range(0, n - batch_size + 1, batch_size):
            x = self.images[perm[start : start + batch_size]]
            yield Batch(self.transform(x), None, self.views.two_views(x), generator)

    def evaluate(self, net, rule) -> dict:
        return {}


def check(preset: str, precision: str, compiled: bool, args: argparse.Namespace) -> dict:
    """Train ``preset`` for warm-up + timed steps; return the measurements."""
    from locallearn.schema import load_config
    from locallearn.train import Trainer

    overrides = [f"device={args.device}", f"precision={precision}", f"compile={compiled}",
                 f"net.width_mult={args.width}", "progress=false"]
    cfg = load_config(ROOT / "configs" / "images" / f"{preset}.yaml", overrides)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    task = SyntheticCifar(cfg, device, (args.warmup + args.steps) * cfg.batch_size)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, task, out)
    losses: list[float] = []
    compute = trainer.rule.compute_grads

    def recorded(net, batch):
        metrics = compute(net, batch)
        losses.append(float(metrics["loss"]))
        return metrics

    trainer.rule.compute_grads = recorded  # type: ignore[method-assign]
    timed_from = {"t": 0.0}
    original_step = trainer.opt.step

    def step_and_mark(*a, **k):
        result = original_step(*a, **k)
        if len(losses) == args.warmup:  # the warm-up ends: start the clock and the memory
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            timed_from["t"] = time.perf_counter()
        return result

    trainer.opt.step = step_and_mark  # type: ignore[method-assign]
    if args.warmup == 0:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        timed_from["t"] = time.perf_counter()
    trainer.train_epoch()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - timed_from["t"]
    timed = losses[args.warmup :]
    tenth = max(len(timed) // 10, 1)
    first = sum(timed[:tenth]) / tenth
    last = sum(timed[-tenth:]) / tenth
    per_step = seconds / max(len(timed), 1)
    steps_per_epoch = -(-CIFAR_TRAIN // cfg.batch_size)
    return {
        "preset": preset, "precision": precision, "compile": compiled,
        "pairs_per_s": len(timed) * cfg.batch_size / seconds,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan"),
        "loss_first": first, "loss_last": last, "falls": last < first,
        "early_loss": sum(losses[1:11]) / len(losses[1:11]),
        "hours_300": per_step * steps_per_epoch * PAPER_EPOCHS / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--steps", type=int, default=300, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="also time compile=true")
    p.add_argument("--width", type=float, default=1.0, help="net.width_mult (1: the paper's)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    args = p.parse_args(argv)
    if args.steps < 10 or args.warmup < 0:
        p.error("--steps must be >= 10 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing measured (use --device cpu to "
              "try the script itself)")
        return 0
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, width {args.width:g}, "
          f"{args.warmup} warm-up + {args.steps} timed steps of 32 pairs per run")
    if args.device.startswith("cuda") and "bf16" in args.precision:
        major, minor = torch.cuda.get_device_capability(args.device)
        if major < 8:
            print(f"note: compute capability {major}.{minor} has no native bf16 (8.0 and up "
                  "have): the bf16 rows time an emulation")
    head = (f"{'preset':<12} {'prec':<5} {'compile':<7} {'pairs/s':>8} {'peak MiB':>9} "
            f"{'loss first->last':>18} {'falls':>5} {'300 ep h':>8} {'vs eager':>9}")
    print(head)
    for preset in args.presets:
        for precision in args.precision:
            modes = [False, True] if args.compile else [False]
            eager = None
            for compiled in modes:
                r = check(preset, precision, compiled, args)
                if not compiled:
                    eager = r["early_loss"]
                diff = ("" if not compiled or not eager else
                        f"{abs(r['early_loss'] - eager) / abs(eager):.1e}")
                print(f"{preset:<12} {precision:<5} {str(compiled).lower():<7} "
                      f"{r['pairs_per_s']:>8.0f} {r['peak_mib']:>9.0f} "
                      f"{r['loss_first']:>8.4f}->{r['loss_last']:<8.4f} "
                      f"{'yes' if r['falls'] else 'no':>5} {r['hours_300']:>8.2f} {diff:>9}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
