#!/usr/bin/env bash
# The GPU checks of one lent device call (see /work/.library/device). It installs the carried wheels
# (.whl: diffusers and the server's packages, which the device image lacks), then by mode:
#   check  the CUDA tests, a short tiny-sdxl `bench slo` on CUDA and sdxl-arch's engine against
#          diffusers' pipeline (scripts/fullsize_engine_check.py);
#   full   scripts/gpu_fullsize.py: full-width exactness, step costs, the simulator's GPU costs and a
#          short real sdxl-arch replay on them;
#   all    both, in one call (a warm machine goes back after 30 s idle, and each start costs minutes).
# Every stage is bounded so that the whole command ends by LIMIT_S (default 540) seconds; everything
# lands under $OUT. Fetch the wheels first (scripts/gpu_wheels.sh); run it as
# `run(command="bash scripts/gpu_session.sh all", carry=[".whl"], timeout_s=600)`.
set -u
mode=${1:-all}
limit=${LIMIT_S:-540}
left() { echo $((limit - SECONDS - ${1:-0})); }
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
{
    nvidia-smi
    python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__,
transformers.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version())"
} >"$OUT/env.txt" 2>&1
tail -2 "$OUT/env.txt"
if [ "$mode" != full ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_patch_exact.py tests/test_sampler.py \
        >"$OUT/gpu_tests.txt" 2>&1
    echo "gpu tests exit $? at ${SECONDS} s" >>"$OUT/gpu_tests.txt"
    tail -6 "$OUT/gpu_tests.txt"
    # The engine end to end on CUDA (encode, patched steps, sampler, decode, both schedulers), briefly.
    timeout 60 python3 -m patchedserve.cli bench slo --model tiny-sdxl --device cuda \
        --systems patchedserve,nirvana --qps 4 --duration 6 --steps 8 --sizes 256x256,512x256,512x512 \
        --slo-scale 5 --no-progress --out "$OUT/slo_tiny" >"$OUT/slo_tiny.log" 2>&1
    echo "bench slo exit $? at ${SECONDS} s" >>"$OUT/slo_tiny.log"
    (cd "$OUT" && tar czf slo_tiny.tgz slo_tiny && rm -rf slo_tiny)
    tail -5 "$OUT/slo_tiny.log"
    # The engine at full width on the GPU against diffusers' own pipeline (float32, TF32 off).
    timeout 150 python3 scripts/fullsize_engine_check.py --model sdxl-arch --device cuda \
        --json "$OUT/engine_sdxl-arch.json" >"$OUT/engine_check.log" 2>&1
    echo "engine check exit $? at ${SECONDS} s" >>"$OUT/engine_check.log"
    tail -4 "$OUT/engine_check.log"
fi
if [ "$mode" != check ]; then
    mkdir -p "$OUT/res"
    # gpu_fullsize.py skips the costs and the replay when they would start too late; the timeout
    # stops the replay where it stands (results.json is rewritten after each run).
    run_s=$(left 15)
    timeout "$run_s" python3 scripts/gpu_fullsize.py --out "$OUT/res" --budget-s $((run_s - 170)) \
        --replay-budget-s $((run_s - 80)) >"$OUT/fullsize.log" 2>&1
    echo "gpu_fullsize exit $? at ${SECONDS} s" >>"$OUT/fullsize.log"
    (cd "$OUT" && tar czf res.tgz res && rm -rf res)
    grep -v "should be kept in float32" "$OUT/fullsize.log" | tail -40
fi
exit 0
