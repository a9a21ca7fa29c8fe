"""slurm.queue: canned sacct / squeue / scancel output, no SLURM needed."""
import re
import subprocess

import pytest

from slurm import queue
from slurm.queue import JobRecord, cancel_jobs, query_jobs


class FakeRunner:
    """Stands in for subprocess.run: answers per command name, records every call."""

    def __init__(self, **answers):
        self.answers = answers  # name -> (returncode, stdout, stderr) | exception instance
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        assert kwargs.get("capture_output") and kwargs.get("text") and kwargs.get("timeout")
        assert isinstance(cmd, list), "commands run without a shell"
        self.calls.append(cmd)
        answer = self.answers.get(cmd[0])
        if answer is None or isinstance(answer, BaseException):
            raise answer or FileNotFoundError(cmd[0])
        rc, out, err = answer
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def names(self):
        return [c[0] for c in self.calls]


T0, T1, T2, T3 = "2024-05-01T10:00:00", "2024-05-01T11:00:00", "2024-05-01T12:00:00", "2024-05-01T13:00:00"
SUB0, SUB1 = "2024-05-01T09:59:00", "2024-05-01T11:05:00"
CPU1 = "billing=1,cpu=1,mem=1000M,node=1"  # AllocTRES of a one-CPU job, as sacct 22.05 prints it

# JobID|State|NodeList|ElapsedRaw|Start|End|ExitCode|Submit|AllocTRES
SACCT = "\n".join([
    f"100|COMPLETED|node01|3600|{T0}|{T1}|0:0|{SUB0}|{CPU1}",  # plain job, done
    f"101_0|COMPLETED|node01|60|{T0}|{T0}|0:0|{SUB0}|{CPU1}",  # array tasks
    f"101_1|FAILED|node02|61|{T0}|{T0}|1:0|{SUB0}|{CPU1}",
    f"101_2|RUNNING|node02|30|{T1}|Unknown|0:0|{SUB0}|{CPU1}",
    f"101_[3-5%2]|PENDING|None assigned|0|Unknown|Unknown|0:0|{SUB0}|{CPU1}",  # pending remainder, throttled
    f"102|REQUEUED|node01|7080|{T0}|{T2}|0:0|{SUB0}|{CPU1}",  # requeued twice, now running
    f"102|PREEMPTED|node03|100|{T2}|{T2}|0:15|2024-05-01T12:00:00|{CPU1}",
    f"102|RUNNING|node01|40|{T3}|Unknown|0:0|{SUB1.replace('11:05', '12:01')}|{CPU1}",
    f"103|CANCELLED by 0|None assigned|0|None|{T1}|0:0|{SUB0}|{CPU1}",  # cancelled while pending
    f"104_[0-2]|PENDING|None assigned|0|Unknown|Unknown|0:0|{SUB0}|{CPU1}",  # whole array pending
    f"105|OUT_OF_MEMORY|node04|12|{T0}|{T0}|0:125|{SUB0}|{CPU1}",
    "",
])


def test_one_sacct_call_with_the_documented_flags():
    runner = FakeRunner(sacct=(0, SACCT, ""))
    query_jobs(["100", "101", "102", "103", "104", "105"], runner=runner)
    assert runner.calls == [["sacct", "-X", "-D", "-n", "-P", "-j", "100,101,102,103,104,105",
                             "-o", "JobID,State,NodeList,ElapsedRaw,Start,End,ExitCode,Submit,AllocTRES"]]


def test_records_from_sacct():
    records = query_jobs(["100", "101", "102", "103", "104", "105"], runner=FakeRunner(sacct=(0, SACCT, "")))
    assert records["100"] == JobRecord("100", "COMPLETED", "node01", 3600, T0, T1, "0:0", 0)
    assert records["101_1"] == JobRecord("101_1", "FAILED", "node02", 61, T0, T0, "1:0", 0)
    assert records["101_2"] == JobRecord("101_2", "RUNNING", "node02", 30, T1, None, "0:0", 0)
    assert records["105"].state == "OUT_OF_MEMORY" and records["105"].exit_code == "0:125"
    assert sorted(records) == ["100", "101_0", "101_1", "101_2", "101_3", "101_4", "101_5", "102", "103",
                               "104_0", "104_1", "104_2", "105"]


