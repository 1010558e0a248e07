"""
mathscore.py: the math benchmarks' official scorers (VL-Rethinker's, MathVision's, EMMA's), and the rule-based stand-ins
for what they call in sympy, math_verify and latex2sympy2 (none of which lookagain depends on). Read top to bottom:
  1. value          a LaTeX or plain expression -> its number (a Fraction while exact), or None: the one evaluator
  2. math_verify    mv_extract (parse's answer) and mv_equal (verify), approximated as the research notes propose
  3. scorers        rethinker_score (MathVerse's default, VL-Rethinker's handle_boxed), mathvision_score, emma_score

Where the stand-ins can differ from the libraries (docs/benchmarks.md lists it): identities that need simplify
(sin^2 + cos^2, factored polynomials), equations equal only once solved, inequalities vs intervals, matrices, complex
numbers, functions, calculus, unusual macros, math_verify's joining of several boxes and its full priority order.
Every scorer is a function of (model output text, record) -> (value, why): model text never raises.
"""
import math
import re
from fractions import Fraction

MAX_EXPR_CHARS = 300  # longer text is no answer to evaluate (bounded work)

# -----------------------------------------------------------------------------
# 1. value: a recursive-descent evaluator over + - * / ^ ( ) { }, \frac, \sqrt, \pi, e, \ln, \log, trig, % and a:b


# markup with no value, dropped before parsing (math_verify's basic_latex normalisation; research notes §2.3 step 1)
_DROP = re.compile(r"\$|\\left|\\right|\\!|\\,|\\;|\\quad|\\displaystyle")
# a number (12, 1.5, 3., .5), a macro (\frac), \%, one letter ('xy' is two tokens), else one character
_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\%|[a-zA-Z]|\S")
_FUNCS = {  # in radians, as sympy reads \sin(30) (research notes §2.4)
          "\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\ln": math.log, "\\exp": math.exp,
          "\\arcsin": math.asin, "\\arccos": math.acos, "\\arctan": math.atan}


def _tidy(s):
    """What both libraries do before parsing: $ and spacing macros dropped, \\dfrac -> \\frac, 1,000 -> 1000,
    \\frac12 -> \\frac{1}{2}, \\sqrt3 -> \\sqrt{3}."""
    s = _DROP.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    # thousands separators: groups of exactly 3 digits, not inside a longer number, not before a decimal part;
    # anything else keeps its commas (1,2 and (1,23) are tuples for mv_equal)
    s = re.sub(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,]|\.\d)", lambda m: m.group().replace(",", ""), s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # one digit each: \frac123 is \frac{1}{2}3, as LaTeX
    return re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)


