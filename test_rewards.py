"""
test_rewards.py: answer extraction, scorers, reward terms (rewards.py).

    python -m pytest -q test_rewards.py
"""
import json
import math
import random

import pytest
from PIL import Image

import dialects
import rewards as R
import scorers as S
import tools as T
from conftest import DIALECT_CASES, TINY_CFG, execute
from rewards import (PRESETS, accuracy, iou, r_format_deepeyes, r_format_groundlight, r_format_r3, r_format_vilasr,
                     r_length, r_region_iou, r_region_valid, r_rethink, r_tool_bonus, r_tool_success, r_vilasr,
                     r_vqa_hard, reward)
from scorers import (anls, choice_score, extract_answer, extract_choice, final_answer, levenshtein, mathvista_score,
                     mra, number_score, soft_score, vqa_normalize, vqa_score)


RW_OPTS = ["cat", "dog", "bird", "fish"]


RW_MC = {"id": 1, "question": "which?", "type": "multiple_choice", "options": RW_OPTS, "answer": "B"}


def _rw_call(ok=True, region=(0, 0, 10, 10), name="zoom_in", parsed=True):
    """A call record as tools.execute makes it: a call that did not parse has no arguments."""
    return {"name": name, "arguments": {} if parsed else None, "ok": ok, "error": None if ok else "bad box",
            "region": list(region) if region else None, "zoom": T.TOOLS[name]["zoom"]}


def _rw_traj(turns, calls=(), rethinks=0, stop="answer"):
    return {"turns": list(turns), "calls": list(calls), "stop": stop, "rethinks": rethinks}


# a well-formed two-turn trajectory: one crop, then answer B; reasoning segments of 10 and 11 characters
RW_GOOD = _rw_traj(["<think>look at it</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>",
             "<think>it is a dog</think><answer>B</answer>"], [_rw_call()])


def test_rewards_extract_answer():
    assert extract_answer("<think>x</think><answer> B </answer>") == "B"
    assert extract_answer("<answer>A</answer> no wait <answer>C</answer>") == "C"
    assert extract_answer("<answer>A</answer> \\boxed{C}") == "A"  # the tag wins over \boxed
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"  # balanced braces
    assert extract_answer("\\boxed{1} then \\boxed{2") == "1"  # the last box never closes
    assert extract_answer("\\boxed{3} and \\boxed{4}") == "4"
    assert extract_answer("<answer><answer>B</answer></answer>") == "B"  # nested: innermost
    assert extract_answer("<answer>A</answer></answer>") == "A"  # stray closing tag
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("plain text") is None
    assert extract_answer("") is None and extract_answer(None) is None
    assert extract_answer("<answer></answer>") == ""


def test_rewards_final_answer_fallback():
    assert final_answer("<think>hmm</think> Paris ") == "Paris"  # bare text after the thinking
    assert final_answer("<think>still thinking about Paris") is None  # cut off inside <think>
    assert final_answer("<think>a</think><tool_call>{}</tool_call>") is None  # only a tool call
    assert final_answer("<answer></answer>") is None
    assert final_answer("x" * 1001) is None  # that long is reasoning, not an answer


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B) dog", "B"), ("(B) dog", "B"), ("B. dog", "B"),
    ("Answer: B", "B"), ("The answer is (B).", "B"), ("dog", "B"), ("Dog.", "B"), ("**B**", "B"),
    ("\\boxed{B}", "B"), ("\\boxed{\\text{B}}", "B"), ("<answer>B</answer>", "B"),
    ("<think>A or C?</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>\n<think>(A) no</think><answer>C</answer>",
     "C"),
    ("<think>maybe A</think>I pick (D) fish", "D"),
    ("E", None), ("", None), ("a horse", None), ("(A) or (B)", None), ("<answer>A", "A"),
])
def test_rewards_extract_choice(text, want):
    assert extract_choice(text, RW_OPTS) == want


def test_rewards_choice_score():
    assert choice_score("(B) dog", "B", RW_OPTS) == 1.0
    assert choice_score("B", "dog", RW_OPTS) == 1.0  # gold given as the option text
    assert choice_score("C", "B", RW_OPTS) == 0.0
    with pytest.raises(ValueError):
        choice_score("B", "horse", RW_OPTS)  # a bad record is a user error


def test_rewards_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    # cut to 3 chars: lev("abc", "abd") = 1, plus 2 cut chars of the first string = 3 >= true distance 3
    assert levenshtein("abcxy", "abd", max_chars=3) == 3


def test_rewards_vqa_normalize():
    assert vqa_normalize("The Cat.") == "cat"  # lowercase, article, period
    assert vqa_normalize("two") == "2" and vqa_normalize("None") == "0"  # number words
    assert vqa_normalize("coca-cola") == "coca cola"  # glued punctuation becomes a space
    assert vqa_normalize("coca - cola") == "coca cola"  # spaced punctuation is dropped
    assert vqa_normalize("dont") == "don't" and vqa_normalize("yall'll") == "y'all'll"  # contractions
    assert vqa_normalize("it's") == "it 's"  # 's is split off
    assert vqa_normalize("3.5") == "3.5" and vqa_normalize("a.m.") == "am"
    assert vqa_normalize("yes!") == "yes" and vqa_normalize("$5") == "$5"
    # the official re.UNICODE-as-count slip: only the first 32 periods are stripped
    assert vqa_normalize("." * 40 + "x") == "." * 8 + "x"


