"""Scheduler-only code: SLURM resources, submission through submitit, queue queries.

Nothing in this package may import torch, transformers, trl, `pipeline` or `jobs`: it runs on
login nodes and in `--dry-run` without the ML stack.
"""
