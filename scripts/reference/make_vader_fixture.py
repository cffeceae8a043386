#!/usr/bin/env python3
"""Fixture for r2m's VADER gold reward: 100 strings and their VADER compound score from the
Python reference implementation, vaderSentiment 3.3.2 (`pip install vaderSentiment==3.3.2`).

  python3 scripts/reference/make_vader_fixture.py > tests/fixtures/vader_compound.json

The strings: hand-written cases for each VADER rule (negation, boosters, capitals, exclamation
marks, "but", "kind of", emoticons, idioms) and the last assistant reply of the first HH-RLHF
pairs shipped in data/hh-harmless-demo.jsonl (chosen and rejected).
"""

import json
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

HAND = [
    "This movie was great.",
    "This movie was GREAT!",
    "This movie was GREAT!!!",
    "This movie was not great.",
    "This movie was not bad at all.",
    "This movie was very good.",
    "This movie was extremely good!",
    "This movie was kind of good.",
    "This movie was good, but the ending was terrible.",
    "The acting was terrible but the music was wonderful.",
    "I loved it :)",
    "I hated it :(",
    "Meh.",
    "It was okay, I guess.",
    "Worst film I have ever seen. Awful, boring, and way too long.",
    "An absolute masterpiece, beautiful and moving.",
    "Not the worst, not the best.",
    "I never liked the lead actor.",
    "The plot was barely coherent.",
    "What a waste of time and money!",
    "I would happily watch it again and again.",
    "It's the bomb!",
    "The story was sort of interesting, but mostly dull.",
    "No, I did not enjoy it.",
    "LOL, that twist was hilarious",
    "The soundtrack is fantastic, the visuals are stunning, and the cast is superb.",
    "It was not terrible, but it was not good either.",
    "Honestly? Disappointing.",
    "I can't say I didn't like it.",
    "A heartwarming, funny, and clever film.",
    "",
    "The.",
    "Great great great great great",
    "Bad bad bad bad bad",
    "I am so happy and excited about this!!",
    "I feel sad and lonely.",
    "The movie was fine until the last hour, which was a disaster.",
    "Without a doubt the most beautiful film of the year.",
    "Hardly anyone would call this good.",
    "It's a decent movie; nothing special, nothing awful.",
]


def replies() -> list:
    out = []
    path = Path(__file__).resolve().parents[2] / "data" / "hh-harmless-demo.jsonl"
    for line in open(path):
        r = json.loads(line)
        for side in ("chosen", "rejected"):
            t = r[side]
            out.append(t[t.rfind("\n\nAssistant:") + len("\n\nAssistant:"):].strip())
        if len(HAND) + len(out) >= 100:
            break
    return out


def main() -> None:
    sia = SentimentIntensityAnalyzer()
    texts = (HAND + replies())[:100]
    cases = [{"text": t, "compound": sia.polarity_scores(t)["compound"]} for t in texts]
    print(json.dumps({"source": "vaderSentiment 3.3.2", "cases": cases}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
