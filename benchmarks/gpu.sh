#!/usr/bin/env bash
# The GPU benchmarks of issue 23, in one script: under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu.sh            # on the GPU machine; results in $OUT (default runs/gpu-<date>)
#   bash benchmarks/gpu.sh --tiny     # the same steps at tiny sizes, on any machine (a test)
#
# Each step writes a JSON file into $OUT:
#   largest_mlp.json    the largest MLP N whose memory estimate fits 90% of the device's memory
#                       (doubling from 16,384), run for 2 rounds: wall, peak memory, throughput
#   gnlenet_vmap.json   GN-LeNet (CIFAR-10) at N = 64, 256, 1,024: overhead, node-steps/s,
#   gnlenet_fast.json   compile time and bytes per node, with model_impl=vmap (one grouped
#                       convolution) against the CPU's hand-written per-node convolutions
#   overhead_mlp.json   the DivShare tick against local training only, MLP, N = 1,024-65,536
#   sweep64.json        a 64-point sweep (8 lr x 8 seeds of the quickstart): wall time
# GN-LeNet needs CIFAR-10 as $DATA_DIR/cifar10.npz (default ../shared/data); without it those
# two steps write {"skipped": ...}. Each step has its own time limit, so one slow step cannot
# take the others' time; a step that fails or times out is recorded as such and the rest run.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=""
[[ "${1:-}" == "--tiny" ]] && TINY="--tiny"
OUT=${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
DATA_DIR=${DATA_DIR:-../shared/data}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit; records a failure as JSON
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   done in $((SECONDS - t0)) s" >&2
  else
    local rc=$?
    echo "   FAILED (exit $rc) after $((SECONDS - t0)) s; see $OUT/$name.log" >&2
    [[ -s "$OUT/$name.json" ]] || echo "{\"failed\": true, \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" > "$OUT/$name.json"
  fi
}

$PY -c "import jax, json; d = jax.devices(); print(json.dumps({'jax': jax.__version__, 'platform': d[0].platform,
  'device': d[0].device_kind, 'count': len(d), 'memory': (d[0].memory_stats() or {}).get('bytes_limit')}))" \
  > "$OUT/device.json"
cat "$OUT/device.json" >&2

if [[ -n "$TINY" ]]; then
  LIMIT=0.5; START=16; MLP_N="16 32"; GN_N="16"; STEPS=2048; LR="0.01 0.02"; SEEDS=2
  GN_LIMIT=600; GN_STEPS=64; GN_FAST_N="16"; FAST_LIMIT=600; LARGE_LIMIT=120   # two GN-LeNet compiles on a CPU take minutes
else
  LIMIT=$($PY -c "import jax; b = (jax.devices()[0].memory_stats() or {}).get('bytes_limit'); print(round(0.9 * b / 1e9, 1) if b else 20)")
  START=16384; MLP_N="1024 4096 16384 65536"; GN_N="64 256 1024"; STEPS=$((1 << 22))
  LR="0.005 0.01 0.02 0.03 0.05 0.07 0.1 0.2"; SEEDS=8; GN_LIMIT=80; GN_STEPS=8192
  # the per-node convolutions are a CPU path: on an H200 N = 64 alone took most of 90 s
  GN_FAST_N="64"; FAST_LIMIT=45; LARGE_LIMIT=200   # 524,288 MLP nodes: 169 s on an H200 (2026-12-04)
fi

step largest_mlp "$LARGE_LIMIT" $PY benchmarks/largest.py --model mlp --limit-gb "$LIMIT" --start "$START" $TINY \
  --json "$OUT/largest_mlp.json"

for impl in vmap fast; do
  if [[ -n "$TINY" && "$impl" == vmap ]]; then  # one grouped convolution: many minutes on a CPU
    echo "{\"skipped\": \"--tiny: model_impl=vmap is for accelerators\"}" > "$OUT/gnlenet_$impl.json"
  elif [[ -f "$DATA_DIR/cifar10.npz" ]]; then
    if [[ "$impl" == vmap ]]; then nodes=$GN_N; limit=$GN_LIMIT; else nodes=$GN_FAST_N; limit=$FAST_LIMIT; fi
    step "gnlenet_$impl" "$limit" $PY benchmarks/scale.py --model gnlenet --nodes $nodes --node-steps "$GN_STEPS" \
      --data-dir "$DATA_DIR" --set "model_impl=$impl" $TINY --json "$OUT/gnlenet_$impl.json"
  else
    echo "{\"skipped\": \"no $DATA_DIR/cifar10.npz\"}" > "$OUT/gnlenet_$impl.json"
  fi
done

step overhead_mlp 80 $PY benchmarks/scale.py --model mlp --nodes $MLP_N --node-steps "$STEPS" $TINY \
  --json "$OUT/overhead_mlp.json"

SEEDLIST=$(seq -s, 0 $((SEEDS - 1)))
step sweep64 70 $PY benchmarks/sweep_wall.py --out "$OUT/sweep" --json "$OUT/sweep64.json" -- \
  configs/quickstart.yaml --grid "lr=${LR// /,}" --grid "seed=$SEEDLIST" \
  ${TINY:+--set n_nodes=8 duration_s=2 eval_every_s=1}
echo "results in $OUT" >&2