def test_rewards_vqa_score_leave_one_out():
    ten = ["cat"] * 2 + ["dog"] * 8
    # leave out a cat (2 subsets): 1 match -> 1/3; leave out a dog (8 subsets): 2 -> 2/3; (2/3 + 16/3) / 10
    assert vqa_score("cat", ten) == pytest.approx(0.6)
    assert vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)  # (3 x 2/3 + 7 x 1) / 10
    assert vqa_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # (1 x 0 + 9 x 1/3) / 10
    assert vqa_score("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_score("bird", ten) == 0.0
    # answers differing only by case, punctuation, articles: all "cat"
    assert vqa_score("Cat.", ["the cat", "CAT", "a cat!", "cat"] + ["dog"] * 6) == 1.0
    assert vqa_score("two", ["2", "2", "2"] + ["x"] * 7) == pytest.approx(0.9)  # number words
    # fewer than 10 answers: 3 answers, leave out a cat (2): 1/3 each; leave out the dog: 2/3 -> 4/9
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    assert vqa_score("cat", "Cat") == 1.0  # one answer: exact match after normalisation


def test_rewards_anls():
    assert anls("Hello  World ", ["hello world"]) == 1.0  # lowercase, strip, collapsed spaces
    assert anls("ac", ["ab"]) == 0.5  # NL = 1/2 exactly: q = 0.5 is kept (official `q < 0.5` -> 0)
    assert anls("axy", ["abc"]) == 0.0  # NL = 2/3 -> q = 1/3 < 0.5
    assert anls("docvqa.", ["docvqa"]) == pytest.approx(6 / 7)  # one edit over 7 chars
    assert anls("ac", ["  ab  "]) == pytest.approx(5 / 6)  # raw answer length 6 in the denominator
    assert anls("ab", ["zz", "ab"]) == 1.0  # best answer wins
    assert anls("x" * 100000, ["abc"]) == 0.0  # huge prediction, bounded work


def test_rewards_soft_score():
    assert soft_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(1.0)
    # lev(cap, cat) = 1 -> 2/3, three times; lev(cap, dog) = 3 -> 0
    assert soft_score("cap", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(2 / 3)
    assert soft_score("The Cat", ["cat"]) == pytest.approx(1 / 3)  # top-3 sum / 3, one answer
    assert soft_score("hallo", ["hello", "hello"]) == pytest.approx(2 * 0.8 / 3)  # 1 - 1/5 twice


def test_rewards_mra():
    assert mra("10", 10) == 1.0
    assert mra("15", 10) == pytest.approx(0.1)  # rel err 0.5 <= 1 - 0.5 only (1 - 0.55 < 0.5)
    assert mra("5", 10) == pytest.approx(0.1)
    # rel 0.22 passes 1 - theta in {.5, .45, .4, .35, .3, .25}: 6 of 10
    assert mra("12.2", 10) == pytest.approx(0.6)
    # 0.95 is stored just below 0.95, so 1 - 0.95 = 0.05000000000000004 > 0.05 = rel err: all 10 pass
    assert mra("10.5", 10) == 1.0
    assert mra("16", 10) == 0.0  # rel 0.6 > 0.5
    assert mra("15 meters", 10) == pytest.approx(0.1)  # VSI-Bench reads the first token
    assert mra("about 15", 10) == 0.0 and mra("abc", 10) == 0.0 and mra("nan", 10) == 0.0
    with pytest.raises(ValueError):
        mra("3", "many")


def test_rewards_number_score():
    assert number_score("12", "12.0") == 1.0
    assert number_score("12.5", 12) == 0.0
    assert number_score("1,234", 1234) == 1.0
    assert number_score("3 apples", 3) == 1.0 and number_score("five", 5) == 1.0
    assert number_score("2 or 3", 3) == 0.0  # two numbers: no answer
    assert number_score("abc", 3) == 0.0
    assert number_score("10.5", 10, rel_tol=0.1) == 1.0  # |0.5| <= 0.1 x 10.5
    assert number_score("7", [5, 7]) == 1.0
    assert number_score("none", 0) == 0.0  # EvalAI maps none -> 0 for VQA, but it is no count


def test_rewards_mathvista_score():
    mc = {"answer": "4", "options": ["3", "4", "5"]}
    assert mathvista_score("B", mc) == 1.0  # letter -> option text "4"
    assert mathvista_score("(B) four", mc) == 1.0  # "(B)" pattern
    assert mathvista_score("4", mc) == 1.0  # not a letter: nearest option by edit distance is "4"
    assert mathvista_score("nine", mc) == 0.0  # distance 4 to every option: the first, "3"
    assert mathvista_score("", mc) == 0.0
    integer = {"answer": "3", "answer_type": "integer"}
    assert mathvista_score("3.0", integer) == 1.0
    assert mathvista_score("3.7", integer) == 1.0  # int(float()) truncates, as MathVista does
    assert mathvista_score("three", integer) == 0.0
    flt = {"answer": "1.5", "answer_type": "float", "precision": 1}
    assert mathvista_score("1.52", flt) == 1.0 and mathvista_score("1.56", flt) == 0.0  # 1.5 vs 1.6
    assert mathvista_score("0.254", {"answer": "0.25", "precision": 2}) == 1.0
    assert mathvista_score("[1, 2]", {"answer": "[1, 2]", "answer_type": "list"}) == 1.0


def test_rewards_accuracy_dispatch():
    assert accuracy("<answer>(B) dog</answer>", RW_MC)[0] == 1.0
    assert accuracy("<answer>dog</answer>", {**RW_MC, "answer": "dog"})[0] == 1.0
    assert accuracy("<answer>C</answer>", RW_MC)[0] == 0.0
    assert accuracy("<answer>12</answer>", {"type": "number", "answer": "12"})[0] == 1.0
    assert accuracy("<answer>15</answer>", {"type": "mra", "answer": 10})[0] == pytest.approx(0.1)
    assert accuracy("<answer>Cat</answer>", {"type": "vqa", "answer": ["cat"] * 2 + ["dog"] * 8})[0] == \
        pytest.approx(0.6)
    assert accuracy("<answer>ac</answer>", {"type": "anls", "answer": ["ab"]})[0] == 0.5
    assert accuracy("<answer>The Eiffel Tower.</answer>", {"type": "text", "answer": ["eiffel tower"]})[0] == 1.0
    assert accuracy("\\boxed{3.0}", {"type": "mathvista", "answer": "3", "answer_type": "integer"})[0] == 1.0
    v, why = accuracy("<think>no idea", {"type": "number", "answer": "1"})
    assert v == 0.0 and "no answer" in why


def test_rewards_accuracy_bad_records_raise():
    with pytest.raises(ValueError, match="unknown record type"):
        accuracy("<answer>x</answer>", {"type": "essay", "answer": "x"})
    with pytest.raises(ValueError):
        accuracy("", {"type": "multiple_choice", "answer": "A"})  # no options
    with pytest.raises(ValueError):
        accuracy("", {"type": "number", "answer": "lots"})  # raises whatever the model said
    with pytest.raises(ValueError):
        accuracy("", {"type": "vqa"})


def test_rewards_trajectory_names_its_dialect(policy, tmp_path):
    """The terms read the format the turns are written in: tools.trajectory says which (a hand-built one: lookagain)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    rec = dict(id="x", image=[str(tmp_path / "x.png")], question="Q?", answer="A", type="text")
    for d in ("lookagain", "vilasr", "groundlight"):
        assert T.trajectory(T.new_episode(policy, rec, ["zoom_in"], dialect=d))["dialect"] == d
    assert R._dialect(RW_GOOD) == "lookagain"


def test_rewards_harness_texts_are_the_dialects():
    """rewards.py stands on scorers.py alone: the harness texts its terms read are its own copies of dialects.py's."""
    assert R.GL_PREFILLS == (dialects.DIALECTS["groundlight"]["prefill"], dialects.GL_NEXT)
    assert R.DE_USER == dialects.DE_USER


def test_rewards_format_terms():
    assert r_format_r3(RW_GOOD, RW_MC, 1.0)[0] == 0.5
    assert r_format_r3(_rw_traj(["<answer>B</answer> and more"]), RW_MC, 1.0)[0] == 0.0
    assert r_format_r3(_rw_traj(["B</answer>"]), RW_MC, 1.0)[0] == 0.0
    # ViLaSR: every operation must parse; executing it is not asked (an out-of-image box still counts)
    assert r_format_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False, parsed=False)]), RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think><answer>A</answer>", "<think>y</think><answer>B</answer>"]),
                           RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think> so <tool_call>{}</tool_call>", RW_GOOD["turns"][1]],
                                    [_rw_call()]), RW_MC, 1.0)[0] == 0.0  # text between the thought and the action
    # Groundlight, graded per turn (0.4 think + one action, 0.2 their spacing check, which always passes, 0.2 starts
    # <think>, 0.2 ends with the action's closing tag), averaged over the turns
    assert r_format_groundlight(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(1.0)
    both = "<think>x</think><tool_call>{}</tool_call><answer>B</answer>"  # a call and an answer: 0 + .2 + .2 + .2
    assert r_format_groundlight(_rw_traj([both, "<think>y</think><answer>B</answer>"]), RW_MC, 1.0)[0] == \
        pytest.approx((0.6 + 1.0) / 2)
    assert r_format_groundlight(_rw_traj(["<answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.4)  # no think
    assert r_format_groundlight(_rw_traj(["<think>x</think><answer>B</answer> ok"]), RW_MC, 1.0)[0] == \
        pytest.approx(0.8)
    assert r_format_groundlight(_rw_traj(["hmm"]), RW_MC, 1.0)[0] == pytest.approx(0.2)  # no tag: spacing alone
    # a think is an open tag then a close after it (XMLParser's regex): a </think> before the <think> is none
    late = _rw_traj(["</think> a <think> b <answer>B</answer>"])  # 0 + 0.2 + 0 + 0.2
    assert r_format_groundlight(late, RW_MC, 1.0)[0] == pytest.approx(0.4)
    assert r_format_deepeyes(RW_GOOD, RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(_rw_traj(["<think>x<answer>B</answer>"]), RW_MC, 1.0)[0] == -1.0
    assert r_format_deepeyes(_rw_traj(["<think>x</think><answer>B"]), RW_MC, 1.0)[0] == -1.0


def test_rewards_groundlight_format_native():
    """format_reward_func under Groundlight's dialect, worked by hand: each message is the model call after its
    prefill ("\\n<think> Let me think step by step." first, "<think>" after the tool's turn), the tool tag <tool>;
    0.4 think and one of tool / answer, 0.2 always, 0.2 starts with <think>, 0.2 ends in the held action's tag."""
    call, answer = DIALECT_CASES["groundlight"]["a"]

    def fmt(*turns, dialect="groundlight"):
        return r_format_groundlight({"turns": list(turns), "calls": [], "dialect": dialect}, RW_MC, 1.0)[0]
    assert fmt(call, answer) == pytest.approx(1.0)  # (0.4 + 0.2 + 0.2 + 0.2) twice
    # read as lookagain's: no <think> opens either turn, no <tool_call>: (0.2) and (0.2 + 0.2 the answer's end)
    assert fmt(call, answer, dialect=None) == pytest.approx((0.2 + 0.4) / 2)
    assert fmt(" I am not sure") == pytest.approx(0.4)  # the prefill's <think>, never closed: 0.2 + 0.2 (starts)
    both = " x </think><tool>\nname: zoom\n</tool><answer>A</answer>"  # tool and answer: 0 + 0.2 + 0.2 + 0.2
    assert fmt(both) == pytest.approx(0.6)
    assert fmt(" a </think><tool_call>{}</tool_call>") == pytest.approx(0.4)  # <tool_call> is no tool here
    assert fmt(call, " no tags, no answer") == pytest.approx((1.0 + 0.4) / 2)  # "<think>" + text: 0.2 + 0.2


def test_rewards_tool_terms():
    calls = [_rw_call(), _rw_call(ok=False), _rw_call(), _rw_call()]
    assert r_tool_success(_rw_traj(["x"], calls), RW_MC, 0.0)[0] == 0.75
    assert r_tool_success(_rw_traj(["x"]), RW_MC, 1.0)[0] == 0.0  # none attempted
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False), _rw_call()]), RW_MC, 1.0)[0] == 1.0
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call()]), RW_MC, 0.0)[0] == 0.0  # wrong answer
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.0  # no successful call


