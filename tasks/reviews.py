"""
tasks/reviews.py: the built-in task. Seeded movie reviews (and restaurant reviews, out of distribution)
whose gold reward is the VADER sentiment compound score of the response, known exactly, as in DPO's
sentiment experiment. Preference labels are drawn from it with Bradley-Terry noise, so the reward
model learns from noisy labels while the evaluation can measure the true reward.

    python -m tasks.reviews   # prints a few examples with their gold rewards
"""
import functools
import math
import random

from machinery.files import DataError


# -----------------------------------------------------------------------------
# the gold reward

def gold_reward(texts, prompts=None):
    """VADER compound sentiment in [-1, 1] of each text (its lexicon ships inside the package). With
    the prompts of the stakes variant of the task, each scaled by its prompt's stake."""
    return [vader(t) * (stake(p) if prompts is not None else 1.0) for t, p in zip(texts, prompts or texts)]


def stake(prompt):
    """How much a review matters on the stakes variant of the task (--stakes=true): 0.1 for every
    other film and restaurant (LOW_STAKES), 1 for the rest. The KL-regularised optimum has one
    temperature for every prompt, so it spends its KL where much is at stake."""
    return 0.1 if any(name in prompt for name in LOW_STAKES) else 1.0


@functools.lru_cache(maxsize=1 << 16)  # policies repeat themselves: short reviews recur across samples
def vader(text):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    global _analyzer
    if "_analyzer" not in globals():
        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer.polarity_scores(text)["compound"]


# -----------------------------------------------------------------------------
# the review generator: prompts (a film, its kind and story) and responses of graded sentiment

MOVIES = dict(
    names=["The Silent Harbor", "Night Train", "A Summer in Rome", "The Last Orchard", "Iron Valley",
           "Paper Moons", "The Glass Road", "Cold River", "The Long Winter", "Blue Horizon", "Echo Park",
           "The Hollow Crown", "Midnight Garden", "Salt and Stone", "The Red Lantern", "Wild Hearts",
           "Distant Shores", "The Clockmaker", "Northern Lights", "The Quiet Hour", "Broken Compass",
           "Golden Fields", "The Lighthouse Keeper", "Stormbound", "City of Ash", "The Little Fox"],
    kinds=["drama", "comedy", "thriller", "horror film", "romance", "war film", "western", "musical",
           "science fiction film", "family film", "mystery", "crime story"],
    subjects=["a young teacher", "two brothers", "a retired detective", "a lonely pilot",
              "a small town", "a family of farmers", "an old sailor", "a group of students",
              "a famous singer", "a stubborn doctor", "a runaway girl", "a travelling circus"],
    events=["on the eve of a war", "in a small village", "after a long storm", "far from home",
            "during one strange summer", "in a big city", "on a long journey", "at the end of the world"],
    about="It is a {kind} about {subject} {event}.",
    openers=["I watched {name} last night.", "I saw {name} with my family.",
             "We went to see {name} on Sunday.", "I finally watched {name} at home."],
    aspects=["the acting", "the story", "the music", "the dialogue", "the ending", "the camera work",
             "the pacing", "the cast", "the script", "the soundtrack", "the lead actor", "the plot"],
    it_is=["the film", "the movie", "it"],
    verdict="film",
)

RESTAURANTS = dict(  # the out-of-distribution family: same kind of language, new nouns
    names=["Luigi's Kitchen", "The Green Table", "Blue Bay Grill", "Mama Rosa", "The Copper Pot",
           "Saffron House", "Harbor Fish Bar", "The Old Mill Cafe", "Sakura Garden", "Casa Verde"],
    kinds=["Italian restaurant", "fish restaurant", "cafe", "steak house", "noodle bar", "bakery"],
    subjects=["a young chef", "two sisters", "an old couple", "a local family"],
    events=["near the station", "by the river", "in the old town", "on the main square"],
    about="It is a {kind} run by {subject} {event}.",
    openers=["We had dinner at {name} last night.", "I had lunch at {name} with a friend.",
             "We tried {name} on Saturday."],
    aspects=["the food", "the service", "the bill", "the dessert", "the soup", "the bread",
             "the wine", "the waiter", "the atmosphere", "the coffee"],
    it_is=["the place", "the meal", "it"],
    verdict="restaurant",
)

