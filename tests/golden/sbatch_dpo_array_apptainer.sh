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

# setup
SLURM_DPO_APPTAINER=$(command -v apptainer || command -v singularity) || { echo 'slurm.container.runtime=apptainer: neither apptainer nor singularity is on the PATH of the compute node' >&2; exit 1; }

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/dpo/jobs/dpo/%A_%a_%t_log.out --error /shared/runs/dpo/jobs/dpo/%A_%a_%t_log.err --cpus-per-task=8 --mpi=pmix "$SLURM_DPO_APPTAINER" exec --nv --bind /shared/runs/dpo,/shared/repo,/shared/hf/hub,/scratch --pwd /shared/repo --cleanenv /shared/images/dpo.sif python3 -u -m submitit.core._submit /shared/runs/dpo/jobs/dpo
