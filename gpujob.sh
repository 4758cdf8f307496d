#!/usr/bin/env bash
# Temporary device job (not committed).
set -x
out=/tmp/out; mkdir -p $out
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD PATH=/tmp/site/bin:/tmp/site2/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $out/card.txt 2>&1
python3 -c "import pynvml; print('nvml ok')" > $out/nvml.txt 2>&1
python3 -m musetalk.bench --device cuda --reference-flow --frames 500 > $out/reference.txt 2>&1
scripts/gpu_loadtest.sh $out/lt 1,8,12,16,20,24 60 > $out/lt.txt 2>&1
echo done > $out/DONE
