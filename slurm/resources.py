"""SLURM resources of one job (or one array task): declared once, validated once.

`SlurmResources` is the only place a SLURM parameter is declared. Every value is checked in
`__post_init__`; each error names the dotted field (`slurm.dpo.time`) and says what is valid, and
no string that could inject a line or a command into the generated sbatch script gets through.
`to_submitit_params` turns the resources into `submitit.SlurmExecutor.update_parameters(...)`
keywords; `slurm.submit` is the only caller that talks to submitit.

Pure standard library: importable on a login node without submitit or the ML stack.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import InitVar, dataclass, field
from typing import Any, Mapping

TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
SIGNAL_LEAD_MAX_S = 65535  # sbatch --signal accepts at most 65535 seconds

# Characters named explicitly when refused (checked before the per-field allow-lists below).
_DANGEROUS = (
    ("\n", "a newline"),
    ("\r", "a carriage return"),
    ("#", "'#'"),
    (";", "';'"),
    ("`", "a backtick"),
    ("$(", "'$('"),
    ("$", "'$'"),
    ("'", "a single quote"),
    ('"', "a double quote"),
    ("\\", "a backslash"),
    (" ", "a space"),
    ("\t", "a tab"),
)

_NAME = r"[A-Za-z0-9_.\-]+"
_NAME_CHARS = "letters, digits, '_', '.', '-'"
# field -> (regex, description of what is allowed, example)
_TEXT_RULES: dict[str, tuple[str, str, str]] = {
    "partition": (rf"{_NAME}(,{_NAME})*", f"{_NAME_CHARS} (several partitions separated by ',')", "'gpu'"),
    "account": (_NAME, _NAME_CHARS, "'proj123'"),
    "qos": (_NAME, _NAME_CHARS, "'normal'"),
    "constraint": (r"[A-Za-z0-9_.,:&|*()\[\]\-]+", f"{_NAME_CHARS}, ',', ':', '&', '|', '*', '(', ')', '[', ']'",
                   "'a100&ib'"),
    "job_name": (r"[A-Za-z0-9_.+\-]+", f"{_NAME_CHARS}, '+'", "'tiny-dpo'"),
    "comment": (r"[A-Za-z0-9_.:\-]+", f"{_NAME_CHARS}, ':'", "'slurm-dpo:0123abcd'"),
}
_EXTRA_KEY_RE = r"[a-z][a-z0-9]*(-[a-z0-9]+)*"
_EXTRA_VALUE_RE = r"[A-Za-z0-9_.,:=@%/+\[\]\-]*"
_EXTRA_VALUE_CHARS = f"{_NAME_CHARS}, ',', ':', '=', '@', '%', '/', '+', '[', ']'"
_MEM_RE = r"\d+[KMGT]?"
_FLAG_RE = rf"--{_EXTRA_KEY_RE}(={_EXTRA_VALUE_RE})?"
# srun options the generated srun line already sets: srun_args may not set them again.
_RESERVED_SRUN: dict[str, str] = {
    "output": "nothing: submitit writes the logs into the executor folder",
    "error": "nothing: submitit writes the logs into the executor folder",
    "unbuffered": "nothing: submitit sets it", "cpus-per-task": "cpus_per_task",
    "container-image": "slurm.container", "container-mounts": "slurm.container",
    "container-workdir": "slurm.container",
}

# sbatch options that a declared field (or the submission itself) already sets: extra_sbatch_args
# may not set them again. Value: what to use instead.
_RESERVED_SBATCH: dict[str, str] = {
    "time": "time", "partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes",
    "constraint": "constraint", "mem": "mem", "mem-per-cpu": "mem", "mem-per-gpu": "mem",
    "gres": "gpus_per_node", "gpus": "gpus_per_node", "gpus-per-node": "gpus_per_node",
    "gpus-per-task": "gpus_per_node", "gpus-per-socket": "gpus_per_node",
    "ntasks": "gpus_per_node (one task per GPU)", "ntasks-per-node": "gpus_per_node (one task per GPU)",
    "ntasks-per-gpu": "gpus_per_node (one task per GPU)",
    "cpus-per-task": "cpus_per_task", "cpus-per-gpu": "cpus_per_task",
    "array": "array_parallelism (the array size is the number of submitted tasks)",
    "signal": "signal_lead_s",
    "no-requeue": "max_requeues (save-and-requeue needs requeueing allowed)",
    "dependency": "the dependencies argument of slurm.submit.make_executor / render_sbatch",
    "job-name": "the job_name argument of slurm.submit.make_executor / render_sbatch",
    "output": "nothing: submitit writes the logs into the executor folder",
    "error": "nothing: submitit writes the logs into the executor folder",
    "open-mode": "nothing: submitit sets it",
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def parse_time_seconds(text: str) -> int:
    """SLURM time limit syntax -> seconds. Raises ValueError (without a field name) when malformed.

    Accepted: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS. The leading number is unbounded
    (`90` = 90 minutes, `48:00:00` = 2 days); the others must be < 60 (minutes, seconds) or < 24
    (hours after a day count). Zero and UNLIMITED are refused: the job needs a finite limit for
    the save-and-requeue signal.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__} {text!r}")
    days = 0
    rest = text
    m = re.fullmatch(r"(\d+)-(.+)", text)
    if m:
        days, rest = int(m.group(1)), m.group(2)
    parts = rest.split(":")
    if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) > 3:
        raise ValueError(f"{text!r} is not a SLURM time")
    nums = [int(p) for p in parts]
    if m:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (nums + [0, 0])[:3]
        if hours >= 24:
            raise ValueError(f"{text!r}: hours after the day count must be < 24")
        bounded = nums[1:]
    elif len(nums) == 1:  # MM
        hours, minutes, seconds = 0, nums[0], 0
        bounded = []
    elif len(nums) == 2:  # MM:SS
        hours, minutes, seconds = 0, nums[0], nums[1]
        bounded = nums[1:]
    else:  # HH:MM:SS
        hours, minutes, seconds = nums
        bounded = nums[1:]
    if any(n >= 60 for n in bounded):
        raise ValueError(f"{text!r}: minutes and seconds after the first number must be < 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is zero; a positive time limit is required")
    return total


