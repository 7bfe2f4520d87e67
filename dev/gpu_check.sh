#!/usr/bin/env bash
# gpu_check.sh: the first device check of train_gpt2.py's GPU path (nothing of it has run on a GPU).
# The team's ../shared/gpu/gpu_check.sh, kept in step with this project's command line (run this one).
#
# Run from the project root (the folder holding train_gpt2.py and prepare_data.py):
#     OUT=/some/dir bash dev/gpu_check.sh [ASSETS]
# ASSETS (default: .gpu_assets) holds what the offline machine cannot download:
#     tiktoken_cache/        the three GPT-2 BPE files (../shared/tiktoken_cache)
#     tinyshakespeare.txt    (or data/tinyshakespeare.txt: ../shared works as is)
#     hellaswag_val.jsonl    (or data/...; a few hundred lines are enough: `head -n 400`)
# Environment:
#     OUT       where the results go (on the device machine the tool sets it); default $WORK/out
#     DRY=1     CPU dry run of the same steps with a tiny model (checks this script, flags, data flow)
#     DRY_COMPILE=1   with DRY=1, also exercise torch.compile on the CPU (slow on 2 cores)
#     BUDGET_S  wall-clock budget for all steps (default 420 s); a step that cannot fit is skipped.
#               The first ~300 s hold what matters most (environment, compiled bench, a short
#               pretrain with evaluation, FSDP on one rank); the rest runs while the budget lasts,
#               so that a 15-minute device lease keeps room for a machine start and a rerun.
# One GPU: DDP across 8 NCCL ranks cannot be exercised here (FSDP runs as a group of one).
#     PY        the python that holds torch (default python3)
# Results: $OUT/summary.txt (one block per step: exit code, seconds, the lines that matter),
# $OUT/all.log (every step's output, time-stamped, concatenated), $OUT/logs.tgz (one log per
# step, the runs' log.jsonl). Three files, so that few files travel back.
# Nothing is written inside the project tree: data, runs and caches live in a fresh $WORK in /tmp.
# Needs no network. Every step is time-boxed with `timeout`, so a hang costs one step, not the run.

set -u
ROOT=$(pwd)
if [ ! -f "$ROOT/train_gpt2.py" ] || [ ! -f "$ROOT/prepare_data.py" ]; then
    echo "gpu_check.sh: run it from the project root (no train_gpt2.py / prepare_data.py in $ROOT)" >&2
    exit 2
fi
ASSETS=$(cd "${1:-${GPU_ASSETS:-.gpu_assets}}" 2>/dev/null && pwd) || { echo "gpu_check.sh: assets folder ${1:-.gpu_assets} not found" >&2; exit 2; }
PY=${PY:-python3}
DRY=${DRY:-0}
BUDGET_S=${BUDGET_S:-420}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK/logs" "$WORK/runs" "$WORK/data"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

find_asset() {  # the first of ASSETS/name, ASSETS/data/name
    for p in "$ASSETS/$1" "$ASSETS/data/$1"; do [ -e "$p" ] && { echo "$p"; return 0; }; done
    return 1
}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$ASSETS/tiktoken_cache}
SHAKESPEARE=$(find_asset tinyshakespeare.txt) || SHAKESPEARE=""
HELLASWAG=$(find_asset hellaswag_val.jsonl) || HELLASWAG=""

export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache  # shared by the steps: a later compile of the same graph hits it
export TRITON_CACHE_DIR=$WORK/triton_cache
export TOKENIZERS_PARALLELISM=false
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}  # the FSDP steps' NCCL group of one: loopback only (no network there)

