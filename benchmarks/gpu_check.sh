#!/usr/bin/env bash
# One short GPU lease, used well: everything issue 15 could not measure without a GPU, in one
# run of under 8 minutes on an H100 / H200, offline, writing one summary file.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --smoke    # (or SMOKE=1) the same steps on the CPU, tiny sizes
#
# Prepare once, on a machine with the internet, in the repository root (the GPU machine has
# PyTorch but no network; these travel with the working tree, 30 MB in all):
#
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 pooch==1.9.0 platformdirs==4.5.1
#   mkdir -p .gpudata && cp -r ../shared/data/{abdomen_ct,chest_ct,dicom_ct,head_ct} .gpudata/
#
# and carry `.whl` and `.gpudata` to the machine (the device tool: carry [".whl", ".gpudata"]).
#
# Steps, most important first, each under `timeout` within a 430 s budget (a step that fails
# or runs out of time is logged and the next one runs); [seconds each may take on a GPU]:
#   0. install the wheels into /tmp/site (no network); versions, nvidia-smi, default workers
#   1. pretrain_throughput --preset base: ours vs MONAI MaskedAutoEncoderViT at batch 2 (MONAI
#      keeps every 4,096^2 attention matrix: ~26 GB there, out of memory at 16), decoder heads
#      8 and 16: speed, peak memory, util vs the measured matmul peak and the spec, SDPA
#      backend                                                                           [ 60 s]
#   2. ours at batch 16 (the preset), 2 and 8 x decoder heads 8 and 16 (utilisation vs batch
#      size and head width), and the real fit() fed by the real loader (api.pretrain) at the
#      preset beside its synthetic step                                                  [110 s]
#   3. attention.py: every SDPA kernel and MONAI-style explicit attention at the decoder's
#      (4096 tokens, 512 wide, 16 and 8 heads) and the encoder's shapes                  [ 30 s]
#   4. `maesil pretrain --preset base` on the shared CT (200 steps), nvidia-smi sampled every
#      0.5 s                                                                             [ 90 s]
#   5. segment_full_ct.py: `maesil segment` on a 512 x 512 x 400 CT, bf16 vs fp32, 16 vs 4
#      windows per pass, with peak RSS                                                   [150 s]
#   6. pretrain_throughput --preset mim-med3d: ours vs MONAI                             [ 45 s]
#   7. torch.compile at base, batch 16 (if 90 s of the budget are left)
#   8. summary.md (benchmarks/gpu_summary.py) and results.tar.gz into $OUT
# Install, steps and summary: under 8 minutes by design. Untested on a GPU so far.
#
# Knobs (environment): OUT (./gpu_check_out), WORK (/tmp/gpu_check), PY (python3), DATA
# (./.gpudata, else ../shared/data), BUDGET_S (430: seconds for steps 1-7), SMOKE (1: CPU,
# with CAP_SCALE 8 and SMOKE_BUDGET_S 3600), PRETRAIN_STEPS (200), SKIP_INSTALL (1: use what
# is installed).
set -u
set -o pipefail

[ "${1:-}" = "--smoke" ] && SMOKE=1
SMOKE=${SMOKE:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-430}
START=$SECONDS
mkdir -p "$OUT" "$WORK"
rm -f "$WORK"/status.txt
exec > >(tee "$OUT/gpu_check.log") 2>&1

log() { echo "[gpu_check +$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
# run NAME CAP_SECONDS COMMAND...: under timeout min(CAP x CAP_SCALE, budget left); output to
# $WORK/NAME.log
run() {
  local name=$1 cap=$(($2 * CAP_SCALE))
  shift 2
  local t
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    log "skip $name: budget spent"
    echo "$name: skipped (budget spent)" >>"$WORK/status.txt"
    return 1
  fi
  log "$name (timeout ${t}s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$t" "$@" 2>&1 | grep -v -E "UserWarning|warnings.warn|return _VF|mode = self" | tee "$WORK/$name.log"
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (timeout $t s)" | tee -a "$WORK/status.txt"
  return $rc
}

# ------------------------------------------------------------------ 0. environment
if [ -z "${DATA:-}" ]; then
  if [ -d "$ROOT/.gpudata/chest_ct" ]; then DATA=$ROOT/.gpudata; else DATA=$ROOT/../shared/data; fi
fi
export MAESIL_DATA=$DATA PYTHONUNBUFFERED=1
SITE=/tmp/site
if [ "${SKIP_INSTALL:-0}" != 1 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls "$ROOT"/.whl | tr '\n' ' ') into $SITE (no network)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"/.whl/*.whl || log "WARNING: wheel install failed"
else
  log "no wheels in .whl (or SKIP_INSTALL=1): using what is installed"
fi
export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
if [ "$SMOKE" = 1 ]; then  # the code paths, not the figures: small sizes, generous time
  CAP_SCALE=${CAP_SCALE:-8}; BUDGET_S=${SMOKE_BUDGET_S:-3600}
  DEVICE=cpu; BASE=smoke; MIM=smoke; BATCHES="4 2"; BATCH_MONAI=2; HEADS="4 2"; STEPS=2; ROUNDS=1
  PRETRAIN_STEPS=${PRETRAIN_STEPS:-20}; SLICES=48; SEG_PRESET=smoke; FED=10
  ATTN=(--tokens 64 --width 64 --heads 4 2 --batch 2 --iters 1 --rounds 2)
  ATTN_ENC=(--tokens 16 --width 96 --heads 3 --batch 2 --iters 1 --rounds 2)
else
  CAP_SCALE=${CAP_SCALE:-1}
  DEVICE=cuda; BASE=base; MIM=mim-med3d; BATCHES="16 2 8"; BATCH_MONAI=2; HEADS="8 16"; STEPS=10
  ROUNDS=3; PRETRAIN_STEPS=${PRETRAIN_STEPS:-200}; SLICES=400; SEG_PRESET=base; FED=40
  ATTN=(--tokens 4096 --width 512 --heads 16 8 --batch 2)
  ATTN_ENC=(--tokens 1024 --width 768 --heads 12 --batch 2)
fi
$PY - >"$WORK/env.json" <<'PYEOF'
import json, os, platform, subprocess
import torch
env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cpus": os.cpu_count(),
       "affinity_cpus": len(os.sched_getaffinity(0))}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
               multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
               flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
               mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
               cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled())
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        env["driver"] = f"nvidia-smi: {exc}"
try:
    import monai, nibabel, pydicom
    from maesil_core.data.datasets import default_workers
    env.update(monai=monai.__version__, nibabel=nibabel.__version__, pydicom=pydicom.__version__,
               default_workers_on_gpu=default_workers("cuda"))