def test_rewards_deepeyes_terms_native():
    """vl_agent.py compute_score under DeepEyes' dialect, by hand: its response holds each crop's tool response, whose
    instruction has a <think>...</think> and an <answer>...</answer> of its own; the tool bonus needs accuracy > 0.5
    (strictly) and an answer under 1000 characters."""
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>'
    early = "<think>a</think> maybe <answer> " + call  # an <answer> left open before the call
    t = {"turns": [early, "<answer>B</answer>"], "calls": [_rw_call()], "dialect": "deepeyes"}
    # after the response's last </think> (the instruction's): its answer pair and the model's: 2 and 2
    assert r_format_deepeyes(t, RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(_rw_traj(t["turns"], t["calls"]), RW_MC, 1.0)[0] == -1.0  # turns alone: 2 and 1
    t2 = {**t, "turns": [early.replace("maybe <answer> ", ""), "<think>hmm<answer>B</answer>"]}
    assert r_format_deepeyes(t2, RW_MC, 1.0)[0] == -1.0  # 3 <think> and 2 </think>
    assert r_tool_bonus(t, RW_MC, 0.6)[0] == 1.0 and r_tool_bonus(t, RW_MC, 0.5)[0] == 0.0  # > 0.5, strictly
    long = {**t, "turns": [t["turns"][0], "<answer>" + "x" * 1000 + "</answer>"]}
    assert r_tool_bonus(long, RW_MC, 1.0)[0] == 0.0 and r_format_deepeyes(long, RW_MC, 1.0)[0] == -1.0


@pytest.mark.parametrize("dialect", ["deepeyes", None])
def test_rewards_deepeyes_long_answer_scores_zero(dialect):
    """vl_agent.py:255-257: `if len(answer_text) >= 1000: acc_reward = 0.0; is_format_error = True`, then (:261, :266)
    0.8 acc + 0.2 x (-1) + 1.2 x (call and acc > 0.5). 'B. ' and 996 or 997 x's chooses B (correct for RW_MC):
    999 characters: 0.8 x 1 + 0 + 1.2 x 1 = 2.0; 1000: 0.8 x 0 - 0.2 + 1.2 x 0 = -0.2 (the shared accuracy, 1, is
    still logged). Without an <answer> their slice is the whole response: '<think>' + 990 x's + '</think>B' is 1006
    characters, so -0.2 though after </think> it reads B (no call: no tool bonus either way)."""
    call = '<think>a</think><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}' \
        '</tool_call>'

    def total(answer_turn, calls=(_rw_call(),)):
        turns = [call, answer_turn] if calls else [answer_turn]
        return reward({"turns": turns, "calls": list(calls), "dialect": dialect}, RW_MC, "deepeyes")
    got, comp, _ = total("<think>b</think><answer>B. " + "x" * 996 + "</answer>")
    assert got == pytest.approx(2.0) and comp["accuracy_deepeyes"] == 1.0
    got, comp, _ = total("<think>b</think><answer>B. " + "x" * 997 + "</answer>")
    assert got == pytest.approx(-0.2) and comp["accuracy"] == 1.0 and comp["accuracy_deepeyes"] == 0.0
    got, comp, _ = total("<think>" + "x" * 990 + "</think>B", calls=())
    assert got == pytest.approx(-0.2) and comp["accuracy"] == 1.0 and comp["accuracy_deepeyes"] == 0.0


def test_rewards_region_terms():
    # VLM-R3's code: 0.5 when every box parses and there is one, gated on a fully correct answer
    assert r_region_valid(RW_GOOD, RW_MC, 1.0)[0] == 0.5
    assert r_region_valid(RW_GOOD, RW_MC, 0.0)[0] == 0.0  # only when correct
    assert r_region_valid(RW_GOOD, RW_MC, 0.9)[0] == 0.0  # fully: their gate is accuracy == 1
    assert r_region_valid(_rw_traj(["x"]), RW_MC, 1.0)[0] == 0.0  # at least one box
    assert r_region_valid(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.5  # parses
    assert r_region_valid(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False, parsed=False)]), RW_MC, 1.0)[0] == 0.0
    # the execution-gated variant (an option): a box that parsed but failed to run counts against it
    assert R.r_region_executed(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.0
    assert R.r_region_executed(RW_GOOD, RW_MC, 1.0)[0] == 0.5 and R.r_region_executed(RW_GOOD, RW_MC, 0.9)[0] == 0.0
    assert reward(RW_GOOD, RW_MC, "vlm_r3", {"region_valid": 0, "region_executed": 1})[1]["region_executed"] == 0.5
    # gt [0,0,10,10] vs [5,5,15,15]: intersection 25, union 100 + 100 - 25 = 175
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(1 / 7)
    rec = {**RW_MC, "bbox": [0, 0, 10, 10]}
    t = _rw_traj(["x"], [_rw_call(region=(5, 5, 15, 15)), _rw_call(region=(0, 0, 10, 20)),
                         _rw_call(ok=False, region=(0, 0, 10, 10))])
    assert r_region_iou(t, rec, 1.0)[0] == pytest.approx(0.5)  # 100 / 200 beats 1/7; the failed call is ignored
    assert r_region_iou(t, RW_MC, 1.0)[0] == 0.0  # no ground-truth region
    with pytest.raises(ValueError):
        r_region_iou(t, {**RW_MC, "bbox": [5, 5, 1, 1]}, 1.0)


def test_rewards_vlm_r3_terms_native():
    """format_reward and repeat_reward (rgrpo.py) on VLM-R3's own text, by hand: the one message (its turns joined as
    they stand) fullmatches .*?<answer>.*?</answer>\\s*; each {...} (to its first }) mentioning "bbox" must load
    with a bbox_2d key, and one must, for 0.5 when the answer is fully right."""
    def traj(*turns):
        return {"turns": list(turns), "calls": [], "dialect": "vlm_r3"}
    good = traj('<think> Zoom. {"bbox_2d": [1, 2, 3, 4]}\n', " White. </think><answer>A</answer>\n")
    assert r_format_r3(good, RW_MC, 1.0)[0] == 0.5 and r_region_valid(good, RW_MC, 1.0)[0] == 0.5
    assert r_region_valid(good, RW_MC, 0.9)[0] == 0.0  # their gate: accuracy == 1
    assert r_format_r3(traj("<think> x </think><answer>A</answer> more"), RW_MC, 1.0)[0] == 0.0
    assert r_region_valid(traj("<think> x </think><answer>A</answer>"), RW_MC, 1.0)[0] == 0.0  # no box
    # a {"bbox": ...} (no bbox_2d), or a nested {...} cut at its first }, spoils them all; a {...} without "bbox" is
    # not looked at
    spoilt = traj('<think> {"bbox_2d": [1, 2, 3, 4]}\n', ' also {"bbox": [1]} </think><answer>A</answer>')
    nested = traj('<think> {"bbox_2d": [1, 2, 3, 4], "meta": {"a": 1}} </think><answer>A</answer>')
    loose = traj('<think> a set {x, y} then {"bbox_2d": [1, 2, 3, 4]}\n', " so </think><answer>A</answer>")
    assert [r_region_valid(t, RW_MC, 1.0)[0] for t in (spoilt, nested, loose)] == [0.0, 0.0, 0.5]


def test_rewards_length_term():
    # segments: "look at it" (10 chars) and "it is a dog" (11 chars): min(0.1, 0.01 x 10)
    assert r_length(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(0.1)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<think>abcde</think><answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == pytest.approx(0.05)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == 0.0  # nothing reasoned after the crop
    assert r_length(_rw_traj(["<think>abc</think><answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.03)


def test_rewards_length_term_vlm_r3():
    """length_reward (rgrpo.py) under VLM-R3's dialect, by hand: the turns of its one message joined as they stand,
    split at each {"bbox_2d": [...]} with no space after { or before }, middle segments kept only if not empty."""
    def length(*turns, dialect="vlm_r3"):
        return r_length({"turns": list(turns), "calls": [], "dialect": dialect}, RW_MC, 1.0)[0]
    box, box2, end = '{"bbox_2d": [1, 2, 3, 4]}\n', '{"bbox_2d": [5, 6, 7, 8]}\n', " White. </think><answer>A</answer>"
    assert length("<think> Zoom. " + box, end) == pytest.approx(0.05)  # "Zoom." 5, "White." 6
    assert length("<think> Zoom. " + box, end, dialect=None) == pytest.approx(0.1)  # read as ours: one segment
    assert length("<think> Zoom. " + box, box2, end) == pytest.approx(0.05)  # the empty middle one is dropped
    assert length("<think> Zoom. " + box, "<answer>A</answer>") == 0.0  # nothing after the crop: the empty end
    assert length('<think> Zoom. { "bbox_2d": [1, 2, 3, 4]} White. </think><answer>A</answer>') == pytest.approx(0.1)
    # the harness's text sticks to the next call's: "Bad!ok" 6 characters (joined by "\n": "Bad! ok", 7)
    long = "<think> Zoom in on the woman please. " + box[:-1] + "Bad!"
    assert length(long, "ok</think><answer>A") == pytest.approx(0.06)


def test_rewards_rethink_term():
    # VL-Rethinker's code: -0.1 invalid (cut off, or "wait" > 5 times), else 1 / 0; a correct answer written
    # alone gets 1.1 with 1-2 self-reflections ('wait,' + 'wait a' + 'alternatively') and
    # max(1 - 0.2 n, -0.1) with n >= 3; a forced continuation gets the plain value
    def answer(thought, **kw):
        return _rw_traj([f"<think>{thought}</think><answer>B</answer>"], **kw)
    assert r_rethink(answer("x"), RW_MC, 1.0)[0] == 1.0
    assert r_rethink(answer("Wait, is it B?"), RW_MC, 1.0)[0] == 1.1
    assert r_rethink(answer("wait a moment. Alternatively B"), RW_MC, 1.0)[0] == 1.1          # 2
    assert r_rethink(answer("wait, wait a bit, alternatively"), RW_MC, 1.0)[0] == pytest.approx(0.4)  # 3: 1 - 0.6
    assert r_rethink(answer("wait, " * 4), RW_MC, 1.0)[0] == pytest.approx(0.2)                # 4: 1 - 0.8
    assert r_rethink(answer("wait, " * 5), RW_MC, 1.0)[0] == pytest.approx(0.0)                # 5
    assert r_rethink(answer("wait, " * 6), RW_MC, 1.0)[0] == -0.1   # 6 waits: invalid, and the floor
    assert r_rethink(answer("waiting " * 6), RW_MC, 1.0)[0] == -0.1  # any substring counts for validity
    assert r_rethink(answer("Wait, is it B?"), RW_MC, 0.0)[0] == 0.0  # wrong: no bonus
    assert r_rethink(answer("Wait, is it B?", rethinks=1), RW_MC, 1.0)[0] == 1.0  # forced: plain
    assert r_rethink(answer("x", rethinks=1), RW_MC, 0.0)[0] == 0.0
    assert r_rethink(answer("x", stop="max_tokens"), RW_MC, 1.0)[0] == -0.1  # cut off
    assert r_rethink(_rw_traj(["<think>x</think>"], stop="no_action"), RW_MC, 0.0)[0] == 0.0  # ended, no answer
    # its own text (one turn, \\boxed{}, no tags) reads the same
    own = {"turns": ["So \\boxed{B}. Wait, is it? Yes, \\boxed{B}."], "stop": "answer", "dialect": "vl_rethinker"}
    assert r_rethink(own, RW_MC, 1.0)[0] == 1.1
    # cut off yet right with 1-2 waits: the shaping overrides the validity (their get_logprobs_and_logs) -> 1.1
    assert r_rethink({**own, "stop": "max_tokens"}, RW_MC, 1.0)[0] == 1.1


def test_rewards_vilasr_term():
    assert r_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0  # 0.5 x 1 + 0.5 x 1
    wrong = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>C</answer>"], [_rw_call()])
    assert r_vilasr(wrong, RW_MC, 0.0)[0] == 0.0  # gated
    assert r_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(parsed=False)]), RW_MC, 1.0)[0] == 0.5
    dot = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>B.</answer>"], [_rw_call()])
    assert r_vilasr(dot, RW_MC, 1.0)[0] == 0.0  # ViLaSR's multiple choice: the gold string exactly
    # counting: the first number found in the answer (VSI-Bench's parse takes the first token, "some": 0),
    # MRA with a strict '<' in float32 (gcot.py's torch): |9 - 10| / (10 + 1e-8) is 0.1 in float32 (10 + 1e-8 is 10),
    # 0.100000001; 1 - 0.9 is 0.100000024 in float32: still above; 1 - 0.95 is not -> 9 of 10
    rec = {"id": 2, "question": "how far?", "type": "mra", "answer": "10"}
    far = _rw_traj([RW_GOOD["turns"][0], "<think>about</think><answer>some 9 metres, not 12</answer>"], [_rw_call()])
    assert mra("some 9 metres, not 12", "10") == 0.0
    assert r_vilasr(far, rec, 0.0)[0] == pytest.approx(0.5 * 0.9 + 0.5 * 1.0)
    # 5 / 10 is 0.5 in float32, not below 1 - 0.50 = 0.5: 0 of 10 (float64's 5 / (10 + 1e-8) would pass once),
    # so the accuracy gate closes
    assert r_vilasr(_rw_traj(["<think>a</think><answer>15</answer>"]), rec, 0.0)[0] == 0.0


def test_rewards_vilasr_accuracy_float32_boundaries():
    """gcot.py's MRA in float32, worked by hand: 12 for 10 has a relative error of 0.2 (0.200000003 in float32) and
    1 - 0.80 is 0.199999988 in float32, so theta 0.80 fails as do 0.85-0.95: 6 of 10 (float64 passes 0.80: 0.7)."""
    def acc(pred, gold):
        rec = {"id": 2, "question": "how many?", "type": "number", "answer": gold}
        return R.vilasr_accuracy(_rw_traj([f"<think>x</think><answer>{pred}</answer>"]), rec, 0.0)
    # 4 for 5: 0.2 again; 14 for 10: 0.4 (0.400000006) fails at 1 - 0.60 (0.399999976): 2 of 10; 8.5 for 10: 0.15
    # (0.150000006) fails at 1 - 0.85 (0.149999976): 7; 0.95 for 1: 0.05 (0.0500000119) fails at 0.95 only: 9
    for pred, gold, want in ((12, "10", 0.6), (4, "5", 0.6), (14, "10", 0.2), (8.5, "10", 0.7), (0.95, "1", 0.9)):
        assert acc(pred, gold) == pytest.approx(want, abs=1e-6), (pred, gold)
    assert acc("about 12, not 20", "10") == pytest.approx(0.6, abs=1e-6)  # the first number
    assert acc("x" * 2000 + " 10", "10") == 1.0  # the first number, however far into the answer


def test_rewards_vilasr_format_native():
    """gcot.py format_reward under ViLaSR's dialect, worked by hand from its rule: every assistant message fullmatches
    <think>(.*?)</think>\\s*Action:\\s*(.*?)(?=\\n|$) (so it starts with <think>), <answer> and </answer> in the last
    one only, every ```json block (turns joined with nothing) a literal whose items each hold bbox_2d and label or
    start_point_2d, end_point_2d and label, tested with `in`."""
    call, answer = DIALECT_CASES["vilasr"]["a"]

    def fmt(*turns):
        return r_format_vilasr({"turns": list(turns), "calls": [], "dialect": "vilasr"}, RW_MC, 1.0)[0]
    assert fmt(call, answer) == 1.0
    assert r_format_vilasr(_rw_traj([call, answer]), RW_MC, 1.0)[0] == 0.0  # read as lookagain's tags: no <tool_call>
    assert fmt("<think> a </think> Action: Object Mapper", answer) == 1.0  # a turn need not hold a block
    assert fmt("<think> a </think>\n\nAction:Answer <answer>A</answer>") == 1.0  # whitespace around "Action:"
    assert fmt(" " + call, answer) == 0.0 and fmt(call, answer + "\n") == 1.0  # starts with <think>; any tail
    assert fmt("<think> a </think> so Action: Answer <answer>A</answer>") == 0.0  # "Action:" right after </think>
    assert fmt(answer, answer) == 0.0 and fmt(call, call) == 0.0  # the answer early; none at the end
    assert fmt(call.replace(', "label": "woman"', ""), answer) == 0.0  # an item without a label
    assert fmt(call.replace('"bbox_2d"', '"start_point_2d": [1, 2], "end_point_2d"'), answer) == 1.0  # a line
    # a bare dict: its keys are the items ("label" is not in "bbox_2d"); None: `in` raises in theirs
    assert fmt(call.replace("[{", "{").replace("}]", "}"), answer) == 0.0
    assert fmt(call.replace("}]", "}, None]"), answer) == 0.0
    assert fmt(call.replace("}]", "}"), answer) == 0.0  # unbalanced: not a literal
    # an item that is a string holding both words passes their `in` test
    assert fmt("<think> a </think> Action: Object Mapper\n```json\n['bbox_2d label']\n```", answer) == 1.0
    # a block left open runs to the end of the output, into the next turn: not a literal
    assert fmt(call[:-len("\n```")], answer) == 0.0
    # the whole reward: 0.5 x accuracy + 0.5 x format, accuracy of the last turn's answer (the gold exactly)
    rec = {**RW_MC, "answer": "A"}
    assert r_vilasr({"turns": [call, answer], "calls": [], "dialect": "vilasr"}, rec, 0.0)[0] == 1.0


def test_rewards_vilasr_question_types():
    """gcot.py accuracy_reward (:253-263) scores 'multiple choice' by ==, 'regression' and 'numerical' by MRA, any
    other question_type 0; gcot_compute_score (:286) is then 0 (accuracy alone: format is gated off). Each case below
    is well formed (format 1) with an answer the shared accuracy scores 1, so only the type decides."""
    call, answer = DIALECT_CASES["vilasr"]["a"]  # the answer: "<answer> A </answer>", read as "A"

    def score(last=answer, **record):
        t = {"turns": [call, last], "calls": [], "dialect": "vilasr"}
        return R.vilasr_accuracy(t, record, 1.0), reward(t, record, "vilasr")[0]
    # their rows as convert.py vilasr_rl writes them: free-form as text, question_type kept as written
    assert score(type="text", answer="A", question_type="free-form") == (0.0, 0.0)  # shared accuracy: 1
    assert accuracy(answer, {"type": "text", "answer": "A"})[0] == 1.0
    assert score(type="multiple_choice", options=["x", "y"], answer="A", question_type="multiple choice") == (1.0, 1.0)
    # 9 for 10: relative error 0.1 passes theta 0.50..0.90 and fails 0.95 (test above): MRA 0.9, 0.5 x 0.9 + 0.5 x 1
    nine = answer.replace(" A ", " 9 ")
    assert score(nine, type="mra", answer="10", question_type="regression") == pytest.approx((0.9, 0.95))
    assert score(nine, type="text", answer="9", question_type="free-form") == (0.0, 0.0)
    # their == is case-sensitive: "Multiple Choice" is no type it knows (convert.py reads it lower-cased)
    assert score(type="multiple_choice", options=["x", "y"], answer="A", question_type="Multiple Choice") == (0, 0)
    # records not of theirs, by our type: multiple_choice, number and mra as theirs; the others (text, vqa: no
    # rule of theirs, no row of theirs) the shared accuracy, passed in as 1.0 here and 0.0 below
    assert score(type="multiple_choice", options=["x", "y"], answer="A") == (1.0, 1.0)
    assert score(type="vqa", answer=["A"] * 10) == (1.0, 1.0)
    t = {"turns": [call, answer], "calls": [], "dialect": "vilasr"}
    assert R.vilasr_accuracy(t, {"type": "text", "answer": "B"}, 0.0) == 0.0
    # a benchmark's own question_type (MMMU's "multiple-choice") is none of theirs: our type decides
    assert score(type="multiple_choice", options=["x", "y"], answer="A", question_type="multiple-choice")[0] == 1.0


def test_rewards_groundlight_hard_score():
    # min(1, matches / 3) over the 10 answers, not the leave-one-out VQA accuracy (2 matches: 2/3 vs 0.6)
    rec = {"id": 3, "question": "brand?", "type": "vqa", "answer": ["coke"] * 2 + ["pepsi"] * 8}
    t = _rw_traj(["<think>x</think><answer>Coke</answer>"])
    assert r_vqa_hard(t, rec, 0.6)[0] == pytest.approx(2 / 3)
    assert accuracy("<answer>Coke</answer>", rec)[0] == pytest.approx(0.6)  # eval keeps the official score
    assert r_vqa_hard(_rw_traj(["<answer>pepsi</answer>"]), rec, 1.0)[0] == 1.0
    assert reward(t, rec, "groundlight")[1]["vqa_hard"] == pytest.approx(2 / 3)


def test_rewards_groundlight_answer_terms_native():
    """Groundlight's check_correctness / get_edit_distance_score, by hand: their normalize_answer (EvalAI's steps
    without its tokenizing first) on both sides; under its dialect the first <answer> of the last message, none
    without one (no untagged fallback)."""
    assert S.gl_normalize("what's up?") == "what's up" and S.gl_normalize("x,y") == "x y"  # no "'s" split, "," kept
    assert S.gl_normalize("1,000 a-b") == "1000 ab" and S.gl_normalize("coca-cola") == "coca cola"  # digit,digit
    assert soft_score("john's", ["johns"]) == pytest.approx((1 - 1 / 6) / 3)  # one edit in 6 characters
    rec = {"id": 3, "question": "what?", "type": "vqa", "answer": ["x,y"] * 3 + ["z"] * 7}
    t = {"turns": [" Look. </think>\n<answer> x y </answer>"], "calls": [], "dialect": "groundlight"}
    assert r_vqa_hard(t, rec, 0.0)[0] == 1.0  # "x,y" reads "x y": 3 matches
    red = {"id": 4, "question": "color?", "type": "vqa", "answer": ["red"] * 10}
    untagged = [" It is red. </think> red"]
    assert R.r_soft({"turns": untagged, "dialect": "groundlight"}, red, 0.0)[0] == 0.0  # no <answer>: none
    assert R.r_soft(_rw_traj(untagged), red, 0.0)[0] == 1.0  # lookagain's reading: the text after </think>
    two = [" x </think><answer>blue</answer> no, <answer>red</answer>"]
    assert r_vqa_hard({"turns": two, "dialect": "groundlight"}, red, 0.0)[0] == 0.0  # the first: blue
    assert r_vqa_hard(_rw_traj(two), red, 0.0)[0] == 1.0  # lookagain's reading: the last


def test_rewards_presets():
    total, comp, why = reward(RW_GOOD, RW_MC, "vlm_r3")
    assert total == pytest.approx(1 + 0.5 + 0.5 + 0.1)  # acc + format + valid boxes + length
    assert set(comp) == {"accuracy", "format_r3", "region_valid", "length"} and set(why) == set(comp)
    assert reward(RW_GOOD, RW_MC, "vl_rethinker")[0] == 1.0
    assert reward(RW_GOOD, RW_MC, "vilasr")[0] == 1.0
    assert reward(RW_GOOD, RW_MC, "deepeyes")[0] == pytest.approx(0.8 + 0 + 1.2)
    wrong = _rw_traj(["<think>x</think><tool_call>{}</tool_call>", "<think>y</think><answer>C</answer>"], [_rw_call()])
    assert reward(wrong, RW_MC, "deepeyes")[0] == 0.0
    no_tool = _rw_traj(["<think>x<answer>B</answer>"])  # correct, unbalanced think, no tool
    assert reward(no_tool, RW_MC, "deepeyes")[0] == pytest.approx(0.8 - 0.2)
    vqa = {"type": "vqa", "answer": ["cat"] * 10}
    gl = _rw_traj(["<think>look</think><tool_call>{}</tool_call>", "<think>ok</think><answer>Cat</answer>"],
                  [_rw_call(), _rw_call(ok=False)])
    total, comp, _ = reward(gl, vqa, "groundlight")
    assert total == pytest.approx(0.5 * 1 + 0.5 * 1 + 0.1 * 1 + 0.0 * 0.5)
    assert comp["tool_success"] == 0.5


def test_rewards_weights_override():
    assert reward(RW_GOOD, RW_MC, "vlm_r3", weights={"length": 0.0})[0] == pytest.approx(2.0)
    rec = {**RW_MC, "bbox": [0, 0, 20, 10]}  # the call looked at [0,0,10,10]: IoU 1/2
    assert reward(RW_GOOD, rec, "vlm_r3", weights={"region_iou": 2.0})[0] == pytest.approx(2.1 + 1.0)
    assert reward(RW_GOOD, RW_MC, None, weights={"accuracy": 3.0})[0] == 3.0
    with pytest.raises(ValueError, match="vlm_r3"):
        reward(RW_GOOD, RW_MC, "r1")  # unknown preset lists the known ones
    with pytest.raises(ValueError, match="unknown reward terms"):
        reward(RW_GOOD, RW_MC, "vlm_r3", weights={"lenght": 1.0})
    assert set(PRESETS) == {"vlm_r3", "vl_rethinker", "vilasr", "groundlight", "deepeyes"}


def test_rewards_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "\\boxed{", "{",
              "}", "(B)", "B", "wait", " ", "\n", "3.5", "-", "é", "日本", "\x00", "\U0001F600", "1,000", "nan",
              "inf", "''", "Answer:", "."]
    texts = ["", " ", "\\boxed{" * 2000, "<think>" * 20000, "<answer>" * 20000 + "</answer>",
             "<tool_call>" * 20000, "{" * 100000, "a" * 300000, "9" * 5000, "1e999", "-0", "\\boxed{}" * 100,
             "<answer>" + "a" * 300000 + "</answer>", "<answer>" + "(A) " * 50000 + "</answer>"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    records = [RW_MC, {"type": "number", "answer": "3"}, {"type": "mra", "answer": 12},
               {"type": "vqa", "answer": ["cat"] * 10}, {"type": "anls", "answer": ["hello world"]},
               {"type": "text", "answer": ["x"]}, {"type": "mathvista", "answer": "2", "options": ["1", "2"]},
               {"type": "mathvista", "answer": "1.5", "precision": 1}, {**RW_MC, "bbox": [0, 0, 5, 5]}]
    odd_calls = [_rw_call(), _rw_call(ok=False, region=None), {"name": None, "arguments": None, "ok": False,
                 "error": "json", "region": None}, _rw_call(region=("a", 1, 2, 3)), _rw_call(region=(5, 5, 1, 1))]
    for i, text in enumerate(texts):
        rec = records[i % len(records)]
        assert extract_choice(text, RW_OPTS) in (None, "A", "B", "C", "D")
        extract_answer(text)
        v, why = accuracy(text, rec)
        assert 0.0 <= v <= 1.0 and isinstance(why, str)
        names = list(dialects.DIALECTS)  # each term in its own method's reading too (the long texts: all of them)
        for dialect in names if i < 14 else [names[i % len(names)]]:
            t = {"turns": [text, text[:50]], "calls": odd_calls[: i % 6], "rethinks": i % 4, "dialect": dialect}
            for preset in PRESETS:
                total, comp, reasons = reward(t, rec, preset, weights={"region_iou": 1.0, "soft": 0.1})
                assert math.isfinite(total) and set(comp) == set(reasons)
    assert reward({}, RW_MC, "vlm_r3")[0] == 0.0  # no turns at all


def test_rewards_coverage_hand_computed_boxes():
    rec = dict(bbox=[100, 100, 200, 200])

    def zoom(region, ok=True, name="zoom_in"):
        return dict(name=name, arguments={}, ok=ok, error=None, region=region, zoom=T.TOOLS[name]["zoom"])
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200])]), rec) == (1.0, 1.0)
    # [0,0,200,200]: IoU 10000/40000 = 0.25, gt wholly inside; [150,150,250,250]: IoU 2500/17500, inside 0.25
    assert R.coverage(dict(calls=[zoom([150, 150, 250, 250]), zoom([0, 0, 200, 200])]), rec) == (0.25, 1.0)
    # equal IoU 0.5: [100,100,150,200] holds half of the gt, [100,100,200,300] all of it: the tie goes to it
    assert R.coverage(dict(calls=[zoom([100, 100, 150, 200]), zoom([100, 100, 200, 300])]), rec) == (0.5, 1.0)
    # failed zooms and drawings do not count as looking
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200], ok=False),
                                  zoom([100, 100, 200, 200], name="draw_box")]), rec) == (0.0, 0.0)
    assert R.coverage(dict(calls=[]), rec) == (0.0, 0.0)
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200])]), {}) == (None, None)
    # a zoom on a zoom, measured in original pixels: 1000x800 image, the model's view 500x400
    img = Image.new("RGB", (1000, 800), (128, 128, 128))
    ep = dict(tools=["zoom_in"], specs={"zoom_in": T.TOOLS["zoom_in"]}, cfg=dict(TINY_CFG), originals=[img],
              calls=[], images=[T.make_view([img], 0, (0, 0, 1000, 800), (500, 400))])
    call = {"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [0, 0, 250, 200]}}
    c1, v1, _ = execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>")
    ep["images"].append(v1)
    w, h = v1["img"].size
    call = {"name": "zoom_in", "arguments": {"image_index": 1, "bbox_2d": [w / 2, h / 2, w, h]}}
    c2, _, _ = execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>")
    assert c1["region"] == [0, 0, 500, 400] and c2["region"] == pytest.approx([250, 200, 500, 400])
    # gt = the bottom-right quarter of the first zoom: the second zoom is exactly it; the first has IoU 1/4
    assert R.coverage(dict(calls=[c1, c2]), dict(bbox=[250, 200, 500, 400])) == pytest.approx((1.0, 1.0))
    assert R.coverage(dict(calls=[c1]), dict(bbox=[250, 200, 500, 400])) == pytest.approx((0.25, 1.0))
