"""Verifiers (megatron_trillion/rewards): hand-written cases that must pass and must fail for
GSM8K, MATH and the format reward, IFEval's published test cases (google-research's
instruction_following_eval/instructions_test.py; lm-evaluation-harness's IFEval needs nltk's punkt
data, which nothing here can download, so it cannot be the oracle), a passing and a failing Korean
response for each of Ko-IFEval's 22 types, and user verifiers by module:function."""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest

from megatron_trillion.errors import UserError
from megatron_trillion.rewards import BUILTINS, get_verifier
from megatron_trillion.rewards import answers, ifeval


@pytest.mark.parametrize("response, truth, expected", [
    ("So they have 1,000 apples.", "She sells 1000 in total.\n#### 1000", 1.0),
    ("The answer is 1,000.", "#### 1,000", 1.0),
    ("It costs $5.", "5", 1.0),
    ("He ate 5 apples", "#### 5", 1.0),
    ("5 apples and then 7 pears", "5", 0.0),           # the last number counts
    ("The total is \\boxed{18} and I checked 3 times.", "18", 1.0),  # the box wins
    ("\\boxed{\\$18.00}", "18", 1.0),
    ("pages 10-15", "15", 1.0),                          # a dash, not -15
    ("The temperature fell to -3 degrees.", "-3", 1.0),
    ("The answer is 2.5", "2.50", 1.0),
    ("I do not know.", "4", 0.0),
    ("it is 12", "#### 21", 0.0),
])
def test_gsm8k(response, truth, expected):
    assert get_verifier("gsm8k")(response, truth).score == expected


def test_gsm8k_ground_truth_must_be_a_number():
    for bad in ("#### twelve", "#### 12 and 13", None, ""):
        with pytest.raises(UserError):
            answers.gsm8k_ground_truth(bad)
    with pytest.raises(UserError, match="verifier 'gsm8k' on sample d.jsonl:4: the ground truth"):
        get_verifier("gsm8k")("12", "#### twelve", sample="d.jsonl:4")


@pytest.mark.parametrize("response, truth, expected", [
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),                   # LaTeX spacing
    ("\\boxed{[1,2]}", "(1,2]", 0.0),                    # another interval
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("The answer is 1/2.", "\\frac{1}{2}", 0.0),          # no \boxed{}
    ("\\boxed{x = 3}", "The solution gives $\\boxed{3}$.", 1.0),  # a MATH solution field
])
def test_math(response, truth, expected):
    assert get_verifier("math")(response, truth).score == expected


def test_math_timeout_holds_in_threads():
    """10^{10^{10}} makes sympy build a ten-billion-digit integer; the comparison is cut off
    (from a non-main thread, where a signal-based timeout would raise) and the next answer is
    scored normally by a restarted helper."""
    results = []
    worker = threading.Thread(target=lambda: results.append(
        answers.math("\\boxed{10^{10^{10}}}", "1", timeout_s=1.0)))
    start = time.monotonic()
    worker.start()
    worker.join()
    assert results[0][0] == 0.0 and "timed out" in results[0][1]
    assert time.monotonic() - start < 60
    assert answers.math("\\boxed{0.5}", "\\frac12")[0] == 1.0


def test_format_and_sums():
    fmt = get_verifier("format")
    assert fmt("so \\boxed{42}", None).score == 1.0
    assert fmt("so 42", None).score == 0.0 and fmt("\\boxed{ }", None).score == 0.0
    both = get_verifier("gsm8k+format")
    assert both("so \\boxed{42}", "42").score == 1.0
    assert both("so 42", "42") == (0.5, "gsm8k: answer 42; format: no \\boxed{} answer")


# ---- user verifiers --------------------------------------------------------------------------

