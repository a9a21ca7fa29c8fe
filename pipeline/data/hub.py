"""Hugging Face Hub models and datasets of a run: pinned and downloaded once, read offline by the jobs.

Compute nodes often have no internet, and a hub repository can change between two jobs of one
run. So `prefetch` (run by `launch.py` on the login node, before anything is submitted) resolves
every hub reference of the config (`references`) to a commit sha, records it in
`RUN/hub_revisions.json` (a relaunch reuses the recorded shas), and downloads those exact
revisions into the cache (`cache_dir`). Jobs run with `offline_environment`: HF_*_OFFLINE=1, the
cache, and SLURM_DPO_HUB_REVISIONS naming the record. The loaders (pipeline.models.policy, data,
reward) pass every model/dataset name through `resolve`, which turns a recorded hub id into its
snapshot directory, so a job opens plain local files and never touches the network.

The record, one entry per config field:
    {"model.name": {"repo_id": "gpt2-large", "repo_type": "model", "revision": "<sha>",
                    "files": ["config.json", "model.safetensors", ...]}, ...}
`files` is what was chosen for download (for models: config, tokenizer and safetensors weights,
not the .bin/.h5/.msgpack/onnx copies); a job checks they are all in the snapshot.

Never imports slurm or jobs: this runs inside the jobs too.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import PipelineConfig
from pipeline.data.sources import check_local_dataset, check_local_exists, validate_dataset_source
from pipeline.rundir.layout import RunLayout, atomic_write_json, read_json

REVISIONS_ENV = "SLURM_DPO_HUB_REVISIONS"
PREFETCH_HINT = ("run `python launch.py prefetch --run-dir RUN` (`launch.py run` does it before submitting) "
                 "on a machine with hub access")
LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`, or set HF_TOKEN)"
# Files from_pretrained reads besides the weights: configs, tokenizer vocabularies/merges, sentencepiece models,
# chat templates (chat_template.jinja, where transformers now saves them).
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
BIN_WEIGHTS = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")


class NotPrefetchedError(FileNotFoundError):
    """A hub reference a job needs is not recorded or not (completely) in the cache."""


@dataclass(frozen=True)
class HubReference:
    field: str  # config field, e.g. "model.name"
    repo_id: str
    repo_type: str  # "model" or "dataset"


def revisions_file(run_root: str | Path) -> Path:
    """Where a run records the hub revisions it uses."""
    return RunLayout(run_root).hub_revisions


def _local_model_dir(name: str, field: str) -> bool:
    """True for an existing directory; refuses a path-looking name that is not one (instead of
    sending it to the hub as an id, which fails with a confusing message)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return True
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        raise ValueError(f"{field}: {name} is not an existing directory; give a directory written by "
                         "save_pretrained (config.json, weights, tokenizer) or a hub id such as gpt2-large")
    return False


def references(cfg: PipelineConfig) -> list[HubReference]:
    """Every hub repository the config points at (local paths and 'tiny' need no hub)."""
    refs = []
    if cfg.model.name != "tiny" and not _local_model_dir(cfg.model.name, "model.name"):
        refs.append(HubReference("model.name", cfg.model.name, "model"))  # policy weights + tokenizer
    validate_dataset_source(cfg.data)  # a missing local file is refused here, not looked up on the hub
    # the review corpus feeds SFT and the pair prompts; with pairs.source=dataset the preference data does
    if cfg.pairs.source != "dataset" and cfg.data.dataset != "tiny" and not Path(cfg.data.dataset).expanduser().exists():
        refs.append(HubReference("data.dataset", cfg.data.dataset, "dataset"))
    if cfg.pairs.source == "dataset":  # preference data: a local file/directory, else a hub dataset
        check_local_exists(cfg.pairs.dataset, "pairs.dataset", "trl-lib/ultrafeedback_binarized")
        if not Path(cfg.pairs.dataset).expanduser().exists():
            refs.append(HubReference("pairs.dataset", cfg.pairs.dataset, "dataset"))
    if cfg.sft.dataset is not None:  # SFT's own data
        if not Path(cfg.sft.dataset).expanduser().exists():
            refs.append(HubReference("sft.dataset", cfg.sft.dataset, "dataset"))
    if cfg.reward.kind in ("classifier", "reward_model") and not _local_model_dir(cfg.reward.model, "reward.model"):
        refs.append(HubReference("reward.model", cfg.reward.model, "model"))
    return refs


def cache_dir(cfg: PipelineConfig | None, run_root: str | Path) -> Path:
    """hub.cache_dir (relative: to the run directory), else $HF_HOME/hub, else RUN/cache/huggingface."""
    setting = cfg.hub.cache_dir if cfg is not None else None
    if setting:
        path = Path(setting).expanduser()
        return path if path.is_absolute() else (Path(run_root) / path).resolve()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser().resolve() / "hub"
    return Path(run_root).resolve() / "cache" / "huggingface"