def _dangerous_part(value: str) -> str | None:
    for needle, name in _DANGEROUS:
        if needle in value:
            return name
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127:
            return f"a control character ({ch!r})"
    return None


def check_safe_text(value: str, where: str, rule: str) -> None:
    """Refuse `value` unless it fully matches the allow-list `rule` (a key of the rules table)."""
    regex, allowed, example = _TEXT_RULES[rule]
    _check_text(value, where, regex, allowed, example)


def check_flags(values: Any, where: str, reserved: Mapping[str, str] = {}) -> list[str]:
    """A list of long command-line flags (`--KEY` or `--KEY=VALUE`), each checked like an sbatch value."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: expected a list of flags such as ['--mpi=pmix'], got "
                         f"{type(values).__name__} {values!r}")
    for i, flag in enumerate(values):
        if not isinstance(flag, str):
            raise ValueError(f"{where}[{i}]: expected a string such as '--mpi=pmix', got {type(flag).__name__} {flag!r}")
        _check_text(flag, f"{where}[{i}]", _FLAG_RE, f"'--KEY' or '--KEY=VALUE' with a lowercase KEY and a VALUE "
                    f"of {_EXTRA_VALUE_CHARS}", "'--mpi=pmix'")
        key = flag[2:].split("=")[0]
        if key in reserved:
            raise ValueError(f"{where}[{i}]: --{key} is set already; use {reserved[key]} instead")
    return list(values)


def _check_text(value: str, where: str, regex: str, allowed: str, example: str) -> None:
    bad = _dangerous_part(value)
    if bad:
        raise ValueError(f"{where}: {value!r} contains {bad}, which is refused (it could break or inject "
                         f"into the sbatch script); use only {allowed}, e.g. {example}")
    if not re.fullmatch(regex, value):
        raise ValueError(f"{where}: {value!r} has characters SLURM does not take here; use only {allowed}, "
                         f"e.g. {example}")


@dataclass(frozen=True, kw_only=True)
class SlurmResources:
    """What one SLURM job (or each task of a job array) asks for.

    Build it with keywords; pass `_where="slurm.dpo"` so that errors name the config path
    (`slurm.dpo.time`). The config layer (`pipeline.configlib.from_dict`) does that for each
    section and refuses unknown keys with the list of valid ones.
    """
    partition: str | None = field(default=None, metadata=_help(
        "SLURM partition (sbatch --partition); several may be comma-separated; none = the cluster default."))
    account: str | None = field(default=None, metadata=_help(
        "Account charged for the job (sbatch --account); none = your default account."))
    qos: str | None = field(default=None, metadata=_help("Quality of service (sbatch --qos); none = default."))
    time: str = field(default="01:00:00", metadata=_help(
        f"Time limit per job / array task, SLURM syntax: {TIME_FORMS} (quote it in YAML)."))
    nodes: int = field(default=1, metadata=_help("Nodes per job / array task (sbatch --nodes)."))
    gpus_per_node: int = field(default=0, metadata=_help(
        "GPUs per node (sbatch --gpus-per-node); one task is started per GPU; 0 = CPU-only job."))
    cpus_per_task: int = field(default=1, metadata=_help(
        "CPU cores per task, i.e. per GPU on GPU jobs (sbatch --cpus-per-task)."))
    mem: str | None = field(default=None, metadata=_help(
        "Memory per node (sbatch --mem): a number with optional K/M/G/T suffix (16G, 500M); 0 = all of "
        "the node's memory; none = the cluster default."))
    constraint: str | None = field(default=None, metadata=_help(
        "Node feature constraint (sbatch --constraint), e.g. a100 or 'a100|h100'; none = any node."))
    array_parallelism: int = field(default=16, metadata=_help(
        "At most this many tasks of a job array run at once (sbatch --array=...%N)."))
    signal_lead_s: int = field(default=120, metadata=_help(
        "Seconds before the time limit at which SLURM sends USR2 so the job saves and requeues "
        "(SLURM may send it up to 60 s earlier); must be shorter than the time limit."))
    max_requeues: int = field(default=3, metadata=_help(
        "How many times a job that hits its time limit is requeued to resume from its checkpoint."))
    extra_sbatch_args: dict[str, str] = field(default_factory=dict, metadata=_help(
        "Extra '#SBATCH --KEY=VALUE' lines, keys without leading dashes, e.g. {mail-type: END}; an empty "
        "value gives a bare flag ('#SBATCH --KEY'). Options of the fields above are refused."))
    srun_args: list[str] = field(default_factory=list, metadata=_help(
        "Extra flags on the job's srun line, e.g. ['--mpi=pmix'] ('--KEY' or '--KEY=VALUE'); flags the line "
        "already sets (--output, --error, --cpus-per-task, --container-*) are refused."))
    _where: InitVar[str] = "slurm"

    # ------------------------------------------------------------------ validation
    def __post_init__(self, _where: str) -> None:
        w = _where or "slurm"

        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{w}.{name}: expected a string or null, got {type(value).__name__} {value!r}")
            check_safe_text(value, f"{w}.{name}", name)

        self._check_time(w)
        for name, minimum in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("array_parallelism", 1),
                              ("signal_lead_s", 0), ("max_requeues", 0)):
            self._check_int(w, name, minimum)
        if self.signal_lead_s > SIGNAL_LEAD_MAX_S:
            raise ValueError(f"{w}.signal_lead_s: {self.signal_lead_s} exceeds {SIGNAL_LEAD_MAX_S}, the most "
                             "sbatch --signal accepts; use a smaller number of seconds")
        if self.signal_lead_s >= self.time_seconds:
            raise ValueError(f"{w}.signal_lead_s: {self.signal_lead_s} s must be shorter than the time limit "
                             f"{w}.time={self.time!r} ({self.time_seconds} s); lower it or raise {w}.time")

        if self.mem is not None:
            if not isinstance(self.mem, str):
                raise ValueError(f"{w}.mem: expected a string like '16G' or '500M', got "
                                 f"{type(self.mem).__name__} {self.mem!r} (quote it in YAML)")
            _check_text(self.mem, f"{w}.mem", _MEM_RE, "a whole number with an optional K, M, G or T suffix "
                        "(0 = all of the node's memory)", "'16G', '500M', '0'")

        self._check_extra(w)
        object.__setattr__(self, "srun_args", check_flags(self.srun_args, f"{w}.srun_args", _RESERVED_SRUN))

    def _check_time(self, w: str) -> None:
        if not isinstance(self.time, str):
            hint = (" (quote it in YAML: unquoted 02:00:00 is read as a base-60 number)"
                    if isinstance(self.time, int) and not isinstance(self.time, bool) else "")
            raise ValueError(f"{w}.time: expected a SLURM time string like '02:00:00', got "
                             f"{type(self.time).__name__} {self.time!r}{hint}")
        bad = _dangerous_part(self.time)
        if bad:
            raise ValueError(f"{w}.time: {self.time!r} contains {bad}, which is refused (it could break or "
                             f"inject into the sbatch script); use {TIME_FORMS}, e.g. '02:00:00' or '1-12'")
        try:
            parse_time_seconds(self.time)
        except ValueError as exc:
            raise ValueError(f"{w}.time: {exc}; use {TIME_FORMS} (e.g. '02:00:00', '90', '1-12'), "
                             "a positive finite limit") from None

    def _check_int(self, w: str, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{w}.{name}: expected an integer >= {minimum}, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise ValueError(f"{w}.{name}: must be >= {minimum}, got {value}")

    def _check_extra(self, w: str) -> None:
        extra = self.extra_sbatch_args
        where = f"{w}.extra_sbatch_args"
        if not isinstance(extra, Mapping):
            raise ValueError(f"{where}: expected a mapping of sbatch option -> value, e.g. {{mail-type: END}}, "
                             f"got {type(extra).__name__} {extra!r}")
        for key, value in extra.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} must be a string (an sbatch long option name)")
            if key.startswith("-"):
                raise ValueError(f"{where}.{key}: write the option without leading dashes, e.g. "
                                 f"{key.lstrip('-')!r}")
            bad = _dangerous_part(key)
            if bad:
                raise ValueError(f"{where}: key {key!r} contains {bad}, which is refused (it could break or inject "
                                 "into the sbatch script); keys are sbatch long option names such as 'mail-type'")
            if not re.fullmatch(_EXTRA_KEY_RE, key) or len(key) < 2:
                raise ValueError(f"{where}: key {key!r} is not an sbatch long option name; use lowercase letters, "
                                 "digits and '-', without leading dashes, e.g. 'mail-type'")
            if key in _RESERVED_SBATCH:
                raise ValueError(f"{where}.{key}: --{key} is set by a declared field; use {self._instead(w, key)} "
                                 "instead")
            prefix_of = sorted(r for r in _RESERVED_SBATCH if r.startswith(key))
            if prefix_of:
                raise ValueError(f"{where}.{key}: sbatch would read --{key} as an abbreviation of --{prefix_of[0]}, "
                                 f"which is set by a declared field; use {self._instead(w, prefix_of[0])} instead")
            if not isinstance(value, str):
                raise ValueError(f"{where}.{key}: expected a string value, got {type(value).__name__} {value!r} "
                                 "(quote it in YAML; use '' for a bare flag)")
            _check_text(value, f"{where}.{key}", _EXTRA_VALUE_RE, _EXTRA_VALUE_CHARS, "'END,FAIL'")
        object.__setattr__(self, "extra_sbatch_args", dict(extra))

    @staticmethod
    def _instead(w: str, key: str) -> str:
        target = _RESERVED_SBATCH[key]
        first = target.split(" ")[0]
        return f"{w}.{target}" if first in {f.name for f in dataclasses.fields(SlurmResources)} else target

    # ------------------------------------------------------------------ derived values
    @property
    def time_seconds(self) -> int:
        """The time limit in seconds (as written)."""
        return parse_time_seconds(self.time)

    @property
    def time_minutes(self) -> int:
        """The time limit in whole minutes, rounded up, at least 1 (what sbatch receives)."""
        return max(1, math.ceil(self.time_seconds / 60))

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU; a CPU-only job runs one task."""
        return max(1, self.gpus_per_node)

    def to_submitit_params(self, job_name: str) -> dict[str, Any]:
        """Keywords for `submitit.SlurmExecutor.update_parameters` (None values dropped).

        `time` is in minutes (submitit's unit), GPUs are requested with `--gpus-per-node` (left
        out for CPU-only jobs), stdout and stderr go to separate logs, `extra_sbatch_args` travel as
        `additional_parameters` ('' -> bare flag). `use_srun` stays submitit's default (True): the
        job's callable runs once per task, i.e. once per GPU.
        """
        if not isinstance(job_name, str):
            raise ValueError(f"job_name: expected a string, got {type(job_name).__name__} {job_name!r}")
        check_safe_text(job_name, "job_name", "job_name")
        params: dict[str, Any] = {
            "job_name": job_name,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "time": self.time_minutes,
            "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "gpus_per_node": self.gpus_per_node or None,
            "mem": self.mem,
            "signal_delay_s": self.signal_lead_s,
            "array_parallelism": self.array_parallelism,
            "stderr_to_stdout": False,  # separate .out / .err logs per task (see slurm.submit.job_log_paths)
            # Slurm 22.05-23.02: srun no longer inherits --cpus-per-task from the batch script; where tasks
            # are bound to CPUs, a rank would otherwise get fewer CPUs than the job asked for
            "srun_args": [f"--cpus-per-task={self.cpus_per_task}", *self.srun_args],
            # --requeue: jobs requeue themselves on time-out, also where the cluster default is JobRequeue=0
            "additional_parameters": {"requeue": True,
                                      **{k: (True if v == "" else v) for k, v in self.extra_sbatch_args.items()}},
        }
        return {k: v for k, v in params.items() if v is not None}
