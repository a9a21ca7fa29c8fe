"""wandb across a requeue, offline (issue #11, item 6).

A requeued stage writes one offline folder per attempt, all with the run id kept in the stage
directory. This test interrupts a real (shortened) tiny DPO stage with SLURM's early warning
(SIGUSR2), resumes it, and checks what the two offline folders hold, read back with wandb's own
record protobufs: one run id, both attempts started with resume allowed (wandb >= 0.31 records
this in the run record, and `wandb sync` then uploads the segments oldest first into one run),
and a `train/global_step` x-axis that the resumed segment continues instead of restarting at 0.
No wandb server is reachable here: `wandb sync --dry-run` only lists what it would upload.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import clone_before_dpo, start_stage_job, wait_for_step
from pipeline.training.loop import latest_checkpoint

STEP_METRIC = "train/global_step"  # transformers' WandbCallback: define_metric("*", step_metric=...)

# --------------------------------------------------------------- reading a .wandb transaction log
# wandb >= 0.30 ships no Python reader (its datastore moved into the Go wandb-core), so the
# framing is decoded here: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# chunks, each `crc32 (uint32 LE) | length (uint16 LE) | type (FULL=1, FIRST, MIDDLE, LAST)` + data;
# the checksum is zlib's crc32 of the data seeded with the crc32 of the type byte. A chunk header
# never straddles a block: fewer than 7 bytes left in a block are padding. The payloads are
# wandb.proto Record messages.
_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every complete record of a .wandb file (a file cut off mid-record yields the ones before)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:len(_HEADER)] == _HEADER, f"{path}: not a wandb transaction log (header {data[:7]!r})"
    records, pos, pending = [], len(_HEADER), b""
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:
            pos += left_in_block  # block trailer padding
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero padding: end of what was written
            break
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        if len(chunk) < length:
            break  # the writer died mid-chunk
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad checksum at byte {pos}"
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def segment(folder: Path) -> dict:
    """What one attempt's offline folder says: its run record and the logged step-metric values."""
    (wandb_file,) = folder.glob("*.wandb")
    run, steps, internal_steps = None, [], []
    for record in read_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run" and run is None:
            run = record.run
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if STEP_METRIC in items:
                steps.append(items[STEP_METRIC])
                internal_steps.append(items.get("_step"))
    assert run is not None, f"{wandb_file}: no run record"
    return {"folder": folder, "file": wandb_file, "id": run.run_id, "start": run.start_time.ToMicroseconds(),
            "resume": run.resume, "resumed": run.resumed, "steps": steps, "internal_steps": internal_steps}


def wandb_cli(*args: str, cwd: Path, wandb_dir: Path) -> subprocess.CompletedProcess:
    """The venv's wandb CLI, offline (no server is reachable), with its messages shown (not silent)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
    return subprocess.run([sys.executable, "-m", "wandb", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# --------------------------------------------------------------- a real requeued stage
@pytest.mark.slow
def test_requeued_stage_continues_one_offline_wandb_run(tiny_run, tmp_path):
    from wandb.proto import wandb_internal_pb2

    assert "resume" in wandb_internal_pb2.RunRecord.DESCRIPTOR.fields_by_name, (
        f"wandb {__import__('wandb').__version__} does not record in an offline run that it resumes a run "
        "(RunRecord.resume, present in 0.31; absent in 0.28); install wandb>=0.31")

    # the tiny DPO stage, shortened to 0.3 epochs (~23 steps, a few seconds on a CPU) and logging every
    # step, so that the x-axis of each segment can be checked step by step
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", wandb={"enabled": True, "mode": "offline"},
                               dpo={"epochs": 0.3, "logging_steps": 1})
    stage_dir = run_dir / "dpo" / "beta-0.1"

    proc = start_stage_job(run_dir, "dpo", "0.1")
    wait_for_step(stage_dir / "progress.json", 3, proc)
    proc.send_signal(signal.SIGUSR2)  # SLURM's early warning: save at this step, stop, requeue
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped on request" in out, out[-3000:]
    stopped = json.loads((stage_dir / "progress.json").read_text())
    stop_step, total = stopped["step"], stopped["total_steps"]
    assert stopped["status"] == "interrupted" and 3 <= stop_step < total, stopped
    assert latest_checkpoint(stage_dir / "checkpoints")[0] == stop_step

    proc = start_stage_job(run_dir, "dpo", "0.1")  # the requeued job
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    manifest = json.loads((stage_dir / "DONE.json").read_text())
    assert [(r["resumed_from_step"], r["step_before"]) for r in manifest["restarts"]] == [(stop_step, stop_step)]
    assert manifest["metrics"]["global_step"] == total

    # one offline folder per attempt, oldest first, both carrying the stage's stored run id
    folders = sorted(p for p in (run_dir / "wandb").rglob("offline-run-*") if p.is_dir() and not p.is_symlink())
    assert len(folders) == 2, folders
    first, second = (segment(folder) for folder in folders)
    run_id = json.loads((stage_dir / "wandb_run.json").read_text())["id"]
    assert first["id"] == second["id"] == run_id
    assert all(folder.name.endswith(f"-{run_id}") for folder in folders)
    assert first["start"] < second["start"]  # `wandb sync` uploads segments of one run by start time

    # marked as resuming: every attempt starts with WANDB_RESUME=allow (configure_wandb), which
    # wandb >= 0.31 records in the run record. (`resumed`, the server's answer, stays false offline.)
    assert first["resume"] and second["resume"]

    # the x-axis: the first segment logs steps 1..stop, the resumed one continues at stop+1 up to the
    # end (the final summary row repeats the last step), not at 0; wandb's own `_step` does restart
    assert sorted(set(first["steps"])) == list(range(1, stop_step + 1)), first["steps"]
    assert sorted(set(second["steps"])) == list(range(stop_step + 1, total + 1)), second["steps"]
    assert max(first["steps"]) <= min(second["steps"]) == stop_step + 1
    assert second["internal_steps"][0] == 0  # hence the step metric: `_step` alone would overlap

    # `wandb sync --dry-run` (no server needed) lists both segments, oldest first
    sync = wandb_cli("sync", "--dry-run", *map(str, folders), cwd=run_dir / "wandb", wandb_dir=tmp_path)
    listing = sync.stdout + sync.stderr
    assert sync.returncode == 0, listing
    assert "Would sync 2 run(s)" in listing, listing
    positions = [listing.find(str(s["file"].relative_to(run_dir / "wandb"))) for s in (first, second)]
    assert -1 < positions[0] < positions[1], listing
