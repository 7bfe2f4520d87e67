#!/usr/bin/env bash
# check_torch.sh: this project on a given torch, in a fresh virtual environment, on the CPU. Every
# mode runs once (pretrain with evaluations, samples, checkpoints and a resume; finetune; sample;
# chat; eval; export; bench; plot; DDP and FSDP on gloo; --compile 1), then the test suite.
#
#     bash dev/check_torch.sh 2.7.1          # from the project root; SUITE=0 skips the suite
#
# PyPI's torch for Linux is a CUDA build (~3 GB with its libraries); it runs on a CPU too. Older
# CPU builds are not on every index: this is a script for a developer, not for CI. A line per
# step (ok or FAILED, seconds), then the suite's summary; exit 1 if anything failed. Everything
# is written under a new folder in /tmp; the data is made from the project's own text files.

set -u
VERSION=${1:?usage: bash dev/check_torch.sh TORCH_VERSION}
ROOT=$(pwd)
[ -f "$ROOT/train_gpt2.py" ] || { echo "check_torch.sh: run it from the project root" >&2; exit 2; }
WORK=$(mktemp -d /tmp/check_torch.XXXXXX)
FAILED=0

# VENV=path: an environment made before (by an earlier run of this script) instead of a new one.
VENV=${VENV:-$WORK/venv}
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# A pip configuration that caps torch's version refuses a newer one: PIP_CONFIG_FILE=/dev/null
# in the environment lifts it.
python -m pip install -q "torch==$VERSION" || exit 1
python -m pip install -q -r requirements.txt || exit 1
echo "torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/tiktoken_cache ]; then
    export TIKTOKEN_CACHE_DIR=$(cd ../shared/tiktoken_cache && pwd)
fi

step() {  # step NAME COMMAND...: runs it, prints ok or FAILED (with its output's end) and seconds
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$WORK/$name.log" 2>&1; then
        echo "ok      $name ($((SECONDS - start)) s)"
    else
        echo "FAILED  $name ($((SECONDS - start)) s): $WORK/$name.log"
        tail -n 5 "$WORK/$name.log" | sed 's/^/        /'
        FAILED=1
    fi
}

# The data: the project's own text as a corpus, 24 instruction records, 8 HellaSwag items.
D=$WORK/data
mkdir -p "$D"
cat README.md train_gpt2.py prepare_data.py test_gpt2.py >"$D/corpus.txt"
python - "$D" <<'EOF'
import json, sys
folder = sys.argv[1]
records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(24)]
json.dump(records, open(f"{folder}/alpaca.json", "w"))
with open(f"{folder}/hellaswag.jsonl", "w") as f:
    for i in range(8):
        item = {"ctx": f"A man counts to {i}. He", "activity_label": "Counting", "ctx_a": f"A man counts to {i}.",
                "ctx_b": "he", "endings": ["stops.", "sings.", "sleeps.", "runs."], "label": i % 4}
        f.write(json.dumps(item) + "\n")
EOF

TINY="--n_layer 2 --n_head 2 --n_embd 64 --block_size 64 --device cpu"
PRE="--mode pretrain $TINY --data_dir $D/text --batch_size 4 --total_batch_size 512 --warmup_steps 2 --eval_interval 3 --val_steps 2 --eval_samples 1 --ckpt_interval 3"
R=$WORK/runs

step prepare python prepare_data.py --files "$D/corpus.txt" --out_dir "$D/text" --val_tokens 4000
step prepare_sft python prepare_data.py --sft --files "$D/alpaca.json" --out_dir "$D/sft" --val_fraction 0.25
step prepare_hellaswag python prepare_data.py --hellaswag --files "$D/hellaswag.jsonl" --out_dir "$D/hs"
step pretrain python train_gpt2.py $PRE --max_steps 6 --out_dir "$R/pre" --hellaswag 1 --hellaswag_path "$D/hs/hellaswag_val.jsonl"
step resume python train_gpt2.py $PRE --max_steps 8 --out_dir "$R/pre" --init_from resume
step compile python train_gpt2.py $PRE --max_steps 2 --out_dir "$R/compiled" --compile 1
step ddp torchrun --standalone --nproc_per_node=2 train_gpt2.py $PRE --max_steps 3 --out_dir "$R/ddp"
if python -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 10))'; then
    step fsdp torchrun --standalone --nproc_per_node=2 train_gpt2.py $PRE --max_steps 3 --out_dir "$R/fsdp" --fsdp 1
else  # FSDP needs 2.10 (older ones get its gradients wrong): refused in one line
    step fsdp_refused bash -c "python train_gpt2.py $PRE --max_steps 3 --out_dir '$R/fsdp' --fsdp 1 2>&1 | grep 'needs torch 2.10'"
fi
step finetune python train_gpt2.py --mode finetune --init_from "$R/pre" --data_dir "$D/sft" --batch_size 2 --total_batch_size 4 --max_steps 3 --eval_interval 3 --val_steps 1 --eval_samples 1 --device cpu --out_dir "$R/ft"
step sample python train_gpt2.py --mode sample --init_from "$R/pre" --prompt "GPT-2" --max_new_tokens 8 --device cpu
step chat bash -c "printf 'Add 1 and 2.\n/quit\n' | python train_gpt2.py --mode chat --init_from '$R/ft' --max_new_tokens 8 --device cpu"
step eval python train_gpt2.py --mode eval --init_from "$R/pre" --hellaswag_path "$D/hs/hellaswag_val.jsonl" --device cpu --out_dir "$R/eval"
step export python train_gpt2.py --mode export --init_from "$R/ft" --out_dir "$R/hf"
step sample_export python train_gpt2.py --mode sample --init_from "$R/hf" --prompt "Add 2 and 3." --max_new_tokens 8 --device cpu
step bench python train_gpt2.py --mode bench $TINY --batch_size 4 --bench_steps 3 --bench_warmup 1
step plot python train_gpt2.py --mode plot --out_dir "$R/pre"

if [ "${SUITE:-1}" = 1 ]; then
    python -m pip install -q pytest pytest-xdist
    start=$SECONDS
    python -m pytest -q -n auto test_gpt2.py -p no:cacheprovider >"$WORK/suite.log" 2>&1 || FAILED=1
    echo "suite ($((SECONDS - start)) s): $(tail -n 1 "$WORK/suite.log")"
fi
echo "logs: $WORK"
exit $FAILED
