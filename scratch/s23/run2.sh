#!/bin/bash
set -e
cd /work/main
PS=.venv/bin/patchedserve
OUT=outputs/s23
COMMON="--model tiny-sdxl --systems nirvana,patchedserve --qps 1,1.5,2 --slo-scale 5 --duration 120 --seed 23 \
  --sizes 256x256,512x256,512x512 --steps 8 --patch-size 256 --profile $OUT/profile_t2.json --no-progress"
$PS bench slo $COMMON --replicas 2 --cpus-per-replica 1 --replica-profile $OUT/profile_t1.json \
  --image-cost $OUT/cal_t1/image_cost.json --patched-cost $OUT/cal_t1/patched_cost.json --out $OUT/ray2b > $OUT/ray2b.log 2>&1
echo done > $OUT/done2