def test_pending_array_ranges_expand_per_task():
    records = query_jobs(["101", "104"], runner=FakeRunner(sacct=(0, SACCT, "")))
    for task in ("101_3", "101_4", "101_5", "104_0", "104_1", "104_2"):
        assert records[task] == JobRecord(task, "PENDING", None, 0, None, None, "0:0", 0)


def test_requeued_duplicates_keep_latest_and_count_restarts():
    record = query_jobs(["102"], runner=FakeRunner(sacct=(0, SACCT, "")))["102"]
    assert (record.state, record.node, record.elapsed_s, record.start, record.end) == ("RUNNING", "node01", 40, T3, None)
    assert record.restarts == 2


def test_latest_is_by_submit_time_not_output_order():
    out = "\n".join([f"7|RUNNING|n1|5|{T3}|Unknown|0:0|{T3}|{CPU1}",
                     f"7|REQUEUED|n1|50|{T0}|{T1}|0:0|{T0}|{CPU1}"])
    record = query_jobs(["7"], runner=FakeRunner(sacct=(0, out, "")))["7"]
    assert (record.state, record.restarts) == ("RUNNING", 1)


def test_cancelled_by_uid_is_normalised():
    record = query_jobs(["103"], runner=FakeRunner(sacct=(0, SACCT, "")))["103"]
    assert record == JobRecord("103", "CANCELLED", None, 0, None, T1, "0:0", 0)
    assert record.state in queue.FAILED_STATES


@pytest.mark.parametrize("raw, state", [("CANCELLED by 1000", "CANCELLED"), ("RUNNING", "RUNNING"),
                                        ("completed", "COMPLETED"), ("PENDING+", "PENDING"), ("", "UNKNOWN")])
def test_normalise_state(raw, state):
    assert queue.normalise_state(raw) == state


def test_task_with_own_row_is_not_a_restart_of_the_range():
    out = "\n".join([f"9_[1-2]|PENDING|None assigned|0|Unknown|Unknown|0:0|{SUB0}|{CPU1}",
                     f"9_1|RUNNING|n1|3|{T1}|Unknown|0:0|{SUB0}|{CPU1}"])
    records = query_jobs(["9"], runner=FakeRunner(sacct=(0, out, "")))
    assert (records["9_1"].state, records["9_1"].restarts) == ("RUNNING", 0)
    assert (records["9_2"].state, records["9_2"].restarts) == ("PENDING", 0)


def test_real_sacct_22_05_lines():
    """Verbatim shapes seen from sacct 22.05.8 on the test cluster: a partly released throttled array
    and a job requeued once."""
    out = "\n".join([
        "30_1|COMPLETED|vm|0|2026-11-27T03:10:56|2026-11-27T03:10:56|0:0|2026-11-27T03:10:35|billing=1,cpu=1,mem=1000M,node=1",
        "30_[0,2-3%2]|PENDING|None assigned|0|Unknown|Unknown|0:0|2026-11-27T03:10:35|billing=1,cpu=1,mem=1000M,node=1",
        "11|REQUEUED|vm|1|2026-11-27T03:08:50|2026-11-27T03:08:51|0:0|2026-11-27T03:08:49|billing=1,cpu=1,mem=1000M,node=1",
        "11|COMPLETED|vm|0|2026-11-27T03:09:02|2026-11-27T03:09:02|0:0|2026-11-27T03:08:51|billing=1,cpu=1,mem=1000M,node=1",
    ])
    records = query_jobs(["30", "11"], runner=FakeRunner(sacct=(0, out, "")))
    assert sorted(records) == ["11", "30_0", "30_1", "30_2", "30_3"]
    assert [records[f"30_{i}"].state for i in range(4)] == ["PENDING", "COMPLETED", "PENDING", "PENDING"]
    assert records["11"] == JobRecord("11", "COMPLETED", "vm", 0, "2026-11-27T03:09:02", "2026-11-27T03:09:02",
                                      "0:0", 1)


