#!/usr/bin/env bash
#SBATCH --job-name=relaxrec-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#
# Tokenize a large corpus on many machines: a slurm array job, one shard per task. Task I of an
# array 0..N-1 runs `relaxrec data prepare ... --shard I/N` with one tokenizer worker per CPU and
# writes OUTPUT_PREFIX-IIIII-of-NNNNN.{bin,idx,json}. A task whose shard is already prepared from the
# same inputs skips it, so resubmitting the whole array after a failure redoes only what is missing.
# Then either name OUTPUT_PREFIX in data.blend (it stands for the complete shard set) or merge:
#   relaxrec data merge OUTPUT_PREFIX --output-prefix MERGED
#
#   TOKENIZER=google/gemma-2b OUTPUT_PREFIX=data/slimpajama/slimpajama_text_document \
#     sbatch --array=0-63 slurm/prepare_data.sh /data/slimpajama/train/
#   relaxrec data stats data/slimpajama/slimpajama_text_document --config gemma-2b-relaxed
#
# With at least N input files each task reads only its own files; with fewer, every task opens
# the corpus and keeps its range of documents.
set -euo pipefail
# the checkout and its Python environment (as slurm/uptrain_gemma.sh finds them)
ROOT="${RELAXREC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -f "$ROOT/launch/python_env.sh" ] || ROOT="$(dirname "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2- || true)")")"
[ -f "$ROOT/launch/python_env.sh" ] || ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
[ -f "$ROOT/launch/python_env.sh" ] || { echo "prepare_data.sh: cannot find the relaxrec checkout; submit from it or set RELAXREC_ROOT" >&2; exit 2; }
source "$ROOT/launch/python_env.sh"
: "${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=0-<N-1> (or set SLURM_ARRAY_TASK_*)}"
: "${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT unset}"
: "${TOKENIZER:?set TOKENIZER (tokenizer folder or hub name of the source model)}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX (the dataset prefix data.blend will name)}"
if [ "${SLURM_ARRAY_TASK_MIN:-0}" != 0 ]; then
    echo "prepare_data.sh: the array must start at 0 (--array=0-$((SLURM_ARRAY_TASK_COUNT - 1))), got ${SLURM_ARRAY_TASK_MIN}" >&2
    exit 2
fi
[ "$#" -gt 0 ] || { echo "prepare_data.sh: name the corpus files or folders to tokenize" >&2; exit 2; }
SHARD="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-2}}"
echo "[data] shard $SHARD on $(hostname) with $WORKERS workers"
exec python -m relaxrec_megatron.cli.main data prepare "$@" --tokenizer "$TOKENIZER" \
    --output-prefix "$OUTPUT_PREFIX" --workers "$WORKERS" --shard "$SHARD" --quiet ${TEXT_KEY:+--text-key "$TEXT_KEY"}
