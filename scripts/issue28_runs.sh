#!/bin/bash
# Issue 28's long runs in order (docs/plans/issue28-runs.md): the library at the validation-chosen recipe, the two
# multi-task LoRAs, the full fine-tune bound on 4 tasks, then the grid. Every step is resumable: rerun this script
# after a kill and each step skips what it finished. Run it niced in the background:
#   WORK=/work/repro28 EXTRA=/work/shared/data/extra setsid nohup nice -n 19 bash scripts/issue28_runs.sh >> $WORK/runs.log 2>&1 &
# Pause it (kill -STOP) while a benchmark needs the machine; its recorded seconds then include the pause.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:?set WORK, e.g. /work/repro28}
DATA=${DATA:-$WORK/data}
EXTRA=${EXTRA:?set EXTRA, the directory of the 6 extra tasks}
DLP=${DLP:-.venv/bin/dlp-lora}
stamp() { echo "== $(date -u +%FT%TZ) $*"; }

stamp "1/4 library"
$DLP train-loras --tasks all --data "$DATA" --out "$WORK/library" --recipe select --eval-limit 0
stamp "2/4 multi-task LoRA, rank 8 and rank 32"
$DLP train-multitask --library "$WORK/library" --data "$DATA"
$DLP train-multitask --library "$WORK/library" --data "$DATA" --rank 32 --name multitask-r32
stamp "3/4 full fine-tune bound"
for t in question_selection winowhy cs_algorithms unit_conversion; do
  [ -f "$WORK/fullft/$t.json" ] || $DLP train-full --task "$t" --data "$DATA" --out "$WORK/fullft"
done
stamp "4/4 the grid"
$DLP reproduce --extra-data "$EXTRA" --work "$WORK" --out runs/reproduce28 --recipe select --multitask-ranks 8,32 \
    --full-ft "$WORK/fullft" --conversations 100 --no-progress
stamp "done"