def test_querying_one_array_task():
    out = f"101_2|RUNNING|node02|30|{T1}|Unknown|0:0|{SUB0}|{CPU1}\n"
    runner = FakeRunner(sacct=(0, out, ""))
    assert list(query_jobs(["101_2"], runner=runner)) == ["101_2"]
    assert runner.names() == ["sacct"]


SQUEUE = "\n".join([
    "200|RUNNING|node01|1-02:03:04|2024-05-01T10:00:00|2024-05-02T10:00:00",
    "201_0|PENDING||0:00|2024-05-01T14:00:00|2024-05-01T15:00:00",
    "201_1|COMPLETED|node02|5:07|2024-05-01T10:00:00|2024-05-01T10:05:07",
    "202|COMPLETING|node03|1:00:00|2024-05-01T09:00:00|2024-05-01T10:00:00",
    "",
])


def test_sacct_unavailable_falls_back_to_one_squeue_call():
    runner = FakeRunner(sacct=(1, "", "sacct: error: Slurm accounting storage is disabled\n"), squeue=(0, SQUEUE, ""))
    records = query_jobs(["200", "201", "202"], runner=runner)
    assert runner.calls[1] == ["squeue", "-h", "-r", "-t", "all", "-j", "200,201,202", "-o", "%i|%T|%N|%M|%S|%e"]
    assert runner.names() == ["sacct", "squeue"]
    assert records["200"] == JobRecord("200", "RUNNING", "node01", 93784, "2024-05-01T10:00:00", None, None, 0)
    assert records["201_0"] == JobRecord("201_0", "PENDING", None, 0, None, None, None, 0)  # estimates dropped
    assert records["201_1"] == JobRecord("201_1", "COMPLETED", "node02", 307, "2024-05-01T10:00:00",
                                         "2024-05-01T10:05:07", None, 0)
    assert records["202"].elapsed_s == 3600 and records["202"].end is None


def test_sacct_missing_binary_falls_back_too():
    runner = FakeRunner(squeue=(0, SQUEUE, ""))
    assert "200" in query_jobs(["200"], runner=runner)
    assert runner.names() == ["sacct", "squeue"]


def test_ids_unknown_to_sacct_are_looked_up_in_squeue():
    """A job submitted a moment ago may not be in the accounting database yet."""
    runner = FakeRunner(sacct=(0, f"100|COMPLETED|node01|3600|{T0}|{T1}|0:0|{SUB0}|{CPU1}\n", ""),
                        squeue=(0, "201_0|PENDING||0:00|N/A|N/A\n201_1|PENDING||0:00|N/A|N/A\n", ""))
    records = query_jobs(["100", "201", "300"], runner=runner)
    assert runner.calls[1][:7] == ["squeue", "-h", "-r", "-t", "all", "-j", "201,300"]
    assert sorted(records) == ["100", "201_0", "201_1"]  # 300: nobody knows it -> absent


def test_squeue_invalid_job_id_means_unknown_not_error():
    runner = FakeRunner(sacct=(1, "", "accounting storage is disabled"),
                        squeue=(1, "", "slurm_load_jobs error: Invalid job id specified\n"))
    assert query_jobs(["999"], runner=runner) == {}


def test_neither_sacct_nor_squeue_raises_with_both_reasons():
    runner = FakeRunner(sacct=(1, "", "sacct: error: Problem talking to the database: Connection refused"))
    with pytest.raises(RuntimeError) as info:
        query_jobs(["1", "2"], runner=runner)
    message = str(info.value)
    assert message.startswith("cannot query SLURM jobs 1,2:")
    assert "Connection refused" in message and "`squeue` is not on the PATH" in message


def test_sacct_timeout_is_a_failure():
    runner = FakeRunner(sacct=subprocess.TimeoutExpired("sacct", 60), squeue=(0, SQUEUE, ""))
    assert "200" in query_jobs(["200"], runner=runner)


def test_unexpected_sacct_output_is_reported():
    with pytest.raises(RuntimeError, match="unexpected sacct output line"):
        query_jobs(["1"], runner=FakeRunner(sacct=(0, "1|RUNNING|n1\n", "")))


def test_empty_query_makes_no_call():
    runner = FakeRunner()
    assert query_jobs([], runner=runner) == {} and runner.calls == []


