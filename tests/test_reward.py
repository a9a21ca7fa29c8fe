"""The reward interface: texts -> P(positive) in [0, 1], for both backends."""
import pytest

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
    texts = ["great", "awful", "fine", "horrible", "wonderful"] * 3
    assert score_in_batches(reward, texts, batch_size=4) == reward(texts)


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