def value(s, e=math.e, percent=True, ratio=False):
    """The number s evaluates to: a Fraction while only integers and decimals meet + - * / and integer powers, else a
    float; None for anything else (a letter, \\text, a unit, a set). e: the value of a bare e (None: not a number,
    as MathVision's eval of sympy's E); percent: 25\\% = 1/4 (math_verify) or not a number (latex2sympy2);
    ratio: 1:2 = 1/2 (latex2sympy2)."""
    if not isinstance(s, str) or not s.strip() or len(s) > MAX_EXPR_CHARS:
        return None
    toks, pos = _TOKEN.findall(_tidy(s)), [0]  # pos in a list: the nested parsers below move it

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else None

    def take(want=None):
        t = peek()
        if t is None or (want is not None and t != want):
            raise ValueError(f"expected {want}")
        pos[0] += 1
        return t

    def group():  # {expr}, or one token (\frac12 is tidied already)
        if peek() == "{":
            take("{")
            v = expr()
            take("}")
            return v
        return atom()

    def atom():
        t = take()
        if t[0].isdigit() or t[0] == ".":
            return Fraction(t)  # exact: Fraction("0.1") is 1/10, so 0.1 + 0.2 == 0.3 here
        if t in "({[":  # any bracket groups; a comma inside fails (tuples and intervals are mv_equal's)
            v = expr()
            take({"(": ")", "{": "}", "[": "]"}[t])
            return v
        if t == "\\frac":
            a = group()
            return a / group()  # Fractions stay exact; a zero denominator is caught below (None)
        if t == "\\sqrt":
            n = 2
            if peek() == "[":
                take("[")
                n = expr()
                take("]")
            return float(group()) ** (1 / float(n))  # a root is a float: irrational in general
        if t == "\\pi":
            return math.pi
        if t == "e" and e is not None:  # (e=None: 'e' is a letter, no number)
            return e
        if t == "\\log":
            base = 10  # latex2sympy2's \log is base 10; \log_{2} 8 = 3 (research notes §2.4)
            if peek() == "_":
                take("_")
                base = group()
            return math.log(float(unary())) / math.log(float(base))  # its argument: one unary, \log 10^2 = 2
        if t in _FUNCS:
            return _FUNCS[t](float(unary()))  # \sin 2\pi reads as (\sin 2) times \pi
        raise ValueError(f"not a number: {t}")

    def power():
        b = atom()
        if peek() == "^":
            take("^")
            x = group() if peek() == "{" else atom()  # 2^{10}, or one atom: 2^3 (a^b^c is no number)
            # an integer power stays exact, its exponent bounded (2^{100000} as a Fraction is slow work)
            if isinstance(b, Fraction) and isinstance(x, Fraction) and x.denominator == 1 and abs(x) <= 64:
                return b ** int(x)
            return float(b) ** float(x)  # a negative base to a fraction is complex: caught at the end
        return b

    def unary():  # below power: -2^2 is -(2^2) = -4, as LaTeX means it
        if peek() in ("-", "+"):
            return -unary() if take() == "-" else unary()
        return power()

    def term():
        v = unary()
        while True:
            t = peek()
            if t in ("\\%", "%") and percent:  # percent=False leaves it unread: the text is then no number
                take()
                v = v / 100
            elif t in ("*", "\\cdot", "\\times"):
                take()
                v = v * unary()
            elif t in ("/", "\\div") or (t == ":" and ratio):  # latex2sympy2 reads 1:2 as 1/2 (research notes §2.4)
                take()
                v = v / unary()
            elif t is not None and (t[0].isdigit() or t in ("(", "{", "\\frac", "\\sqrt", "\\pi", "e", "\\log")
                                    or t in _FUNCS):
                v = v * power()  # implicit multiplication: 2\sqrt{3}, 2\pi, 3(4)
            else:
                return v

    def expr():
        v = term()
        while peek() in ("+", "-"):  # left to right: 1 - 2 + 3 = 2
            v = v + term() if take() == "+" else v - term()
        return v

    try:
        v = expr()
        if pos[0] != len(toks):  # text left over (a unit, a letter, an '='): no number
            return None
        return v if isinstance(v, Fraction) or math.isfinite(v) else None  # inf and nan are no answer
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None  # a complex power is a TypeError when compared; a letter, a stray brace: ValueError

# -----------------------------------------------------------------------------
# 2. math_verify, approximated: parse(text) -> the answer string; verify(a, b) -> equal?


# math_verify's last-resort anchors (priority 300, its parser.py; research notes §2.1). A number: after a space, '='
# or the start; 1,234 / 12 / 1.5 / .5 with an optional % or \%; then a space, punctuation, ')' , '$' or the end
# (every part is optional: it matches '' too, which mv_extract skips). LaTeX: $$...$$, \[...\], $...$ on one line
# and not after a digit, \(...\), the content in the group that matched.
_NUMBER = re.compile(r"(?:(?<=[\s=])|^)[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\\?%)?(?=[\s.,;:!?)$]|$)")
_LATEX_ENV = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|(?<!\d)\$([^$\n]+?)\$|\\\((.+?)\\\)", re.S)
_MATHY = re.compile(r"[\w\s\\{}()\[\],.+\-*/^=!'%:]*")  # what LaTeX answers are made of (not '<|im_end|>')