def test_user_verifier_by_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exact(response, truth):\n    return float(response.strip() == truth)\n"
        "def pair(response, truth):\n    return 0.25, 'quarter'\n"
        "def broken(response, truth):\n    raise KeyError('oops')\n"
        "def wrong(response, truth):\n    return 'yes'\n"
        "def too_big(response, truth):\n    return 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert get_verifier("my_rewards:exact")(" a ", "a") == (1.0, "")
    assert get_verifier("my_rewards:pair")("x", None) == (0.25, "quarter")
    assert get_verifier("my_rewards:exact+format")("\\boxed{1}", "\\boxed{1}").score == 1.0
    for name, message in [
        ("my_rewards:broken", "verifier 'my_rewards:broken' on sample d.jsonl:3 raised KeyError"),
        ("my_rewards:wrong", "verifier 'my_rewards:wrong' on sample d.jsonl:3 returned 'yes'"),
        ("my_rewards:too_big", "returned 2.0; a verifier returns a float in [0, 1]"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            get_verifier(name)("x", "y", sample="d.jsonl:3")
    for name, message in [("no_such_module:f", "cannot import 'no_such_module'"),
                          ("my_rewards:absent", "has no function 'absent'"),
                          ("gsm9k", "unknown verifier 'gsm9k'")]:
        with pytest.raises(UserError, match=message):
            get_verifier(name)


# ---- IFEval: the published test cases --------------------------------------------------------

BULLETS_1 = """
  A Markdown bullet point is a way of formatting text to create a list. To
  create a bullet point, start each line with an asterisk (*). For example:
  * This is a bullet point.
  *(no space required)Another bullet point.
  * (no newline ending required)Another bullet point.
  markdown bullet points are often used to create to-do lists or to list items
  in a step-by-step guide."""
BULLETS_2 = """
  Check that inline asterisk (*), *, will not be counted. Only * that starts a
  bullet list will be counted:
    * This is a bullet point.
    * Another bullet point.
    . dot is not counted"""
BULLETS_4 = """
  Here are three markdown bullets:
  - I am a large language model, also known as a conversational AI.
  - I am trained on a massive amount of text data, and I am able to communicate.
  -I am still under development, but I am learning new things every day."""
BULLETS_5 = """
  Paragraph 1
  ***
  Paragraph 2
  ***
  Paragraph 3
  * only one bullet point
  """
HIGHLIGHT_1 = """
  To highlight text with Markdown, you can use the * character before and after
  the text you want to highlight. For example, if you want to highlight the
  word `hello`, you would type:*hello*, You can also use the ** character to
  create bold text. For example, if you want to bold the word `hello`, you
  would type: **hello** """
HIGHLIGHT_2 = """
  Sure, here are the numerical methods for solving partial differential
  equations highlighted with Markdown:
  *Finite difference methods
  *Finite element methods*
  *Boundary element methods
  *Monte Carlo methods
  I hope this helps!"""
HIGHLIGHT_3 = """
  There is allowed to be *two different* highlighted *sections in the same*
  line. **This is also true** for **double markdown highlights.**
  """
SECTION_1 = """
  Your response must have multiple sections. Mark the beginning of each section
  with "Section X", such as:
  Section 1
  [content of section 1]
  Section 2
  [content of section 2]"""
SECTION_2 = """SECTION 1
  [content of section 1]
  SECTION 2
  [content of section 2]"""
PARAGRAPHS_2 = """
          ***
  paragraph 1
          ***
      paragraph 2
          ***
      paragraph 3"""
PARAGRAPHS_4 = """
  paragraph 1
          ***
      paragraph 2
          ***
          ***"""
POSTSCRIPT_1 = """
  I will do my best to follow your instructions and always start my responses
  with "My response is:". I will try to be as consistent as possible, but
  please be patient with me if I make a mistake. I am still under development,
  and I am always learning new things.

  P.S. I hope this is what you were looking for."""
POSTSCRIPT_2 = """
  Sure, here is my response with a postscript starting with P.P.S.:

  My response is: I hope this answers your question.

  P.P.S. I am always happy to answer any other questions you may have.

  Do you have any other questions for me?"""
POSTSCRIPT_4 = """
  If the length of a square is one, the area of the square will also be one.
  p.p.s what if the entire response was lower case letters?
  """
POSTSCRIPT_5 = """
  The mysteries of space and time are mysterious.
  P. S. Sometimes there are even spaces between P. and S..
  """
KEYWORDS_1 = """
  Paris is a city of beauty and romance. The romantic river Seine winds its way
  through the city, past iconic landmarks like the Eiffel Tower and the Louvre
  Museum, where the Mona Lisa resides. Whether you're taking a boat cruise down
  the river or simply strolling along the banks, you're sure to be captivated
  by the city's charm."""
KEYWORDS_2 = """
  Paris is a city of beauty, romance, and history. It is home to some of the
  most iconic landmarks in the world, including the Eiffel Tower, the Louvre
  Museum, and the Notre Dame Cathedral. The city is also known for its romantic
  river cruises, its delicious food, and its stylish people.
  """
WORDS_1 = """
  d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS."""
WORDS_2 = """
  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms
  l4ngu4g3 b4s3d on pr3vious l3arning & d4t4."""
FIRST_WORD_1 = """
  paragraph 1

  I paragraph 2

  paragraph 3"""
FIRST_WORD_2 = """
  paragraph 1

  I paragraph 2"""
FIRST_WORD_4 = """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  Really more than three? No way!

  I can't believe it but I guess I am living proof.

  Haha, you go that right."""
FIRST_WORD_5 = FIRST_WORD_4.replace("Really more than three?", '"Really?! more than three?')
FIRST_WORD_6 = FIRST_WORD_4.replace("Really", "Rea!lly")
FORBIDDEN_1 = """
  The Nazis came to power in 1933 through a combination of legal and illegal
  means. Hitler was appointed chancellor by President Paul von Hindenburg, and
  the Nazis quickly consolidated their power by passing a series of laws that
  restricted the rights of opposition parties and individuals. By 1934, Hitler
  had become dictator of Germany.
  """
FORBIDDEN_2 = """
  Dinosaurs were a diverse group of reptiles that dominated the Earth for over
  160 million years. They came in all shapes and sizes, from the tiny
  Compsognathus to the massive Argentinosaurus.
  """
LT, AL = "less than", "at least"

PUBLISHED = [
    ("language:response_language", {"language": "en"}, "The response is English", True),
    ("language:response_language", {"language": "es"}, "Desayunamos en McDonald's hoy", True),
    ("language:response_language", {"language": "en"}, "Today we visit the Louvre", True),
    ("length_constraints:number_sentences", {"relation": LT, "num_sentences": 4},
     "xx,x. xx,x! xx/x. x{x}x?", False),
    ("length_constraints:number_sentences", {"relation": LT, "num_sentences": 5},
     "xxxx. xx,x! xxxx. x(x)x?", True),
    ("length_constraints:number_sentences", {"relation": AL, "num_sentences": 4},
     "xxxx. xx,x! xx|x. x&x x?", True),
    ("length_constraints:number_sentences", {"relation": AL, "num_sentences": 5},
     "xx-x. xx,x! xx}x. x,xx?", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 5},
     "Sure, here is a short template with 5 placeholders:\n[Name]\n[Email]\n[Phone]\n"
     "[Address]\n[Website]\nThis template can be used for a variety of purposes.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_1, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, BULLETS_2, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_4, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, BULLETS_5, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, BULLETS_4, False),
    ("detectable_format:constrained_response", {}, "\n My answer is no.\n", True),
    ("detectable_format:constrained_response", {}, "My answer is no.   ", True),
    ("detectable_format:constrained_response", {}, "I think so.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHT_1, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHT_2, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4}, HIGHLIGHT_3, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     SECTION_1, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     SECTION_2, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "\n  paragraph 1\n  ***\n  paragraph 2\n  ***\n  paragraph 3", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS_2, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, PARAGRAPHS_4, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, POSTSCRIPT_1, True),
    ("detectable_content:postscript", {"postscript_marker": "PS:"}, POSTSCRIPT_1, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, POSTSCRIPT_2, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, POSTSCRIPT_4, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, POSTSCRIPT_5, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_1, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_2, False),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 4, "relation": LT},
     "\n  keyword, Keyword, KEYWORD\n  ", True),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": AL},
     "\n  keyword, Keyword, KEYWORD\n  ", True),
    ("keywords:frequency", {"keyword": "KEYWORD", "frequency": 4, "relation": AL},
     "\n    *keyword\n    *Keyword\n    *KEYWORD\n  ", False),
    ("length_constraints:number_words", {"num_words": 8, "relation": LT}, WORDS_1, True),
    ("length_constraints:number_words", {"num_words": 16, "relation": LT}, WORDS_2, False),
    ("length_constraints:number_words", {"num_words": 16, "relation": AL}, WORDS_2, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, FIRST_WORD_1, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, FIRST_WORD_2, False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"},
     FIRST_WORD_1.replace("I paragraph", "fail paragraph"), False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 5, "first_word": "haha"}, FIRST_WORD_4, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, FIRST_WORD_5, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, FIRST_WORD_6, False),
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]},
     FORBIDDEN_1, False),
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]},
     FORBIDDEN_2, True),
    ("keywords:forbidden_words", {"forbidden_words": ["GENE", "TRANSFORM"]},
     "GPT, or Generative Pre-trained Transformer, uses the transformer architecture.", True),
    # the remaining types, written here in the same spirit
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": AL},
     "Zebras graze.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": LT},
     "Zebras graze.", False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True),
    ("detectable_format:json_format", {}, "{'a': 1}", False),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nLine one.", True),
    ("detectable_format:title", {}, "<<>> Poem of Joy", False),
    ("combination:two_responses", {}, "Yes, it is.\n******\nNo, it is not.", True),
    ("combination:two_responses", {}, "Yes.\n******\nYes.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "Write a poem. Roses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Roses are red.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"That is all. Any other questions?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Any other questions? Bye.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL},
     "This is VERY IMPORTANT news.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT},
     "This is VERY IMPORTANT news.", False),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITAL LETTERS, AS ASKED.", True),
    ("change_case:english_capital", {}, "THIS IS MOSTLY IN CAPITALS, but not all.", False),
    ("change_case:english_lowercase", {}, "this is all in lowercase letters, as asked.", True),
    ("change_case:english_lowercase", {}, "This is not all lowercase.", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "Well, a comma.", False),
    ("startend:quotation", {}, '"Wrapped in quotes."', True),
    ("startend:quotation", {}, 'Not "wrapped".', False),
]


