#!/usr/bin/env bash
# The GPU figures as one prepared command, for a session lent a GPU machine by the device tool:
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#
# It uses that machine's own python3 (its image has torch, transformers, peft and safetensors;
# salmonn/ needs nothing else and no Ray) with this checkout on PYTHONPATH, and writes each log
# to $OUT (which comes back) or ./gpu-logs. 13B first, then 7B, each under its own time limit, so
# that a slow configuration costs the rest of its model's list, not the other model's figures;
# gpu_throughput.py prints each configuration's line as soon as it is measured, so a log cut off
# by its limit still holds every configuration measured before. Then the two generation engines
# (engine_throughput.py: HF static batches vs vLLM, batch 32 windows x 3 tasks), 13B then 7B; the
# vLLM half runs where vllm is installed (the workplace's GPU image has none: it then measures
# the HF engine and says "skipped"; carry wheels to measure vLLM). Then timed text
# (timed_text.py: Whisper's decoder on SALMONN's encoder output vs a separate Whisper pass,
# large-v2 shapes, batch 8 and 32), under LIMIT_TIMED. The limits add up to 580 s, inside what one
# device command may run (600 s), with 20 s for start-up and nvidia-smi.
# Extra arguments go to the gpu_throughput runs (e.g. --batch-sizes 8,32,64 --beams 1 to measure less); --smoke, the CPU
# dry run of this script (tests/test_benchmarks_smoke.py), goes to every run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
PY=${PYTHON:-python3}
LIMIT_13B=${LIMIT_13B:-210}
LIMIT_7B=${LIMIT_7B:-150}
LIMIT_ENGINE_13B=${LIMIT_ENGINE_13B:-100}
LIMIT_ENGINE_7B=${LIMIT_ENGINE_7B:-60}
LIMIT_TIMED=${LIMIT_TIMED:-60}
smoke=()
for a in "$@"; do [ "$a" = --smoke ] && smoke=(--smoke); done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi 2>&1 || echo "no nvidia-smi here"; } > "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/versions.txt"

status=0
for spec in "salmonn-13b $LIMIT_13B" "salmonn-7b $LIMIT_7B"; do
    model=${spec% *}; limit=${spec#* }
    timeout "$limit" "$PY" benchmarks/gpu_throughput.py --models "$model" "${@}" 2>&1 | tee "$OUT/gpu_${model#salmonn-}.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "gpu_session: $model ended with status $rc (124: its ${limit} s limit; the log holds what was measured)"
        status=$rc
    fi
done
for spec in "salmonn-13b $LIMIT_ENGINE_13B" "salmonn-7b $LIMIT_ENGINE_7B"; do
    model=${spec% *}; limit=${spec#* }
    timeout "$limit" "$PY" benchmarks/engine_throughput.py --model "$model" --batch 32 --windows 128 "${smoke[@]}" 2>&1 \
        | tee "$OUT/engine_${model#salmonn-}.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "gpu_session: engines on $model ended with status $rc (124: its ${limit} s limit)"
        status=$rc
    fi
done
timeout "$LIMIT_TIMED" "$PY" benchmarks/timed_text.py "${smoke[@]}" 2>&1 | tee "$OUT/timed_text.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "gpu_session: timed text ended with status $rc (124: its ${LIMIT_TIMED} s limit; the log holds what was measured)"
    status=$rc
fi
exit $status