LOW_STAKES = MOVIES["names"][1::2] + RESTAURANTS["names"][1::2]  # the stakes variant: their reviews count 10x less

# graded sentiment: strong and mild praise and complaints, negations, and plain facts
ADJ = {2: ["wonderful", "brilliant", "amazing", "excellent", "superb", "fantastic"],
       1: ["good", "nice", "fine", "pleasant", "solid", "decent"],
       -1: ["weak", "dull", "slow", "odd", "uneven", "forgettable"],
       -2: ["terrible", "awful", "horrible", "painful", "dreadful", "boring"]}
MILD = ["a bit", "somewhat", "quite", "fairly", "a little"]
STRONG = ["really", "very", "truly", "extremely", "incredibly"]
SENTENCES = {
    2: ["I loved every minute of it.", "An absolute masterpiece.", "I would happily go again.",
        "Easily the best {verdict} I have seen this year.", "What a wonderful surprise!"],
    1: ["I enjoyed it.", "Worth a look.", "It was a good evening.", "I liked it more than I expected."],
    0: ["It lasted about two hours.", "We went on a {day}.", "There were not many people there.",
        "I went there after work.", "My friend chose it."],
    -1: ["I was a little bored.", "It could have been better.", "I expected more.", "Not really my thing."],
    -2: ["I hated it.", "A complete waste of time.", "Never again.", "I wanted my money back.",
         "The worst {verdict} I have seen in years."],
}
NEGATIONS = {1: ["{it} was not bad at all.", "I did not hate {it}.", "{aspect} was not bad."],
             -1: ["{it} was not great.", "{aspect} was not very good.", "{it} was not as good as I hoped."]}
