"""Preference-pair construction and sharding."""
from pipeline.stages.pairs import build_pairs, shard_prompts


def completions(*rewards):
    return [{"completion": f" c{i}", "reward": r} for i, r in enumerate(rewards)]


def test_four_completions_give_six_ordered_pairs():
    pairs = build_pairs("I love", completions(0.9, 0.1, 0.5, 0.7))
    assert len(pairs) == 6
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        (" c0", " c1"), (" c0", " c2"), (" c0", " c3"), (" c3", " c1"), (" c3", " c2"), (" c2", " c1")}
    assert all(p["prompt"] == "I love" for p in pairs)


def test_ties_carry_no_preference_and_are_dropped():
    pairs = build_pairs("p", completions(0.5, 0.5, 0.8, 0.5))
    assert len(pairs) == 3 and all(p["chosen"] == " c2" for p in pairs)


def test_shards_partition_the_prompts():
    prompts = [f"p{i}" for i in range(10)]
    shards = [shard_prompts(prompts, s, 3) for s in range(3)]
    assert sorted(p for shard in shards for p in shard) == sorted(prompts)
    assert [len(s) for s in shards] == [4, 3, 3]


def test_generated_corpus_is_deterministic_and_review_length_is_configurable():
    from pipeline.data.corpus import make_corpus

    short, again, long = make_corpus(300, 0), make_corpus(300, 0, max_sentences=4), make_corpus(300, 0, max_sentences=80)
    assert short == again  # the default is the tiny preset's corpus
    mean_words = lambda rows: sum(len(r["text"].split()) for r in rows) / len(rows)  # noqa: E731
    assert 15 < mean_words(short) < 35 and 200 < mean_words(long) < 350  # ~IMDb's length for benchmarks
    assert sum(r["label"] for r in long) == 150
