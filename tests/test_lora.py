"""LoRA (peft) arms: adapter checkpoints, the adapter-disabled SFT model as reference, exact resume, eval of
base + adapter, and target modules the model lacks refused before anything exists."""
import json
import math
import signal
from pathlib import Path

import pytest

from conftest import clone_before_dpo, launch, start_stage_job, wait_for_step
from pipeline.config import DPOLoraConfig, LoraConfig

LORA = {"enabled": True, "r": 8, "alpha": 16.0, "target_modules": ["c_attn", "c_proj"]}


def test_lora_fields_are_checked_with_the_fix():
    from pipeline.configlib import from_dict
    from pipeline.config import PipelineConfig

    for bad, message in [({"r": 0}, "dpo.lora.r: 0 must be >= 1"), ({"dropout": 1.0}, "dpo.lora.dropout"),
                         ({"target_modules": []}, "dpo.lora.target_modules: must list"),
                         ({"target_modules": ["all-linear", "c_attn"]}, "give it alone")]:
        with pytest.raises(ValueError, match=message):
            from_dict(PipelineConfig, {"dpo": {"lora": bad}}, "")
    with pytest.raises(ValueError, match="dpo.lora.merge_final: merging needs"):
        from_dict(PipelineConfig, {"dpo": {"lora": {"enabled": True, "merge_final": True}},
                                   "distributed": {"zero_stage": 3}}, "")
    assert not PipelineConfig().dpo.lora.enabled and not PipelineConfig().sft.lora.enabled  # off by default


def test_target_modules_are_checked_against_the_model():
    from transformers import GPT2Config

    from pipeline.models.adapters import check_target_modules

    gpt2 = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)
    check_target_modules(DPOLoraConfig(enabled=True, target_modules=["c_attn", "c_proj"]), gpt2, "dpo.lora.x")
    check_target_modules(DPOLoraConfig(enabled=True, target_modules=["attn.c_proj"]), gpt2, "dpo.lora.x")
    for missing in (["q_proj", "c_attn"], ["attn"]):  # absent; present but not a layer peft adapts
        with pytest.raises(ValueError, match=rf"sft.lora.target_modules: .*named {missing[0]}; its adaptable "
                                             r"modules: c_attn, c_fc, c_proj"):
            check_target_modules(LoraConfig(enabled=True, target_modules=missing), gpt2, "sft.lora.target_modules")


def test_bad_target_modules_are_refused_before_anything_exists(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local",
                  "--set", "dpo.lora.enabled=true", "--set", "dpo.lora.target_modules=[q_proj,v_proj]", check=False)
    assert proc.returncode != 0
    assert "dpo.lora.target_modules: the model (gpt2) has no linear/embedding module named q_proj, v_proj" in proc.stderr
    assert "c_attn" in proc.stderr  # names what the model has
    assert not run_dir.exists()
    # a local model directory: its config.json is read
    proc = launch("prefetch", "--preset", "tiny", "--run-dir", str(run_dir), "--set", "sft.lora.enabled=true",
                  "--set", f"model.name={make_local_model(tmp_path / 'model')}",
                  "--set", "sft.lora.target_modules=[query]", check=False)
    assert proc.returncode != 0 and "sft.lora.target_modules: the model (gpt2) has no" in proc.stderr, proc.stderr
    assert not run_dir.exists()


def make_local_model(path: Path) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300).save_pretrained(path)
    return path


def test_saving_an_adapter_never_asks_the_hub(tmp_path, monkeypatch):
    """peft#1452: peft's save looks the base model up on the hub unless it has a local config.json (or
    HF_HUB_OFFLINE is set). The stages train from local directories (a hub id is its prefetched snapshot)."""
    import huggingface_hub
    import peft.utils.save_and_load as save_and_load
    import torch
    from peft import get_peft_model

    from pipeline.models.adapters import peft_config
    from pipeline.models.policy import load_model

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub contacted: {args}")

    base = make_local_model(tmp_path / "base")
    from transformers import AutoModelForCausalLM, GPT2Config
    AutoModelForCausalLM.from_config(GPT2Config.from_pretrained(base)).save_pretrained(base)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub)
    monkeypatch.setattr(huggingface_hub, "file_exists", no_hub)
    model = get_peft_model(load_model(base, torch.device("cpu"), torch.float32, train=True),
                           peft_config(DPOLoraConfig(**LORA)))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


# ------------------------------------------------------------------ LoRA arms of the tiny pipeline
def sizes_kb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1024, 1)


@pytest.fixture(scope="module")
def lora_run(tiny_run, tmp_path_factory):
    """tiny's SFT and pairs, then one LoRA DPO arm (beta 0.1), its eval and the frontier, by `launch.py run`."""
    run_dir = clone_before_dpo(tiny_run, tmp_path_factory.mktemp("lora") / "run",
                               dpo={"betas": [0.1], "lora": LORA})
    launch("run", "--run-dir", str(run_dir), "--executor", "local")
    return run_dir


