#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every TPU VM worker runs one process over its 4 chips.
#
#   export TPU=my-v5p-256 ZONE=us-east5-a PROJECT=my-project
#   launch/tpu_pod.sh create v5p-256            # once: a TPU VM slice (tpu-ubuntu2204-base)
#   launch/tpu_pod.sh install                   # copies this repo to every worker, builds .venv there
#   launch/tpu_pod.sh run --config configs/mae_scale.py:preset=L8 --workdir /tmp/mae-l8 \
#       --config.ckpt_dir=gs://BUCKET/mae-l8/checkpoints --config.data.dir=/mnt/data/phenoprints
#   launch/tpu_pod.sh stop                      # SIGTERM to every worker: checkpoint, then exit
#
# Checkpoints must be on storage every worker sees (gs://...: orbax writes it directly). Metrics go to the
# workdir of worker 0. The dataset must be readable on every worker at the same path (a gcsfuse mount of
# the bucket, as MaxText does, or a copy on local disk). Running `run` again resumes from the checkpoint.
# Multi-slice (e.g. 2 x v5p-256 over DCN): create the slices with queued resources, add
# --config.mesh.dcn_data=2, and run the same command on all workers of all slices.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
gc=(gcloud compute tpus tpu-vm)
[ -n "${PROJECT:-}" ] && gc+=(--project "$PROJECT")
on_all() { "${gc[@]}" ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:?usage: tpu_pod.sh create TYPE | install | run ARGS... | stop}" in
  create)
    "${gc[@]}" create "$TPU" --zone "$ZONE" --accelerator-type "${2:?accelerator type, e.g. v5p-256}" \
      --version "${TPU_VERSION:-tpu-ubuntu2204-base}"
    ;;
  install)
    tar czf /tmp/maejax-src.tgz --exclude .git --exclude .venv --exclude runs .
    "${gc[@]}" scp /tmp/maejax-src.tgz "$TPU":/tmp/ --zone "$ZONE" --worker=all
    on_all "mkdir -p ~/maejax && tar xzf /tmp/maejax-src.tgz -C ~/maejax && cd ~/maejax && bash launch/setup.sh \
      && .venv/bin/pip install --quiet 'jax[tpu]==0.10.2'"
    ;;
  run)
    shift
    # MAEJAX_DISTRIBUTED=1: every worker joins the job (jax finds the coordinator from the TPU metadata).
    # nohup + log file: the job survives the ssh session; `tail -f ~/maejax/train.log` on a worker to watch.
    on_all "cd ~/maejax && MAEJAX_DISTRIBUTED=1 nohup .venv/bin/python -m maejax.train $(printf '%q ' "$@") \
      > train.log 2>&1 & echo \$! > train.pid"
    ;;
  stop)
    on_all "cd ~/maejax && kill -TERM \$(cat train.pid)"
    ;;
  *)
    echo "unknown command $1" >&2; exit 2 ;;
esac
