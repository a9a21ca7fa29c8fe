"""slurm.resources and slurm.submit: every validation rule names the field; the sbatch script is golden.

No SLURM needed: the SlurmExecutor test pretends `srun` exists; nothing is submitted.
"""
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from submitit.slurm import slurm as submitit_slurm

from conftest import launch
from pipeline.configlib import from_dict
from slurm import submit
from slurm.resources import SlurmResources, parse_time_seconds

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "sbatch_dpo_array.sh"
UPDATE_GOLDEN_ENV = "SLURM_DPO_UPDATE_GOLDEN"
W = "slurm.dpo"


def make(**kwargs) -> SlurmResources:
    return SlurmResources(**kwargs, _where=W)


def error_of(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    return str(info.value)


def config_error_of(**kwargs) -> str:
    """As the config layer builds each `slurm.<section>` (unknown keys are refused there)."""
    with pytest.raises(ValueError) as info:
        from_dict(SlurmResources, kwargs, where=W)
    return str(info.value)


# ------------------------------------------------------------------ defaults, construction
def test_defaults_are_valid_and_cpu_only():
    r = SlurmResources()
    assert (r.time, r.nodes, r.gpus_per_node, r.cpus_per_task, r.array_parallelism) == ("01:00:00", 1, 0, 1, 16)
    assert (r.signal_lead_s, r.max_requeues, r.extra_sbatch_args) == (120, 3, {})
    assert r.partition is r.account is r.qos is r.mem is r.constraint is None
    assert r.time_minutes == 60 and r.ntasks_per_node == 1


def test_every_field_has_one_line_help():
    for f in dataclasses.fields(SlurmResources):
        assert f.metadata.get("help") and "\n" not in f.metadata["help"], f.name


def test_constructor_where_defaults_to_slurm_and_can_be_given():
    with pytest.raises(ValueError, match=r"^slurm\.nodes: "):
        SlurmResources(nodes=0)
    with pytest.raises(ValueError, match=r"^slurm\.sft\.nodes: "):
        SlurmResources(nodes=0, _where="slurm.sft")


def test_keyword_only():
    with pytest.raises(TypeError):
        SlurmResources("gpu")  # type: ignore[misc]


def test_replace_revalidates_and_round_trips():
    r = make(partition="gpu", gpus_per_node=2, mem="64G", extra_sbatch_args={"mail-type": "END"})
    cpu = dataclasses.replace(r, nodes=1, gpus_per_node=0)
    assert cpu.gpus_per_node == 0 and cpu.partition == "gpu"
    assert from_dict(SlurmResources, dataclasses.asdict(r), where=W) == r
    with pytest.raises(ValueError, match=r"^slurm\.nodes: must be >= 1"):
        dataclasses.replace(r, nodes=0)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SlurmResources().time = "bogus"  # type: ignore[misc]


# ------------------------------------------------------------------ unknown keys
def test_unknown_key_lists_sorted_valid_keys_and_suggests():
    message = config_error_of(gpus=1)
    valid = sorted(f.name for f in dataclasses.fields(SlurmResources))
    assert message.startswith("slurm.dpo: unknown key(s) gpus"), message
    assert f"valid keys: {', '.join(valid)}" in message
    assert "did you mean slurm.dpo.gpus_per_node" in message


def test_from_dict_needs_a_mapping():
    with pytest.raises(ValueError, match=r"^slurm\.dpo: expected a mapping"):
        from_dict(SlurmResources, ["gpu"], where=W)


def test_where_is_not_a_config_key():
    assert "unknown key(s) _where" in config_error_of(_where="x")


# ------------------------------------------------------------------ time
@pytest.mark.parametrize("text, seconds, minutes", [
    ("30", 1800, 30),
    ("90", 5400, 90),
    ("00:30", 30, 1),          # 30 s rounds up to the 1-minute minimum
    ("05:30", 330, 6),         # MM:SS, rounded up
    ("10:00", 600, 10),
    ("02:00:00", 7200, 120),
    ("00:00:01", 1, 1),
    ("48:00:00", 172800, 2880),
    ("1-00", 86400, 1440),     # D-HH
    ("1-12", 129600, 2160),
    ("1-01:30", 91800, 1530),  # D-HH:MM
    ("2-00:00:30", 172830, 2881),  # D-HH:MM:SS
])
def test_time_parsing(text, seconds, minutes):
    r = make(time=text, signal_lead_s=0)
    assert parse_time_seconds(text) == seconds
    assert (r.time_seconds, r.time_minutes) == (seconds, minutes)


@pytest.mark.parametrize("text", ["2h", "", "01:60:00", "00:61", "1-24", "1-00:60", "0", "00:00:00", "0-00",
                                  "1:2:3:4", "-5", "UNLIMITED", "1-", "1--2", ":30", "1.5", " 01:00:00"])
def test_malformed_time_names_the_field(text):
    message = error_of(time=text)
    assert message.startswith("slurm.dpo.time: "), message
    assert "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in message


def test_time_as_int_hints_yaml_quoting():
    message = error_of(time=7200)
    assert message.startswith("slurm.dpo.time: expected a SLURM time string") and "quote it in YAML" in message


# ------------------------------------------------------------------ integers
INT_FIELDS = [("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("array_parallelism", 1),
              ("signal_lead_s", 0), ("max_requeues", 0)]


@pytest.mark.parametrize("name, minimum", INT_FIELDS)
@pytest.mark.parametrize("bad", [True, False, "2", 2.0, None])
def test_int_fields_refuse_bools_strings_floats(name, minimum, bad):
    message = error_of(**{name: bad})
    assert message.startswith(f"slurm.dpo.{name}: expected an integer >= {minimum}, got {type(bad).__name__}"), message


@pytest.mark.parametrize("name, minimum", INT_FIELDS)
def test_int_fields_below_minimum(name, minimum):
    message = error_of(**{name: minimum - 1})
    assert message == f"slurm.dpo.{name}: must be >= {minimum}, got {minimum - 1}"


def test_negative_gpus():
    assert error_of(gpus_per_node=-1).startswith("slurm.dpo.gpus_per_node: must be >= 0")


def test_signal_lead_must_be_shorter_than_time_limit():
    message = error_of(time="02:00", signal_lead_s=120)
    assert message.startswith("slurm.dpo.signal_lead_s: 120 s must be shorter than the time limit "
                              "slurm.dpo.time='02:00' (120 s)"), message
    assert make(time="02:01", signal_lead_s=120).signal_lead_s == 120


def test_signal_lead_has_sbatch_maximum():
    assert error_of(time="30-00", signal_lead_s=70000).startswith("slurm.dpo.signal_lead_s: 70000 exceeds 65535")


# ------------------------------------------------------------------ strings and injection
INJECTIONS = [("gpu\nsrun rm -rf ~", "a newline"), ("gpu#x", "'#'"), ("gpu;reboot", "';'"),
              ("gpu`id`", "a backtick"), ("gpu$(id)", "'$('"), ("gpu\r", "a carriage return"),
              ("gpu x", "a space"), ("gpu$HOME", "'$'"), ("gpu'x", "a single quote"), ("gpu\x00", "a control character")]


@pytest.mark.parametrize("value, named", INJECTIONS)
@pytest.mark.parametrize("name", ["partition", "account", "qos", "constraint"])
def test_injection_refused_in_text_fields(name, value, named):
    message = error_of(**{name: value})
    assert message.startswith(f"slurm.dpo.{name}: {value!r} contains {named}"), message
    assert "use only" in message


@pytest.mark.parametrize("value, named", INJECTIONS[:5])
def test_injection_refused_in_time_and_mem(value, named):
    assert error_of(time="01:00:00" + value[3:]).startswith("slurm.dpo.time: ")
    assert error_of(mem="16G" + value[3:]).startswith("slurm.dpo.mem: ")


@pytest.mark.parametrize("name, value", [("partition", "gpu,debug"), ("account", "proj_1.a-b"), ("qos", "high"),
                                         ("constraint", "a100&ib"), ("constraint", "[rack1|rack2]*2")])
def test_good_text_values(name, value):
    assert getattr(make(**{name: value}), name) == value


@pytest.mark.parametrize("name, value", [("account", "a,b"), ("partition", "gpu,"), ("qos", "x!"),
                                         ("constraint", "a100<b")])
def test_text_outside_allow_list(name, value):
    message = error_of(**{name: value})
    assert message.startswith(f"slurm.dpo.{name}: {value!r} has characters SLURM does not take here"), message


@pytest.mark.parametrize("name", ["partition", "account", "qos", "constraint", "mem"])
def test_text_fields_must_be_strings(name):
    assert error_of(**{name: 5}).startswith(f"slurm.dpo.{name}: expected a string")


@pytest.mark.parametrize("mem", ["16G", "500M", "0", "1024", "2T", "64K"])
def test_good_mem(mem):
    assert make(mem=mem).mem == mem


@pytest.mark.parametrize("mem", ["16GB", "16g", "lots", "-1", "16 G", "1.5G", ""])
def test_bad_mem(mem):
    message = error_of(mem=mem)
    assert message.startswith("slurm.dpo.mem: ") and "'16G', '500M', '0'" in message, message


# ------------------------------------------------------------------ extra_sbatch_args
def test_extra_args_accepted():
    r = make(extra_sbatch_args={"mail-type": "END,FAIL", "mail-user": "me@example.org", "requeue": "",
                                "exclude": "node[01-03]"})
    assert r.extra_sbatch_args["mail-type"] == "END,FAIL"


@pytest.mark.parametrize("key, field", [
    ("time", "slurm.dpo.time"), ("partition", "slurm.dpo.partition"), ("nodes", "slurm.dpo.nodes"),
    ("gres", "slurm.dpo.gpus_per_node"), ("gpus-per-node", "slurm.dpo.gpus_per_node"),
    ("gpus", "slurm.dpo.gpus_per_node"), ("ntasks-per-node", "slurm.dpo.gpus_per_node"),
    ("cpus-per-task", "slurm.dpo.cpus_per_task"), ("mem", "slurm.dpo.mem"), ("mem-per-cpu", "slurm.dpo.mem"),
    ("account", "slurm.dpo.account"), ("qos", "slurm.dpo.qos"), ("constraint", "slurm.dpo.constraint"),
    ("array", "slurm.dpo.array_parallelism"), ("signal", "slurm.dpo.signal_lead_s"),
    ("dependency", "dependencies argument"), ("job-name", "job_name argument"), ("output", "submitit"),
    ("no-requeue", "slurm.dpo.max_requeues"),
])
def test_extra_args_refuse_declared_fields(key, field):
    message = error_of(extra_sbatch_args={key: "1"})
    assert message.startswith(f"slurm.dpo.extra_sbatch_args.{key}: --{key} is set by a declared field; use "), message
    assert field in message


def test_extra_args_refuse_abbreviations_of_declared_options():
    message = error_of(extra_sbatch_args={"part": "gpu"})
    assert message.startswith("slurm.dpo.extra_sbatch_args.part: sbatch would read --part as an abbreviation of "
                              "--partition") and "slurm.dpo.partition" in message, message


@pytest.mark.parametrize("value, named", INJECTIONS)
def test_extra_args_refuse_injection_in_values(value, named):
    message = error_of(extra_sbatch_args={"comment": value})
    assert message.startswith(f"slurm.dpo.extra_sbatch_args.comment: {value!r} contains {named}"), message


@pytest.mark.parametrize("value, named", INJECTIONS)
def test_extra_args_refuse_injection_in_keys(value, named):
    key = "mail" + value[3:]
    message = error_of(extra_sbatch_args={key: "END"})
    assert message.startswith(f"slurm.dpo.extra_sbatch_args: key {key!r} contains {named}"), message


@pytest.mark.parametrize("key", ["--mail-type", "-J"])
def test_extra_args_keys_without_dashes(key):
    message = error_of(extra_sbatch_args={key: "x"})
    assert message.startswith(f"slurm.dpo.extra_sbatch_args.{key}: write the option without leading dashes")


@pytest.mark.parametrize("key", ["Mail-Type", "mail_type", "x", "mail--type", "mail-"])
def test_extra_args_key_shape(key):
    assert error_of(extra_sbatch_args={key: "x"}).startswith(
        f"slurm.dpo.extra_sbatch_args: key {key!r} is not an sbatch long option name")


def test_extra_args_values_are_strings_and_mapping_required():
    assert error_of(extra_sbatch_args={"nice": 10}).startswith(
        "slurm.dpo.extra_sbatch_args.nice: expected a string value, got int")
    assert error_of(extra_sbatch_args=["mail-type=END"]).startswith(
        "slurm.dpo.extra_sbatch_args: expected a mapping")


# ------------------------------------------------------------------ submitit parameters
def test_to_submitit_params_gpu_job():
    r = make(partition="gpu", account="proj", qos="high", time="1-00:00:30", nodes=2, gpus_per_node=4,
             cpus_per_task=8, mem="0", constraint="a100", array_parallelism=4, signal_lead_s=300,
             extra_sbatch_args={"mail-type": "END", "requeue": ""})
    assert r.to_submitit_params("gpt2-large-dpo") == {
        "job_name": "gpt2-large-dpo", "partition": "gpu", "account": "proj", "qos": "high", "constraint": "a100",
        "time": 1441, "nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 8, "gpus_per_node": 4, "mem": "0",
        "signal_delay_s": 300, "array_parallelism": 4, "stderr_to_stdout": False,
        "srun_args": ["--cpus-per-task=8"],  # srun does not inherit it from sbatch (Slurm 22.05-23.02)
        "additional_parameters": {"mail-type": "END", "requeue": True},
    }


def test_to_submitit_params_cpu_job_drops_nones_and_zero_gpus():
    assert SlurmResources().to_submitit_params("x") == {
        "job_name": "x", "time": 60, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1,
        "signal_delay_s": 120, "array_parallelism": 16, "stderr_to_stdout": False,
        "srun_args": ["--cpus-per-task=1"], "additional_parameters": {"requeue": True}}  # every job may requeue itself on time-out


def test_to_submitit_params_are_accepted_by_submitit():
    params = make(partition="gpu", gpus_per_node=1, mem="8G", extra_sbatch_args={"mail-type": "END"}) \
        .to_submitit_params("j")
    defaults = submitit_slurm._get_default_parameters()
    assert set(params) <= set(defaults)
    assert "use_srun" not in params  # submitit's default (True) stays


@pytest.mark.parametrize("name", ["a b", "x\ny", "x;y", "$(id)", ""])
def test_job_name_is_checked(name):
    with pytest.raises(ValueError, match=r"^job_name: "):
        SlurmResources().to_submitit_params(name)


# ------------------------------------------------------------------ render_sbatch (golden)
GOLDEN_RESOURCES = dict(partition="gpu", account="proj", time="02:00:00", nodes=1, gpus_per_node=1,
                        cpus_per_task=8, mem="32G")
GOLDEN_FOLDER = "/shared/runs/dpo/jobs/dpo"


def test_render_sbatch_matches_golden(monkeypatch):
    # submitit reads SUBMITIT_PREEMPT_SIGNAL at import; pin its default so the golden file is stable
    monkeypatch.setattr(submitit_slurm.SlurmJobEnvironment, "USR_SIG", "USR2")
    text = submit.render_sbatch(make(**GOLDEN_RESOURCES), GOLDEN_FOLDER, "dpo", array_size=3,
                                dependencies=["101"], python="python")
    if os.environ.get(UPDATE_GOLDEN_ENV) == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    how = (f"accept the new script (after checking the diff) with: "
           f"{UPDATE_GOLDEN_ENV}=1 .venv/bin/python -m pytest tests/test_slurm_resources.py -k golden")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; {how}"
    expected = GOLDEN.read_text()
    assert text == expected, f"render_sbatch output differs from {GOLDEN}; {how}\n--- got:\n{text}"


def test_golden_script_content(monkeypatch):
    """What the golden file must say, independent of its exact layout."""
    lines = GOLDEN.read_text().splitlines()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=120", "#SBATCH --nodes=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=32G", "#SBATCH --array=0-2%3", "#SBATCH --dependency=afterok:101",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=dpo",
                 "#SBATCH --output=/shared/runs/dpo/jobs/dpo/%A_%a_0_log.out"]:
        assert line in lines, line
    assert lines[-1].endswith("python -u -m submitit.core._submit /shared/runs/dpo/jobs/dpo")


def test_render_sbatch_single_job_and_placeholders():
    text = submit.render_sbatch(None, "/x/jobs/eval", "eval", array_size=1, dependencies=["7_1", "<dpo>"],
                                python="python")
    assert "--array" not in text and "%A_%a" not in text and "/x/jobs/eval/%j_0_log.out" in text
    assert "#SBATCH --dependency='afterok:7_1:<dpo>'" in text
    default_python = submit.render_sbatch(None, "/x", "eval")
    assert f"{shlex.quote(sys.executable)} -u -m submitit.core._submit /x" in default_python


def test_dependencies_by_task_render_as_aftercorr():
    assert submit.dependency_string([], corresponding=["12"]) == "aftercorr:12"
    assert submit.dependency_string(["14"], corresponding=["12"]) == "afterok:14,aftercorr:12"  # both must hold
    assert submit.dependency_string([], corresponding=[]) is None
    text = submit.render_sbatch(None, "/x/jobs/eval_arms", "eval_arms", array_size=3, corresponding=["<dpo>"],
                                python="python")
    assert "#SBATCH --dependency='aftercorr:<dpo>'" in text and "#SBATCH --array=0-2" in text
    with pytest.raises(ValueError, match=r"^corresponding\[0\]: '12_1' is one task; aftercorr names a whole job "
                                         r"array, e.g. '12'"):
        submit.dependency_string([], corresponding=["12_1"])
    with pytest.raises(ValueError, match=r"^corresponding\[0\]: 'x' is not a SLURM job id"):
        submit.dependency_string([], corresponding=["x"])


@pytest.mark.parametrize("array_size", [0, -1, True, "3"])
def test_render_sbatch_array_size_checked(array_size):
    with pytest.raises(ValueError, match=r"^array_size: "):
        submit.render_sbatch(None, "/x", "j", array_size=array_size)


@pytest.mark.parametrize("deps", [["abc"], ["1;2"], ["<a b>"], "101"])
def test_dependencies_checked(deps):
    with pytest.raises(ValueError, match=r"^dependencies"):
        submit.render_sbatch(None, "/x", "j", dependencies=deps)


def test_folder_with_newline_refused():
    with pytest.raises(ValueError, match=r"^folder: "):
        submit.render_sbatch(None, "/x\n/y", "j")


# ------------------------------------------------------------------ make_executor
def test_make_executor_unknown_kind():
    with pytest.raises(ValueError, match=r"^kind: 'pbs' is not an executor kind; valid kinds: local, slurm"):
        submit.make_executor("pbs", "/tmp/x", None, "j")


def test_make_executor_local(tmp_path):
    ex = submit.make_executor("local", tmp_path / "f", make(time="00:30:00", max_requeues=5), "j")
    assert isinstance(ex, submitit.LocalExecutor)
    assert ex.parameters["timeout_min"] == 30 and ex.max_num_timeout == 5
    with pytest.raises(ValueError, match=r"^dependencies: the local executor cannot wait"):
        submit.make_executor("local", tmp_path / "f", None, "j", ["101"])


@pytest.mark.parametrize("visible, gpus, expected", [("3,5", 8, "3,5"), ("", 8, ""), (None, 2, "0,1"),
                                                     (None, 0, "")],
                         ids=["two-of-eight", "none-visible", "unset-two-gpus", "unset-cpu-machine"])
def test_local_jobs_see_the_gpus_the_launching_shell_sees(tmp_path, monkeypatch, visible, gpus, expected):
    # submitit alone sets CUDA_VISIBLE_DEVICES="" in local jobs: a GPU workstation would train on its CPU
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(submit, "count_gpus", lambda: gpus)
    ex = submit.make_executor("local", tmp_path / "f", None, "j")
    job = ex.submit(os.getenv, "CUDA_VISIBLE_DEVICES")  # a real local job: os.getenv reads its environment
    assert job.result() == expected


def test_local_executor_refuses_gpu_uuids(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1b2c3d")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES='GPU-8a1b2c3d': the local executor passes GPUs on"):
        submit.make_executor("local", tmp_path / "f", None, "j")


def test_make_executor_slurm_matches_render(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    r = make(**GOLDEN_RESOURCES, max_requeues=2)
    ex = submit.make_executor("slurm", tmp_path, r, "dpo", ["101", "102_3"])
    assert isinstance(ex, submitit.SlurmExecutor) and ex.max_num_timeout == 2
    assert ex.parameters["additional_parameters"] == {"requeue": True, "dependency": "afterok:101:102_3"}
    assert ex.parameters["time"] == 120 and ex.parameters["gpus_per_node"] == 1
    # the exact text submitit writes for a single job == render_sbatch's
    written = ex._make_submission_file_text(ex._submitit_command_str, "uid")
    assert written == submit.render_sbatch(r, tmp_path, "dpo", dependencies=["101", "102_3"])
    with pytest.raises(ValueError, match=r"^dependencies\[0\]: '<sft>' is not a SLURM job id"):
        submit.make_executor("slurm", tmp_path, r, "dpo", ["<sft>"])


def test_make_executor_slurm_without_srun(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    with pytest.raises(RuntimeError, match="kind='slurm' needs the SLURM client commands"):
        submit.make_executor("slurm", tmp_path, None, "j")


def test_sbatch_available_follows_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit.sbatch_available() is False
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert submit.sbatch_available() is True


# ------------------------------------------------------------------ architecture rule
def test_slurm_package_imports_no_ml_stack_nor_project_code():
    code = ("import sys, slurm, slurm.resources, slurm.submit, slurm.queue\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'trl', 'pipeline', 'jobs'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"slurm/ pulled in: {out.stdout.strip()}"


# ------------------------------------------------------------------ log paths
def test_job_log_paths_match_the_rendered_script(tmp_path):
    folder = tmp_path / "jobs" / "dpo"
    assert submit.job_log_paths(folder, "123") == (folder / "123_0_log.out", folder / "123_0_log.err")
    assert submit.job_log_paths(folder, "123_2") == (folder / "123_2_0_log.out", folder / "123_2_0_log.err")
    assert submit.job_log_paths(folder, "123_2", task=3)[0] == folder / "123_2_3_log.out"
    script = submit.render_sbatch(None, folder, "dpo", array_size=3)
    assert f"--output {folder}/%A_%a_%t_log.out --error {folder}/%A_%a_%t_log.err" in script
    with pytest.raises(ValueError, match=r"^job_id: "):
        submit.job_log_paths(folder, "../x")


# a dry run asks the live controller (MaxArraySize), so it lives with the scheduler's tests
def test_dry_run_for_two_nodes_of_four_gpus(tmp_path):
    out = launch("run", "--preset", "gpt2-large", "--run-dir", str(tmp_path / "r"), "--executor", "slurm", "--dry-run",
                 "--set", "slurm.dpo.nodes=2", "--set", "slurm.dpo.gpus_per_node=4", "--set", "slurm.dpo.partition=gpu",
                 env={"PATH": f"{tmp_path}:{os.environ['PATH']}"} if _no_sbatch(tmp_path) else None).stdout
    dpo = out.split("# ---- stage dpo")[1].split("# ---- stage")[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --array=0-2", "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in dpo, dpo
    assert not (tmp_path / "r").exists()


def _no_sbatch(tmp_path: Path) -> bool:
    """Dry runs need no cluster; where sbatch is missing, put inert stand-ins for it and srun on the PATH."""
    import shutil

    if shutil.which("sbatch") and shutil.which("srun"):
        return False
    for name in ("sbatch", "srun"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    return True
