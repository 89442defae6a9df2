#!/usr/bin/env bash
# Steps of one GPU session on the lent device machine (see docs/dev/gpu_notes.md and docs/dev/lent_machines.md).
# The machine re-syncs the repository tree at every call and deletes ignored folders that are not carried, so a
# background run keeps its checkpoint outside the tree (/tmp/imhead) and every call copies it to $OUT.
#   bash docs/dev/device_session.sh start CKPT MINUTES SCHEDULE_MINUTES  # resume CKPT (carried) in the background
#   bash docs/dev/device_session.sh wait SECONDS                          # until the run ends or SECONDS pass
#   bash docs/dev/device_session.sh export                                # final checkpoint -> weights/ and $OUT
set -u
WORK=/tmp/imhead
case "$1" in
start)
    mkdir -p "$WORK"
    rm -rf "$WORK/run"
    cp -r "$2" "$WORK/run"
    cp "$2.log.jsonl" "$WORK/run.log.jsonl" 2>/dev/null || true
    setsid nohup python -m backend.train.train --data ict --ckpt "$WORK/run" --minutes "$3" --save-every 2 \
        --schedule-minutes "$4" --batch 16 --lr 5e-4 --code-lr 5e-3 --topk 0 >"$WORK/train.out" 2>&1 </dev/null &
    echo $! >"$WORK/train.pid"
    sleep 60
    tail -n 2 "$WORK/train.out"
    ;;
wait)
    end=$((SECONDS + $2))
    while kill -0 "$(cat "$WORK/train.pid")" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
    kill -0 "$(cat "$WORK/train.pid")" 2>/dev/null && echo "training still running" || echo "training ended"
    tail -n 1 "$WORK/train.out"
    mkdir -p "$OUT/run"
    cp "$WORK"/run/*.safetensors "$OUT/run/" || { sleep 5; cp "$WORK"/run/*.safetensors "$OUT/run/"; }
    cp "$WORK/run.log.jsonl" "$OUT/"
    ;;
export)
    python -m backend.train.export --ckpt "$WORK/run" --out weights/imhead.safetensors
    mkdir -p "$OUT/weights"
    cp weights/imhead.safetensors weights/imhead.safetensors.sha256 "$OUT/weights/"
    ;;
*)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
