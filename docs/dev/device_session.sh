#!/usr/bin/env bash
# Steps of one GPU piece on the lent device machine (docs/dev/gpu_notes.md). The committed training state
# (training_state/run, resumed and replaced by every piece) travels with the tree; the machine re-syncs the
# tree at every call, so the background run keeps its checkpoint in /tmp/imhead and each call copies it to $OUT.
#   bash docs/dev/device_session.sh start MINUTES SCHEDULE_MINUTES [TRAIN_ARGS...]  # resume training_state/run in
#                                                                    # the background (e.g. --detail-weight 3)
#   bash docs/dev/device_session.sh piece MINUTES SCHEDULE_MINUTES [TRAIN_ARGS...]  # the same in the foreground,
#       resuming /tmp/imhead/run if this machine still has it, else training_state/run; checkpoint to $OUT (a
#       machine lost between calls then costs only the call in flight)
#   bash docs/dev/device_session.sh wait SECONDS                     # until the run ends or SECONDS pass
#   bash docs/dev/device_session.sh eval IDENTITIES [WHICH]          # export the checkpoint, eval it (WHICH=new)
#                                                                    # or it and the shipped weights (both, default)
#   bash docs/dev/device_session.sh capacity MINUTES IDS WIDTH...    # capacity study (issue 13 point 2): per local
#       width, a run warm-started from weights/ (wider nets start as the same function), MINUTES each, on IDS
#       fixed training identities (a code table: can the network fit them at all?) or, with IDS=0, fresh ones
set -u
WORK=/tmp/imhead
export PYTHONPATH=$PWD
case "$1" in
start)
    mkdir -p "$WORK"
    rm -rf "$WORK/run"
    cp -r training_state/run "$WORK/run"
    cp training_state/run.log.jsonl "$WORK/run.log.jsonl"
    setsid nohup python -m backend.train.train --data ict --ict .data/ict.safetensors --ckpt "$WORK/run" \
        --minutes "$2" --save-every 3 --schedule-minutes "$3" --batch 16 --lr 3e-4 --code-lr 5e-3 --topk 0 \
        --step analytic --identities encoder --compile "${@:4}" >"$WORK/train.out" 2>&1 </dev/null &
    echo $! >"$WORK/train.pid"
    sleep 90
    tail -n 3 "$WORK/train.out"
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv
    ;;
piece)
    mkdir -p "$WORK" "$OUT/run"
    if [ ! -f "$WORK/run/state.safetensors" ]; then
        rm -rf "$WORK/run"
        cp -r training_state/run "$WORK/run"
        cp training_state/run.log.jsonl "$WORK/run.log.jsonl"
    fi
    python -m backend.train.train --data ict --ict .data/ict.safetensors --ckpt "$WORK/run" \
        --minutes "$2" --save-every 3 --schedule-minutes "$3" --batch 16 --lr 3e-4 --code-lr 5e-3 --topk 0 \
        --step analytic --identities encoder --compile "${@:4}" >"$WORK/train.out" 2>&1 </dev/null
    tail -n 2 "$WORK/train.out"
    cp "$WORK"/run/*.safetensors "$OUT/run/"
    cp "$WORK/run.log.jsonl" "$OUT/"
    ;;
wait)
    end=$((SECONDS + $2))
    while kill -0 "$(cat "$WORK/train.pid")" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
    kill -0 "$(cat "$WORK/train.pid")" 2>/dev/null && echo "training still running" || echo "training ended"
    tail -n 2 "$WORK/train.out"
    mkdir -p "$OUT/run"
    cp "$WORK"/run/*.safetensors "$OUT/run/" || { sleep 5; cp "$WORK"/run/*.safetensors "$OUT/run/"; }
    cp "$WORK/run.log.jsonl" "$OUT/"
    ;;
eval)
    mkdir -p "$WORK/new" "$OUT/weights"
    cp weights/*.safetensors weights/*.sha256 weights/MODEL_CARD.md "$WORK/new/"
    ckpt="$WORK/run"; [ -f "$ckpt/state.safetensors" ] || ckpt=training_state/run  # a fresh machine
    python -m backend.train.export --ckpt "$ckpt" --out "$WORK/new/imhead.safetensors"
    cp "$WORK/new/imhead.safetensors" "$WORK/new/imhead.safetensors.sha256" "$OUT/weights/"
    which="new old"; [ "${3:-both}" = new ] && which=new
    for w in $which; do
        dir="$WORK/new"; [ "$w" = old ] && dir=weights
        python -m backend eval --ict .data/ict.safetensors --weights "$dir" --identities "$2" --expressions 1 \
            --steps 300 --resolution 256 --batch-points 2048 --samples 200000 --locality-regions 39 \
            --json "$OUT/eval_$w.json" | tail -n 12
    done
    ;;
capacity)
    ids=(--identities encoder); [ "$3" != 0 ] && ids=(--identities table --n-train "$3")
    for w in "${@:4}"; do
        rm -rf "$WORK/cap$w" "$WORK/cap$w.log.jsonl"
        python -m backend.train.train --data ict --ict .data/ict.safetensors --ckpt "$WORK/cap$w" \
            --init-weights weights --local-hidden "$w" "${ids[@]}" --minutes "$2" --schedule-minutes "$2" \
            --warmup 100 --batch 16 --lr 1e-4 --code-lr 5e-3 --topk 0 --step analytic --compile --log-every 100 \
            >"$WORK/cap$w.out" 2>&1
        echo "width $w: $(tail -n 1 "$WORK/cap$w.out")"
        cp "$WORK/cap$w.log.jsonl" "$OUT/capacity_w$w.log.jsonl"
    done
    ;;
*)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
