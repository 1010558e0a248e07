"""
rethink.py: VL-Rethinker's forced rethinking (arXiv 2504.08837), as its released code runs it
(openrlhf/trainer/ppo_utils/experience_maker.py, _generate_vllm).

Why. Vision-language models rarely check themselves: "reflection inertia". RL alone seldom makes them start, since a
response that says "wait" is rare and so is its reward. Forced rethinking writes the start for them: after a first
answer, a trigger ("Wait, does it seem right?") is appended and the model continues. A continuation that ends right is
kept in its group in place of the original, and the trigger with everything after it is TRAINED: that is how the
policy learns to say "wait" on its own (rewards.r_rethink then pays 1.1 for 1-2 self-generated reflections).

What it does, each GRPO step, after the rollouts are scored:
  1. candidates: responses that ended in an answer and used at most half the token budget; in a group more than
     EASY_GROUP right, its wrong responses are skipped (a lone slip in an easy group is noise, not a lesson);
  2. --rethink-prob of the candidates go on; each is first cut back with probability --rethink-truncate (cut_back:
     before its last "Wait", its last \\boxed, its first "answer", then to the last blank line), then a trigger is
     appended (pick_trigger) and the turn is continued at --rethink-temperature;
  3. a continuation replaces its original if its answer is correct, it wrote more than MIN_NEW_TOKENS and fewer
     than half the budget new tokens, at most MAX_PER_GROUP per group (a slot is taken before the last check) and
     MAX_WAITS waits (the trigger's included).

Usage (in grpo.py):
    n_kept = forced_rethinking(policy, groups, scores, rng, score=..., max_tokens=..., prob=0.65, truncate=0.5,
                               temperature=0.9, max_turn_tokens=..., top_p=..., top_k=..., min_p=...)

At evaluation (eval.py --force-wait, their force_append_wait_eval): every candidate is continued after "\n\nWait";
eval_continuations() makes the continuations, continuation_ok() holds the checks that do not read the answer.
"""
import random

import model as M
import rewards as R
import tools as T

# the triggers and how often each is drawn: "Wait" 0.2, "Wait, does it seem right?" 0.3, and with 0.5 the one that
# follows the first answer: "let's double check" after a right one, "there might be a mistake" after a wrong one
TRIGGERS = ["\n\nWait", "\n\nWait, does it seem right?"]
TRIGGER_RIGHT, TRIGGER_WRONG = "\n\nWait, let's double check", "\n\nWait, there might be a mistake"
EASY_GROUP = 0.7     # a group with more than this share right: its wrong responses are not continued
MIN_NEW_TOKENS = 30  # a continuation must write more than this many tokens (and fewer than half the budget)
MAX_PER_GROUP = 2    # continuations kept per group
MAX_WAITS = 4        # self-reflections allowed in a kept continuation, the trigger's own "Wait" included


def candidate(ep, max_tokens):
    """A response VL-Rethinker continues: it ended in an answer (their eos) within maxtoken - 1024 tokens, here half
    the budget (1024 of its 2048)."""
    return ep["stop"] == "answer" and ep["n_sampled"] <= max_tokens // 2


def long_enough(ep, max_tokens):
    """A continuation wrote more than MIN_NEW_TOKENS and fewer than half the budget new tokens (their 1024 > n > 30)."""
    return MIN_NEW_TOKENS < ep["n_sampled"] - ep["rethink_from"][1] < max_tokens // 2


def few_waits(ep):
    """At most MAX_WAITS self-reflections in the continuation's text, + 1 for the trigger's own (their 1 + nw1 + nw2 +
    nalt <= 4)."""
    return 1 + R.rethinker_waits("".join(ep["turns"][ep["rethink_from"][0]:])) <= MAX_WAITS


def continuation_ok(ep):
    """eval.py --force-wait: the checks on a continuation that do not read its answer (experience_maker.py:2013,
    2042); their oracle adds one that does: it is kept only if right (:2018)."""
    return long_enough(ep, ep["cfg"]["max_tokens"]) and few_waits(ep)


def eval_continuations(policy, episodes, seed):
    """VL-Rethinker's force_append_wait_eval (experience_maker.py:1866, 1914-1942): each candidate is cut back with
    probability 0.5 (their coin is thrown at evaluation too; here seeded by (seed, item, sample)), "\n\nWait" (their
    trigger 0 at evaluation) is appended and the turn goes on, sampled as the first was. -> the continuations to roll
    out; each is at its episode's ep["wait"] too. A replayed episode's next text is its continuation."""
    out = []
    for ep in episodes:
        if candidate(ep, ep["cfg"]["max_tokens"]):
            coin = random.Random("{}/{}/{}".format(seed, *ep["item"])).random() < 0.5
            ep["wait"] = rethink_episode(policy, ep, TRIGGERS[0], coin)
            ep["wait"]["script"] = list(ep.get("script") or [])  # (copy_episode shares the list)
            out.append(ep["wait"])
    return out