def last_boxed(text):
    """The content of the last \\boxed{...} whose braces balance (nested braces kept), else None."""
    best, stack = None, []  # best: (start, end) of the content
    for m in re.finditer(r"\\boxed\{|[{}]", text):
        if m.group() != "}":  # a \boxed{ pushes where its content starts, a plain { pushes None
            stack.append(m.end() if m.group() != "{" else None)
        elif stack:  # a } closes the innermost open brace (a stray } is ignored)
            s = stack.pop()
            if s is not None and (best is None or s > best[0]):  # the box opened last wins: an inner one over its outer
                best = (s, m.start())
    # an unclosed \boxed{ is never popped: skipped, an earlier closed box is the answer
    return text[best[0]:best[1]] if best else None


def _parses(s):  # stands in for "sympy parsed it": only math characters, balanced braces
    return bool(s.strip()) and _MATHY.fullmatch(s) is not None and s.count("{") == s.count("}")


def mv_extract(text):
    """math_verify.parse's answer, approximated: the first of its anchors (by priority, the rightmost match within one)
    whose content parses: the last \\boxed{}, a number or LaTeX within 50 characters after 'answer:', the rightmost
    $...$ / \\(...\\) / \\[...\\] or number. A match that does not parse is what is returned when nothing parses
    (a string, compared as a string); None when nothing matched (math_verify's [])."""
    text = text[-20000:]  # math_verify's regexes see it all; the answer is at the end
    found = []  # candidates in math_verify's priority order: \boxed (50), 'answer:' (100), then anchors (300)
    box = last_boxed(text)
    if box is not None:
        found.append(box)
    low = text.lower()
    if "answer:" in low:  # the last one (case-insensitive, as its (?i:answer): pattern)
        after = text[low.rindex("answer:") + 7:][:60]  # 50 characters may come first: 60 leave the value room
        m = _LATEX_ENV.search(after) or re.search(r"[-+]?\d[\d,]*(?:\.\d+)?", after)
        if m:  # a LaTeX environment's content (its groups), else the number (no groups)
            found.append(next(g for g in m.groups() if g is not None) if m.groups() else m.group())
    ends = [(m.end(), next(g for g in m.groups() if g is not None)) for m in _LATEX_ENV.finditer(text)]
    ends += [(m.end(), m.group()) for m in _NUMBER.finditer(text) if re.search(r"\d", m.group())]
    found += [s for _, s in sorted(ends, reverse=True)]  # within one priority, the rightmost match is tried first
    for s in found:
        if _parses(s):  # the first candidate that parses wins (math_verify: the first match sympy parses)
            return s.strip()
    return found[0] if found else None  # none parsed: the first match as a string (its fallback_mode first_match)


def _canon(s):
    """§2.3's canonical text: $, spacing, \\left/\\right, \\text{X} -> X, degrees and spaces dropped, one final '.'."""
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf|mbox)\{([^{}]*)\}", r"\1", _tidy(s.strip()))  # (no braces inside X)
    s = re.sub(r"\^\{?\\circ\}?|°", "", s)  # 40^\circ = 40: math_verify drops degrees (research notes §1.3 Q7)
    return re.sub(r"\s+", "", s).removesuffix(".")  # a sentence's full stop: '12.' is 12


