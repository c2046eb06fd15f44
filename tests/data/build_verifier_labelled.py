"""Builds ``verifier_labelled.jsonl``: hand-labelled (gold, prediction) pairs on real golds.

The golds were sampled once with ``random.Random(21)`` from each benchmark (gsm8k 22, math500 45,
aime24 8, amc23 8, minerva 28, olympiadbench 40 items: :func:`sampled_ids`, drawn in the order of
:data:`SAMPLE_SIZES`), and completed with every gold of the packaged sets that shows one of the forms issue 21 names
(``,\\!`` separators, vectors, labelled equations, degrees, units, Python-style golds). The
predictions and labels below were written by hand, as a model would write its final answer (the
string passed to ``rewards.math.check`` as ``pred``); each label carries its reason.

Split (fixed before anything was measured): a row is held out when
``int(sha256(question id)[:8], 16) % 10 < 4`` (about 40 % of the questions; all predictions
for one question fall in the same part, so a rule tuned on a gold never sees it held out).

Labels follow the verifier's documented rules where the rule is a convention (README, "Rewards"):
an angle in degrees equals the same angle in radians; a bare list is unordered unless the row's
``options`` say the question fixes the order (``{"ordered_lists": true}``, decided from the question
text); a quantity with a unit equals the same quantity in another unit of the same dimension
only when both sides name their unit (a bare number is read in the unit the question asks for).

Run from the repository root: ``python tests/data/build_verifier_labelled.py`` (reads only the
packaged benchmark files, writes ``tests/data/verifier_labelled.jsonl``).
"""

import hashlib
import json
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from offpolicy_jax import rewards  # noqa: E402

OUT = pathlib.Path(__file__).with_name("verifier_labelled.jsonl")
HELD_OUT_BUCKETS = 4  # of 10
SAMPLE_SEED = 21
SAMPLE_SIZES = {"gsm8k": 22, "math500": 45, "aime24": 8, "amc23": 8, "minerva": 28,
                "olympiadbench": 40}


def sampled_ids() -> list[str]:
    """The question ids drawn at random for the table (one generator, benchmarks in order)."""
    rng = random.Random(SAMPLE_SEED)
    return [item["id"] for name, n in SAMPLE_SIZES.items()
            for item in rng.sample(rewards.load_benchmark(name), n)]


def split_of(question_id: str) -> str:
    """'heldout' for ~40 % of question ids (sha256 bucket < 4), else 'tuning'."""
    bucket = int(hashlib.sha256(question_id.encode()).hexdigest()[:8], 16) % 10
    return "heldout" if bucket < HELD_OUT_BUCKETS else "tuning"


T, F = True, False
ORDERED = {"ordered_lists": True}