except Exception as exc:  # noqa: BLE001
    env["import_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(env, indent=1))
PYEOF
cat "$WORK/env.json"
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
log "data: $DATA; device $DEVICE; smoke $SMOKE"
CT=("$DATA/abdomen_ct/ct.nii.gz" "$DATA/chest_ct/ct.nii.gz" "$DATA/dicom_ct" "$DATA/head_ct/ct_not_hu.nii.gz")
T0=$SECONDS
B=benchmarks

# ------------------------------------------------------------------ 1-3. throughput
# MONAI keeps every 4,096^2 attention matrix: compared at the old batch of 2 (about 26 GB)
# shellcheck disable=SC2086
run bench_base 60 $PY $B/pretrain_throughput.py --preset $BASE --device $DEVICE --models ours monai \
  --batch-size $BATCH_MONAI --decoder-heads $HEADS --steps $STEPS --warmup 3 --rounds $ROUNDS \
  --out "$WORK/bench_base.json"
# ours at the preset's batch first (the fed step uses it), then the others
# shellcheck disable=SC2086
run sweep_base 110 $PY $B/pretrain_throughput.py --preset $BASE --device $DEVICE --models ours \
  --batch-size $BATCHES --decoder-heads $HEADS --steps $STEPS --warmup 2 --rounds $ROUNDS \
  --fed-steps $FED --data "${CT[@]}" --out "$WORK/sweep_base.json"
run attention 30 bash -c "$PY $B/attention.py --device $DEVICE ${ATTN[*]} --out $WORK/attention_dec.json && \
  $PY $B/attention.py --device $DEVICE ${ATTN_ENC[*]} --out $WORK/attention_enc.json"

# ------------------------------------------------------------------ 4. maesil pretrain, GPU sampled
pretrain() {  # pretrain TAG [extra flags]
  local tag=$1
  shift
  local smi=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm \
      --format=csv,noheader,nounits -lms 500 >"$WORK/smi_$tag.csv" 2>/dev/null &
    smi=$!
  fi
  run "pretrain_$tag" 90 $PY -m maesil_core pretrain --data "${CT[@]}" --out "$WORK/run_$tag" \
    --preset $BASE --device $DEVICE --steps "$PRETRAIN_STEPS" --force "$@"
  [ -n "$smi" ] && kill "$smi" 2>/dev/null && wait "$smi" 2>/dev/null
  [ -f "$WORK/run_$tag/metrics.csv" ] && tail -5 "$WORK/run_$tag/metrics.csv"
}
pretrain default_workers

# ------------------------------------------------------------------ 5. whole-CT segmentation
# shellcheck disable=SC2086
run segment 150 $PY $B/segment_full_ct.py --work "$WORK/segment" --device $DEVICE --preset $SEG_PRESET \
  --train-steps 2 --slices $SLICES --precision bf16 fp32 --sw-batch-size 16 4 --rounds 1 \
  --out "$WORK/segment.json"

# ------------------------------------------------------------------ 6-7. mim-med3d, torch.compile
run bench_mim 45 $PY $B/pretrain_throughput.py --preset $MIM --device $DEVICE --models ours monai \
  --steps $STEPS --warmup 3 --rounds $ROUNDS --out "$WORK/bench_mim.json"
if [ "$(left)" -ge 90 ]; then
  run compile_base $(($(left) / CAP_SCALE)) $PY $B/pretrain_throughput.py --preset $BASE --device $DEVICE \
    --models ours --compile no yes --steps $STEPS --warmup 2 --rounds $ROUNDS --memory no \
    --out "$WORK/compile_base.json"
else
  log "skip compile_base: $(left) s left"
  echo "compile_base: skipped ($(left) s left)" >>"$WORK/status.txt"
fi

# ------------------------------------------------------------------ 8. summary
log "summary"
timeout 60 $PY $B/gpu_summary.py "$WORK" "$OUT/summary.md" >/dev/null || cp "$WORK/status.txt" "$OUT/summary.md"
(cd "$WORK" && timeout 60 tar czf "$OUT/results.tar.gz" --exclude='*.safetensors' --exclude='*.nii.gz' \
  --exclude='cache' --exclude='tensorboard' --exclude='*.png' ./*.json ./*.log ./*.csv ./*.txt \
  run_*/metrics.csv run_*/config.json segment/*.log 2>/dev/null)
cat "$OUT/summary.md"
log "done in $((SECONDS - START)) s (steps 1-7: $((SECONDS - T0)) s of a $BUDGET_S s budget)"