DAYS = ["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "rainy evening"]


def review_sentence(rng, fam, tone):
    """One sentence whose sentiment leans with tone in {-2, -1, 0, 1, 2}."""
    aspect = rng.choice(fam["aspects"])
    it = rng.choice(fam["it_is"])
    roll = rng.random()
    if tone != 0 and roll < 0.15:  # mixed: praise one thing, fault another
        good, bad = rng.choice(ADJ[rng.choice([1, 2])]), rng.choice(ADJ[rng.choice([-1, -2])])
        a2 = rng.choice([a for a in fam["aspects"] if a != aspect])
        s = f"{aspect} was {good} but {a2} was {bad}." if tone > 0 else f"{aspect} was {bad} but {a2} was {good}."
    elif tone != 0 and roll < 0.3:
        s = rng.choice(NEGATIONS[1 if tone > 0 else -1]).format(it=it, aspect=aspect)
    elif tone != 0 and roll < 0.7:
        adverb = rng.choice(STRONG if abs(tone) == 2 else MILD + [""])
        adj = rng.choice(ADJ[tone])
        s = f"{rng.choice([aspect, it])} was {adverb + ' ' if adverb else ''}{adj}."
    else:
        s = rng.choice(SENTENCES[tone]).format(verdict=fam["verdict"], day=rng.choice(DAYS))
    return s[0].upper() + s[1:]


def review_prompt(rng, fam):
    name = rng.choice(fam["names"])
    first = rng.choice(fam["openers"]).format(name=name)
    second = fam["about"].format(kind=rng.choice(fam["kinds"]), subject=rng.choice(fam["subjects"]),
                                 event=rng.choice(fam["events"]))
    return f"{first} {second}" if rng.random() < 0.7 else first


def review_response(rng, fam):
    """One to three sentences around a tone drawn per review, so reviews read as one opinion."""
    tone = rng.choice([-2, -1, -1, 0, 1, 1, 2])
    parts = [review_sentence(rng, fam, tone if rng.random() < 0.8 else rng.choice([-2, -1, 0, 1, 2]))
             for _ in range(rng.choice([1, 2, 2, 3]))]
    return " " + " ".join(parts)


def builtin_task(seed=0, n_sft=4000, n_prefs=3000, n_align=512, n_eval=128, n_ood=128, pref_tau=0.25, stakes=False,
                 n_val=0, judge=None):
    """The built-in task's files as lists of records. Evaluation prompts are drawn first and never
    appear in training. Preference labels: the winner of (a, b) is a with probability
    sigmoid((g_a - g_b) / pref_tau), g the gold reward (Bradley-Terry noise, like human labels);
    with stakes, g is scaled by the prompt's stake, so a low-stakes pair's label is nearly a coin flip.
    Validation prompts (n_val) are drawn last, from the prompts no other file has: choosing a setting
    on them leaves the held-out prompts unseen, and the draws before them are the same with or without.
    judge: a monotone function the gold reward goes through before the labels are drawn from it."""
    rng = random.Random(seed)
    eval_prompts = unique_prompts(rng, MOVIES, n_eval, set())
    ood_prompts = unique_prompts(rng, RESTAURANTS, n_ood, set())
    seen = set(eval_prompts)
    align_prompts = unique_prompts(rng, MOVIES, n_align, seen)
    sft = []
    for _ in range(n_sft):
        p = review_prompt(rng, MOVIES)
        if p not in seen:
            sft.append({"prompt": p, "response": review_response(rng, MOVIES)})
    prefs, misses = [], 0
    while len(prefs) < n_prefs:
        p = review_prompt(rng, MOVIES)
        a, b = review_response(rng, MOVIES), review_response(rng, MOVIES)
        if p in seen or a == b:
            misses += 1
            if misses > MISSES:
                raise DataError(f"--n_prefs={n_prefs}: the built-in task's training prompts are used up by --n_eval and "
                                f"--n_align ({len(seen)} prompts); ask for fewer")
            continue
        misses = 0
        ga, gb = gold_reward([a, b], [p, p] if stakes else None)
        ga, gb = (judge(ga), judge(gb)) if judge else (ga, gb)
        a_wins = rng.random() < 1 / (1 + math.exp(min(-(ga - gb) / pref_tau, 700)))  # exp(> 709) overflows a float
        prefs.append({"prompt": p, "chosen": a if a_wins else b, "rejected": b if a_wins else a})
    used = seen | set(align_prompts) | {r["prompt"] for r in sft + prefs}
    val_prompts = unique_prompts(rng, MOVIES, n_val, used)
    return {"sft": sft, "prefs": prefs,
            "align_prompts": [{"prompt": p} for p in align_prompts],
            "eval_prompts": [{"prompt": p} for p in eval_prompts],
            "ood_prompts": [{"prompt": p} for p in ood_prompts],
            "val_prompts": [{"prompt": p} for p in val_prompts]}


MISSES = 10_000  # draws in a row with nothing new: the generator's prompts are used up


def unique_prompts(rng, fam, n, exclude):
    out, seen, misses = [], set(exclude), 0
    while len(out) < n and misses <= MISSES:
        p = review_prompt(rng, fam)
        misses = misses + 1 if p in seen else 0
        if p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) < n:
        raise DataError(f"--n_eval, --n_align: the built-in task has {len(out)} distinct prompts of this kind left, "
                        f"not the {n} asked for")
    return out


if __name__ == "__main__":
    task = builtin_task(seed=0, n_sft=5, n_prefs=3, n_align=3, n_eval=3, n_ood=3)
    for r in task["sft"]:
        print(f"{gold_reward([r['response']])[0]:+.3f}  {r['prompt']!r} -> {r['response']!r}")
    for r in task["ood_prompts"]:
        print(f"out of distribution prompt: {r['prompt']!r}")