@pytest.mark.parametrize("ids, where", [(["12;rm"], "job_ids[0]"), (["1", "1_x"], "job_ids[1]"),
                                        ("123", "job_ids"), ([None], "job_ids[0]"), (["-1"], "job_ids[0]")])
def test_bad_ids_refused_before_any_call(ids, where):
    runner = FakeRunner()
    with pytest.raises(ValueError, match="^" + re.escape(where)):
        query_jobs(ids, runner=runner)
    assert runner.calls == []


def test_duplicate_ids_are_asked_once():
    runner = FakeRunner(sacct=(0, "", ""), squeue=(0, "", ""))
    query_jobs(["5", "5", 6], runner=runner)
    assert runner.calls[0][6] == "5,6"


# ------------------------------------------------------------------ state sets
def test_state_sets():
    assert queue.ACTIVE_STATES >= {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                                   "SUSPENDED"}
    assert queue.DONE_OK_STATES == {"COMPLETED"}
    assert queue.FAILED_STATES == {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                                   "BOOT_FAIL", "DEADLINE"}
    assert not (queue.ACTIVE_STATES & queue.DONE_OK_STATES or queue.ACTIVE_STATES & queue.FAILED_STATES
                or queue.DONE_OK_STATES & queue.FAILED_STATES)
    assert all(isinstance(s, frozenset) for s in (queue.ACTIVE_STATES, queue.DONE_OK_STATES, queue.FAILED_STATES))


# ------------------------------------------------------------------ scancel
def test_cancel_is_one_scancel_call():
    runner = FakeRunner(scancel=(0, "", ""))
    assert cancel_jobs(["100", "101_2", "102"], runner=runner) == []
    assert runner.calls == [["scancel", "100", "101_2", "102"]]


def test_cancel_nothing_makes_no_call():
    runner = FakeRunner()
    assert cancel_jobs([], runner=runner) == [] and runner.calls == []


def test_cancel_finished_jobs_is_harmless():
    err = ("scancel: error: Kill job error on job id 100: Job/step already completing or completed\n"
           "scancel: error: Invalid job id specified\n")
    assert len(cancel_jobs(["100", "99"], runner=FakeRunner(scancel=(1, "", err)))) == 2


def test_cancel_real_errors_raise():
    with pytest.raises(RuntimeError, match="Access/permission denied"):
        cancel_jobs(["100"], runner=FakeRunner(
            scancel=(1, "", "scancel: error: Kill job error on job id 100: Access/permission denied\n")))
    with pytest.raises(RuntimeError, match="`scancel` is not on the PATH"):
        cancel_jobs(["100"], runner=FakeRunner())
    with pytest.raises(ValueError, match=r"^job_ids\[0\]"):
        cancel_jobs(["all"], runner=FakeRunner())


# ------------------------------------------------------------------ the real test cluster (opt-in)
@pytest.mark.slurm
def test_real_cluster_array_query_and_cancel(tmp_path):
    """Submit a 2-task array and a dependant through make_executor, query both, cancel the dependant.

    Needs the project's SLURM test cluster (slurm/cluster/start.sh); skipped where `sbatch` is absent.
    """
    import math
    import time

    from slurm import submit
    from slurm.resources import SlurmResources

    if not submit.sbatch_available():
        pytest.skip("no sbatch on the PATH: start the test cluster with slurm/cluster/start.sh")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"scontrol ping failed ({exc}): start the test cluster with slurm/cluster/start.sh")
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        why = " ".join((ping.stdout + ping.stderr).split())[:200]
        pytest.skip(f"slurmctld is not answering ({why}): start it with slurm/cluster/start.sh")
    resources = SlurmResources(time="00:05:00", signal_lead_s=30)
    folder = tmp_path / "jobs"
    executor = submit.make_executor("slurm", folder, resources, "slurm-dpo-test")
    with executor.batch():
        jobs = [executor.submit(math.factorial, n) for n in (3, 4)]
    parent = jobs[0].job_id.split("_")[0]
    # the script submitit wrote is the one render_sbatch predicts
    assert jobs[0].paths.submission_file.read_text() == submit.render_sbatch(resources, folder, "slurm-dpo-test",
                                                                             array_size=2)
    blocked = submit.make_executor("slurm", tmp_path / "after", resources, "slurm-dpo-after",
                                   [parent]).submit(math.factorial, 1)
    assert [job.result() for job in jobs] == [6, 24]  # waits for the array
    deadline = time.time() + 60
    while True:
        records = query_jobs([parent, blocked.job_id])
        if all(records.get(f"{parent}_{i}") and records[f"{parent}_{i}"].state == "COMPLETED" for i in (0, 1)):
            break
        assert time.time() < deadline, records
        time.sleep(2)
    assert records[f"{parent}_0"].exit_code == "0:0" and records[f"{parent}_0"].elapsed_s is not None
    cancel_jobs([blocked.job_id])
    deadline = time.time() + 60
    while (state := query_jobs([blocked.job_id]).get(blocked.job_id)) is None or state.state in queue.ACTIVE_STATES:
        if state is not None and state.state == "COMPLETED":
            break  # it was fast enough to run before the cancel
        assert time.time() < deadline, state
        time.sleep(2)


