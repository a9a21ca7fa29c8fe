"""A small synthetic movie-review corpus for the offline `tiny` preset.

Deterministic from a seed. Reviews are positive or negative (half each) and mix in neutral and
occasionally opposite-sentiment sentences, so a model trained on them samples a spread of
sentiments that VADER can tell apart: exactly what the pairs and DPO stages need. The seed
report's eval prompts ("I love", "Worth the entertainment value of a", "its a") occur naturally.
"""
from __future__ import annotations

import random

TOPICS = ["the acting", "the plot", "the story", "the music", "the ending", "the characters", "the cast",
          "the script", "the dialogue", "the soundtrack", "the direction", "the pacing", "the humor",
          "the cinematography", "the lead actress", "the villain"]
THINGS = ["movie", "film", "show", "story", "drama", "comedy", "thriller", "series"]
WHEN = ["last night", "with my friends", "on a Saturday afternoon", "at the cinema", "twice", "on TV"]

POSITIVE = {
    "adj": ["great", "wonderful", "brilliant", "excellent", "beautiful", "superb", "amazing", "fantastic",
            "delightful", "charming", "funny", "touching", "good", "perfect", "lovely"],
    "verb": ["love", "loved", "enjoyed", "adored", "liked", "recommend"],
    "feel": ["happy", "moved", "delighted", "impressed", "glad"],
    "close": ["I would watch it again.", "Highly recommended.", "A real treat.", "Ten out of ten.",
              "I can't wait to see it again.", "Do not miss it."],
}
NEGATIVE = {
    "adj": ["terrible", "awful", "boring", "bad", "horrible", "dull", "poor", "weak", "dreadful", "stupid",
            "painful", "annoying", "ugly", "worst", "pathetic"],
    "verb": ["hate", "hated", "disliked", "regret", "could not stand", "do not recommend"],
    "feel": ["bored", "angry", "disappointed", "annoyed", "sad"],
    "close": ["I want my money back.", "Avoid it.", "A total waste of time.", "One out of ten.",
              "I walked out halfway.", "Never again."],
}
NEUTRAL = ["I saw it {when}.", "The film is set in a small town.", "It runs about two hours.",
           "The story follows a family over one summer.", "It was released last year.",
           "My friend told me about it.", "{topic} is based on a novel.", "It is a {thing} about a teacher."]

OPENERS = [
    "I {verb} this {thing}.", "I {verb} this {thing} so much.", "its a {adj} {thing}.", "its a {adj} {thing} really.",
    "This {thing} was {adj}.", "What a {adj} {thing}.", "Worth the entertainment value of a {adj} {thing}.",
    "{Topic} was {adj}.", "I watched this {thing} {when} and it was {adj}.", "This is a {adj} {thing}.",
]
BODY = [
    "{Topic} was {adj}.", "{Topic} is {adj} and {topic} is {adj}.", "I felt {feel} at the end.",
    "The {thing} is {adj} from start to finish.", "I {verb} {topic}.", "Honestly {topic} was {adj}.",
    "{Topic} made me feel {feel}.", "It is a {adj} {thing} with {adj} {topic2}.",
]


def _fill(template: str, rng: random.Random, words: dict) -> str:
    topic, topic2 = rng.sample(TOPICS, 2)
    text = template.format(
        verb=rng.choice(words["verb"]), thing=rng.choice(THINGS), adj=rng.choice(words["adj"]),
        feel=rng.choice(words["feel"]), when=rng.choice(WHEN), topic=topic, Topic=topic.capitalize(),
        topic2=topic2.replace("the ", ""))
    # "I love this movie." reads better than "I loved this movie." only sometimes; keep both.
    return text


def make_review(rng: random.Random, positive: bool, max_sentences: int = 4) -> str:
    words, other = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    sentences = [_fill(rng.choice(OPENERS), rng, words)]
    for _ in range(rng.randint(1, max_sentences)):
        roll = rng.random()
        if roll < 0.2:
            sentences.append(_fill(rng.choice(NEUTRAL), rng, words))
        elif roll < 0.3:  # real reviews hedge: an opposite-sentiment remark now and then
            sentences.append(_fill(rng.choice(BODY), rng, other))
        else:
            sentences.append(_fill(rng.choice(BODY), rng, words))
    if rng.random() < 0.5:
        sentences.append(rng.choice(words["close"]))
    return " ".join(sentences)


def make_corpus(n_reviews: int, seed: int, max_sentences: int = 4) -> list[dict]:
    """`n_reviews` reviews, alternating positive/negative, as {text, label} rows (label 1 = positive)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_reviews):
        positive = i % 2 == 0
        rows.append({"text": make_review(rng, positive, max_sentences), "label": int(positive)})
    rng.shuffle(rows)
    return rows
