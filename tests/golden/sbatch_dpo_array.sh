#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --array=0-2%3
#SBATCH --cpus-per-task=8
#SBATCH --dependency=afterok:101
#SBATCH --error=/shared/runs/dpo/jobs/dpo/%A_%a_0_log.err
#SBATCH --gpus-per-node=1
#SBATCH --job-name=dpo
#SBATCH --mem=32G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/runs/dpo/jobs/dpo/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=120
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/dpo/jobs/dpo/%A_%a_%t_log.out --error /shared/runs/dpo/jobs/dpo/%A_%a_%t_log.err --cpus-per-task=8 python -u -m submitit.core._submit /shared/runs/dpo/jobs/dpo