def test_ifeval_published_cases():
    verifier = get_verifier("ifeval")
    assert {case[0] for case in PUBLISHED} == set(ifeval.KWARGS)  # all 25 types
    for instruction_id, kwargs, response, expected in PUBLISHED:
        truth = {"instruction_id_list": [instruction_id], "kwargs": [kwargs]}
        assert verifier(response, truth).score == float(expected), (instruction_id, response)


def test_ifeval_strict_loose_and_dataset_layout():
    # the published dataset fills every kwarg key of every instruction, null where unused
    truth = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
             "kwargs": [{"num_words": None, "relation": None}, {}]}
    instructions = ifeval.parse_instructions(truth)
    response = 'Sure here it is:\n"No commas at all."'
    assert ifeval.follows(response, instructions) == [True, False]
    assert ifeval.follows(response, instructions, loose=True) == [True, True]  # first line off
    assert get_verifier("ifeval")(response, truth) == (
        0.0, "followed 1/2; failed startend:quotation")


@pytest.mark.parametrize("truth, message", [
    ({"instruction_id_list": ["keywords:teleport"], "kwargs": [{}]}, "unknown ifeval instruction"),
    ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keyword": ["a"]}]},
     "takes ['keywords'], not ['keyword']"),
    ({"instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "a", "frequency": 2,
                                                                 "relation": "exactly"}]},
     "'relation' must be one of"),
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": AL}]},
     "needs kwargs ['num_words']"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "2 entries for 1"),
    ({"prompt": "x"}, "needs IFEval's 'instruction_id_list'"),
])
def test_ifeval_bad_instructions(truth, message):
    with pytest.raises(UserError, match=re.escape(message)):
        get_verifier("ifeval").parse_ground_truth(truth)