def offline_environment(cfg: PipelineConfig, run_root: str | Path) -> dict[str, str]:
    """Environment variables every job runs with: the prefetched cache, read offline."""
    run_root = Path(run_root).resolve()
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_CACHE": str(cache_dir(cfg, run_root)),
        # datasets' Arrow copies go to the run, not the hub cache: that may be a shared, read-only site cache
        "HF_DATASETS_CACHE": str(run_root / "cache" / "datasets"),
        REVISIONS_ENV: str(revisions_file(run_root)),
    }


# ------------------------------------------------------------------------------------------------- prefetch

def prefetch(cfg: PipelineConfig, run_root: str | Path, revisions_path: str | Path | None = None,
             log: Callable[[str], None] = print, endpoint: str | None = None) -> dict:
    """Pin and download every hub reference of `cfg`; returns the record with each snapshot's `path`.

    Revisions already recorded in `revisions_path` (default RUN/hub_revisions.json) are reused, so
    a relaunch gets the same weights and data; new ones are resolved to the current commit sha and
    recorded (atomically) before any download. Files already in the cache are not fetched again,
    so a repeated prefetch needs no hub at all. Any reference that cannot be fetched raises one
    ValueError naming the config field, the repository, the endpoint, the reason and the fix.
    """
    from huggingface_hub import HfApi, constants

    refs = references(cfg)
    check_local_dataset(cfg.data)  # a local dataset is opened and checked here, as hub ones are fetched below
    revisions_path = Path(revisions_path) if revisions_path is not None else revisions_file(run_root)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    cache = cache_dir(cfg, run_root)
    recorded = _read_revisions(revisions_path) if revisions_path.exists() else {}
    api = HfApi(endpoint=endpoint)

    entries: dict[str, dict] = {}
    problems: list[tuple[HubReference, Exception, str | None]] = []
    for ref in refs:
        old = recorded.get(ref.field)
        pinned = old["revision"] if old and (old.get("repo_id"), old.get("repo_type")) == (ref.repo_id, ref.repo_type) \
            else None
        if old and pinned is None:
            log(f"{ref.field}: the recorded {old.get('repo_id')} is not the configured {ref.repo_id}; resolving anew")
        try:
            # a timeout: a firewall that drops packets must not hang the launcher
            sha = pinned or api.repo_info(ref.repo_id, repo_type=ref.repo_type, timeout=60).sha
            files = old.get("files") if pinned and old.get("files") else _select_files(ref, sha, api)
        except Exception as error:  # noqa: BLE001 - every failure becomes one explained ValueError below
            problems.append((ref, error, pinned))
            if _is_connection_error(error):
                break  # the other references would fail the same way
            continue
        entries[ref.field] = {"repo_id": ref.repo_id, "repo_type": ref.repo_type, "revision": sha,
                              "files": sorted(files)}
        log(f"{ref.field}: {ref.repo_type} {ref.repo_id} at {sha}" + (" (recorded)" if pinned else ""))
    if problems:
        raise _prefetch_error(problems, refs, endpoint, revisions_path, cache)
    if entries != recorded:
        atomic_write_json(revisions_path, entries)  # pinned before downloading: a retry gets the same shas

    paths = {}
    for ref in refs:
        entry = entries[ref.field]
        snapshot = snapshot_dir(ref, entry["revision"], cache)
        if not _missing(snapshot, entry["files"]):
            log(f"{ref.field}: already in {snapshot}")
        else:
            log(f"{ref.field}: downloading {len(entry['files'])} files of {ref.repo_id} into {cache}")
            try:
                _download(ref, entry, cache, endpoint)
            except Exception as error:  # noqa: BLE001
                problems.append((ref, error, entry["revision"]))
                if _is_connection_error(error):
                    break
                continue
            missing = _missing(snapshot, entry["files"])
            if missing:  # a hub answering with other files than it listed
                problems.append((ref, RuntimeError(f"files missing after download: {missing}"), entry["revision"]))
                continue
        paths[ref.field] = {**entry, "path": str(snapshot)}
    if problems:
        raise _prefetch_error(problems, refs, endpoint, revisions_path, cache)
    return paths


