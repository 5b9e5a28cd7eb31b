#!/usr/bin/env bash
# The checks that need an accelerator, as one prepared run for a session that is lent a GPU.
#
# The device machine has PyTorch, Triton, transformers and pytest but no network and none of our
# data: the eval prompts travel in an ignored folder. Prepare here, once per session:
#
#     mkdir -p .device && cp -r ../shared/data/eval .device/ && echo /.device/ >> .git/info/exclude
#
# then run there (the device tool: carry [".device"], timeout_s 540):
#
#     bash tools/device_check.sh
#
# It installs dspark without dependencies (offline), prints the device, runs the conformance
# matrix on the backend, the Triton-kernel tests and the engine's lossless tests (greedy identity,
# exact sampled distributions; they run on $DSPARK_BACKEND), and `dspark bench --quick` on the
# reference models (acceptance, batch-1 speed against transformers, concurrency; every greedy
# output compared with plain decoding). Logs and the bench results go to $OUT (the device tool's
# folder that comes back), else to /tmp/dspark-device. SmolLM2 does not travel (its GGUF package
# is larger than what a call may carry), so this covers the backend, not the real-model tables.
#
# BACKEND=cpu bash tools/device_check.sh dry-runs the same steps here on the CPU backend.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dspark-device}"
BACKEND="${BACKEND:-cuda}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 DSPARK_BACKEND="$BACKEND"
[ -d .device/eval ] && export DSPARK_EVAL_DATA="$PWD/.device/eval"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.txt, remember a failure, go on
    local name="$1"; shift
    echo "=== $name: $*"
    local started=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

"$PYTHON" -c "import dspark" 2>/dev/null ||
    step install "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step device "$PYTHON" -c "
import torch, dspark
from dspark.backends import get_backend
print('torch', torch.__version__, '| dspark', dspark.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')
print(get_backend('$BACKEND').describe())"
step conformance "$PYTHON" -m dspark conformance --backend "$BACKEND"
step tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_engine_greedy.py \
    tests/test_engine_sampling.py
step bench "$PYTHON" -m dspark bench --quick --backend "$BACKEND" --out "$OUT/bench"
exit $status
