#!/usr/bin/env bash
# Every GPU check of the image path, in one command, on a machine with one CUDA GPU:
#
#   bash benchmarks/gpu_all.sh OUT [CIFAR10_ROOT] [EPOCHS]
#
# 1. the GPU-only test (tests/test_gpu_path.py: bf16 and compile on CUDA, every preset);
# 2. benchmarks/gpu_check.py: every paper preset at full width in fp32 and bf16 ($STEPS timed
#    steps, default 200: pairs/s, peak memory, whether the loss falls, projected hours of 300
#    epochs), then clapp++ in bf16 with compile=true against eager;
# 3. where CIFAR10_ROOT holds CIFAR-10 (cifar-10-batches-py/, or train/ + test/ image trees:
#    extract the archives first), the clapp++ paper preset on it in bf16 for EPOCHS epochs
#    (default 2; the k-NN curve every epoch; the final probe on clean features, 30 epochs, all
#    50,000 training images), and the random encoder (epochs=0) under the same probe.
#
# 4. with PAPERS=1 (and CIFAR10_ROOT), the published protocols of the field's other local rules,
#    each as its preset ships (docs/local-rules.md has the time each is expected to take):
#    SoftHebb (one unsupervised epoch and its 50-epoch read-out), SCFF greedy (31 block-epochs)
#    and with every block at once, and LPL (800 epochs at batch 1024: the long one).
#
# About 6-10 minutes on one recent GPU (an estimate: not yet measured) without PAPERS=1. Logs go to OUT/*.log, the
# runs to OUT/runs/. Without a CUDA GPU it says so in one line and exits 0. Every step runs even
# when an earlier one fails; the exit status is that of the first failure.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_all.sh OUT [CIFAR10_ROOT] [EPOCHS]}
data=${2:-data/cifar10}
epochs=${3:-2}
steps=${STEPS:-200}
# absolute paths: the script moves to the repository
case $out in /*) ;; *) out=$PWD/$out ;; esac
case $data in /*) ;; *) data=$PWD/$data ;; esac
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1
if ! cuda=$("$py" -c 'import torch; print(torch.cuda.is_available())'); then
    echo "gpu_all: $py cannot import torch" >&2
    exit 1
fi
if [ "$cuda" != True ]; then
    echo "gpu_all: no CUDA GPU here (torch.cuda.is_available() is false); nothing to check"
    exit 0
fi
mkdir -p "$out/runs"
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, keep the first failure
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
"$py" -c 'import torch; print("gpu_all:", torch.__version__, torch.cuda.get_device_name(0))' \
    | tee "$out/device.log"
step tests "$py" -m pytest -q tests/test_gpu_path.py -k on_the_gpu
step gpu_check "$py" benchmarks/gpu_check.py --steps "$steps" --warmup 20
step gpu_compile "$py" benchmarks/gpu_check.py --presets clapp++ --precision bf16 --compile \
    --steps "$steps" --warmup 30
# 5. with two GPUs or more: the pipeline's NCCL path (one GPU per stage; NCCL refuses two ranks
#    on one GPU): two stages of the deep RHM network and its one-process run, and CLAPP++DFB's
#    top context one batch late on two stages against its one-process simulation.
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    rhm=(configs/rhm/clapp-per-block.yaml data.L=6 epochs=2 device=cuda progress=false)
    step pipeline_nccl torchrun --nproc_per_node=2 -m locallearn run "${rhm[@]}" \
        parallel.stages=2 --out "$out/runs/pipeline2"
    step pipeline_one "$py" -m locallearn run "${rhm[@]}" --out "$out/runs/pipeline1"
    if [ -d "$data/train" ] || [ -d "$data/cifar-10-batches-py" ]; then
        late=(configs/images/clapp++dfb-cpu.yaml data.root="$data" device=cuda epochs=1
              probe_every=1 progress=false parallel.feedback_delay=1)
        step late_nccl torchrun --nproc_per_node=2 -m locallearn run "${late[@]}" \
            parallel.stages=2 --out "$out/runs/late2"
        step late_one "$py" -m locallearn run "${late[@]}" --out "$out/runs/late1"
    fi
else
    echo "gpu_all: $gpus GPU(s); the pipeline's NCCL path needs two or more, left out"
fi
if [ -d "$data/train" ] || [ -d "$data/cifar-10-batches-py" ]; then
    real=(data.root="$data" device=cuda precision=bf16 progress=false probe_every=1
          probe.epochs=30 probe.augment=false)
    step cifar_clapp++ "$py" -m locallearn run configs/images/clapp++.yaml "${real[@]}" \
        epochs="$epochs" --out "$out/runs/clapp++"
    step cifar_random "$py" -m locallearn run configs/images/clapp++.yaml "${real[@]}" \
        epochs=0 --out "$out/runs/random"
    for run in clapp++ random; do
        [ -f "$out/runs/$run/summary.json" ] && cp "$out/runs/$run/summary.json" \
            "$out/summary_$run.json"
    done
    if [ "${PAPERS:-0}" = 1 ]; then
        for preset in softhebb scff scff-all lpl; do
            step "paper_$preset" "$py" -m locallearn run "configs/images/$preset.yaml" \
                data.root="$data" device=cuda progress=false --out "$out/runs/paper_$preset"
            [ -f "$out/runs/paper_$preset/summary.json" ] && cp \
                "$out/runs/paper_$preset/summary.json" "$out/summary_paper_$preset.json"
        done
    fi
else
    echo "gpu_all: no CIFAR-10 at $data (cifar-10-batches-py/ or train/ + test/); the real-data" \
        "runs are left out"
fi
exit $status