def _select_files(ref: HubReference, sha: str, api) -> list[str]:
    """What to download at `sha`: a dataset whole; a model's configs, tokenizer and one weight format."""
    from huggingface_hub.hf_api import RepoFile

    listing = [f.path for f in api.list_repo_tree(ref.repo_id, repo_type=ref.repo_type, revision=sha, recursive=True)
               if isinstance(f, RepoFile)]
    if ref.repo_type == "dataset":
        return listing
    top = [f for f in listing if "/" not in f]  # from_pretrained reads the root; onnx/, flax/... are other formats
    weights = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    if not weights:  # older repositories: PyTorch pickles only
        weights = [f for f in top if BIN_WEIGHTS.fullmatch(f)]
    if not weights:
        raise ValueError(f"no PyTorch weights (model.safetensors or pytorch_model.bin) at the top of the repository "
                         f"(files: {', '.join(top[:20])})")
    return sorted(set(weights) | {f for f in top if f.endswith(MODEL_FILE_SUFFIXES)})


def _download(ref: HubReference, entry: dict, cache: Path, endpoint: str) -> str:
    from huggingface_hub import snapshot_download

    # The exact file list (escaped: allow_patterns are fnmatch patterns); huggingface_hub shows progress bars.
    return snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=entry["revision"], cache_dir=cache,
                             endpoint=endpoint, allow_patterns=[glob.escape(f) for f in entry["files"]])


def snapshot_dir(ref: HubReference, revision: str, cache: str | Path) -> Path:
    """The cache's directory for `ref` at commit `revision` (huggingface_hub's cache layout)."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache) / repo_folder_name(repo_id=ref.repo_id, repo_type=ref.repo_type) / "snapshots" / revision


def _missing(snapshot: Path, files: list[str]) -> list[str]:
    return [f for f in files if not (snapshot / f).is_file()]


# ------------------------------------------------------------------------------------------------- errors

def _error_chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _transport_errors() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):  # whichever HTTP client this huggingface_hub uses
        try:
            mod = __import__(module)
        except ImportError:
            continue
        types.append(getattr(mod, "TransportError", None) or getattr(mod, "ConnectionError", ConnectionError))
    return tuple(types)


def _is_connection_error(error: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    transport = _transport_errors()
    return any(isinstance(e, transport) and not isinstance(e, OfflineModeIsEnabled) for e in _error_chain(error))


def _explain(ref: HubReference, error: Exception, endpoint: str, revision: str | None, revisions_path: Path,
             cache: Path) -> str:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{endpoint}/{'datasets/' if ref.repo_type == 'dataset' else ''}{ref.repo_id}"
    use_local = (f"or use a local copy instead: --set {ref.field}=/path/to/dir (written by save_pretrained)"
                 if ref.repo_type == "model" else
                 f"or use a local copy instead: --set {ref.field}=/path/to/file-or-dir (.parquet/.jsonl/.csv)")
    cause = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    chain = list(_error_chain(error))
    if any(isinstance(e, GatedRepoError) for e in chain):
        reason = "the repository is gated and this account has not been granted access"
        fix = f"accept its licence on {page} while logged in, {LOGIN_HINT} on this machine, {use_local}"
    elif any(isinstance(e, RepositoryNotFoundError) for e in chain):
        reason = "no such repository, or it is private and no valid token was sent"
        fix = f"check the id (the page would be {page}); for a private repository {LOGIN_HINT}; {use_local}"
    elif any(isinstance(e, RevisionNotFoundError) for e in chain):
        if revision:
            reason = f"the revision {revision} recorded in {revisions_path} no longer exists (history rewritten)"
            fix = (f"delete the {ref.field!r} entry from {revisions_path} to use the current revision "
                   f"(the run then mixes revisions: a new --run-dir is cleaner), {use_local}")
        else:
            reason = "the repository has no default branch"
            fix = use_local
    elif any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        reason = f"HF_HUB_OFFLINE is set and the files are not in the cache {cache}"
        fix = f"unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for the prefetch, {use_local}"
    elif _is_connection_error(error):
        reason = f"the hub could not be reached ({cause})"
        fix = ("run the prefetch on a machine that reaches the hub (the login node), check the network/proxy "
               f"settings or point HF_ENDPOINT at a reachable mirror, {use_local}")
    elif isinstance(error, HFValidationError):
        reason = "this is neither an existing local path nor a valid hub id"
        fix = f"correct the id (namespace/name), {use_local}"
    elif isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", "?")
        reason = f"the hub answered HTTP {status} ({cause})"
        fix = f"retry later if the hub is down; if it says 401/403, {LOGIN_HINT}; {use_local}"
    else:
        reason = cause
        fix = use_local
    where = f" at {revision}" if revision else ""
    return (f"{ref.field}: could not fetch {ref.repo_type} {ref.repo_id!r}{where} from {endpoint} into {cache}: "
            f"{reason}.\n  Fix: {fix}.")


def _prefetch_error(problems, refs, endpoint, revisions_path, cache) -> ValueError:
    lines = [_explain(ref, error, endpoint, revision, revisions_path, cache) for ref, error, revision in problems]
    if _is_connection_error(problems[-1][1]):
        unreached = [r.field for r in refs if r.field not in {p[0].field for p in problems}]
        if unreached:
            lines.append(f"(not tried, same hub: {', '.join(unreached)})")
    error = ValueError("hub prefetch failed:\n" + "\n".join(lines))
    error.__cause__ = problems[0][1]
    return error


# ------------------------------------------------------------------------------------------------- inside jobs

def _read_revisions(path: Path) -> dict:
    try:
        data = read_json(path)
    except ValueError as error:  # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON ({error}); delete it and {PREFETCH_HINT}") from error
    if data is None:
        raise NotPrefetchedError(f"{path} does not exist: {PREFETCH_HINT}")
    if not isinstance(data, dict) or not all(isinstance(e, dict) and {"repo_id", "repo_type", "revision"} <= set(e)
                                             for e in data.values()):
        raise ValueError(f"{path}: expected {{field: {{repo_id, repo_type, revision, files}}}}; delete it and "
                         f"{PREFETCH_HINT}")
    return data


def local_path(ref: HubReference | str, run_root: str | Path, cfg: PipelineConfig | None = None,
               revisions_path: str | Path | None = None) -> str:
    """The prefetched snapshot directory of `ref` (a HubReference or a field such as "model.name")
    at its recorded revision. No network. The cache is `cache_dir(cfg, run_root)`, or without
    `cfg` the job's HF_HUB_CACHE. Raises NotPrefetchedError naming `launch.py prefetch`."""
    revisions_path = Path(revisions_path) if revisions_path is not None else revisions_file(run_root)
    entries = _read_revisions(revisions_path)
    if isinstance(ref, str):
        if ref not in entries:
            raise NotPrefetchedError(f"{ref}: no hub revision recorded in {revisions_path}: {PREFETCH_HINT}")
        entry = entries[ref]
        ref = HubReference(ref, entry["repo_id"], entry["repo_type"])
    else:
        entry = _find_entry(entries, ref.repo_id, ref.repo_type, revisions_path, field=ref.field)
    cache = cache_dir(cfg, run_root) if cfg is not None else Path(os.environ.get("HF_HUB_CACHE")
                                                                  or cache_dir(None, run_root))
    return _checked_snapshot(ref, entry, cache)


