# Sourced by the sbatch templates (in the batch step, before `srun`): environment, run
# directory, W&B run id, and the checkpoint to resume from. Everything can be preset by the
# caller (`sbatch --export=ALL,RUN_DIR=...,VENV=...`).
#
# Why a fixed run directory: a requeued job (preemption, `scontrol requeue`, Lightning's
# SIGUSR1 auto-requeue) keeps its job id and must find the previous attempt's checkpoints and
# W&B run; a run directory named after the job id gives it both.

set -euo pipefail

# Repository root: sbatch runs a *copy* of the script from Slurm's spool directory, so the
# script's own path says nothing; sbatch must be called from the repo root (or set DPG_ROOT).
DPG_ROOT=${DPG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$DPG_ROOT"
if [[ ! -f dpg_lightning/__init__.py ]]; then
  echo "slurm/env.sh: $DPG_ROOT is not the dpg_lightning repository; submit from the repo root" \
       "or export DPG_ROOT" >&2
  exit 2
fi

# Python environment: a venv (default .venv in the repo) or whatever PYTHON points at.
VENV=${VENV:-$DPG_ROOT/.venv}
if [[ -f $VENV/bin/activate ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
PYTHON=${PYTHON:-python}

# One CPU thread pool per rank, sized to the rank's CPUs (not the whole node's).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# Multi-node NCCL: keep failures loud instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# Run directory: one per job id (array jobs: per task), reused on requeue.
JOB_TAG=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_TAG=${JOB_TAG:-${SLURM_JOB_ID:-local}}
RUN_DIR=${RUN_DIR:-$DPG_ROOT/runs/slurm/${SLURM_JOB_NAME:-dpg}_$JOB_TAG}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
export RUN_DIR

# W&B: the run id lives in the run directory, so a requeued (or manually resubmitted with the
# same RUN_DIR) job logs into the same W&B run; WandbLogger/wandb.init read these variables.
if [[ ! -s $RUN_DIR/wandb_run_id ]]; then
  "$PYTHON" -c "import uuid; print(uuid.uuid4().hex[:12])" > "$RUN_DIR/wandb_run_id"
fi
export WANDB_RUN_ID=$(cat "$RUN_DIR/wandb_run_id")
export WANDB_RESUME=allow
export WANDB_DIR=${WANDB_DIR:-$RUN_DIR}

# Resume: `--ckpt_path last` makes the run resume its newest *readable* checkpoint in the run
# directory (Lightning's HPC checkpoint, written on SIGUSR1 before auto-requeue, or a
# `last*.ckpt` of ModelCheckpoint), skipping broken files with a message, and start fresh when
# there is none; metrics, samples and W&B then continue in the same run directory.
RESUME_ARGS=(--ckpt_path last)

# Where outputs go: the trainer's root dir (HPC checkpoints) and the logger's save_dir
# (metrics, and ModelCheckpoint's default dirpath). LOGGER_ARGS assumes one logger given as
# class_path/init_args (CSVLogger, WandbLogger); set it empty for configs with a logger list.
LOGGER_ARGS=${LOGGER_ARGS---trainer.logger.init_args.save_dir=$RUN_DIR}
RUN_ARGS=(--trainer.default_root_dir="$RUN_DIR")
if [[ -n $LOGGER_ARGS ]]; then
  read -r -a _logger <<< "$LOGGER_ARGS"
  RUN_ARGS+=("${_logger[@]}")
fi

echo "[dpg-slurm] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s); run dir $RUN_DIR;" \
     "wandb id $WANDB_RUN_ID; resuming the newest readable checkpoint there, if any"