def pick_trigger(correct, rng):
    if rng.random() < 0.5:
        return TRIGGERS[0] if rng.random() < 0.4 else TRIGGERS[1]
    return TRIGGER_RIGHT if correct else TRIGGER_WRONG


def cut_back(text):
    """VL-Rethinker's truncation of a response before rethinking: before the last "Wait", then before the last
    "\\boxed", then before the first "answer" (any case; here the <answer> tag), then at the last blank line."""
    for mark in ("Wait", "\\boxed"):  # one after the other: the last \boxed is looked for in what the Wait cut left
        i = text.rfind(mark)
        text = text[:i] if i >= 0 else text
    i = text.lower().find("answer")  # the first, as VL-Rethinker's find()
    text = text[:i - (text[i - 1:i] == "<")] if i >= 0 else text  # an <answer> tag's "<" goes with it (ours)
    i = text.rfind("\n\n")
    return text[:i].strip() if i >= 0 else text  # (stripped only when cut at a blank line, as theirs)


def rethink_episode(policy, ep, trigger, truncate):
    """A copy of an answered episode (sharing its images), its last turn cut back when `truncate`, the trigger
    appended (trained, as in VL-Rethinker's code: a part of what the policy wrote) and the turn left open for
    rollout() to go on."""
    # stop None: rollout() takes it up again; rethinks: r_rethink pays no reflection bonus to a forced rethink
    new = dict(T.copy_episode(ep), stop=None, truncated=False, rethinks=ep["rethinks"] + 1)
    msg = new["messages"][-1]  # the answering assistant message; its last sampled part is the answer's turn
    k = max(i for i, p in enumerate(msg["parts"]) if isinstance(p, dict))
    turn, logps = msg["parts"][k]["ids"], msg["parts"][k]["logps"]
    n_turn = len(turn)
    if turn and turn[-1] in policy.eos:  # the turn goes on after the trigger: its end goes (VL-Rethinker's too)
        turn = turn[:-1]
    text = policy.tok.decode(turn)
    # the sampled ids themselves up to where the text is cut, never re-tokenised (their log-probs stay theirs)
    kept = T.prefix_ids(policy, turn, len(cut_back(text)) if truncate else len(text))
    tids = M.ids(policy, trigger)
    # the trigger was not sampled: 0.0, as render gives every token the sampler did not draw
    msg["parts"][k:] = [dict(ids=kept + tids, logps=logps[:len(kept)] + [0.0] * len(tids))]
    msg["closed"] = False  # open: the next model call continues this turn after the trigger
    new["turns"][-1] = policy.tok.decode(kept) + trigger  # the turn's text, as the reward reads it
    new["n_sampled"] = ep["n_sampled"] - (n_turn - len(kept))  # what was cut, a stripped end-of-turn token too
    new["rethink_from"] = (len(new["turns"]), new["n_sampled"])  # where the continuation starts
    return T.render(policy, new)


def forced_rethinking(policy, groups, scores, rng, score, max_tokens, prob, truncate, temperature, max_turn_tokens,
                      **sampling):
    """Continue some answered responses after a trigger and keep the good continuations in their groups, in place.
    groups: lists of finished episodes; scores: (reward, components) per episode, in the same shape, replaced where
    a continuation is kept; score(episode) -> (reward, components); sampling: rollout's top_p / top_k / min_p.
    -> the number of continuations kept."""
    todo = []
    for gi, g in enumerate(groups):
        right = [s[1]["accuracy"] >= R.CORRECT for s in scores[gi]]
        easy = sum(right) / len(right) > EASY_GROUP
        for ei, ep in enumerate(g):
            if not candidate(ep, max_tokens) or (easy and not right[ei]):
                continue
            if rng.random() < prob:  # (VL-Rethinker skips a candidate with probability 0.35: prob 0.65)
                trigger = pick_trigger(right[ei], rng)
                todo.append((gi, ei, rethink_episode(policy, ep, trigger, rng.random() < truncate)))
    if not todo and not M.lockstep(policy):  # sharded ranks roll out together, even with nothing to continue
        return 0
    # one batched rollout for every continuation, as the first rollout (VL-Rethinker: temperature 0.9)
    T.rollout(policy, [t[2] for t in todo], temperature=temperature, max_turn_tokens=max_turn_tokens, **sampling)
    kept, slots = 0, {}
    for gi, ei, ep in todo:
        total, comp = score(ep)
        # VL-Rethinker's checks: right, 30 < new tokens < 1024 (half its 2048), a slot left in the group
        if comp["accuracy"] < R.CORRECT or not long_enough(ep, max_tokens) or slots.get(gi, 0) >= MAX_PER_GROUP:
            continue
        slots[gi] = slots.get(gi, 0) + 1  # taken even if the wait count below drops it (its q2cnt)
        if few_waits(ep):
            # in place: the group's advantages, computed after this, see the continuation, not the original
            groups[gi][ei], scores[gi][ei] = ep, (total, comp)
            kept += 1
    return kept