if [ "$DRY" = 1 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
    DEV="--device cpu"
    C=${DRY_COMPILE:-0}
    SIZE="--n_layer 2 --n_head 2 --n_embd 64 --block_size 64"
    BENCH_SHORT="$SIZE --batch_size 4 --bench_steps 2 --bench_warmup 1"
    GEN="$SIZE --max_new_tokens 8 --rounds 1"
    ANCHOR="$SIZE --batch_size 4 --rounds 2"
    PRE="$SIZE --batch_size 4 --total_batch_size 512 --max_steps 4 --warmup_steps 1 --eval_interval 2 --val_steps 1 --eval_samples 1 --ckpt_interval 2 --hellaswag_limit 8"
    RESUME_STEPS=5
    FSDP_PRE="$SIZE --batch_size 4 --total_batch_size 512 --max_steps 2 --warmup_steps 1 --eval_interval 2 --val_steps 1 --eval_samples 1 --ckpt_interval 1000"
    VAL_TOKENS=2000
else
    DEV=""  # auto: cuda
    C=1
    SIZE=""  # GPT-2 124M, block 1024
    BENCH_SHORT="--batch_size 64 --bench_steps 10 --bench_warmup 3"
    GEN="--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --max_new_tokens 200 --rounds 5"  # GPT-2 124M
    ANCHOR="--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 16 --rounds 10"  # eager, both sides
    # 268k train tokens: 2 steps of 131,072 tokens (64 x 1024 x 2 micro-steps) an epoch; val 70k >= one batch
    PRE="--batch_size 64 --total_batch_size 131072 --max_steps 30 --warmup_steps 5 --eval_interval 15 --val_steps 1 --eval_samples 2 --ckpt_interval 10 --hellaswag_limit 200"
    RESUME_STEPS=32
    # the same data, seed and step geometry as PRE: its first 4 losses compare with PRE's (bf16 weights under FSDP)
    FSDP_PRE="--batch_size 64 --total_batch_size 131072 --max_steps 4 --warmup_steps 5 --eval_interval 4 --val_steps 1 --eval_samples 2 --ckpt_interval 1000"
    VAL_TOKENS=70000
fi

T_START=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T_START))); }
stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }
STEPS=()

# run NAME LIMIT_S MIN_S CMD...: run CMD time-boxed to LIMIT_S (cut to the budget left), logged to
# $WORK/logs/NAME.log; skipped when less than MIN_S of the budget is left.
run() {
    local name=$1 limit=$2 min=$3; shift 3
    local log=$WORK/logs/$name.log rem
    rem=$(left)
    STEPS+=("$name")
    if [ "$rem" -lt "$min" ]; then
        echo "== $name: SKIPPED (budget: ${rem}s left, needs ~${min}s)" | tee "$log"
        echo "skipped" >"$WORK/logs/$name.rc"; echo 0 >"$WORK/logs/$name.sec"
        return
    fi
    [ "$limit" -gt $((rem - 5)) ] && limit=$((rem - 5))
    echo "== $name (limit ${limit}s, budget left ${rem}s): $*"
    local t0=$SECONDS
    { echo "\$ $*"; timeout -k 10 "$limit" "$@" 2>&1; echo "[exit $?]"; } | stamp | tee "$log" | tail -n 40
    local rc
    rc=$(tail -n 1 "$log" | sed -n 's/.*\[exit \([0-9]*\)\]$/\1/p')
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (TIMED OUT after ${limit}s)"
    echo "$rc" >"$WORK/logs/$name.rc"; echo $((SECONDS - t0)) >"$WORK/logs/$name.sec"
    report  # after every step: if the whole command is killed, $OUT still holds what was done
}

