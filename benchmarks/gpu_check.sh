#!/usr/bin/env bash
# Issue 16's GPU measurements in ONE script, for one short session on one NVIDIA GPU (an H200: ~5 min of run).
#
#   bash benchmarks/gpu_check.sh wheels   # HERE, on a machine that reaches PyPI: the wheels the GPU machine lacks,
#                                         # into .whl/ (ignored through .git/info/exclude), ~21 MiB
#   bash benchmarks/gpu_check.sh run      # ON THE GPU MACHINE (device tool: carry [".whl"], timeout_s 560):
#                                         # installs .whl/ into /tmp/site, runs every step, writes under $OUT
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh run   # the same steps on CPU at tiny sizes (a dry run, ~4 min)
#
# Steps, in order (each with its own time limit, all within GPU_CHECK_BUDGET_S, default 480 s; a failed or
# skipped step does not stop the next):
#   0. versions, nvidia-smi, and a check that the NF4 base built on the device equals from_pretrained's
#   1. 7B NF4 (double quant, bf16 compute), batch 4x512, gradient checkpointing: floor, LoRA r16,
#      select LoRA-equal, protect r16 7.5%, select 20% (fp32 deltas + AdamW)
#   2. the same base and settings: select 20% with bf16 deltas + bitsandbytes AdamW8bit (floor and LoRA r16 again)
#   3. 1B bf16, batch 8x512, no checkpointing: floor, LoRA r16, select LoRA-equal, protect r16
#   4. the scorer at 1B bf16: score_units (variance, wanda) against a plain no-grad forward, 16 batches of 8x512
#   5. the scorer's exactness on the device: scores of a small bf16 model against float64 ones (--check-exact)
#   6. gpu_check.md and gpu_check.json: every table, the commands, and the three targets of issue 16 checked
# Files under $OUT (the device tool brings back at most 8): gpu_check.log, gpu_check.md, gpu_check.json,
# train_7b_nf4.json, train_7b_nf4_bf16_8bit.json, train_1b_bf16.json, scoring_1b_bf16.json, scoring_exact.json.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(bitsandbytes peft transformers datasets dill multiprocess)