def _split_top(s):
    """s split at its commas outside any bracket."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")  # any kind opens and closes: a half-open (1,2] still balances
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _brackets(s):  # a bare list a,b counts as the open (a,b) (math_verify's rule; research notes §2.3 step 3)
    return s[0] + s[-1] if s[0] in "([" and s[-1] in ")]" else "()"


def _num_equal(a, b):
    """math_verify's number rule: 6 decimals if either side was written with a decimal point, else exact (Fractions)
    or, for irrational values (sqrt, pi), within 1e-9 (standing in for evalf(15) and simplify)."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    # relative 1e-9: our floats and sympy's 15-digit evalf may part in the last digits of the same value
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def mv_equal(pred, gold):
    """math_verify.verify of two extracted answers, approximated (§2.3 of the research notes): assignments keep their
    right side, tuples and intervals compare brackets and elements, numbers by value, words case-insensitively,
    anything else as canonical text."""
    p, g = _canon(pred), _canon(gold)
    if not p or not g:  # math_verify's string rule needs both sides non-empty
        return False
    if p == g:
        return True
    # an assignment (x=5, AB=3: a name, one '=') keeps its right side, on either side (research notes §2.3 step 2)
    sides = [re.fullmatch(r"([a-zA-Z]\w*)=([^=]+)", s) for s in (p, g)]
    p, g = [m.group(2) if m else s for m, s in zip(sides, (p, g))]
    pt, gt = _split_top(p.strip("()[]")), _split_top(g.strip("()[]"))  # the elements, outer brackets off
    if len(pt) > 1 or len(gt) > 1:  # a tuple or an interval: same brackets (a bare list equals (a, b)), same elements
        return (len(pt) == len(gt) and _brackets(p) == _brackets(g)
                and all(mv_equal(a, b) for a, b in zip(pt, gt)))
    a, b = value(p), value(g)
    if a is not None and b is not None:
        decimal = "." in re.sub(r"\\[a-z]+", "", p + g)
        # a decimal point on either side: 6 places (math_verify's float_rounding=6: 0.333 is not 1/3; notes §1.3 Q6)
        return round(float(a), 6) == round(float(b), 6) if decimal else _num_equal(a, b)
    if re.fullmatch(r"[a-zA-Z]+", p) and re.fullmatch(r"[a-zA-Z]+", g):  # Yes == yes: symbols compare case-folded
        return p.lower() == g.lower()
    return p == g  # else the canonical text; never partly right

# -----------------------------------------------------------------------------
# 3. the official scorers


RETHINKER_EOS = "<|im_end|>"  # its eval decodes token ids, EOS kept: the scored text ends in it (experience_maker.py)
RETHINKER_DONE = "Now everything looks fine. Solution finished."  # text after it scores 0 (handle_boxed's first check)


def rethinker_normalize(s):
    """VL-Rethinker's normalize_answer, substring for substring (quirk: \\text{ cm} -> { }, 'cm' gone anywhere)."""
    s = s.replace("dfrac", "frac").replace("\\text", "")  # the command's name only: \textbf{B} -> bf{B}
    s = s.replace("\\varnothing", "\\emptyset")
    return s.replace("minutes", "").replace("cm", "")  # anywhere: 'acme' -> 'ae', \boxed{5 cm} -> \boxed{5 }


def _rethinker_verify(nsol, gold):
    """do_verify: a letter gold (any substring of A..K, as 'AB') by the text right after '\\boxed{' starting with it
    (quirk: case-sensitive, '(B)' and '\\text{B}' wrong, 'Blue' right); else math_verify (approximated)."""
    if gold in "ABCDEFGHIJK":  # a substring test, as theirs: 'AB' and 'IJK' take this branch too
        # 7 characters dropped whatever they are: on the whole text, the 8th character against the letter (Q2)
        return float(nsol[len("\\boxed{"):].startswith(gold))
    a = mv_extract(nsol)
    return -1.0 if a is None else float(mv_equal(a, gold))  # nothing parses: their -1, counted wrong


