"""The reward interface: (prompt, completion) -> a score; P(positive) in [0, 1] for the classifier and
VADER, an unbounded logit for a one-output reward model (issue 18, item 4)."""
import pytest

from conftest import clone_before_dpo, launch

from pipeline.config import RewardConfig
from pipeline.models.reward import ClassifierReward, VaderReward, make_reward, score_in_batches


def test_vader_orders_sentiment_and_stays_in_unit_interval():
    reward = make_reward(RewardConfig(kind="vader"))
    assert isinstance(reward, VaderReward)
    positive, neutral, negative = reward(["I love this movie, it is wonderful and brilliant.",
                                          "The film is set in a small town.",
                                          "A terrible, boring and awful film. I hated it."])
    assert positive > 0.9 and negative < 0.1 and neutral == pytest.approx(0.5)


def test_score_in_batches_preserves_order_across_batches():
    reward = VaderReward()
    prompts = ["It was", "So", "Quite", "Truly", "A"] * 3
    completions = [" great", " awful", " fine", " horrible", " wonderful"] * 3
    texts = [p + c for p, c in zip(prompts, completions)]
    assert score_in_batches(reward, prompts, completions, batch_size=4) == reward(texts)


@pytest.fixture(scope="module")
def local_classifier(tmp_path_factory):
    """A randomly initialised 2-label classifier saved like a hub model (the hub is unreachable here)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("clf")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a good movie", "a bad movie"] * 20, vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    RobertaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_classifier_returns_the_positive_label_probability(local_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = RewardConfig(kind="classifier", model=str(local_classifier), batch_size=2, max_length=64)
    reward = make_reward(cfg, "cpu")
    assert isinstance(reward, ClassifierReward)
    texts = ["a good movie", "a bad movie", "good good good"]
    scores = reward(texts)
    model = AutoModelForSequenceClassification.from_pretrained(local_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(local_classifier)
    with torch.no_grad():
        expected = [float(torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1)[1]) for t in texts]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_classifier_with_a_wrong_label_name_fails_clearly(local_classifier):
    cfg = RewardConfig(kind="classifier", model=str(local_classifier), positive_label="LABEL_1")
    with pytest.raises(ValueError, match="reward.positive_label: 'LABEL_1' is not a label"):
        make_reward(cfg, "cpu")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_reward_model(path, chat_template: str | None):
    """A randomly initialised one-output GPT-2 reward model, with or without a chat template; its score
    head is scaled up so that scores spread well outside [0, 1] (a reward model's score is unbounded)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a good movie, I loved it", "a bad movie, boring and dull", "the film was"] * 20,
                            vocab_size=400, special_tokens=["</s>", "<pad>", "<|user|>", "<|assistant|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32,
                                                     n_layer=1, n_head=2, num_labels=1,
                                                     pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def manual_scores(path, texts, add_special_tokens=True):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [float(model(**tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0, 0])
                for t in texts]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return {"chat": build_reward_model(root / "chat-rm", CHAT_TEMPLATE), "plain": build_reward_model(root / "rm", None)}


PROMPTS = ["The film was", "a bad movie", "I loved it"]
COMPLETIONS = [" a good movie", ", boring and dull", " the film was good"]


def test_a_reward_model_scores_prompt_and_response_through_its_own_chat_template(reward_models):
    from pipeline.models.reward import ScalarReward

    cfg = RewardConfig(kind="reward_model", model=str(reward_models["chat"]), batch_size=2, max_length=64)
    reward = make_reward(cfg, "cpu")
    assert isinstance(reward, ScalarReward) and not reward.bounded
    rendered = [f"<|user|>{p}</s><|assistant|>{c}</s>" for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = manual_scores(reward_models["chat"], rendered, add_special_tokens=False)
    scores = score_in_batches(reward, PROMPTS, COMPLETIONS, batch_size=2)  # padded batches of 2 and 1
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == 3 and max(abs(s) for s in scores) > 1.0
    plain = manual_scores(reward_models["chat"], [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert max(abs(a - b) for a, b in zip(scores, plain)) > 1e-3  # the template changed what was scored


def test_a_reward_model_without_a_chat_template_scores_the_plain_text(reward_models):
    cfg = RewardConfig(kind="reward_model", model=str(reward_models["plain"]), batch_size=8)
    scores = score_in_batches(make_reward(cfg, "cpu"), PROMPTS, COMPLETIONS, batch_size=8)
    assert scores == pytest.approx(manual_scores(reward_models["plain"], [p + c for p, c in zip(PROMPTS, COMPLETIONS)]),
                                   abs=1e-4)


def test_a_reward_model_must_have_one_output(local_classifier, reward_models):
    from types import SimpleNamespace

    from pipeline.models.reward import check_reward_model

    two = SimpleNamespace(reward=RewardConfig(kind="reward_model", model=str(local_classifier)))
    with pytest.raises(ValueError, match=r"reward.model: .* has 2 outputs \(NEGATIVE, POSITIVE\); "
                                         r"reward.kind=reward_model needs .* one output .*reward.kind=classifier"):
        check_reward_model(two, {})
    check_reward_model(SimpleNamespace(reward=RewardConfig(kind="reward_model", model=str(reward_models["plain"]))), {})
    wrong_label = SimpleNamespace(reward=RewardConfig(kind="classifier", model=str(local_classifier),
                                                      positive_label="LABEL_1"))
    with pytest.raises(ValueError, match=r"reward.positive_label: 'LABEL_1' is not a label of .*NEGATIVE, POSITIVE"):
        check_reward_model(wrong_label, {})


def test_the_frontier_axis_names_the_reward_and_its_unit(reward_models):
    from pipeline.models.reward import axis_label

    assert axis_label(RewardConfig(kind="vader")) == "mean reward: VADER sentiment, (compound + 1) / 2 in [0, 1]"
    assert axis_label(RewardConfig()) == "mean reward: P(POSITIVE) under siebert/sentiment-roberta-large-english"
    assert axis_label(RewardConfig(kind="reward_model", model=str(reward_models["chat"]))) == \
        "mean reward: chat-rm score (logit, unbounded)"


def test_a_reward_model_with_more_than_one_output_is_refused_before_any_job(local_classifier, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", "--set",
                  "reward.kind=reward_model", "--set", f"reward.model={local_classifier}", check=False)
    assert proc.returncode != 0
    assert "reward.model:" in proc.stderr and "has 2 outputs" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_sampled_pairs_are_ranked_by_the_reward_models_score(tiny_run, reward_models, tmp_path):
    """tiny's SFT model, then the pairs stage ranked by a chat-templated one-output reward model."""
    from pipeline.rundir.layout import read_jsonl

    run_dir = clone_before_dpo(tiny_run, tmp_path / "run", stages=("data", "sft"),
                               reward={"kind": "reward_model", "model": str(reward_models["chat"])})
    launch("run", "--run-dir", str(run_dir), "--executor", "local", "--until", "pairs_merge")
    generations = read_jsonl(run_dir / "pairs" / "generations.jsonl")
    first = generations[0]
    scored = [c["reward"] for c in first["completions"]]
    rendered = [f"<|user|>{first['prompt']}</s><|assistant|>{c['completion']}</s>" for c in first["completions"]]
    assert scored == pytest.approx(manual_scores(reward_models["chat"], rendered, add_special_tokens=False), abs=1e-3)
    assert scored == sorted(scored, reverse=True)
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert any(not 0.0 <= p["chosen_reward"] <= 1.0 for p in pairs)  # unbounded scores are kept as they are


def test_chat_data_is_scored_as_the_conversation_not_the_policys_rendering(reward_models):
    """Eval passes each rendered prompt's turns: the reward model renders them with its own template."""
    cfg = RewardConfig(kind="reward_model", model=str(reward_models["chat"]), batch_size=4)
    reward = make_reward(cfg, "cpu")
    turns = [[{"role": "user", "content": p}] for p in PROMPTS]
    policy_rendered = [f"<|user|>\n{p}<|endoftext|><|assistant|>\n" for p in PROMPTS]  # another template
    scores = score_in_batches(reward, policy_rendered, COMPLETIONS, batch_size=4, turns=turns)
    assert scores == pytest.approx(score_in_batches(reward, PROMPTS, COMPLETIONS, batch_size=4), abs=1e-5)
    vader = make_reward(RewardConfig(kind="vader"))
    assert vader.score(policy_rendered, COMPLETIONS, turns) == vader([f"{p}\n{c}" for p, c in zip(PROMPTS, COMPLETIONS)])
