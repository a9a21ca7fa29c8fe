"""Stop requests agreed across ranks: same step on every rank, the reason reaches rank 0."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.runtime import interrupt


def _rank(rank: int, port: int, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    interrupt.clear()
    seen = []
    for step in range(1, 11):
        if rank == 1 and step == 2:
            interrupt.request_stop("timeout")  # only rank 1 got the signal
        stop = interrupt.synchronized_stop_requested(step)
        seen.append(stop)
        if stop:
            break
    results[rank] = (step, interrupt.stop_reason(), seen.count(True))
    dist.destroy_process_group()


def test_ranks_stop_together_and_rank0_learns_the_reason():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    assert results[0] == results[1] == (interrupt.SYNC_EVERY_STEPS, "timeout", 1)


def test_single_process_stops_at_the_very_next_step():
    interrupt.clear()
    assert not interrupt.synchronized_stop_requested(1)
    interrupt.request_stop("terminated")
    assert interrupt.synchronized_stop_requested(2)  # no peers to agree with: no waiting
    interrupt.clear()


def _final_rank(rank: int, port: int, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    interrupt.clear()
    last_sync = interrupt.SYNC_EVERY_STEPS
    assert not interrupt.synchronized_stop_requested(last_sync)
    if rank == 1:
        interrupt.request_stop("preempted")  # after the last comparison: rank 0 has not seen it
    local = interrupt.stop_reason()
    results[rank] = (local, interrupt.agreed_stop_reason())
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_that_came_after_their_last_comparison():
    """The end of training decides on the agreed flag, not the local one (ranks would split and hang)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_final_rank, args=(port, results), nprocs=2, join=True)
    assert results[0] == (None, "preempted") and results[1] == ("preempted", "preempted")


def test_finish_or_raise_raises_only_for_a_stop_before_the_last_step(tmp_path):
    from types import SimpleNamespace

    import pytest

    from pipeline.rundir.progress import ProgressFile
    from pipeline.training.loop import finish_or_raise

    progress = ProgressFile(tmp_path / "progress.json")
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=75, max_steps=75))
    interrupt.clear()
    interrupt.request_stop("timeout")
    finish_or_raise(trainer, progress)  # the stop came with the last step: the stage is complete
    trainer.state.global_step = 40
    with pytest.raises(interrupt.StageInterrupted, match="timeout"):
        finish_or_raise(trainer, progress)
    assert (progress.state["status"], progress.state["stop_reason"], progress.state["step"]) == ("interrupted",
                                                                                                 "timeout", 40)
    interrupt.clear()
    finish_or_raise(trainer, progress)  # no stop: nothing to do


def test_a_finished_stage_ignores_a_late_time_limit_warning(monkeypatch):
    """SLURM's USR2 warning can arrive while a finished job's interpreter shuts down, when Python has
    put back USR2's default action (terminate): the job would end FAILED after writing DONE.json.
    Once the stage is over (done or not), the job callable ignores USR2."""
    import signal

    import pytest

    from jobs import stages

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        for outcome in ("done", "error"):
            def fake_stage(run_dir, stage, task, outcome=outcome):
                assert signal.getsignal(signal.SIGUSR2) not in (signal.SIG_IGN, signal.SIG_DFL)  # handled while it runs
                if outcome == "error":
                    raise RuntimeError("the stage failed")
                return {"done": True}

            monkeypatch.setattr(stages, "run_stage", fake_stage)
            job = stages.StageJob("/tmp/unused-run", "eval")
            if outcome == "error":
                with pytest.raises(RuntimeError, match="the stage failed"):
                    job()
            else:
                assert job() == {"done": True}
            assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