def rethinker_score(text, record, eos=RETHINKER_EOS):
    """VL-Rethinker's handle_boxed (experience_maker.py), the scorer behind its published numbers: the text from the
    last \\boxed, else the first one-line <answer>, else after the last 'Answer:', each tried while it fails, then the
    whole text. Quirks kept: <|im_end|> ends the scored text (their decoded tokens keep it: 'Answer: 12' cannot
    parse; eos='' scores a response cut at the token limit, which has none); the whole text is tried last (Q2: the
    8th character against a letter gold); an empty output is -1 -> 0."""
    gold = rethinker_normalize(str(record["answer"][0] if isinstance(record["answer"], list) else record["answer"]))
    gold = (last_boxed(gold) if "\\boxed" in gold else gold) or ""  # they parse a boxed gold as is, else \boxed{gold}
    if not gold.strip():
        return 0.0, "gold does not parse (-1)"
    sol = text if text.endswith(eos) else text + eos  # as their decoded response ends, EOS kept
    done = sol.find(RETHINKER_DONE)
    if done >= 0 and len(sol) > done + len(RETHINKER_DONE) + len(eos):  # anything but the EOS after it: 0, unread
        return 0.0, "text after 'Solution finished.'"
    gold = gold.strip()
    for indicator in ("\\boxed", "<answer>", "Answer:"):  # each one present, in this order; the first to verify wins
        if indicator not in sol:
            continue
        if indicator == "\\boxed":  # from the last \boxed to the end: trailing prose and the EOS included
            nsol = sol[sol.rindex("\\boxed"):].strip()
        elif indicator == "<answer>":
            m = re.search("<answer>(.*?)</answer>", sol)  # no DOTALL: a multi-line answer is skipped
            if not m:
                continue
            nsol = "\\boxed{" + m.group(1) + "}"
        else:
            nsol = "\\boxed{" + sol.split("Answer:")[-1].strip() + "}"  # the EOS inside: 'Answer: 12' never parses (Q4)
        if _rethinker_verify(rethinker_normalize(nsol), gold) > 0.99:
            return 1.0, f"{indicator} matches {gold[:20]!r}"
    v = _rethinker_verify(rethinker_normalize(sol), gold)  # none verified: the whole text decides
    return max(v, 0.0), f"whole text {'matches' if v > 0.99 else 'does not match'} {gold[:20]!r}"


def _is_number(s):
    try:
        float(s)  # 'nan' and 'inf' are numbers too, as their is_number
        return True
    except ValueError:
        return False