report() {
    {
        echo "gpu_check.sh summary ($(date -u +%FT%TZ)); DRY=$DRY; budget ${BUDGET_S}s, used $((SECONDS - T_START))s"
        echo "project: $ROOT ($(cd "$ROOT" && git log --oneline -1 2>/dev/null || echo 'no git'))"
        echo
        for name in "${STEPS[@]}"; do
            local log=$WORK/logs/$name.log
            echo "### $name: exit $(cat "$WORK/logs/$name.rc" 2>/dev/null || echo '?'), $(cat "$WORK/logs/$name.sec" 2>/dev/null || echo '?')s"
            # the lines that carry results, then any sign of trouble (counted)
            grep -E "^[0-9:]{8} (bench|median step|ours |build-nanogpt |ours is|peak memory|rank [0-9]+:|batch [18]|  (KV cache|recompute|transformers|LM head|same tokens)|pretrain:|step +[0-9]+( \||/)|  sample:|saved |stopped|error:|device |torch|triton|numpy|tiktoken|transformers|tqdm|safetensors|matplotlib|datasets|wandb|python |cuda |bf16 |pick_|gpu_peak|before enable|after enable|enable_tf32|compiled fp32|matmul bf16|copy |sdpa|  [a-z_]+ +([0-9.]+ ms|not usable)|NVIDIA|name, |loss compare|\[exit)" "$log" \
                | grep -vE "Recompiling|guards.py|graph_break" | tail -n 40 | cut -c1-230
            local n
            for pat in "Traceback" "[A-Za-z]*Error: " "OutOfMemory|out of memory" "Recompiling function" "recompile_limit" \
                       "Graph break|graph_break" "new API settings" "UserWarning" "Warning"; do
                n=$(grep -cE "$pat" "$log" 2>/dev/null); n=${n:-0}
                [ "$n" -gt 0 ] && echo "  [count] '$pat': $n"
            done
            echo
        done
    } >"$SUMMARY"
    { for name in "${STEPS[@]}"; do echo "######## $name"; tail -c 2000000 "$WORK/logs/$name.log"; echo; done; } >"$OUT/all.log"
    for d in "$WORK"/runs/*/; do [ -f "$d/log.jsonl" ] && cp "$d/log.jsonl" "$WORK/logs/$(basename "$d").log.jsonl"; done
    tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
}
# The console's last lines (what a remote runner's reply keeps): summary.txt with each step's
# per-step training lines cut to its first and last two.
brief() {
    awk '/^### /{flush(); print; next}
         / step +[0-9]+\/[0-9]+ \|/{steps[++n]=$0; next}
         {flush(); print}
         function flush(  i){ for (i = 1; i <= n; i++) if (i == 1 || i > n - 2) print steps[i]; n = 0 }
         END{flush()}' "$SUMMARY" | grep -vE "  sample:|^[0-9:]{8} (tqdm|safetensors|matplotlib|python )"
}
finish() { report; echo; echo "==================== summary (full: $SUMMARY) ===================="; brief; }
trap finish EXIT

# --------------------------------------------------------------------------------------------
# Helpers written into $WORK (never into the project)

cat >"$WORK/env_probe.py" <<'EOF'
# Versions, the device, the project's device/dtype/peak picks, TF32 (which API, warnings, is it on),
# and the two ceilings (a large bf16 matmul, a device-to-device copy) to read MFU against.
import importlib, os, sys, time, warnings
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "numpy", "tiktoken", "transformers", "tqdm", "safetensors", "matplotlib", "datasets", "wandb"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # datasets and wandb are optional here: --files data, no --wandb_project
        print(f"{name} MISSING ({type(e).__name__})")
import torch
print("cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
      "| available", torch.cuda.is_available())
sys.path.insert(0, os.getcwd())
import train_gpt2 as tg
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)!r} cc {p.major}.{p.minor} SMs {p.multi_processor_count} "
          f"memory {p.total_memory / 2**30:.1f} GiB")
    print("bf16 supported", torch.cuda.is_bf16_supported())
    print("gpu_peak_tflops", (tg.peak_flops("cuda:0") or 0) / 1e12)
print("pick_dtype", tg.pick_dtype(dev))
m = torch.backends.cuda.matmul
state = lambda: (f"allow_tf32={m.allow_tf32} fp32_precision={getattr(m, 'fp32_precision', 'n/a')} "
                 f"float32_matmul_precision={torch.get_float32_matmul_precision()} cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
print("before enable_tf32:", state())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print("setup_distributed", tg.setup_distributed("auto"))  # sets TF32 on CUDA (float32_matmul_precision high)
print("enable_tf32 warnings:", [str(w.message)[:200] for w in caught] or "none")
print("after enable_tf32:", state())
if dev == "cuda":
    # inductor reads the TF32 flags while lowering a matmul: a mixed legacy/new API state fails here
    t0 = time.time()
    f = torch.compile(lambda a, b: (a @ b).relu())
    a, b = torch.randn(1024, 1024, device=dev), torch.randn(1024, 1024, device=dev)
    out = f(a, b).double()
    ref = (a.double() @ b.double()).relu()
    print(f"compiled fp32 matmul ok in {time.time() - t0:.1f}s; rel err vs fp64 {((out - ref).norm() / ref.norm()).item():.1e} "
          "(TF32 on: ~1e-4..1e-3; off: ~1e-7)")
    def timed(fn, n=10):
        fn(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record(); torch.cuda.synchronize()
        return s.elapsed_time(e) / n / 1000
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    dt = timed(lambda: a @ b)
    print(f"matmul bf16 8192^3 on random data: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s (the ceiling MFU is read against: the table says 989)")
    x = torch.empty(2**30, dtype=torch.uint8, device=dev).random_()
    y = torch.empty_like(x)
    dt = timed(lambda: y.copy_(x))
    print(f"copy device-to-device 1 GiB: {2 * 2**30 / dt / 1e12:.2f} TB/s (bytes read + written)")
EOF

cat >"$WORK/sdpa_probe.py" <<'EOF'
# Which attention kernel runs for the model's three calls, and each backend's time for the training one.
import re, sys, torch
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
if not torch.cuda.is_available():
    print("sdpa: no CUDA, skipped"); sys.exit(0)
from torch.nn.attention import SDPBackend, sdpa_kernel
dev, bf16 = "cuda", torch.bfloat16
try:
    print("sdpa priority order:", torch._C._get_sdp_priority_order())
except Exception as e:
    print("sdpa priority order: n/a", type(e).__name__)
B, nh, T, hs = 8, 12, 1024, 64
C = nh * hs

def qkv_like_model(B, T, requires_grad):
    # exactly CausalSelfAttention's layout: split of c_attn's (B, T, 3C) output, viewed and transposed
    x = torch.randn(B, T, 3 * C, device=dev, dtype=bf16, requires_grad=requires_grad)
    q, k, v = x.split(C, dim=2)
    return [t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v)], x

def kernels(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    names = []
    for e in prof.key_averages():
        if re.search(r"flash|fmha|cudnn|attention|sdpa|softmax|bmm|gemm|cutlass|efficient|copy|cast|elementwise", e.key, re.I):
            names.append(e.key[:90])
    return names[:12]

def train_call():
    (q, k, v), x = qkv_like_model(B, T, True)
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

print("sdpa training (B 8, T 1024, causal, bf16, fwd+bwd): kernels", kernels(train_call))
# generation, one new token: q (B, nh, 1, hs) against a slice of the preallocated cache, under
# autocast as --mode sample runs it (the cache is made in the keys' dtype: bf16 under autocast)
cache = torch.zeros(12, 1, nh, 1024, hs, device=dev, dtype=bf16)
q1 = torch.randn(1, nh, 1, hs, device=dev, dtype=bf16)
def decode_call():
    with torch.no_grad(), torch.autocast("cuda", dtype=bf16):
        F.scaled_dot_product_attention(q1, cache[0, :, :, :300], cache[0, :, :, :300], is_causal=False)
print("sdpa decode (1 query vs 300 cached bf16 keys, autocast bf16): kernels", kernels(decode_call))
# left-padded prompts: a boolean (B, 1, T, T) mask
(qm, km, vm), _ = qkv_like_model(8, 16, False)
mask = torch.ones(8, 1, 16, 16, dtype=torch.bool, device=dev).tril()
mask[:, :, :, :3] = False
mask |= torch.eye(16, dtype=torch.bool, device=dev)
def mask_call():
    with torch.no_grad():
        F.scaled_dot_product_attention(qm, km, vm, attn_mask=mask)
print("sdpa padded prompt (bool mask (8,1,16,16)): kernels", kernels(mask_call))
# each backend's time on the training call
for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
    if not hasattr(SDPBackend, backend):
        continue
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            (q, k, v), x = qkv_like_model(B, T, True)
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(); s.record()
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            e.record(); torch.cuda.synchronize()
        print(f"  {backend.lower():<22} {s.elapsed_time(e) / 10:8.3f} ms  fwd+bwd, B 8, T 1024")
    except Exception as err:
        print(f"  {backend.lower():<22} not usable: {str(err).splitlines()[0][:120]}")
EOF

cat >"$WORK/compare_losses.py" <<'EOF'
# The first steps' losses of the one-process run and the FSDP run: same seed, data and step geometry.
import json, sys
def losses(path):
    try:
        return {e["step"]: e["loss"] for e in map(json.loads, open(path)) if "loss" in e}
    except OSError:
        return {}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
for step in sorted(set(a) & set(b)):
    print(f"loss compare step {step}: one process {a[step]:.6f} | FSDP {b[step]:.6f} | rel diff {abs(a[step] - b[step]) / abs(a[step]):.1e}")
if not set(a) & set(b):
    print("loss compare: no common steps")
EOF

# --------------------------------------------------------------------------------------------
# The steps, most important first; the later ones run only while the budget lasts.

echo "gpu_check.sh: project $ROOT, assets $ASSETS, work $WORK, out $OUT, DRY=$DRY, budget ${BUDGET_S}s"
echo "tiktoken cache: $TIKTOKEN_CACHE_DIR ($(ls "$TIKTOKEN_CACHE_DIR" 2>/dev/null | wc -l) files); shakespeare: ${SHAKESPEARE:-MISSING}; hellaswag: ${HELLASWAG:-MISSING}"

run 00_env 60 20 bash -c "nvidia-smi 2>&1 || echo 'nvidia-smi: not available'; \
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null; \
    uname -a; nproc; free -g 2>/dev/null | head -2; $PY $WORK/env_probe.py"

# The first ~300 s: what matters most.
# 1. The training step as users measure it: GPT-2 124M, 64 x 1024, bf16 autocast, torch.compile.
TORCH_LOGS=recompiles,graph_breaks run 02_bench_compile 150 60 "$PY" train_gpt2.py --mode bench $DEV --compile $C $BENCH_SHORT
# 2. Real pretraining on tiny Shakespeare: compiled, evaluations with val loss, samples, HellaSwag
#    (eager), checkpoints (saved from CUDA).
if [ -n "$SHAKESPEARE" ]; then
    run 05_prepare_data 60 15 "$PY" prepare_data.py --files "$SHAKESPEARE" --out_dir "$WORK/data/shakespeare" --val_tokens $VAL_TOKENS
    HS=""
    [ -n "$HELLASWAG" ] && HS="--hellaswag 1 --hellaswag_path $HELLASWAG"
    TORCH_LOGS=recompiles,graph_breaks run 06_pretrain 150 60 "$PY" train_gpt2.py --mode pretrain $DEV --compile $C \
        --data_dir "$WORK/data/shakespeare" --out_dir "$WORK/runs/pretrain" $SIZE $PRE $HS
    # 3. FSDP2 on one rank (NCCL group of one), activation checkpointing, the blocks and the LM head with the
    #    loss compiled apart (2 graphs expected); its evaluation samples eagerly (recompiles are logged).
    TORCH_LOGS=recompiles,graph_breaks run 07_fsdp_pretrain 150 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        train_gpt2.py --mode pretrain --fsdp 1 $DEV --compile $C --activation_checkpointing 1 \
        --data_dir "$WORK/data/shakespeare" --out_dir "$WORK/runs/fsdp" $SIZE $FSDP_PRE
    run 08_loss_compare 30 5 "$PY" "$WORK/compare_losses.py" "$WORK/runs/pretrain/log.jsonl" "$WORK/runs/fsdp/log.jsonl"
else
    echo "no tinyshakespeare.txt in $ASSETS: pretraining steps skipped" | tee -a "$SUMMARY"
fi

# Then, while the budget lasts: the attention kernels, generation, the eager step's memory, a
# resume on CUDA, build-nanogpt's step beside ours, the FSDP bench.
run 01_sdpa 60 20 "$PY" "$WORK/sdpa_probe.py"
run 03_bench_generate 90 40 "$PY" dev/compare.py generate ${DEV:---device cuda} $GEN
run 04_bench_eager 90 40 "$PY" train_gpt2.py --mode bench $DEV --compile 0 $BENCH_SHORT
[ -n "$SHAKESPEARE" ] && run 10_resume 120 60 "$PY" train_gpt2.py --mode pretrain $DEV --init_from resume \
    --out_dir "$WORK/runs/pretrain" --max_steps $RESUME_STEPS
run 09_bench_anchor 150 90 "$PY" dev/compare.py train ${DEV:---device cuda} $ANCHOR
run 11_fsdp_bench 120 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py \
    --mode bench --fsdp 1 $DEV --compile $C $BENCH_SHORT
run 99_gpu_state 20 3 bash -c "nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || echo 'nvidia-smi: not available'"