# ---- Ko-IFEval: Table 15's 22 types on Korean text -------------------------------------------

KOREAN = [
    ("keywords:existence", {"keywords": ["인공지능", "미래"]},
     "인공지능은 우리의 미래를 바꿀 것입니다.", "인공지능은 우리의 삶을 바꿀 것입니다."),
    ("keywords:frequency", {"keyword": "사과", "frequency": 3, "relation": AL},
     "사과를 좋아합니다. 사과는 맛있고 사과주스도 좋습니다.", "사과를 좋아합니다. 배도 좋습니다."),
    ("keywords:forbidden_words", {"forbidden_words": ["전쟁"]},
     "평화로운 세상을 꿈꿉니다.", "전쟁이 없는 세상을 꿈꿉니다."),  # particle attached: still found
    ("keywords:letter_frequency", {"letter": "하", "let_frequency": 3, "let_relation": LT},
     "안녕하세요. 반갑습니다.", "하하하 재미있네요."),
    ("language:response_language", {"language": "ko"},
     "AI 기술은 빠르게 발전하고 있으며 많은 산업을 바꾸고 있습니다.",
     "AI technology is developing fast and changing many industries."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "첫 번째 단락입니다.\n* * *\n두 번째 단락입니다.", "첫 번째 단락입니다.\n\n두 번째 단락입니다."),
    ("length_constraints:number_words", {"num_words": 5, "relation": LT},
     "오늘은 날씨가 좋습니다.", "오늘은 날씨가 정말 맑고 따뜻해서 산책하기 좋습니다."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL},
     "날씨가 좋습니다. 산책을 갑시다!", "날씨가 좋습니다"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "결론"},
     "서론입니다.\n\n결론적으로 좋습니다.", "서론입니다.\n\n요약하면 좋습니다."),
    ("detectable_content:postscript", {"postscript_marker": "추신:"},
     "본문입니다.\n\n추신: 감사합니다.", "본문입니다. 감사합니다."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "[이름]님, [주소]로 보내드리겠습니다.", "[이름]님, 곧 보내드리겠습니다."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "목록:\n* 첫째 항목\n* 둘째 항목", "목록:\n* 첫째 항목\n* 둘째 항목\n* 셋째 항목"),
    ("detectable_format:title", {}, "«기쁨의 시»\n햇살이 비칩니다.", "기쁨의 시\n햇살이 비칩니다."),
    ("detectable_format:constrained_response", {"options": ["네, 맞습니다.", "아니요, 틀립니다."]},
     "제 생각에는 네, 맞습니다.", "잘 모르겠습니다."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*중요한 부분*과 *핵심 내용*입니다.", "*중요한 부분*만 있습니다."),
    ("detectable_format:multiple_sections", {"section_spliter": "섹션", "num_sections": 2},
     "섹션 1. 도입\n내용\n섹션 2. 본론\n내용", "섹션 1. 도입\n내용"),
    ("detectable_format:json_format", {}, '{"이름": "홍길동"}', "이름: 홍길동"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "한국의 수도는 어디인가요?"},
     "한국의 수도는 어디인가요? 서울입니다.", "서울입니다."),
    ("combination:two_responses", {}, "첫 번째 답입니다.\n******\n두 번째 답입니다.",
     "첫 번째 답입니다."),
    ("startend:end_checker", {"end_phrase": "더 궁금한 점이 있나요?"},
     "설명을 마칩니다. 더 궁금한 점이 있나요?", "더 궁금한 점이 있나요? 안녕히 계세요."),
    ("startend:quotation", {}, "“모든 답을 큰따옴표로 감쌌습니다.”", "따옴표가 없습니다."),
    ("punctuation:no_comma", {}, "쉼표 없이 씁니다.", "사과, 배, 포도를 샀습니다."),
]