def _fix_fracs(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (the MATH dataset's _fix_fracs)."""
    head, *rest = s.split("\\frac")
    for part in rest:
        head += "\\frac"
        if part[:1] == "{" or len(part) < 2:  # braced already, or too short to fix: as written
            head += part
        elif part[1] == "{":
            head += "{" + part[0] + "}" + part[1:]
        else:
            head += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return head


def _strip_string(s):
    """MathVision's _strip_string (utils.py): the MATH normalisation, with its _fix_fracs run only when 'sqrt' is in
    the text (quirk of its indentation) and a bare % kept (only \\% goes)."""
    for a, b in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", "")):  # in its order
        s = s.replace(a, b)
    # a unit after '\text{ ' cut off; only \% goes (a bare % stays: '50%' is no number); .5 -> 0.5
    s = s.split("\\text{ ")[0].replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = "0" + s if s.startswith(".") else s
    for sep in ("=", "\\approx"):  # exactly one '=' (then '\approx'): its right side, x=5 -> 5
        if len(s.split(sep)) == 2:
            s = s.split(sep)[1]
    if "sqrt" in s:  # its _fix_sqrt: \sqrt3 -> \sqrt{3}
        s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    if "sqrt" in s:  # (the indentation quirk: \frac12 alone stays unfixed)
        s = _fix_fracs(s)
    s = "\\frac{1}{2}" if s == "0.5" else s  # the MATH normalisation's one special case
    m = re.fullmatch(r"(\d+)/(\d+)", s)  # its _fix_a_slash_b: 3/4 -> \frac{3}{4}
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


# find_math_answer's replacements in its order (MathVision's utils.py): its units list has no 'cm' (60cm stays text)
_MV_UNITS = (("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""), ("\\text", ""),
             ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
             ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""), ("{km}", ""), ("km", ""))


def find_math_answer(s):
    """MathVision's find_math_answer: lower-case, the last box's content to the LAST '}' (greedy), the part after the
    last '=' and '\\approx', its unit and LaTeX list removed (quirk: 'cm' is not on it), then _strip_string."""
    s = s.lower().replace("{}", "")
    boxes = re.findall(r"oxed\{(.*)\}", s, flags=re.S)  # greedy: from the first box to the last } of the text
    s = boxes[-1] if boxes else s
    if s.find("}") != -1 and (s.find("{") == -1 or s.find("}") < s.find("{")):  # a } before any {: the box's own end
        s = s.split("}")[0]
    s = s.split("=")[-1].split("\\approx")[-1].replace(" ", "")
    for a, b in _MV_UNITS:
        s = s.replace(a, b)
    return _strip_string(s)


def _round2(s, e, ratio):
    v = value(s, e=e, percent=False, ratio=ratio)  # latex2sympy2 fails on %: no number (research notes §2.4)
    return None if v is None else round(float(v), 2)


def _latex_close(a, b, e, ratio):
    """latex2sympy2 of both evaluated, rounded to 2 places (Python's round on floats), equal; False on any failure."""
    x, y = _round2(a, e, ratio), _round2(b, e, ratio)
    return x is not None and x == y


def _eval_tuple(s):
    """MathVision's eval_tuple: (a, b) / [a, b] -> each part evaluated and rounded to 2 places ('infty', 'a', '-a'
    kept); any failure leaves the text as it was."""
    parts = s[1:-1].split(",")
    if len(s) < 2 or s[0] + s[-1] not in ("()", "[]") or len(parts) < 2:  # a tuple: matching brackets, 2+ parts
        return s
    out = [p if "infty" in p or p in ("a", "-a") else _round2(p, None, True) for p in parts]  # e=None: MathVision's
    return s if None in out else s[0] + ",".join(str(p) for p in out) + s[-1]  # one part fails: the text unchanged


def mathvision_equal(gt, ans):
    """MathVision's is_equal: lower-case; an empty side is False; equal text; equal tuples; equal values to 2 places."""
    gt, ans = gt.lower(), ans.lower()  # (gold first, as their call passes it: harmless, the tests are symmetric)
    if not gt.replace(" ", "") or not ans.replace(" ", ""):
        return False
    if gt.strip() == ans.strip() or _eval_tuple(gt) == _eval_tuple(ans):
        return True
    return _latex_close(gt, ans, None, True)


def mathvision_score(text, record):
    """MathVision's evaluate() (evaluation/evaluate.py): letter heuristics, a number after the last 'is ', the text
    after 'the answer is' unless a box is there, the last of several boxes, find_math_answer; right if equal to the
    gold or to the gold option's text. Quirks kept: '60 cm' -> '60cm' (wrong), '50%' wrong but '50\\%' right."""
    gt = str(record["answer"]).strip() if not isinstance(record["answer"], list) else str(record["answer"][0])
    options = record.get("choices") or []  # benchmarks.py keeps the options written into the question here
    gt_value = options[ord(gt) - 65] if options and len(gt) == 1 and 0 <= ord(gt) - 65 < len(options) else ""
    ans = text.strip()
    for c in "ABCDE":  # ' C.' / ' (C).' at the end, 'C\n' / '(C)\n' / '(C) C\n' at the start
        if (ans.endswith(f" {c}.") or ans.endswith(f" ({c}).") or ans.startswith(f"{c}\n")
                or ans.startswith(f"({c})\n") or ans.startswith(f"({c}) {c}\n")):
            ans = c
    if _is_number(ans.split("is ")[-1].rstrip(".")):  # 'So the answer is 60.' -> 60
        ans = ans.split("is ")[-1].rstrip(".")
    if "oxed{" not in ans:
        for flag in ("the final answer is", "the answer is", "the correct answer is", "the answer should be"):
            for f in (flag, flag.replace("the", "The")):  # each phrase, then capitalised; found: its line and sentence
                raw, ans = ans, ans.split(f)[-1].strip()
                if f in raw:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:  # several boxes: from the last one on (find_math_answer's greedy match then ends it)
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = find_math_answer(ans)
    for c in "abcde":  # (c) and {c} -> c
        ans = ans.replace(f"({c})", c).replace(f"{{{c}}}", c)
    ans = ans.rstrip(".").lstrip(":").strip()
    right = mathvision_equal(gt, ans) or mathvision_equal(gt_value, ans)  # the option's text as written
    return float(right), f"extracted {ans[:40]!r}"


# word2number's vocabulary: a unit's index is its value, tens from twenty (index 2) to ninety
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
         "seventeen eighteen nineteen".split()
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9}


def word_to_num(s):
    """word2number's word_to_num (EMMA's is_equal), its common path: digits as they are; else only the number words
    count ('it is five' -> 5), tens and scales summed, 'point' for decimals; no number word: ValueError."""
    s = s.replace("-", " ").lower()  # forty-two -> forty two
    if s.isdigit():
        return int(s)
    words = [w for w in s.strip().split() if w in _UNITS or w in _TENS or w in _SCALES or w == "point"]
    if not words:
        raise ValueError("no number words")
    whole, _, decimals = " ".join(words).partition("point")
    total, group = 0, 0
    for w in whole.split():  # group: the number below the next scale word
        if w in _SCALES and _SCALES[w] == 100:  # 'three hundred' -> 300 (a bare 'hundred' is 100)
            group = max(group, 1) * 100
        elif w in _SCALES:  # thousand, million, billion close the group: 'two thousand five' -> 2000 + 5
            total, group = total + max(group, 1) * _SCALES[w], 0
        else:
            group += _TENS.get(w) or _UNITS.index(w)  # twenty one -> 20 + 1
    total += group
    if decimals.split():  # 'point one two' -> .12: digit words only, one digit each
        return float(f"{total}." + "".join(str(_UNITS.index(w)) for w in decimals.split() if w in _UNITS[:10]))
    return total


def emma_extract(response):
    """EMMA's fast_extract_answer: a bare letter or 'X:' / 'X.' first (quirk: a CoT starting 'A. First' is A); a
    number; the last \\boxed{} (its last \\text{} if any: '5 \\text{ m/s}' -> 'm/s'); the text after an answer phrase
    up to the first '.' ('3.5' -> '3'); else ''."""
    r = response.strip()
    for ch in "ABCDEFGH":  # 1. a letter, whatever follows 'X.' (its order: before any box is looked at)
        if r.upper() == ch or r.startswith(f"{ch}:") or r.startswith(f"{ch}."):
            return ch
    if _is_number(r):  # 2. the whole output a number
        return r
    if "boxed{" in r:  # 3. a \boxed{} (its test; 'boxed{' without the backslash finds no box and falls through)
        box = last_boxed(r)
        if box is not None:
            texts = re.findall(r"\\text\{(.*?)\}", box)  # its last \text{} wins over the number beside it
            return texts[-1].strip() if texts else box.strip()
    for flag in ("final answer is", "correct answer is", "answer should be", "answer is", "answer:"):  # 4., in order
        if flag in r.lower():  # lower-cased, first line, up to the first '.' (a decimal is cut too)
            return r.lower().split(flag)[-1].strip().split("\n")[0].split(".")[0]
    return ""


def emma_equal(md, gt):
    """EMMA's is_equal: lower-case equal text; word2number; latex2sympy2 of both evaluated, equal to 2 places."""
    md, gt = md.lower(), gt.lower()
    if md.strip() == gt.strip():
        return True
    try:
        if str(word_to_num(md)) == gt.strip():  # 'five' == '5'
            return True
    except ValueError:  # no number word: not equal this way (as theirs)
        pass
    # EMMA evaluates with evalf: a bare e is 2.718...; latex2sympy2 reads a:b as a / b (its grammar's COLON is a
    # division, latex2sympy2.py:412 at 1.9.0, as in latex2sympy2_extended.py:678): 1:2 equals 0.5
    return _latex_close(md, gt, math.e, True)


def emma_score(text, record):
    """EMMA's evaluate.py (fast mode, its default script): right if the extraction equals the answer or the gold
    option's text (gt_content). An empty output is wrong."""
    gold = str(record["answer"][0] if isinstance(record["answer"], list) else record["answer"])
    options = record.get("choices") or []
    k = ord(gold.upper()) - 65 if len(gold) == 1 else -1
    content = options[k] if 0 <= k < len(options) else gold  # its gt_content: the gold option's text, else the answer
    if not text.strip():
        return 0.0, "empty output"
    ext = emma_extract(text)
    return float(emma_equal(ext, gold) or emma_equal(ext, content)), f"extracted {ext[:40]!r}"
