#!/usr/bin/env bash
# The GPU checks of one lent device call (see /work/.library/device): `check` installs the carried
# wheels (.whl: diffusers and the server's packages, which the device image lacks) and runs the
# CUDA tests and a short GPU replay; `full` installs them and runs scripts/gpu_fullsize.py. Everything
# lands under $OUT. Fetch the wheels first (scripts/gpu_wheels.sh); run it as
# `run(command="bash scripts/gpu_session.sh check", carry=[".whl"])`.
set -u
mode=${1:-check}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
{
    nvidia-smi
    python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__,
transformers.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version())"
} >"$OUT/env.txt" 2>&1
if [ "$mode" = check ]; then
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_patch_exact.py tests/test_sampler.py \
    >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >>"$OUT/gpu_tests.txt"
# The engine end to end on CUDA (encode, patched steps, sampler, decode, both schedulers), briefly.
timeout 150 python3 -m patchedserve.cli bench slo --model tiny-sdxl --device cuda --systems patchedserve,nirvana \
    --qps 4 --duration 8 --steps 8 --sizes 256x256,512x256,512x512 --slo-scale 5 --no-progress \
    --out "$OUT/slo_tiny" >"$OUT/slo_tiny.log" 2>&1
echo "bench slo exit $?" >>"$OUT/slo_tiny.log"
(cd "$OUT" && tar czf slo_tiny.tgz slo_tiny && rm -rf slo_tiny)
tail -3 "$OUT/env.txt"
tail -8 "$OUT/gpu_tests.txt"
tail -12 "$OUT/slo_tiny.log"
exit 0
fi
mkdir -p "$OUT/res"
timeout "${FULL_LIMIT_S:-450}" python3 scripts/gpu_fullsize.py --out "$OUT/res" --budget-s "${BUDGET_S:-250}" \
    >"$OUT/fullsize.log" 2>&1
echo "gpu_fullsize exit $?" >>"$OUT/fullsize.log"
(cd "$OUT" && tar czf res.tgz res && rm -rf res)
grep -v "should be kept in float32" "$OUT/fullsize.log" | tail -40