def test_ko_ifeval_each_type_passes_and_fails():
    verifier = get_verifier("ko_ifeval")
    assert len(KOREAN) == 22 and {case[0] for case in KOREAN} == set(ifeval.KOREAN_IDS)
    for instruction_id, kwargs, good, bad in KOREAN:
        truth = {"instruction_id_list": [instruction_id], "kwargs": [kwargs]}
        assert verifier(good, truth).score == 1.0, (instruction_id, good)
        assert verifier(bad, truth).score == 0.0, (instruction_id, bad)
    # "{language}로 작성하세요" for other languages: the script decides, kana tells ja from zh
    for text, language in [("今日は良い天気です。", "ja"), ("今天天气很好。", "zh"),
                           ("오늘은 날씨가 좋습니다.", "ko"), ("Today is a nice day.", "en")]:
        for asked in ("ko", "ja", "zh", "en"):
            truth = {"instruction_id_list": ["language:response_language"],
                     "kwargs": [{"language": asked}]}
            assert verifier(text, truth).score == float(asked == language), (text, asked)
    with pytest.raises(UserError, match="Ko-IFEval has Table 15's 22 types, no change_case"):
        verifier.parse_ground_truth({"instruction_id_list": ["change_case:english_capital"],
                                     "kwargs": [{}]})


def test_registry_names():
    assert set(BUILTINS) == {"gsm8k", "math", "ifeval", "ko_ifeval", "format"}