wheels() {
    # The versions tested here (the project's venv); the GPU image has torch, accelerate, safetensors, tokenizers,
    # huggingface-hub, pyarrow, pandas, xxhash... but no bitsandbytes/datasets and other peft/transformers.
    local python=${PYTHON:-.venv/bin/python} exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    rm -rf .whl && mkdir -p .whl
    local name version
    for name in "${WHEELS[@]}"; do
        version=$("$python" -c "import importlib.metadata as m; print(m.version('$name'))") || return 1
        "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            --platform any -d .whl "$name==$version" || return 1
    done
    # bitsandbytes ships one library per CUDA/ROCm/XPU version (41 MiB); the GPU image's torch is cu130: keep the
    # CPU and CUDA 13.x libraries only (pip installs such a wheel as it is: it does not check RECORD).
    "$python" - <<'EOF' || return 1
import glob, os, re, shutil, zipfile
(path,) = glob.glob(".whl/bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
slim = path + ".slim"
with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if not drop.search(item.filename):
            target.writestr(item, source.read(item.filename))
before = os.path.getsize(path)
shutil.move(slim, path)
print(f"bitsandbytes wheel slimmed: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
    ls -l .whl
    local tree carried
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    carried=$(du -cb .whl/*.whl | tail -1 | cut -f1)
    echo "travels: working tree $((tree / 1024)) KiB + .whl $((carried / 1024)) KiB (limit 64 MiB)"
    [ $((tree + carried)) -lt $((64 * 1024 * 1024)) ] || { echo "over the 64 MiB limit" >&2; return 1; }
}

run() {
    local start=$SECONDS budget=${GPU_CHECK_BUDGET_S:-480} python=${PYTHON:-python3}
    local device=cuda big=7b mid=1b big_batch=(--batch 4 --seq 512) mid_batch=(--batch 8 --seq 512)
    local repeats_big=20 repeats_recipe=10 repeats_mid=20 score=(--batch 8 --seq 512 --batches 16 --repeats 5)
    if [ -n "${GPU_CHECK_SMOKE:-}" ]; then
        device=cpu big=tiny mid=tiny big_batch=(--batch 2 --seq 64) mid_batch=(--batch 2 --seq 64)
        repeats_big=2 repeats_recipe=2 repeats_mid=2 score=(--batch 2 --seq 64 --batches 2 --repeats 2 --threads 1)
        python=${PYTHON:-.venv/bin/python}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    echo "== gpu_check run: device=$device sizes=$big/$mid budget=${budget}s out=$OUT $(date -u +%FT%TZ)"
    if [ -z "${GPU_CHECK_SMOKE:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then  # (smoke: the local venv)
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install failed"; return 1; }
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        [ -n "${GPU_CHECK_SMOKE:-}" ] || echo "warning: no .whl/ (run 'bash benchmarks/gpu_check.sh wheels' first)"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    [ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" - <<'EOF' || { echo "imports failed: nothing measured"; return 1; }
import importlib.metadata as m, sys, torch
import ssah_peft  # imports peft, transformers, datasets
import bitsandbytes
names = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")
print("python", sys.version.split()[0], *(f"{n} {m.version(n)}" for n in names), "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
    local -a failed=()
    step() {  # step NAME MAX_SECONDS COMMAND...: run within what is left of the budget
        local name=$1 most=$2 left
        shift 2
        left=$((budget - (SECONDS - start) - 15))
        [ "$left" -lt "$most" ] && most=$left
        if [ "$most" -lt 20 ]; then
            echo "== $name: skipped, ${left}s of the budget left"
            failed+=("$name (skipped)")
            return
        fi
        echo "== $name (limit ${most}s, at $((SECONDS - start))s): $(printf '%q ' "$@")"
        local t0=$SECONDS
        timeout --signal=INT --kill-after=10 "$most" "$@"
        local rc=$?
        echo "== $name: rc=$rc in $((SECONDS - t0))s"
        [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
    }
    local ts=(benchmarks/train_step.py --device "$device")
    step verify 60 "$python" "${ts[@]}" --size tiny --quant nf4 --dtype bfloat16 --verify-build
    step train_7b_nf4 200 "$python" "${ts[@]}" --size "$big" --quant nf4 --dtype bfloat16 "${big_batch[@]}" \
        --gradient-checkpointing --repeats "$repeats_big" --methods "=LoRA" protect "select 20%" \
        --out "$OUT/train_7b_nf4.json"
    step train_7b_nf4_bf16_8bit 120 "$python" "${ts[@]}" --size "$big" --quant nf4 --dtype bfloat16 \
        "${big_batch[@]}" --gradient-checkpointing --repeats "$repeats_recipe" --methods "select 20%" \
        --delta-dtype bfloat16 --optimizer adamw8bit --out "$OUT/train_7b_nf4_bf16_8bit.json"
    step train_1b_bf16 90 "$python" "${ts[@]}" --size "$mid" --dtype bfloat16 "${mid_batch[@]}" \
        --repeats "$repeats_mid" --methods protect "=LoRA" --out "$OUT/train_1b_bf16.json"
    step scoring_1b_bf16 90 "$python" benchmarks/scoring.py --size "$mid" --dtype bfloat16 --device "$device" \
        "${score[@]}" --methods variance wanda --out "$OUT/scoring_1b_bf16.json"
    step scoring_exact 60 "$python" benchmarks/scoring.py --check-exact --dtype bfloat16 --device "$device" \
        --methods variance wanda --out "$OUT/scoring_exact.json"
    echo "== failed or skipped: ${failed[*]:-none}; steps took $((SECONDS - start))s"
    GPU_CHECK_FAILED="${failed[*]:-}" "$python" - "$OUT" <<'EOF'
"""gpu_check.md / gpu_check.json: the tables, the commands and issue 16's targets."""

import json
import os
import sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {
    "train_7b_nf4": "7B NF4 (double quant, bf16 compute), gradient checkpointing: fp32 deltas + AdamW",
    "train_7b_nf4_bf16_8bit": "7B NF4, gradient checkpointing: the memory recipe, bf16 deltas + AdamW8bit",
    "train_1b_bf16": "1B bf16, no checkpointing",
    "scoring_1b_bf16": "Scoring pass at 1B bf16 against a plain no-grad forward",
    "scoring_exact": "Scores on the device against float64 (small bf16 model)",
}
results = {name: json.loads((out / f"{name}.json").read_text()) for name in parts if (out / f"{name}.json").exists()}
checks = []


def row(name, method_part):
    rows = results.get(name, {}).get("rows", [])
    return next((r for r in rows if method_part in r["method"]), None)


def check(what, compute, limit):
    """``compute()`` over the measured rows; None (not measured) when a row or figure is missing."""
    try:
        value = compute()
    except (TypeError, KeyError, ZeroDivisionError):
        value = None
    checks.append({"target": what, "value": value, "limit": limit, "met": None if value is None else value <= limit})


def protect_over_lora(name, paired):
    protect, lora = row(name, "protect"), row(name, "lora r=16")
    return protect["ratio_to_lora_paired_median"] if paired else protect["step_s_median"] / lora["step_s_median"]


def overhead_ratio(name):
    protect, lora, floor = row(name, "protect"), row(name, "lora r=16"), row(name, "floor")
    return (protect["step_s_median"] - floor["step_s_median"]) / (lora["step_s_median"] - floor["step_s_median"])


for name, limit in (("train_7b_nf4", 1.03), ("train_1b_bf16", 1.02)):
    for paired in (True, False):
        what = f"{name}: protect step / LoRA r16 ({'paired median' if paired else 'medians'})"
        check(what, lambda name=name, paired=paired: protect_over_lora(name, paired), limit)
check("train_7b_nf4: protect overhead above floor / LoRA's", lambda: overhead_ratio("train_7b_nf4"), 1.10)
check(
    "scoring_1b_bf16: score_units(variance) / plain forward (paired median)",
    lambda: results["scoring_1b_bf16"]["runs"]["score_units(variance)"]["wall_ratio_paired"],
    1.10,
)
for method in ("variance", "wanda"):  # the tests' tolerance; float32 reductions give ~1e-7
    check(f"scoring_exact: largest relative error, {method}", lambda m=method: results["scoring_exact"]["errors"][m], 1e-6)
recipe = row("train_7b_nf4_bf16_8bit", "select 20%")
check("train_7b_nf4_bf16_8bit: select 20% total peak GiB", lambda: recipe["total_peak_memory_bytes"] / 2**30, 20.0)

failed = os.environ.get("GPU_CHECK_FAILED") or "none"
lines = [f"# GPU check (issue 16): {os.uname().nodename}", "", f"Failed or skipped steps: {failed}.", ""]
lines += ["| target | value | limit | met |", "|---|---:|---:|---|"]
for c in checks:
    value = "-" if c["value"] is None else f"{c['value']:.3g}"
    met = "-" if c["met"] is None else ("yes" if c["met"] else "NO")
    lines.append(f"| {c['target']} | {value} | {c['limit']} | {met} |")
for name, title in parts.items():
    lines += ["", f"## {title}", ""]
    if name not in results:
        lines.append("not measured (see gpu_check.log)")
        continue
    result = results[name]
    facts = {k: v for k, v in result.items() if k not in ("rows", "table", "runs", "setup", "errors")}
    lines += ["```", result["table"], "```"]
    if facts:
        lines.append(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items()))
    if recipe and name == "train_7b_nf4_bf16_8bit":
        per_param = recipe.get("bytes_per_trainable_param_above_floor", float("nan"))
        lines.append(f"select 20%: {per_param:.2f} bytes per trainable parameter above the floor's peak")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
(out / "gpu_check.json").write_text(json.dumps({"checks": checks, "failed": failed, "results": results}, indent=2))
print("\n".join(lines))
EOF
    echo "== gpu_check done in $((SECONDS - start))s"
}

OUT=${OUT:-/tmp/gpu_check_out}  # the device tool sets OUT; what is written there comes back
case "${1:-}" in
wheels) wheels ;;
run)
    mkdir -p "$OUT"
    run 2>&1 | tee -a "$OUT/gpu_check.log"
    ;;
*)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
