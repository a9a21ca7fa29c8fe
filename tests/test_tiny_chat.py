"""The tiny-chat preset (issue 18): a chat model, an UltraFeedback-shaped conversational preference dataset
and a one-output reward model, all from the test hub. Prefetched with the hub up, then run end to end
with the hub stopped: SFT on the chosen conversations, dataset pairs, DPO arms (full and LoRA), eval
with the reward model through its own template, frontier, report and curves."""
import csv
import json

import pytest

from conftest import launch
from hub_fixture import hub_repos, hub_server  # noqa: F401 - fixtures
from hub_fixture_data import CHAT_MODEL_ID, CHAT_PREFS_ID, CHAT_REWARD_ID
from test_hub import clean_env  # noqa: F401 - fixture


@pytest.mark.slow
def test_tiny_chat_runs_end_to_end_with_the_hub_stopped_after_prefetch(tmp_path, clean_env, hub_server):
    full, lora = tmp_path / "full", tmp_path / "lora"
    lora_sets = ("--set", "dpo.lora.enabled=true", "--set", "dpo.betas=[0.1]")
    launch("prefetch", "--preset", "tiny-chat", "--run-dir", str(full))
    launch("prefetch", "--preset", "tiny-chat", "--run-dir", str(lora), *lora_sets)
    revisions = json.loads((full / "hub_revisions.json").read_text())
    assert {k: v["repo_id"] for k, v in revisions.items()} == {
        "model.name": CHAT_MODEL_ID, "pairs.dataset": CHAT_PREFS_ID, "reward.model": CHAT_REWARD_ID}
    assert "chat_template.jinja" in revisions["model.name"]["files"]  # the template travels with the model
    hub_server.stop()
    hub_server.clear_log()
    for run_dir, sets in ((full, ()), (lora, lora_sets)):
        launch("run", "--preset", "tiny-chat", "--run-dir", str(run_dir), "--executor", "local",
               "--set", "num_threads=1", *sets)
    assert not hub_server.requests  # nothing asked the (stopped) hub

    eos = "<|endoftext|>"
    eval_rows = [json.loads(line) for line in (full / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    held = [r for r in eval_rows if "of film 2" in r["prompt"]]  # test_prefs questions (seed 2: film 2xxx)
    assert len(held) == 13 and all(r["prompt"] == f"<|user|>\n{r['turns'][0]['content']}{eos}<|assistant|>\n"
                                   for r in held)
    pairs = [json.loads(line) for line in (full / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 120 and all(p["chosen"].endswith(eos) for p in pairs)
    with open(full / "eval" / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["sft", "dpo", "dpo"] and {r["beta"] for r in rows[1:]} == {"0.1", "1.0"}
    sft = json.loads((full / "eval" / "policies" / "sft.json").read_text())
    # the reward model's logits: unbounded, not a probability
    assert sft["reward_std"] > 1.0 and any(not 0.0 <= e["reward"] <= 1.0 for e in sft["examples"])
    for name in ("frontier.png", "report.md", "dpo_curves.png", "sft_loss.png"):
        assert (full / "eval" / name).is_file()
    assert "reward `reward_model`" in (full / "eval" / "report.md").read_text()

    adapter = lora / "dpo" / "beta-0.1" / "final"
    assert (adapter / "adapter_model.safetensors").is_file() and not list(adapter.glob("model*.safetensors"))
    with open(lora / "eval" / "frontier.csv") as f:
        assert [r["policy"] for r in csv.DictReader(f)] == ["sft", "dpo"]
