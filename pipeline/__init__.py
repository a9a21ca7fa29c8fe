"""The ML pipeline: SFT -> preference pairs -> DPO (one run per beta) -> reward-vs-KL evaluation.

Runs with no scheduler: each stage is a function of (config, run layout), idempotent, and writes its
`DONE.json` manifest last. `jobs/` wraps these functions into SLURM or local jobs.
"""