def test_tasks_of_an_array_cancelled_while_pending_take_the_parent_record():
    # accounting keeps one record for such an array; `sacct -j 91_0` alone returns nothing
    sacct = "91|CANCELLED by 0|None assigned|0|None|2026-11-27T03:40:00|0:0|2026-11-27T03:39:50|billing=1,cpu=1,mem=1000M,node=1\n"
    runner = FakeRunner(sacct=(0, sacct, ""))
    records = queue.query_jobs(["91_0", "91_1", "90"], runner=runner)
    assert {k: r.state for k, r in records.items() if k != "91"} == {"91_0": "CANCELLED", "91_1": "CANCELLED"}
    assert runner.calls[0][runner.calls[0].index("-j") + 1] == "91_0,91_1,90,91"  # one call, parents included


# ------------------------------------------------------------------ a job's view of its nodes
def test_failed_nodes_are_the_silent_down_or_failing_ones():
    from slurm import environment

    sinfo = "vm idle\nvm2 mixed*\nvm3 down*\nvm4 allocated\nvm5 fail\n"
    runner = FakeRunner(sinfo=(0, sinfo, ""))
    assert environment.failed_nodes("vm[1-5]", runner) == ["vm2", "vm3", "vm5"]
    assert runner.calls == [["sinfo", "-h", "-N", "-n", "vm[1-5]", "-o", "%N %T"]]
    assert environment.failed_nodes("vm", FakeRunner()) == []  # no sinfo: nothing is known to have failed


def test_slurmd_timeout_is_read_from_the_config():
    from slurm import environment

    config = "SlurmctldTimeout        = 120 sec\nSlurmdTimeout           = 20 sec\nSlurmdUser = root(0)\n"
    assert environment.slurmd_timeout_s(FakeRunner(scontrol=(0, config, ""))) == 20
    assert environment.slurmd_timeout_s(FakeRunner(), default=300) == 300


def test_waiting_for_a_node_failure_polls_until_the_controller_sees_it_or_gives_up():
    from slurm import environment

    answers = iter(["vm mixed\nvm2 mixed\n", "vm mixed\nvm2 mixed\n", "vm mixed\nvm2 mixed*\n"])
    now = [0.0]

    def runner(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, next(answers), "")

    def sleep(seconds):
        now[0] += seconds

    assert environment.wait_for_node_failure("vm,vm2", 60, runner, sleep, lambda: now[0]) == ["vm2"]
    assert now[0] == 4  # two polls found every node answering
    healthy = FakeRunner(sinfo=(0, "vm mixed\nvm2 mixed\n", ""))
    now[0] = 0.0
    assert environment.wait_for_node_failure("vm,vm2", 10, healthy, sleep, lambda: now[0]) == []
    assert now[0] >= 10 and len(healthy.calls) == 6  # polled every 2 s, then gave up


def test_job_context_knows_its_nodes():
    from slurm.environment import current_job

    job = current_job({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "vm[2-3]"})
    assert (job.job_id, job.world_size, job.global_rank, job.nodelist) == ("7", 2, 1, "vm[2-3]")
