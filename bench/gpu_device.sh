#!/bin/bash
# The one prepared command for a lent GPU machine (../shared/gpu/NOTES.md): install the carried wheels, build
# the demo data, run the CUDA tests, then bench/gpu.py. Each step runs under a time cap and tees its output
# to $OUT/<step>.txt as it goes; $OUT/steps.txt lists each step's exit code and seconds. The whole stays
# under BUDGET_S (default 540 s): bench/gpu.py's parts scale their caps to the time that is left.
#
# From the repository root, with .whl/ (cp312 wheels, see bench/README.md "GPU") carried along:
#     OUT=/tmp/out bash bench/gpu_device.sh
set -u
OUT=${OUT:?set OUT to the folder that comes back}
WORK=${WORK:-/tmp/almdn-gpu-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
end=$(($(date +%s) + ${BUDGET_S:-540}))
left() { echo $((end - $(date +%s))); }

step() { # step NAME CAP_S COMMAND...: under min(CAP_S, time left), tee'd to $OUT/NAME.txt
    local name=$1 cap=$2 t start rc
    shift 2
    t=$(left)
    ((t > cap)) && t=$cap
    if ((t < 15)); then
        echo "$name: skipped, $(left) s left of the budget" | tee "$OUT/$name.txt" >>"$OUT/steps.txt"
        return
    fi
    start=$(date +%s)
    timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc in $(($(date +%s) - start)) s (cap $t s)" | tee -a "$OUT/$name.txt" >>"$OUT/steps.txt"
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    free -g | head -2
    python3 -V
    ls -l .whl
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
    python3 -c "import torch, ray, ray.data, ray.train.torch, pycocotools.coco, pydantic, jsonschema, pynvml
print('torch', torch.__version__, 'ray', ray.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name())"
}

demo_data() {
    if [ -f data/demo/pool.json ]; then
        echo "data/demo is there"
        return
    fi
    python3 -m almdn_ray data demo data/demo --images 600 --test-images 200 --size 160
}

export -f environment demo_data
: >"$OUT/steps.txt"
step 0-environment 60 bash -c environment
step 1-demo-data 60 bash -c demo_data
step 2-cuda-tests 150 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests/
step 3-gpu-bench 600 python3 bench/gpu.py --workdir "$WORK" --budget-s $(($(left) - 30))
cp "$WORK/run.log" "$WORK/run/logs/driver.log" "$WORK/run/state.json" "$OUT/" 2>/dev/null
echo "done, $(left) s left of the budget" | tee -a "$OUT/steps.txt"
