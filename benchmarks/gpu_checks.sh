#!/usr/bin/env bash
# Every GPU check of the speed work in one prepared script, for a device machine whose python3 has a
# CUDA build of torch, torchvision and Triton (outputs go to $OUT, default ./gpu-out):
#   part a: CUDA tests, NCCL (world size 1), fixed cost per forward and single layers with the fused
#           Triton update and with the composed ops (BNCTL_TRITON=0), ResNet-50 steps in eager mode;
#   part b: ResNet-50 steps compiled (a few setups: each compilation takes a minute).
#     bash benchmarks/gpu_checks.sh a; bash benchmarks/gpu_checks.sh b
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
MODEL=(--device cuda --amp --torchvision resnet50 --batch 32 --size 224 --repeat 15)
case "${1:-a}" in
a)
    { nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -25 > "$OUT/tests.txt"; tail -3 "$OUT/tests.txt"
    timeout 60 python3 benchmarks/check_nccl.py 2>&1 | grep -v Warning > "$OUT/nccl.txt"; tail -4 "$OUT/nccl.txt"
    for t in 1 0; do
        BNCTL_TRITON=$t timeout 100 python3 benchmarks/profile_overhead.py --device cuda 2>&1 | tee "$OUT/overhead_triton$t.txt"
    done
    for t in 1 0; do
        BNCTL_TRITON=$t timeout 150 python3 benchmarks/bench_layers.py --device cuda --repeat 20 2>&1 | tee "$OUT/layers_triton$t.txt"
    done
    timeout 240 python3 benchmarks/bench_model.py "${MODEL[@]}" 2>&1 | tee "$OUT/model_eager.txt"
    ;;
b)
    timeout 60 python3 benchmarks/check_nccl.py 2>&1 | grep -v Warning > "$OUT/nccl.txt"; tail -4 "$OUT/nccl.txt"
    timeout 460 python3 benchmarks/bench_model.py "${MODEL[@]}" --compile --only torch,running_update 2>&1 \
        | grep -v Warning | tee "$OUT/model_compiled.txt"
    ;;
c)
    for d in cuda cpu; do
        timeout 150 python3 benchmarks/explain_compile.py --device $d --amp 2>&1 | grep -v Warn | tee "$OUT/explain_$d.txt"
    done
    timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_compile.py -k graph_break 2>&1 | tail -30 > "$OUT/compile_tests.txt"
    tail -30 "$OUT/compile_tests.txt"
    timeout 150 python3 benchmarks/bench_model.py "${MODEL[@]/32/128}" --only torch,running_update,fold 2>&1 | tee "$OUT/model_eager_b128.txt"
    ;;
d)
    timeout 100 python3 benchmarks/explain_compile.py --device cuda --amp --presets torch,running_update,frozen,renorm 2>&1 \
        | grep -v Warn | tee "$OUT/explain_cuda.txt"
    timeout 120 python3 benchmarks/profile_model.py --presets torch,running_update 2>&1 | grep -v Warn | tee "$OUT/profile_model.txt"
    timeout 200 python3 benchmarks/bench_model.py "${MODEL[@]}" --compile --only torch 2>&1 \
        | grep -v Warning | tee "$OUT/model_compiled.txt"
    ;;
esac