@pytest.mark.slow
def test_lora_arm_holds_adapters_uses_the_sft_reference_and_is_evaluated(lora_run, tiny_run):
    from safetensors.torch import load_file

    stage = lora_run / "dpo" / "beta-0.1"
    checkpoints = sorted((stage / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-25", "checkpoint-50", "checkpoint-75"]
    for path in checkpoints + [stage / "final"]:
        assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        assert not list(path.glob("model*.safetensors"))  # no whole weights
    adapter = load_file(str(stage / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)  # base weights are not trained
    assert {k.split(".")[-3] for k in adapter} == {"c_attn", "c_proj"}
    full = tiny_run / "dpo" / "beta-0.1"
    sizes = {"lora_adapter": sizes_kb(stage / "final" / "adapter_model.safetensors"),
             "lora_checkpoint": sizes_kb(checkpoints[-1]),
             "full_weights": sizes_kb(full / "final" / "model.safetensors"),
             "full_checkpoint": sizes_kb(max((full / "checkpoints").glob("checkpoint-*"),
                                             key=lambda p: int(p.name.split("-")[1])))}
    print("sizes (KB):", sizes)
    assert sizes["lora_adapter"] * 10 < sizes["full_weights"]
    assert sizes["lora_checkpoint"] * 5 < sizes["full_checkpoint"]
    # reference = the SFT model: at step 1 the adapter is zero, so the policy is the reference (margin 0, log 2)
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    assert abs(state[0]["rewards/margins"]) < 1e-5 and state[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # and it trained: the trainer's closing summary is in the stage's metrics log (not in the checkpoint)
    summary = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["train_loss"] < math.log(2)
    # eval: every checkpoint scored as SFT + adapter (merged); the trained adapter moved away from the reference
    rows = [json.loads(p.read_text()) for p in (lora_run / "eval" / "policies").glob("dpo-*.json")]
    sft_row = json.loads((lora_run / "eval" / "policies" / "sft.json").read_text())
    assert sorted(r["step"] for r in rows) == [25, 50, 75]
    # the adapter moved the policy off the reference: the exact per-token KL along the samples is far above
    # the SFT row's floor (its sampler mismatch, ~1e-7) and grows with training
    kl = {r["step"]: r["kl_tokenwise"] for r in rows}
    assert sft_row["kl_tokenwise"] is None and abs(sft_row["sampler_mismatch"]) < 1e-5
    assert min(kl.values()) > 1e-4 and kl[75] > kl[25], kl
    assert (lora_run / "eval" / "frontier.csv").read_text().count("\n") == 1 + 1 + 3  # header, SFT, 3 steps


@pytest.mark.slow
def test_lora_merged_policy_differs_from_sft_only_in_the_adapted_weights(lora_run):
    import torch

    from pipeline.models.adapters import load_policy
    from pipeline.models.policy import load_model

    sft = load_model(lora_run / "sft" / "final", torch.device("cpu"), torch.float32).state_dict()
    merged = load_policy(lora_run / "dpo" / "beta-0.1" / "final", lora_run / "sft" / "final", torch.device("cpu"),
                         torch.float32).state_dict()
    assert merged.keys() == sft.keys()
    changed = {k for k in sft if not torch.equal(sft[k], merged[k])}
    assert changed and all(k.split(".")[-2] in ("c_attn", "c_proj") for k in changed), sorted(changed)[:5]


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.slow
def test_interrupted_lora_dpo_resumes_exactly(lora_run, tiny_run, tmp_path):
    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", dpo={"betas": [0.1], "lora": LORA})
    stage = run_dir / "dpo" / "beta-0.1"
    proc = start_stage_job(run_dir, "dpo", "0.1")
    wait_for_step(stage / "progress.json", 30, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped on request (timeout)" in out
    step = json.loads((stage / "progress.json").read_text())["step"]
    saved = stage / "checkpoints" / f"checkpoint-{step}"
    assert step > 25 and (saved / "adapter_model.safetensors").is_file() and (saved / "optimizer.pt").is_file()
    proc = start_stage_job(run_dir, "dpo", "0.1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    manifest = json.loads((stage / "DONE.json").read_text())
    assert manifest["lost_steps"] == 0 and manifest["metrics"]["global_step"] == 75
    assert adapter_difference(stage / "final", lora_run / "dpo" / "beta-0.1" / "final") <= 1e-6


@pytest.mark.slow
def test_lora_under_zero2_on_two_ranks_saves_adapters_and_merges_final(tiny_run, tmp_path):
    from test_distributed import finish, start_ranks

    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", distributed={"zero_stage": 2},
                               dpo={"betas": [0.1], "lora": {**LORA, "merge_final": True}})
    finish(start_ranks(run_dir, "dpo", "0.1"))
    stage = run_dir / "dpo" / "beta-0.1"
    newest = max((stage / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (newest / "adapter_model.safetensors").is_file() and not list(newest.glob("model*.safetensors"))
    assert len(list(newest.glob("global_step*/*optim_states*"))) == 2  # ZeRO-2: one optimizer shard per rank
    assert (stage / "final" / "model.safetensors").is_file() and not (stage / "final" / "adapter_config.json").exists()
