#!/usr/bin/env bash
# One GPU-machine session, as a single command: install the carried wheels, run the GPU tests,
# time the classifier's model step with its layers on cuDNN or on the Triton kernels, its augmentation
# by torch's operators against the fused kernel, the hand-over of a batch from a DataLoader worker and the input path with and without the batch ring, then
# bench_gpu.py, each classifier convolution both ways, then (with MODELS_DIR) diagnosis of several
# CTs without and with --prefetch; the curve step trains the nodule classifier on a small synthetic set with
# --kernels torch and with --kernels triton (same seed, data and batches) and prints both loss curves.
# Logs and the JSON figures go to $OUT (default /tmp/gpu_session).
#
#   bash bench/gpu_session.sh [MODELS_DIR] [bench_gpu.py options...]
#
# STEPS picks the steps (default all, in this order): tests, curve, sweep, augment, transfer, cutting, input,
# distance, step, gpu, layers, series. CURVE_EPOCHS, CURVE_EPOCH_SIZE, CURVE_BATCH (default 5, 4096, 256) and
# CURVE_DEVICE (cuda) size the curve step.
# Everything does not fit one 10-minute device call; split it. On an H200 on 2026-11-27,
#   TEST_TIMEOUT=130 SWEEP_TIMEOUT=100 BENCH_TIMEOUT=240 LAYER_TIMEOUT=60 STEPS=tests,sweep,gpu,layers \
#       bash bench/gpu_session.sh --seconds 3 --sections classifier --skip-compile --worker-sweep 8
# took 459 s of command time, plus about 40 s to start the machine; the tests took about 130 s
# (Triton compiles each kernel form on first use; the second run on a machine reuses its cache).
# Diagnosis and the segmenter need a call of their own, e.g.
#   STEPS=gpu,series bash bench/gpu_session.sh .device-models --sections diagnosis,segmenter
# Not yet run on a GPU machine (added 2026-11-27 without one): the augment and distance steps,
# tests/kernels/test_resample.py, the copy-stream test in tests/test_gpu.py and bench_gpu.py's
# unfused-augmentation and segmenter plain-loader variants.
#
# Wheels for what the machine lacks (SimpleITK, diskcache) are read from .whl/ in the repo root.
set -uo pipefail
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
models=()
if [ $# -gt 0 ] && [ -d "$1" ]; then models=(--models-dir "$1"); shift; fi
steps=",${STEPS:-tests,curve,sweep,augment,transfer,cutting,input,distance,step,gpu,layers,series},"
want() { [[ $steps == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
if want tests; then
    echo "== GPU tests"
    timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/data/test_augment.py \
        tests/models/test_small_conv.py tests/kernels/test_resample.py \
        2>&1 | tee "$out/tests.log" | tail -n 15
fi
if want curve; then
    echo "== loss curves: nodule training with --kernels torch and with --kernels triton (bf16, same seed and data)"
    curve=/tmp/p2ch_curve
    if [ ! -d "$curve/luna" ]; then
        python3 -m p2ch_luna.synth "$curve/luna" --series 6 --subsets 2 --shape 192 192 --slices 48 64 --seed 0 \
            --log-level WARNING >"$out/curve_synth.log" 2>&1 || { echo "synth failed (see $out/curve_synth.log)"; }
    fi
    for kernels in torch triton; do
        echo "-- --kernels $kernels"
        timeout "${CURVE_TIMEOUT:-150}" python3 -m p2ch_luna.training nodule --kernels "$kernels" \
            --data-root "$curve/luna" --cache-dir "$curve/cache" --models-dir "$curve/models" --runs-dir "$curve/runs" \
            --device "${CURVE_DEVICE:-cuda}" --amp --balanced --augmented --val-stride 3 --seed 0 \
            --epochs "${CURVE_EPOCHS:-5}" --epoch-size "${CURVE_EPOCH_SIZE:-4096}" --batch-size "${CURVE_BATCH:-256}" \
            --comment "curve-$kernels" 2>&1 | tee "$out/curve_$kernels.log" \
            | sed -nE 's/.*(E[0-9]+ (trn|val)) .*: loss ([0-9.naif]+).*/\1 loss \3/p; /error|NaN|non-finite/Ip'
    done
fi
if want sweep; then
    echo "== bench_classifier_step.py --triton-sweep (the model step with the Triton kernels on more or fewer layers)"
    timeout "${SWEEP_TIMEOUT:-150}" python3 -m bench.bench_classifier_step --seconds 2 --triton-sweep \
        --accuracy-batch 64 2>&1 \
        | tee "$out/bench_triton_sweep.log"
fi
if want augment; then
    echo "== bench_augment.py (the on-device augmentation alone: torch's operators against the fused kernel)"
    timeout "${AUGMENT_TIMEOUT:-60}" python3 -m bench.bench_augment 2>&1 | tee "$out/bench_augment.log"
fi
if want transfer; then
    echo "== bench_batch_transfer.py (host only: what a worker-made batch costs the main process)"
    timeout 60 python3 -m bench.bench_batch_transfer 2>&1 | tee "$out/bench_batch_transfer.log"
fi
if want cutting; then
    echo "== bench_batch_cutting.py (host only: a worker's time to cut one batch)"
    timeout 90 python3 -m bench.bench_batch_cutting --rounds 2 2>&1 | tee "$out/bench_batch_cutting.log" \
        | grep -v "it/s\]"
fi
if want input; then
    echo "== bench_input.py (the input path alone: plain DataLoader against the batch ring)"
    timeout "${INPUT_TIMEOUT:-150}" python3 -m bench.bench_input --workers 4 8 --seconds 3 2>&1 \
        | tee "$out/bench_input.log" | grep -v "it/s\]"
fi
if want distance; then
    echo "== bench_distance.py (host only: the grouping's depth by scipy's feature transform or the k-d tree)"
    timeout 90 python3 -m bench.bench_distance --repeats 3 --workers 1 4 16 2>&1 | tee "$out/bench_distance.log"
fi
if want step; then
    echo "== bench_classifier_step.py (the classifier's model step alone, and where its GPU time goes)"
    timeout "${STEP_TIMEOUT:-120}" python3 -m bench.bench_classifier_step --seconds 2 --skip-compile 2>&1 \
        | tee "$out/bench_classifier_step.log"
fi
if want gpu; then
    echo "== bench_gpu.py"
    timeout "${BENCH_TIMEOUT:-420}" python3 -m bench.bench_gpu --json "$out/bench_gpu.json" "${models[@]}" "$@" 2>&1 \
        | tee "$out/bench_gpu.log" | grep -v "it/s\]\|series/s\]"
fi
if want layers; then
    echo "== bench_small_conv.py (each classifier convolution, cuDNN against small_conv's Triton kernels)"
    timeout "${LAYER_TIMEOUT:-150}" python3 -m bench.bench_small_conv 2>&1 | tee "$out/bench_small_conv.log"
fi
if want series && [ ${#models[@]} -gt 0 ]; then
    echo "== bench_diagnose.py --series"
    seg=$(ls "${models[1]}"/segmentation_*.best.state | head -n 1)
    cls=$(ls "${models[1]}"/nodule_*.best.state | head -n 1)
    timeout "${SERIES_TIMEOUT:-150}" python3 -m bench.bench_diagnose --device cuda --series "${SERIES:-4}" \
        --prefetch 1 2 --segmentation-path "$seg" --classification-path "$cls" 2>&1 \
        | tee "$out/bench_series.log" | grep -v "CT/s\]"
fi
