#!/usr/bin/env bash
# The GPU check, prepared to run once on a lent GPU machine that reaches no package index (docs/gpu/README.md):
# the suite for reference and peft on cpu,cuda x float32,bfloat16,float16 (golden fixtures on cuda included),
# the broken drivers built for CUDA and half precision, and the forward benchmark on CUDA.
#
#   scripts/gpu-check.sh OUT_DIR
#
# Runs from a checkout (PYTHONPATH=., -p conformance.plugin), with the machine's torch, transformers, pytest,
# pytest-xdist and hypothesis; wheels in .whl/ (peft, transformers, jsonschema and what it needs, bitsandbytes)
# are installed first into /tmp/site. Writes 7 files into OUT_DIR (a lent machine sends back at most 8): env.txt,
# reference.json/.md, peft.json/.md, suite.log, extras.log. Exit status: 0 when every step passed.
# Settings: DEVICES (default cpu,cuda), JOBS (xdist workers, default: the cores), PROFILE (ci), SUITE_ARGS (more
# pytest arguments, e.g. -k ...), MUTANTS (default: CudaDropsTheAdapter BranchInBaseDtype), BENCH_ARGS.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error CUBLAS_WORKSPACE_CONFIG=:4096:8
devices=${DEVICES:-cpu,cuda} jobs=${JOBS:-$(nproc)} profile=${PROFILE:-ci}
mutants=${MUTANTS:-CudaDropsTheAdapter BranchInBaseDtype}
failed=0

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: none"
    echo "cores $(nproc); DEVICES=$devices JOBS=$jobs PROFILE=$profile; $(git rev-parse --short HEAD 2>/dev/null)"
    python3 -c "import sys, torch, transformers, peft
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

step() {  # step NAME LOG COMMAND...: run it, append its output to LOG, say how it ended and when
    local name=$1 log=$2 started=$SECONDS
    shift 2
    echo "=== $name: $*" >> "$log"
    "$@" >> "$log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "$name: exit $rc in $((SECONDS - started)) s" | tee -a "$log"
}

eval "extra=(${SUITE_ARGS:-})"  # shell words, so that -k "a or b" stays one argument
suite=(python3 -m pytest -p conformance.plugin -p no:cacheprovider -q --pyargs conformance.suite
       --peft-device="$devices" --peft-dtype=float32,bfloat16,float16 --peft-profile="$profile" -n "$jobs")
step reference "$out/suite.log" "${suite[@]}" --peft-impl=reference --peft-report="$out/reference.json" "${extra[@]}"
step peft "$out/suite.log" "${suite[@]}" --peft-impl=peft --peft-expectations=expectations/peft.toml \
    --peft-report="$out/peft.json" "${extra[@]}"
# shellcheck disable=SC2086  # word lists on purpose
step "broken drivers" "$out/extras.log" python3 -m tests.mutants.table --own-test --jobs 2 $mutants
# shellcheck disable=SC2086
step benchmark "$out/extras.log" python3 -m bench.run ${BENCH_ARGS:---forward-only}

grep -h -A6 "^requirements:" "$out/suite.log"
echo "GPU check: $([ $failed -eq 0 ] && echo passed || echo FAILED) in $SECONDS s; reports in $out"
exit $failed