def _find_entry(entries: dict, repo_id: str, repo_type: str, revisions_path: Path, field: str | None = None) -> dict:
    if field in entries and (entries[field]["repo_id"], entries[field]["repo_type"]) == (repo_id, repo_type):
        return entries[field]
    for entry in entries.values():
        if (entry["repo_id"], entry["repo_type"]) == (repo_id, repo_type):
            return entry
    raise NotPrefetchedError(f"{field or repo_type} {repo_id!r}: no revision recorded in {revisions_path} (it holds "
                             f"{', '.join(sorted(entries)) or 'nothing'}): {PREFETCH_HINT}")


def _checked_snapshot(ref: HubReference, entry: dict, cache: Path) -> str:
    snapshot = snapshot_dir(ref, entry["revision"], cache)
    files = entry.get("files")
    missing = _missing(snapshot, files) if files else ([] if snapshot.is_dir() else [str(snapshot)])
    if missing:
        raise NotPrefetchedError(f"{ref.field}: {ref.repo_type} {ref.repo_id} at {entry['revision']} is not "
                                 f"(completely) in the cache {cache} (missing: {', '.join(missing[:5])}): "
                                 f"{PREFETCH_HINT}, with the same hub.cache_dir / HF_HOME as the jobs")
    return str(snapshot)


def resolve(name: str | Path, repo_type: str = "model") -> str:
    """What a loader opens for `name`: local paths and 'tiny' as given; a hub id, inside a job
    (SLURM_DPO_HUB_REVISIONS set by `offline_environment`), as its prefetched snapshot directory.

    Outside jobs (no SLURM_DPO_HUB_REVISIONS) a hub id is returned unchanged: transformers and
    datasets then fetch it themselves, as they always did.
    """
    name = str(name)
    if name == "tiny":
        return name
    expanded = Path(name).expanduser()
    if expanded.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        # a path: hub ids are `name` or `namespace/name`; a missing path is the loader's error to report
        return str(expanded)
    revisions = os.environ.get(REVISIONS_ENV)
    if not revisions:
        return name
    revisions_path = Path(revisions)
    entries = _read_revisions(revisions_path)
    entry = _find_entry(entries, name, repo_type, revisions_path)
    field = next(f for f, e in entries.items() if e is entry)
    cache = Path(os.environ.get("HF_HUB_CACHE") or cache_dir(None, revisions_path.parent))
    return _checked_snapshot(HubReference(field, name, repo_type), entry, cache)