# (benchmark, question id, gold or None for the loader's gold, [(prediction, label, form, reason)],
#  options or None)
ROWS = [
    # ---- gsm8k (sampled) ------------------------------------------------------------------------
    ("gsm8k", "gsm8k-337", None, [("\\$1", T, "integer", "dollar sign"),
                                  ("1.00", T, "integer", "trailing zeros"),
                                  ("0.5", F, "integer", "wrong value")], None),
    ("gsm8k", "gsm8k-856", None, [("7", T, "integer", "same"),
                                  ("7 \\text{ days}", T, "units", "unit only on the prediction is dropped"),
                                  ("8", F, "integer", "off by one")], None),
    ("gsm8k", "gsm8k-1300", None, [("120 \\text{ minutes}", T, "units", "unit only on the prediction"),
                                   ("2 \\text{ hours}", F, "units", "gold is a bare number: read in the question's unit; 2 != 120"),
                                   ("12", F, "integer", "wrong value")], None),
    ("gsm8k", "gsm8k-576", None, [("11,232", T, "thousands", "comma separator"),
                                  ("11,\\! 232", T, "thousands", "latex separator with a space"),
                                  ("11\\,232", T, "thousands", "thin space separator"),
                                  ("11,233", F, "thousands", "wrong value")], None),
    ("gsm8k", "gsm8k-981", None, [("7.0", T, "integer", "decimal point"),
                                  ("\\frac{14}{2}", T, "fraction", "unsimplified fraction"),
                                  ("-7", F, "integer", "sign")], None),
    ("gsm8k", "gsm8k-442", None, [("49", T, "integer", "same"), ("94", F, "integer", "digits swapped")], None),
    ("gsm8k", "gsm8k-972", None, [("\\$120", T, "integer", "dollar sign"),
                                  ("120.5", F, "decimal", "wrong value")], None),
    ("gsm8k", "gsm8k-1049", None, [("20\\%", T, "percent", "percent sign on the prediction"),
                                   ("0.2", F, "percent", "gold has no percent; 0.2 is not 20")], None),
    ("gsm8k", "gsm8k-375", None, [("48 \\text{ cookies}", T, "units", "noun after the number"),
                                  ("4 8", F, "integer", "a product 32, not 48")], None),
    ("gsm8k", "gsm8k-1034", None, [("66", T, "integer", "same"),
                                   ("\\$66.00", T, "integer", "money format"),
                                   ("6.6", F, "decimal", "wrong value")], None),
    ("gsm8k", "gsm8k-1080", None, [("72,000", T, "thousands", "comma separator"),
                                   ("72,\\!000", T, "thousands", "latex separator"),
                                   ("72{,}000", T, "thousands", "braced comma"),
                                   ("7.2 \\times 10^4", T, "scientific", "scientific notation"),
                                   ("72", F, "integer", "missing thousands"),
                                   ("720,000", F, "thousands", "wrong value")], None),
    ("gsm8k", "gsm8k-483", None, [("40", T, "integer", "same"), ("4", F, "integer", "wrong")], None),
    ("gsm8k", "gsm8k-6", None, [("260", T, "integer", "same"), ("\\$26.00", F, "integer", "wrong")], None),
    ("gsm8k", "gsm8k-28", None, [("25\\%", T, "percent", "percent sign"),
                                 ("25.0", T, "integer", "decimal point"), ("52", F, "integer", "wrong")], None),
    ("gsm8k", "gsm8k-759", None, [("60,\\! 000", T, "thousands", "latex separator with a space"),
                                  ("\\$60{,}000", T, "thousands", "dollar and braced comma"),
                                  ("6 \\times 10^{4}", T, "scientific", "power of ten"),
                                  ("6,000", F, "thousands", "wrong value"),
                                  ("60.000", F, "decimal", "a decimal point is not a separator")], None),
    ("gsm8k", "gsm8k-1198", None, [("140", T, "integer", "same"), ("140^2", F, "integer", "power")], None),
    ("gsm8k", "gsm8k-876", None, [("41", T, "integer", "same"), ("41.5", F, "decimal", "wrong")], None),
    ("gsm8k", "gsm8k-141", None, [("400", T, "integer", "same"),
                                  ("4 \\times 10^2", T, "scientific", "power of ten"),
                                  ("40", F, "integer", "wrong")], None),
    ("gsm8k", "gsm8k-296", None, [("3", T, "integer", "same"), ("3.5", F, "decimal", "wrong"),
                                  ("\\frac{9}{3}", T, "fraction", "fraction")], None),
    ("gsm8k", "gsm8k-475", None, [("20", T, "integer", "same"), ("2", F, "integer", "wrong")], None),
    ("gsm8k", "gsm8k-476", None, [("5", T, "integer", "same"), ("5 \\text{ hours}", T, "units", "unit only on the prediction"),
                                  ("-5", F, "integer", "sign")], None),
    ("gsm8k", "gsm8k-86", None, [("22", T, "integer", "same"), ("23", F, "integer", "wrong")], None),
    # ---- math500 (sampled) ----------------------------------------------------------------------
    ("math500", "test/number_theory/183.json", None, [("14", T, "integer", "same"), ("41", F, "integer", "wrong")], None),
    ("math500", "test/prealgebra/1743.json", None, [("3", T, "integer", "same"), ("\\frac{1}{3}", F, "fraction", "wrong")], None),
    ("math500", "test/intermediate_algebra/1791.json", None, [
        ("-0.375", T, "decimal", "exact decimal"), ("-3/8", T, "fraction", "slash"),
        ("-0.37\\overline{5}", F, "repeating", "0.37555... is not 0.375"),
        ("\\frac{3}{8}", F, "fraction", "sign")], None),
    ("math500", "test/number_theory/1000.json", None, [("44", T, "integer", "same"), ("4", F, "integer", "wrong")], None),
    ("math500", "test/number_theory/1201.json", None, [("1", T, "integer", "same"),
                                                       ("0.\\overline{9}", T, "repeating", "0.999... = 1"),
                                                       ("0.9", F, "decimal", "wrong")], None),
    ("math500", "test/algebra/791.json", None, [("41", T, "integer", "same"), ("41.0", T, "integer", "decimal point"),
                                                ("14", F, "integer", "wrong")], None),
    ("math500", "test/counting_and_probability/71.json", None, [("3", T, "integer", "same"), ("6", F, "integer", "wrong")], None),
    ("math500", "test/precalculus/1199.json", None, [("\\pi", T, "symbolic", "same"),
                                                     ("180^\\circ", T, "angle", "the same angle in degrees (rule: angle units convert)"),
                                                     ("3.1416", F, "symbolic", "a decimal approximation is not pi"),
                                                     ("np.pi", T, "python", "NumPy constant"),
                                                     ("math.pi", T, "python", "math module constant")], None),
    ("math500", "test/intermediate_algebra/1365.json", None, [("15", T, "integer", "same"), ("-15", F, "integer", "sign")], None),
    ("math500", "test/counting_and_probability/181.json", None, [("19", T, "integer", "same"), ("91", F, "integer", "wrong")], None),
    ("math500", "test/algebra/1282.json", None, [("11", T, "integer", "same"), ("\\sqrt{121}", T, "symbolic", "radical"),
                                                 ("\\sqrt{11}", F, "symbolic", "wrong")], None),
    ("math500", "test/counting_and_probability/1009.json", None, [("28", T, "integer", "same"), ("\\binom{8}{2}", T, "symbolic", "binomial"),
                                                                  ("\\binom{8}{3}", F, "symbolic", "wrong")], None),
    ("math500", "test/intermediate_algebra/1166.json", None, [("100", T, "integer", "same"), ("10**2", T, "python", "Python power"),
                                                              ("10**3", F, "python", "wrong power")], None),
    ("math500", "test/prealgebra/1247.json", None, [("5", T, "integer", "same"), ("5.5", F, "decimal", "wrong")], None),
    ("math500", "test/intermediate_algebra/190.json", None, [("2", T, "integer", "same"), ("\\sqrt{4}", T, "symbolic", "radical"),
                                                             ("\\sqrt{2}", F, "symbolic", "wrong")], None),
    ("math500", "test/number_theory/239.json", None, [("2", T, "integer", "same"), ("1.\\overline{9}", T, "repeating", "1.999... = 2"),
                                                      ("1.9", F, "decimal", "wrong")], None),
    ("math500", "test/precalculus/1252.json", None, [("1", T, "integer", "same"), ("\\sin^2 x + \\cos^2 x", T, "symbolic", "an identity: equals 1 for every x"),
                                                     ("-1", F, "integer", "sign")], None),
    ("math500", "test/algebra/733.json", None, [("6", T, "integer", "same"), ("3!", T, "symbolic", "factorial"), ("8", F, "integer", "wrong")], None),
    ("math500", "test/intermediate_algebra/1197.json", None, [
        ("0.053\\overline{571428}", T, "repeating", "3/56 = 0.053571428571428..."),
        ("0.05\\overline{357142}", F, "repeating", "period starts one digit late: 0.05357142357..."),
        ("3/56", T, "fraction", "slash"),
        ("0.0536", F, "decimal", "a rounded decimal is not the exact fraction"),
        ("0.0\\overline{5357142}", F, "repeating", "wrong period")], None),
    ("math500", "test/prealgebra/192.json", None, [("2", T, "integer", "same"), ("1/2", F, "fraction", "wrong")], None),
    ("math500", "test/prealgebra/1865.json", None, [("12", T, "integer", "same"), ("12.0", T, "integer", "decimal point"),
                                                    ("21", F, "integer", "wrong")], None),
    ("math500", "test/algebra/1796.json", None, [("\\sqrt{20}", T, "symbolic", "radical"), ("2*sqrt(5)", T, "python", "Python style"),
                                                 ("2*math.sqrt(5)", T, "python", "math module function"),
                                                 ("4.47", F, "symbolic", "rounded"), ("5\\sqrt{2}", F, "symbolic", "wrong")], None),
    ("math500", "test/geometry/178.json", None, [("2", T, "integer", "same"), ("2\\text{ units}", T, "units", "unit word"),
                                                 ("4", F, "integer", "wrong")], None),
    ("math500", "test/intermediate_algebra/279.json", None, [("10", T, "integer", "same"), ("10.0", T, "integer", "decimal point"),
                                                             ("100", F, "integer", "wrong")], None),
    ("math500", "test/algebra/2391.json", None, [("10", T, "integer", "same"), ("x=10", T, "equation", "label"), ("1", F, "integer", "wrong")], None),
    ("math500", "test/counting_and_probability/1003.json", None, [("29", T, "integer", "same"), ("30", F, "integer", "wrong")], None),
    ("math500", "test/number_theory/1032.json", None, [("2,220", T, "thousands", "comma"), ("2,\\! 220", T, "thousands", "latex separator with a space"),
                                                       ("2,200", F, "thousands", "wrong")], None),
    ("math500", "test/intermediate_algebra/1354.json", None, [("998.5", T, "decimal", "decimal"), ("998\\frac{1}{2}", T, "mixed", "mixed number"),
                                                              ("\\frac{1997}{3}", F, "fraction", "wrong")], None),
    ("math500", "test/algebra/2700.json", None, [("1.5", T, "decimal", "decimal"), ("3/2", T, "fraction", "slash"),
                                                 ("1.\\overline{5}", F, "repeating", "1.555... is not 1.5"),
                                                 ("\\frac{2}{3}", F, "fraction", "inverted")], None),
    ("math500", "test/algebra/1184.json", None, [("129", T, "integer", "same"), ("128", F, "integer", "wrong")], None),
    ("math500", "test/geometry/846.json", None, [("90", T, "angle", "bare number in the question's unit"),
                                                 ("\\frac{\\pi}{2}", T, "angle", "same angle in radians (default rule)"),
                                                 ("90^{\\circ}", T, "angle", "braced degree sign"),
                                                 ("45^\\circ", F, "angle", "wrong angle"),
                                                 ("\\frac{\\pi}{4}", F, "angle", "wrong angle in radians")], None),
    ("math500", "test/intermediate_algebra/991.json", None, [("3", T, "integer", "same"), ("\\{3\\}", T, "set", "singleton set"),
                                                             ("3, -3", F, "set", "extra value")], None),
    ("math500", "test/precalculus/263.json", None, [
        ("(-2, -14, -7)", T, "matrix", "tuple of entries"),
        ("-\\begin{pmatrix} 2 \\\\ 14 \\\\ 7 \\end{pmatrix}", T, "scalar_multiple", "negated vector"),
        ("-\\begin{pmatrix} 2 \\\\ 14 \\\\ -7 \\end{pmatrix}", F, "scalar_multiple", "last entry sign"),
        ("\\begin{pmatrix} -2 \\\\ -7 \\\\ -14 \\end{pmatrix}", F, "matrix", "order")], None),
    ("math500", "test/precalculus/920.json", None, [
        ("-\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", T, "scalar_multiple", "minus the identity"),
        ("-1 \\cdot \\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", T, "scalar_multiple", "explicit product"),
        ("-\\begin{pmatrix} 1 & 0 \\\\ 0 & -1 \\end{pmatrix}", F, "scalar_multiple", "one entry differs"),
        ("\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}", T, "matrix", "bmatrix")], None),
    ("math500", "test/algebra/1004.json", None, [("4", T, "integer", "same"), ("4.00", T, "integer", "decimal"), ("2", F, "integer", "wrong")], None),
    ("math500", "test/precalculus/34.json", None, [("-4", T, "integer", "same"), ("4", F, "integer", "sign")], None),
    ("math500", "test/precalculus/801.json", None, [("55", T, "angle", "bare number"), ("55°", T, "angle", "unicode degree"),
                                                    ("\\frac{11\\pi}{36}", T, "angle", "same angle in radians (default rule)"),
                                                    ("125^\\circ", F, "angle", "supplement"), ("35^\\circ", F, "angle", "complement")], None),
    ("math500", "test/intermediate_algebra/1000.json", None, [("3", T, "integer", "same"), ("\\sqrt{3}", F, "symbolic", "wrong")], None),
    ("math500", "test/prealgebra/874.json", None, [("116", T, "integer", "same"), ("116^\\circ", T, "angle", "degree sign; gold bare"),
                                                   ("64", F, "integer", "wrong")], None),
    ("math500", "test/algebra/668.json", None, [("45", T, "integer", "same"), ("54", F, "integer", "wrong")], None),
    ("math500", "test/precalculus/145.json", None, [
        ("\\begin{pmatrix}-7\\\\16\\\\5\\end{pmatrix}", T, "matrix", "spacing"),
        ("(-7,16,5)", T, "matrix", "tuple"),
        ("\\begin{pmatrix} 7 \\\\ -16 \\\\ -5 \\end{pmatrix}", F, "matrix", "negated")], None),
    ("math500", "test/intermediate_algebra/128.json", None, [("\\text{even}", T, "text", "same"), ("even", T, "text", "plain word"),
                                                             ("\\text{odd}", F, "text", "wrong"), ("\\text{neither}", F, "text", "wrong")], None),
    ("math500", "test/algebra/24.json", None, [("2,000", T, "thousands", "comma"), ("2,\\! 000", T, "thousands", "latex separator with a space"),
                                               ("2 \\times 10^3", T, "scientific", "power"), ("200", F, "integer", "wrong")], None),
    ("math500", "test/prealgebra/1784.json", None, [("326\\frac{1}{2}", T, "mixed", "mixed number"), ("\\frac{653}{2}", T, "fraction", "fraction"),
                                                    ("326", F, "integer", "truncated")], None),
    ("math500", "test/intermediate_algebra/582.json", None, [("850", T, "integer", "same"), ("805", F, "integer", "wrong")], None),
    # ---- aime24 / amc23 (sampled) ------------------------------------------------------------------
    ("aime24", "aime24-66", None, [("721", T, "integer", "same"), ("\\boxed{721}", T, "integer", "boxed"), ("127", F, "integer", "wrong")], None),
    ("aime24", "aime24-81", None, [("315", T, "integer", "same"), ("0315", T, "integer", "zero padded"), ("351", F, "integer", "wrong")], None),
    ("aime24", "aime24-85", None, [("080", T, "integer", "zero padded"), ("8", F, "integer", "wrong")], None),
    ("aime24", "aime24-88", None, [("127", T, "integer", "same"), ("2^7-1", T, "symbolic", "expression"), ("128", F, "integer", "wrong")], None),
    ("aime24", "aime24-84", None, [("033", T, "integer", "zero padded"), ("33.0", T, "integer", "decimal"), ("3", F, "integer", "wrong")], None),
    ("aime24", "aime24-87", None, [("699", T, "integer", "same"), ("696", F, "integer", "wrong")], None),
    ("aime24", "aime24-78", None, [("023", T, "integer", "zero padded"), ("32", F, "integer", "wrong")], None),
    ("aime24", "aime24-62", None, [("371", T, "integer", "same"), ("372", F, "integer", "wrong")], None),
    ("amc23", "amc23-8", None, [("3", T, "integer", "same"), ("\\textbf{(C) } 3", T, "text", "choice letter followed by the value, which matches"),
                                ("3.0", T, "integer", "decimal")], None),
    ("amc23", "amc23-45", None, [("4", T, "integer", "same"), ("2^2", T, "symbolic", "power"), ("5", F, "integer", "wrong")], None),
    ("amc23", "amc23-36", None, [("50", T, "integer", "same"), ("50.0", T, "integer", "decimal"), ("5", F, "integer", "wrong")], None),
    ("amc23", "amc23-48", None, [("144", T, "integer", "same"), ("12^2", T, "symbolic", "power"), ("12**2", T, "python", "Python power"),
                                 ("12", F, "integer", "wrong")], None),
    ("amc23", "amc23-27", None, [("13", T, "integer", "same"), ("31", F, "integer", "wrong")], None),
    ("amc23", "amc23-14", None, [("96", T, "integer", "same"), ("69", F, "integer", "wrong")], None),
    ("amc23", "amc23-23", None, [("7", T, "integer", "same"), ("7.5", F, "decimal", "wrong")], None),
    ("amc23", "amc23-11", None, [("4", T, "integer", "same"), ("\\sqrt{16}", T, "symbolic", "radical"), ("16", F, "integer", "wrong")], None),
    # ---- minerva (sampled) -------------------------------------------------------------------------
    ("minerva", "minerva-209", None, [("928", T, "integer", "same"), ("928 \\text{ nm}", T, "units", "unit only on the prediction"),
                                      ("9.28 \\times 10^2", T, "scientific", "scientific"), ("92.8", F, "decimal", "wrong")], None),
    ("minerva", "minerva-149", None, [("14903", T, "scientific", "plain"), ("1.4903e4", T, "python", "e-notation"),
                                      ("14,903", T, "thousands", "comma"), ("1.4903 \\times 10^{3}", F, "scientific", "exponent"),
                                      ("1.49 \\times 10^4", F, "scientific", "fewer digits: a different value")], None),
    ("minerva", "minerva-186", None, [("1.45e-05", T, "python", "Python e-notation"), ("1.45 \\cdot 10^{-5}", T, "scientific", "cdot"),
                                      ("1.45 \\times 10^{-6}", F, "scientific", "exponent"),
                                      ("1.45*10**(-5)", T, "python", "Python power of ten")], None),
    ("minerva", "minerva-231", None, [("100", T, "integer", "same"), ("10^2", T, "symbolic", "power"), ("1000", F, "integer", "wrong")], None),
    ("minerva", "minerva-256", None, [("6.2", T, "decimal", "same"), ("6.20", T, "decimal", "trailing zero"), ("6.25", F, "decimal", "wrong")], None),
    ("minerva", "minerva-197", None, [("1.24e-8", T, "python", "e-notation"), ("12.4 \\times 10^{-9}", T, "scientific", "other mantissa"),
                                      ("1.24 \\times 10^{8}", F, "scientific", "exponent sign")], None),
    ("minerva", "minerva-162", None, [("1.22", T, "decimal", "same"), ("1.22 \\text{ m}", T, "units", "unit on the prediction"),
                                      ("1.2", F, "decimal", "rounded")], None),
    ("minerva", "minerva-248", None, [("8", T, "integer", "same"), ("8.0", T, "integer", "decimal"), ("9", F, "integer", "wrong")], None),
    ("minerva", "minerva-266", None, [("11.9", T, "decimal", "same"), ("11.90", T, "decimal", "trailing zero"), ("1.19", F, "decimal", "wrong")], None),
    ("minerva", "minerva-136", None, [("10^{11}", T, "scientific", "power"), ("1e11", T, "python", "e-notation"),
                                      ("10**11", T, "python", "Python power"), ("10^{10}", F, "scientific", "exponent")], None),
    ("minerva", "minerva-13", None, [("8.7e8", T, "python", "e-notation"), ("870,000,000", T, "thousands", "commas"),
                                     ("8.7 \\times 10^{9}", F, "scientific", "exponent")], None),
    ("minerva", "minerva-47", None, [("0.001", T, "scientific", "decimal"), ("10^{-3}", T, "scientific", "power"),
                                     ("1e-3", T, "python", "e-notation"), ("0.01", F, "decimal", "wrong")], None),
    ("minerva", "minerva-81", None, [
        ("\\frac{1}{15}e^{-2t} + C_1 e^t + C_2 e^{-t} + C_3 \\cos t + C_4 \\sin t", T, "symbolic", "reordered terms"),
        ("np.exp(-2*t)/15 + C_1*np.exp(t) + C_2*np.exp(-t) + C_3*np.cos(t) + C_4*np.sin(t)", T, "python", "NumPy-style expression"),
        ("\\frac{1}{15}e^{2t} + C_1 e^t + C_2 e^{-t} + C_3 \\cos t + C_4 \\sin t", F, "symbolic", "sign of the exponent")], None),
    ("minerva", "minerva-253", None, [("1", T, "integer", "same"), ("1.0", T, "integer", "decimal"), ("0", F, "integer", "wrong")], None),
    ("minerva", "minerva-1", None, [("4.5e33", T, "python", "e-notation"), ("4.5 \\times 10^{33} \\text{ erg}", T, "units", "unit on the prediction"),
                                    ("4.5 \\times 10^{30}", F, "scientific", "exponent")], None),
    ("minerva", "minerva-251", None, [("SRMC = LRMC", T, "text", "spacing"), ("SRMC=SRAC", F, "text", "different curves")], None),
    ("minerva", "minerva-35", None, [("\\arcsin(1.3\\sin\\theta_w)", T, "symbolic", "parentheses"),
                                     ("\\sin^{-1}(1.3 \\sin \\theta_w)", T, "symbolic", "inverse notation"),
                                     ("np.arcsin(1.3*np.sin(theta_w))", T, "python", "NumPy style"),
                                     ("\\arcsin(\\sin\\theta_w / 1.3)", F, "symbolic", "wrong ratio")], None),
    ("minerva", "minerva-140", None, [("10", T, "integer", "same"), ("10.0", T, "integer", "decimal"), ("100", F, "integer", "wrong")], None),
    ("minerva", "minerva-153", None, [("2.78", T, "decimal", "same"), ("2.780", T, "decimal", "trailing zero"), ("2.87", F, "decimal", "wrong")], None),
    ("minerva", "minerva-191", None, [("1.39e-10", T, "python", "e-notation"), ("1.39 \\times 10^{-10} \\text{ m}", T, "units", "unit on the prediction"),
                                      ("1.39 \\times 10^{-9}", F, "scientific", "exponent")], None),
    ("minerva", "minerva-133", None, [("99.9", T, "decimal", "same"), ("99.9\\%", T, "percent", "percent sign"), ("9.99", F, "decimal", "wrong")], None),
    ("minerva", "minerva-56", None, [("11,000", T, "thousands", "comma"), ("1.1 \\times 10^4", T, "scientific", "scientific"),
                                     ("11,\\! 000", T, "thousands", "latex separator with a space"), ("1100", F, "integer", "wrong")], None),
    ("minerva", "minerva-146", None, [("560", T, "integer", "same"), ("5.6 \\times 10^2", T, "scientific", "scientific"), ("56", F, "integer", "wrong")], None),
    ("minerva", "minerva-155", None, [("4.4677", T, "decimal", "same"), ("4.468", F, "decimal", "rounded: a different value")], None),
    ("minerva", "minerva-259", None, [("\\alpha", T, "symbolic", "same"), ("\\beta", F, "symbolic", "wrong")], None),
    ("minerva", "minerva-142", None, [("4", T, "integer", "same"), ("4.0", T, "integer", "decimal"), ("2", F, "integer", "wrong")], None),
    ("minerva", "minerva-159", None, [("1.9", T, "decimal", "same"), ("1.90", T, "decimal", "trailing zero"), ("19", F, "integer", "wrong")], None),
    ("minerva", "minerva-28", None, [
        ("\\left(P_0^{2/5} - \\frac{2}{5} g K^{-3/5} z\\right)^{5/2}", T, "symbolic", "parentheses instead of brackets"),
        ("(P_0**(2/5) - 2/5*g*K**(-3/5)*z)**(5/2)", T, "python", "Python powers"),
        ("\\left(P_0^{2/5} + \\frac{2}{5} g K^{-3/5} z\\right)^{5/2}", F, "symbolic", "sign")], None),
    # ---- olympiadbench (sampled) -----------------------------------------------------------------
    ("olympiadbench", "olympiadbench-2338", None, [("2, -1, -2", T, "set", "all values of x: unordered"),
                                                   ("x=-1, x=2, x=-2", T, "labelled", "repeated label lists the solutions"),
                                                   ("-1, 2", F, "set", "missing a value")], None),
    ("olympiadbench", "olympiadbench-2325", None, [("340", T, "integer", "same"), ("34", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-3043", None, [("548\\pi", T, "symbolic", "no space"), ("548*np.pi", T, "python", "NumPy constant"),
                                                   ("548 \\cdot \\pi", T, "symbolic", "cdot"), ("1721.6", F, "symbolic", "rounded")], None),
    ("olympiadbench", "olympiadbench-2654", None, [("0.15\\overline{6}", T, "repeating", "47/300 = 0.15666..."),
                                                   ("0.15\\dot{6}", T, "repeating", "dot notation"),
                                                   ("0.157", F, "decimal", "rounded"),
                                                   ("0.\\overline{156}", F, "repeating", "wrong period")], None),
    ("olympiadbench", "olympiadbench-2638", None, [("4", T, "integer", "same"), ("3", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2652", None, [("1.6", T, "decimal", "decimal"), ("8/5", T, "fraction", "slash"),
                                                   ("1.\\overline{6}", F, "repeating", "5/3 is not 8/5")], None),
    ("olympiadbench", "olympiadbench-3013", None, [("9.\\overline{428571}", T, "repeating", "66/7 = 9.428571..."),
                                                   ("9\\frac{3}{7}", T, "mixed", "mixed number"),
                                                   ("9.43", F, "decimal", "rounded")], None),
    ("olympiadbench", "olympiadbench-2583", None, [("-2.\\overline{6}", T, "repeating", "-8/3"), ("-2\\frac{2}{3}", T, "mixed", "negative mixed number"),
                                                   ("-2.\\dot{6}", T, "repeating", "dot notation"),
                                                   ("-2.6", F, "decimal", "not repeating"), ("\\frac{8}{3}", F, "fraction", "sign")], None),
    ("olympiadbench", "olympiadbench-2464", None, [("31", T, "integer", "same"), ("13", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2111", None, [("\\{1,2,3,4\\}", T, "set", "set braces"), ("4, 3, 2, 1", T, "set", "unordered"),
                                                   ("1, 2, 3", F, "set", "missing"), ("n = 1, 2, 3, 4", T, "labelled", "one label for the list")], None),
    ("olympiadbench", "olympiadbench-2322", None, [("40", T, "integer", "same"), ("400", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-1939", None, [("n^2 - n", T, "symbolic", "expanded"), ("n*(n-1)", T, "python", "explicit product"),
                                                   ("n(n+1)", F, "symbolic", "wrong sign")], None),
    ("olympiadbench", "olympiadbench-2329", None, [("5", T, "integer", "same"), ("25", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2768", None, [("\\sqrt{130}", T, "symbolic", "same"), ("sqrt(130)", T, "python", "Python call"),
                                                   ("130**0.5", T, "python", "Python power"), ("11.4", F, "symbolic", "rounded")], None),
    ("olympiadbench", "olympiadbench-2684", None, [("27, 54, 108, 135, 189, 216, 270, 297, 351, 378", T, "set", "spacing"),
                                                   ("27, 54, 108, 135, 189, 216, 270, 297, 351", F, "set", "missing one")], None),
    ("olympiadbench", "olympiadbench-2301", None, [("9, 8, 5, 2, 1", T, "set", "unordered"), ("k = 1, 2, 5, 8, 9", T, "labelled", "one label"),
                                                   ("\\{1,2,5,8\\}", F, "set", "missing")], None),
    ("olympiadbench", "olympiadbench-1800", None, [("n=1 \\text{ and } n=3", T, "labelled", "repeated label"), ("3, 1", T, "set", "unordered"),
                                                   ("1", F, "set", "missing")], None),
    ("olympiadbench", "olympiadbench-2905", None, [("0.04", T, "decimal", "decimal"), ("4\\%", T, "percent", "percent"),
                                                   ("0.4", F, "decimal", "wrong")], None),
    ("olympiadbench", "olympiadbench-3101", None, [("14", T, "integer", "same"), ("15", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2459", None, [("x+22", T, "equation", "label dropped"), ("f(x) = 22 + x", T, "equation", "reordered"),
                                                   ("f(x)=x-22", F, "equation", "sign")], None),
    ("olympiadbench", "olympiadbench-2736", None, [("2.8", T, "decimal", "decimal"), ("2\\frac{4}{5}", T, "mixed", "mixed"),
                                                   ("2.\\overline{8}", F, "repeating", "26/9 is not 14/5")], None),
    ("olympiadbench", "olympiadbench-2315", None, [("60", T, "integer", "same"), ("6", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-3006", None, [("\\frac{5}{\\sqrt{2}}", T, "symbolic", "unrationalised"), ("5*sqrt(2)/2", T, "python", "Python"),
                                                   ("2.5\\sqrt{2}", T, "symbolic", "decimal coefficient"), ("5\\sqrt{2}", F, "symbolic", "wrong")], None),
    ("olympiadbench", "olympiadbench-1675", None, [("1", T, "equation", "label dropped"), ("k = 1", T, "equation", "same"),
                                                   ("k=2", F, "equation", "wrong")], None),
    ("olympiadbench", "olympiadbench-2852", None, [("12", T, "integer", "same"), ("21", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2891", None, [
        ("(a,b)=(2+\\sqrt{2}, 1+\\sqrt{2})", T, "labelled", "labelled tuple on the prediction only"),
        ("a=2+\\sqrt{2}, b=1+\\sqrt{2}", T, "labelled", "assignments against a bare tuple"),
        ("b = 1+\\sqrt{2}, a = 2+\\sqrt{2}", T, "labelled", "labels fix the order (a before b)"),
        ("(1+\\sqrt{2}, 2+\\sqrt{2})", F, "tuple", "swapped: the pair is ordered"),
        ("(a, b) = (1+\\sqrt{2}, 2+\\sqrt{2})", F, "labelled", "labelled but swapped")], None),
    ("olympiadbench", "olympiadbench-2687", None, [("1", T, "integer", "same"), ("-1", F, "integer", "sign")], None),
    ("olympiadbench", "olympiadbench-2467", None, [("a = 1.68, b = 0.45", T, "labelled", "labels in the order of the question"),
                                                   ("b=0.45, a=1.68", T, "labelled", "labels give the order"),
                                                   ("0.45, 1.68", F, "ordered", "the question asks for a then b"),
                                                   ("1.68, 0.45", T, "ordered", "same order")], ORDERED),
    ("olympiadbench", "olympiadbench-2313", None, [("(-3,1),(3,0)", T, "tuple", "pairs unordered among themselves"),
                                                   ("(a,b)=(3,0) \\text{ or } (a,b)=(-3,1)", T, "labelled", "labelled pairs"),
                                                   ("(0,3),(1,-3)", F, "tuple", "pairs reversed")], None),
    ("olympiadbench", "olympiadbench-2971", None, [("98,721", T, "thousands", "comma"), ("98721.0", T, "integer", "decimal"),
                                                   ("98,712", F, "thousands", "wrong")], None),
    ("olympiadbench", "olympiadbench-1953", None, [("2^{1/2}", T, "symbolic", "power"), ("math.sqrt(2)", T, "python", "math module"),
                                                   ("1.414", F, "symbolic", "rounded")], None),
    ("olympiadbench", "olympiadbench-2781", None, [("-8", T, "integer", "same"), ("8", F, "integer", "sign")], None),
    ("olympiadbench", "olympiadbench-2737", None, [("99,956", T, "thousands", "comma"), ("99,\\! 956", T, "thousands", "latex separator with a space"),
                                                   ("99,965", F, "thousands", "wrong")], None),
    ("olympiadbench", "olympiadbench-2844", None, [("2018", T, "integer", "same"), ("2,018", T, "thousands", "comma"), ("2019", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-1883", None, [("\\left\\lceil \\frac{n}{2} \\right\\rceil + 1", T, "symbolic", "frac form"),
                                                   ("\\lfloor n/2 \\rfloor + 1", F, "symbolic", "floor is not ceiling")], None),
    ("olympiadbench", "olympiadbench-2552", None, [("3", T, "integer", "same"), ("-3", F, "integer", "sign")], None),
    ("olympiadbench", "olympiadbench-1872", None, [("N/2", T, "symbolic", "slash"), ("0.5N", T, "symbolic", "decimal coefficient"),
                                                   ("\\frac{N}{4}", F, "symbolic", "wrong")], None),
    ("olympiadbench", "olympiadbench-2493", None, [("0.6\\overline{1}", T, "repeating", "11/18 = 0.6111..."),
                                                   ("0.6\\dot{1}", T, "repeating", "dot notation"),
                                                   ("0.61", F, "decimal", "truncated"),
                                                   ("0.\\overline{61}", F, "repeating", "61/99")], None),
    ("olympiadbench", "olympiadbench-3102", None, [("11", T, "integer", "same"), ("12", F, "integer", "wrong")], None),
    ("olympiadbench", "olympiadbench-2555", None, [("0.4\\overline{6}", T, "repeating", "7/15 = 0.4666..."),
                                                   ("0.4\\dot{6}", T, "repeating", "dot notation"),
                                                   ("0.\\overline{46}", F, "repeating", "46/99"),
                                                   ("0.467", F, "decimal", "rounded")], None),
    # ---- golds chosen for the forms of issue 21 ----------------------------------------------------
    ("math500", "test/number_theory/417.json", None, [("11111111100", T, "thousands", "no separators"),
                                                      ("11,111,111,100", T, "thousands", "commas"),
                                                      ("11{,}111{,}111{,}100", T, "thousands", "braced commas"),
                                                      ("1111111100", F, "thousands", "one digit short"),
                                                      ("11,111,111,110", F, "thousands", "wrong")], None),
    ("math500", "test/algebra/2626.json", None, [("32348", T, "thousands", "plain"), ("\\$32,348", T, "thousands", "dollar and comma"),
                                                 ("32,\\! 348", T, "thousands", "latex separator with a space"),
                                                 ("\\$32,348.00", T, "thousands", "cents"), ("32,438", F, "thousands", "wrong")], None),
    ("math500", "test/counting_and_probability/508.json", None, [("10,\\! 080", T, "thousands", "latex separator with a space"),
                                                                 ("10 080", T, "thousands", "space separator"),
                                                                 ("10,800", F, "thousands", "wrong")], None),
    ("math500", "test/precalculus/1300.json", None, [
        ("\\frac{1}{3}\\begin{pmatrix} -1 \\\\ 2 \\\\ 5 \\end{pmatrix}", T, "scalar_multiple", "factor out 1/3"),
        ("\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}", T, "matrix", "fractions"),
        ("\\frac{1}{3}\\begin{pmatrix} 1 \\\\ 2 \\\\ 5 \\end{pmatrix}", F, "scalar_multiple", "sign of the first entry"),
        ("\\frac{1}{3}(-1, 2, 5)", T, "scalar_multiple", "scalar times a tuple")], None),
    ("math500", "test/precalculus/398.json", None, [
        ("\\frac{1}{5}\\begin{pmatrix} 1 \\\\ -18 \\end{pmatrix}", T, "scalar_multiple", "factor out 1/5"),
        ("\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}", T, "matrix", "decimals"),
        ("\\frac{1}{5}\\begin{pmatrix} 1 \\\\ 18 \\end{pmatrix}", F, "scalar_multiple", "sign")], None),
    ("math500", "test/precalculus/625.json", None, [
        ("\\frac{8}{49}\\begin{pmatrix} 2 \\\\ 6 \\\\ 3 \\end{pmatrix}", T, "scalar_multiple", "factor out 8/49"),
        ("\\begin{pmatrix} 2 \\\\ 6 \\\\ 3 \\end{pmatrix} \\cdot \\frac{8}{49}", T, "scalar_multiple", "factor after"),
        ("\\frac{8}{49}\\begin{pmatrix} 2 \\\\ 3 \\\\ 6 \\end{pmatrix}", F, "scalar_multiple", "entries swapped"),
        ("\\frac{1}{49}\\begin{pmatrix} 16 \\\\ 48 \\\\ 24 \\end{pmatrix}", T, "scalar_multiple", "factor out 1/49")], None),
    ("math500", "test/prealgebra/1044.json", None, [("5.4", T, "units", "bare number"), ("5.4 cents", T, "units", "same unit"),
                                                    ("\\$0.054", T, "units", "same amount in dollars"),
                                                    ("0.054 \\text{ dollars}", T, "units", "dollars"),
                                                    ("5.4 \\text{ dollars}", F, "units", "5.4 dollars is 540 cents")], None),
    ("math500", "test/precalculus/927.json", None, [("\\frac{\\pi}{2}", T, "angle", "radians (default rule)"),
                                                    ("90", T, "angle", "bare number"), ("\\pi", F, "angle", "wrong angle")], None),
    ("math500", "test/algebra/2193.json", None, [("5", T, "equation", "label dropped"), ("x = 5.0", T, "equation", "decimal"),
                                                 ("x=-5", F, "equation", "sign")], None),
    ("math500", "test/precalculus/323.json", None, [("y=3+2x", T, "equation", "reordered"), ("2x+3", T, "equation", "label dropped"),
                                                    ("2x - y + 3 = 0", T, "equation", "implicit form"), ("y = 3x + 2", F, "equation", "wrong")], None),
    ("olympiadbench", "olympiadbench-2099", None, [("60^\\circ, 90^\\circ", T, "angle", "unordered"),
                                                   ("\\frac{\\pi}{2}, \\frac{\\pi}{3}", T, "angle", "radians (default rule)"),
                                                   ("90^\\circ", F, "angle", "missing a value")], None),
    ("olympiadbench", "olympiadbench-2332", None, [("(135^\\circ, 60^\\circ), (45^\\circ, 60^\\circ)", T, "angle", "pairs unordered"),
                                                   ("(x, y) = (45^\\circ, 60^\\circ), (135^\\circ, 60^\\circ)", T, "labelled", "label before the list"),
                                                   ("(60^\\circ, 45^\\circ), (60^\\circ, 135^\\circ)", F, "angle", "pairs reversed")], None),
    ("olympiadbench", "olympiadbench-1687", None, [("g(n) = 1, f(n) = n", T, "labelled", "labelled equations in another order"),
                                                   ("f(n)=1, g(n)=n", F, "labelled", "labels swapped"),
                                                   ("f(n) = n \\text{ and } g(n) = 1", T, "labelled", "joined by and")], None),
    ("olympiadbench", "olympiadbench-2287", None, [("2, -6-4\\sqrt{2}", T, "labelled", "values of the labelled golds"),
                                                   ("a = -6 - 4\\sqrt{2} \\text{ or } a = 2", T, "labelled", "or, reordered"),
                                                   ("a=2", F, "labelled", "missing a value"),
                                                   ("a = 2, a = -6 + 4\\sqrt{2}", F, "labelled", "sign")], None),
    ("olympiadbench", "olympiadbench-2253", "45 \\text{ minutes}", [("\\frac{3}{4} \\text{ hours}", T, "units", "same time in hours (gold: answer with its unit)"),
                                                                    ("45", T, "units", "bare number in the gold's unit"),
                                                                    ("0.75 \\text{ h}", T, "units", "abbreviated hours"),
                                                                    ("45 \\text{ hours}", F, "units", "same number, other unit"),
                                                                    ("2700 \\text{ seconds}", T, "units", "seconds")], None),
    ("olympiadbench", "olympiadbench-2334", "\\frac{41}{12} \\text{ km}", [("\\frac{10250}{3} \\text{ m}", T, "units", "same length in metres"),
                                                                           ("\\frac{41}{12}", T, "units", "bare number"),
                                                                           ("\\frac{41}{12} \\text{ m}", F, "units", "metres are not km")], None),
    ("olympiadbench", "olympiadbench-2444", "8 \\text{ min}", [("480 \\text{ seconds}", T, "units", "seconds"), ("8 \\text{ minutes}", T, "units", "spelled out"),
                                                               ("\\frac{2}{15} \\text{ hours}", T, "units", "hours"), ("8 \\text{ s}", F, "units", "seconds")], None),
    ("olympiadbench", "olympiadbench-2522", "50 \\text{ minutes}", [("\\frac{5}{6} \\text{ hours}", T, "units", "hours"), ("50", T, "units", "bare"),
                                                                    ("50 \\text{ hours}", F, "units", "other unit"),
                                                                    ("3000 \\text{ s}", T, "units", "seconds"),
                                                                    ("\\frac{5}{6}", F, "units", "bare number in the wrong unit")], None),
    ("olympiadbench", "olympiadbench-2592", "4.2 \\%", [("4.2", T, "percent", "bare"), ("0.042", T, "percent", "fraction"),
                                                        ("4.2 percent", T, "percent", "word"), ("42\\%", F, "percent", "wrong")], None),
    ("olympiadbench", "olympiadbench-2380", None, [("4", T, "angle", "bare"), ("\\frac{\\pi}{45}", T, "angle", "radians (default rule)"),
                                                   ("4 \\text{ degrees}", T, "angle", "word"), ("40^\\circ", F, "angle", "wrong")], None),
    ("olympiadbench", "olympiadbench-2435", None, [("18.8", T, "angle", "bare"), ("18.8°", T, "angle", "unicode"),
                                                   ("18.9^\\circ", F, "angle", "wrong")], None),
    ("olympiadbench", "olympiadbench-1938", None, [("f(x) = x + 1 \\text{ or } f(x) = -1", T, "labelled", "or, reordered"),
                                                   ("f(x)=-1", F, "labelled", "missing"),
                                                   ("-1, x+1", T, "labelled", "values of the labelled golds")], None),
    ("olympiadbench", "olympiadbench-2171", None, [("f(x)=-x, f(x)=x", T, "labelled", "reordered"),
                                                   ("f(x) = \\pm x", T, "labelled", "plus-minus"),
                                                   ("f(x)=x", F, "labelled", "missing")], None),
    ("minerva", "minerva-5", "np.arcsin(10/13)", [("\\arcsin\\left(\\frac{10}{13}\\right)", T, "python", "raw NumPy gold"),
                                                  ("\\sin^{-1}(10/13)", T, "python", "inverse notation"),
                                                  ("\\arccos(10/13)", F, "python", "wrong function")], None),
    ("minerva", "minerva-38", "-1./3", [("-\\frac{1}{3}", T, "python", "raw Python float gold"), ("-0.\\overline{3}", T, "repeating", "repeating"),
                                        ("-0.33", F, "python", "rounded")], None),
    ("minerva", "minerva-49", "-3./2", [("-1.5", T, "python", "raw Python float gold"), ("-\\frac{3}{2}", T, "python", "fraction"),
                                        ("-\\frac{2}{3}", F, "python", "inverted")], None),
    ("minerva", "minerva-72", None, [("x_0 \\cos(\\omega t) + \\frac{\\dot{x}_0}{\\omega} \\sin(\\omega t)", T, "symbolic", "rearranged"),
                                     ("x_0 \\cos(\\omega t) + \\dot{x}_0 \\omega \\sin(\\omega t)", F, "symbolic", "omega multiplies")], None),
    ("minerva", "minerva-139", None, [("\\frac{\\lambda_{\\text{red}}}{\\sqrt{2}}", T, "symbolic", "fraction"),
                                      ("\\lambda_{\\text{red}} \\sqrt{2}", F, "symbolic", "wrong")], None),
]


def build() -> list[dict]:
    """The table rows (golds from the packaged loaders unless a row gives its own gold)."""
    golds = {}
    for name in sorted({b for b, *_ in ROWS}):
        golds.update({item["id"]: item["gold"] for item in rewards.load_benchmark(name)})
    rows, seen = [], set()
    for benchmark, qid, gold, preds, options in ROWS:
        for pred, label, form, reason in preds:
            row = dict(benchmark=benchmark, id=qid, gold=gold if gold is not None else golds[qid],
                       prediction=pred, label=label, form=form, reason=reason,
                       split=split_of(qid))
            if options:
                row["options"] = options
            key = (qid, row["gold"], pred)
            if key in seen:
                raise ValueError(f"duplicate row {key}")
            seen.add(key)
            rows.append(row)
    return rows


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    held = sum(r["split"] == "heldout" for r in rows)
    print(f"{len(rows)} rows ({held} held out, {len(rows) - held} tuning) -> {OUT}")


if __name__ == "__main__":
    main()
