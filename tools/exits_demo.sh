#!/usr/bin/env bash
# The early-exit stage on a 2-core CPU, end to end (about 35 minutes): SmolLM2-135M as a full-rank
# 2-loop model (equal to the source) -> exit training (configs/smollm2-135m-exits-cpu.yaml, 20K
# tokens of pydoc topics) -> `relaxrec eval exits` before and after (per-loop perplexity, calibrated
# thresholds, plots) -> `relaxrec bench serve` on the trained model at its calibrated threshold.
# Everything lands in outputs/exits/. Extra arguments are overrides of the run config.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
set -euo pipefail
OUT=outputs/exits
mkdir -p "$OUT/data"
python - "$OUT/data" <<'PY'
import json, sys
from relaxrec_megatron.data.pydoc_text import pydoc_topics
for split in ("train", "heldout"):
    with open(f"{sys.argv[1]}/pydoc_{split}.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in pydoc_topics(split))
PY
relaxrec data prepare "$OUT/data/pydoc_train.jsonl" --tokenizer builtin:smollm2-135m \
    --output-prefix "$OUT/data/pydoc_train" --quiet
NPROC_PER_NODE=2 launch/torchrun.sh configs/smollm2-135m-exits-cpu.yaml "$@"
STEP="$(cat "$OUT/run/checkpoints/latest")"
relaxrec export hf-relaxed "$OUT/run/checkpoints/$STEP/model" "$OUT/trained" --overwrite --quiet
HELD_OUT=(--data "$OUT/data/pydoc_heldout.jsonl" --max-tokens 4096)
relaxrec eval exits "$OUT/run/init/student" "${HELD_OUT[@]}" --output "$OUT/exits-before.json" \
    --plot "$OUT/exits-before.png"
relaxrec eval exits "$OUT/trained" "${HELD_OUT[@]}" --output "$OUT/exits-after.json" --plot "$OUT/exits-after.png"
relaxrec bench serve --model "$OUT/trained" --threshold auto --simulate --exit-prob -1 --repeat 3 \
    --json "$OUT/serve.json" --plot "$OUT/serve.png"
