#!/usr/bin/env bash
# Runs one srigl_jax training command on every worker of a Cloud TPU VM pod.
#
# Every worker runs the same `python -m srigl_jax.main ...`; main.py sees the
# pod (TPU_WORKER_HOSTNAMES lists more than one host) and calls
# jax.distributed.initialize(), which finds the coordinator and the process
# ids from the TPU metadata. The workdir must be a path shared by all workers:
# `setup` mounts gs://$GCS_BUCKET at /gcs/$GCS_BUCKET with gcsfuse (orbax
# writes one checkpoint from all hosts; metrics and plots use file I/O).
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b \
#     launch/tpu_pod.sh setup                        # once: clone + install
#   TPU_NAME=my-v4-32 ZONE=us-central2-b \
#     launch/tpu_pod.sh run --config=configs/imagenet_resnet50.py \
#       --workdir=/gcs/my-bucket/r50_srigl90 [--config.xxx=...]
#
# Environment:
#   TPU_NAME, ZONE    the TPU VM and its zone (required).
#   PROJECT           GCP project (default: gcloud's configured project).
#   REPO_URL          git URL of srigl_jax for `setup`.
#   REPO_DIR          checkout on the workers (default: ~/srigl_jax).
#   GCS_BUCKET        bucket mounted at /gcs/$GCS_BUCKET by `setup` (optional).
#   TFDS_DATA_DIR     passed to the workers (e.g. /gcs/my-bucket/tfds).
#
# On SIGTERM (a spot/preemptible TPU VM's shutdown, or `pkill -TERM -f
# srigl_jax.main` on the workers) every worker finishes its step and all save
# the same one (JAX's preemption sync service, which on Cloud TPU also watches
# maintenance events) before exiting 0. Re-running the same `run` command then
# resumes from that checkpoint. Logs of worker 0 hold the progress lines.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-\$HOME/srigl_jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="${PROJECT}"); fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
    "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

cmd="${1:-}"; shift || true
case "${cmd}" in
  setup)
    : "${REPO_URL:?set REPO_URL to the git URL of srigl_jax}"
    on_all_workers "set -e; [ -d ${REPO_DIR} ] || git clone ${REPO_URL} ${REPO_DIR}; \
      cd ${REPO_DIR} && git pull --ff-only && \
      python3 -m pip install -U 'jax[tpu]' -e . tensorboardX"
    if [[ -n "${GCS_BUCKET:-}" ]]; then
      # Needs gcsfuse on the workers (cloud.google.com/storage/docs/gcsfuse-install).
      on_all_workers "sudo mkdir -p /gcs/${GCS_BUCKET} && \
        (mountpoint -q /gcs/${GCS_BUCKET} || sudo gcsfuse --implicit-dirs \
          -o allow_other ${GCS_BUCKET} /gcs/${GCS_BUCKET})"
    fi
    ;;
  run)
    [[ $# -gt 0 ]] || { echo "usage: $0 run --config=... --workdir=..." >&2; exit 2; }
    args=$(printf ' %q' "$@")
    on_all_workers "cd ${REPO_DIR} && \
      TFDS_DATA_DIR=${TFDS_DATA_DIR:-} python3 -m srigl_jax.main${args}"
    ;;
  *)
    echo "usage: $0 setup | run --config=... --workdir=..." >&2
    exit 2
    ;;
esac
