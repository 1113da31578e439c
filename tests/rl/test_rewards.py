"""Reward functions of `lmforge grpo`: answer extraction and comparison, the built-ins, loading
user functions from files and scoring a batch with TRL's call.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/rl/test_rewards.py
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.rl.rewards import (Accuracy, RewardOptions, answers_match, check_columns, extract_answer,
                                load_rewards, reference_answer, soft_overlong)

PROMPT = [{"role": "user", "content": "What is 6 * 7?"}]
RECORD = "data.jsonl, line 7"


@pytest.mark.parametrize("completion, answer", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} first, then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{x^{2} + \{1\}}", r"x^{2} + \{1\}"),                     # nested and escaped braces
    (r"\boxed{7} then \boxed{8", "7"),                                # an unclosed box is passed over
    ("<think>2 or 3</think><answer>3</answer> 9", "3"),                # tags before the last number
    ("<answer>1</answer> <answer> Paris </answer>", " Paris "),
    (r"<answer>1</answer> \boxed{2}", "2"),                            # a box before tags
    ("6 * 7 = 42.", "42"),
    ("pages 3-5", "5"),                                               # a hyphen is not a minus
    ("so x = -7.5 here", "-7.5"),
    ("total: 1,234,567 dollars", "1,234,567"),
    ("half: 1/2", "1/2"),
    (r"it is -\frac{1}{2}", r"-\frac{1}{2}"),
    ("no number at all", None),
])
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize("given, column, match", [
    ("42", "#### 42", True),                                          # GSM8K
    ("42", "Janet has 6 * 7 = 42 eggs.\n#### 42", True),
    ("42.0", "42", True),
    ("42.", "42", True),
    ("$42", "42", True),
    ("1,000", "1000", True),
    (r"1{,}000", "1,000", True),
    (r"1\,000", "1000", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("0.75", "3/4", True),
    (r"\frac{3}{4}", "0.75", True),
    (r"\dfrac{6}{8}", r"\frac{3}{4}", True),
    (r"\frac{1.5}{2}", "0.75", True),
    ("0.333", "1/3", False),                                          # exact, no tolerance
    ("41", "42", False),
    ("12,34", "1234", False),                                         # not a thousands separator
    (" Paris. ", "Paris", True),
    ("New   York", "New York", True),
    ("$x + 1$", "x + 1", True),
    ("paris", "Paris", False),
    ("1/0", "1/0", True),                                             # no number: compared as text
    ("3", r"The sum is \boxed{3}.", True),                            # a MATH solution
    ("42", 42, True),                                                 # a number in the column
    ("42", 42.0, True),
])
def test_answers_match(given, column, match):
    assert answers_match(given, reference_answer(column)) is match


def test_accuracy_rewards_and_null_answers():
    accuracy = Accuracy("solution")
    completions = [[{"role": "assistant", "content": text}] for text in
                   [r"\boxed{4}", "<answer>5</answer>", "no idea", "anything"]]
    rewards = accuracy([PROMPT] * 4, completions, solution=["#### 4", "4", "4", None])
    assert rewards == [1.0, 0.0, 0.0, None]


def test_format():
    rewards = load_rewards(["format"])
    texts = ["<think>a\nb</think>\n<answer>4</answer>\n", " <think></think><answer>4</answer>",
             "<answer>4</answer>", "<think>a</think><answer>4</answer> and more", "4"]
    assert rewards.functions[0]([PROMPT] * 5, texts) == [1.0, 1.0, 0.0, 0.0, 0.0]
    custom = load_rewards(["format"], options=RewardOptions(format_pattern=r".*\\boxed\{.+\}\s*"))
    assert custom.functions[0]([PROMPT] * 2, ["so\n\\boxed{4}", "4"]) == [1.0, 0.0]
    with pytest.raises(LmforgeError) as error:
        load_rewards(["format"], options=RewardOptions(format_pattern="(<answer>"))
    assert str(error.value) == ("reward format: bad pattern '(<answer>': missing ), unterminated "
                                "subpattern at position 0")


def test_soft_overlong_boundaries():
    # L_max = 20, L_cache = 5: free up to 15 tokens, then -1/5 per token, -1 at 20 and beyond.
    assert [soft_overlong(n, 20, 5) for n in (0, 15, 16, 18, 19, 20, 21, 100)] == \
        [0.0, 0.0, -0.2, -0.6, -0.8, -1.0, -1.0, -1.0]
    rewards = load_rewards(["overlong"], options=RewardOptions(overlong_max_length=20, overlong_buffer=5))
    scores = rewards.score([PROMPT] * 3, ["a", "b", "c"], [[1] * 15, [1] * 17, [1] * 20], {}, [RECORD] * 3)
    assert scores.total.tolist() == pytest.approx([0.0, -0.4, -1.0])


def test_overlong_settings():
    assert load_rewards(["overlong"], options=RewardOptions(overlong_max_length=20480)).functions[0].buffer == 4096
    with pytest.raises(LmforgeError) as error:
        load_rewards(["overlong"])
    assert str(error.value) == "reward overlong: needs the maximum completion length (overlong_max_length)"
    with pytest.raises(LmforgeError) as error:
        load_rewards(["overlong"], options=RewardOptions(overlong_max_length=10, overlong_buffer=11))
    assert str(error.value) == "reward overlong: overlong_buffer=11 must be between 1 and overlong_max_length=10"


TRL_STYLE = '''\
import numpy as np

CALLS = []


def keyword_reward(completions, keyword, **kwargs):
    """As TRL's docs write one: the text of a completion is completions[i][0]["content"]."""
    CALLS.append(kwargs)
    return [1.0 if k in c[0]["content"] else 0.0 for c, k in zip(completions, keyword)]


def only_long(completions, completion_ids, **kwargs):
    return [len(ids) / 10 if len(ids) > 2 else None for ids in completion_ids]


def logs(completions, keyword, log_extra=None, log_metric=None, **kwargs):
    log_extra("keyword", list(keyword))
    log_metric("seen", float(len(completions)))
    return [True, False, 1, np.float32(0.5)]


async def slow_reward(completions, **kwargs):
    return [2.0] * len(completions)
'''


def write(tmp_path, text: str, name: str = "my_rewards.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def score_four(rewards, **overrides):
    arguments = dict(prompts=[PROMPT] * 4, completions=["a cat", "a dog", "cat food", "no"],
                     completion_ids=[[1, 2, 3], [4], [5, 6, 7, 8], [9, 9]],
                     columns={"keyword": ["cat", "cat", "dog", "dog"], "answer": ["1"] * 4},
                     records=["data.jsonl, line 7"] * 2 + ["data.jsonl, line 9"] * 2)
    return rewards.score(**{**arguments, **overrides})


def test_trl_style_function_gets_trls_arguments(tmp_path):
    path = write(tmp_path, TRL_STYLE)
    rewards = load_rewards([f"{path}:keyword_reward"])
    scores = score_four(rewards, trainer_state="state")
    assert scores.per_function.tolist() == [[1.0], [0.0], [0.0], [0.0]]
    (call,) = rewards.functions[0].__globals__["CALLS"]
    assert sorted(call) == ["answer", "completion_ids", "log_extra", "log_metric", "prompts", "trainer_state"]
    assert call["prompts"] == [PROMPT] * 4
    assert call["completion_ids"] == [[1, 2, 3], [4], [5, 6, 7, 8], [9, 9]]
    assert call["trainer_state"] == "state"
    assert rewards.names == scores.names == (f"{path}:keyword_reward",)
    # Completions given as TRL's message lists score the same as their texts.
    messages = [[{"role": "assistant", "content": t}] for t in ["a cat", "a dog", "cat food", "no"]]
    assert score_four(rewards, completions=messages).per_function.tolist() == scores.per_function.tolist()


def test_weights_and_functions_that_do_not_apply(tmp_path):
    path = write(tmp_path, TRL_STYLE)
    rewards = load_rewards([f"{path}:keyword_reward", f"{path}:only_long", "accuracy"], [2.0, 0.5, 1.0])
    assert rewards.weights == (2.0, 0.5, 1.0)
    scores = score_four(rewards, completions=["a cat", "a dog 1", "cat food", r"\boxed{1}"])
    per_function = scores.per_function.tolist()
    assert per_function[0] == [1.0, pytest.approx(0.3), 0.0]
    assert per_function[1][0] == 0.0 and math.isnan(per_function[1][1]) and per_function[1][2] == 1.0
    assert scores.total.tolist() == pytest.approx([2.15, 1.0, 0.2, 1.0])
    assert load_rewards(["accuracy", "format"]).weights == (1.0, 1.0)


def test_weight_count_must_match():
    with pytest.raises(LmforgeError) as error:
        load_rewards(["accuracy", "format"], [1.0])
    assert str(error.value) == "reward_weights has 1 values for 2 reward functions (accuracy, format)"
    with pytest.raises(LmforgeError) as error:
        load_rewards(["accuracy"], [float("nan")])
    assert str(error.value) == "reward_weights: nan for accuracy is not a finite number"


def test_logging_bools_numpy_and_async(tmp_path):
    path = write(tmp_path, TRL_STYLE)
    rewards = load_rewards([f"{path}:logs", f"{path}:slow_reward"])
    scores = score_four(rewards)
    assert scores.per_function[:, 0].tolist() == [1.0, 0.0, 1.0, 0.5]
    assert scores.per_function[:, 1].tolist() == [2.0] * 4
    assert scores.logged_columns == {"keyword": ["cat", "cat", "dog", "dog"]}
    assert scores.logged_metrics == {"seen": [4.0]}


BAD = '''\
import math


def not_a_list(completions, **kwargs):
    return 1.0


def too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def a_nan(completions, **kwargs):
    return [0.0, 0.0, math.nan, 0.0]


def an_inf(completions, **kwargs):
    return [0.0, -math.inf, 0.0, 0.0]


def a_string(completions, **kwargs):
    return ["1.0", 0.0, 0.0, 0.0]


def nothing(completions, **kwargs):
    return [None] * len(completions)


def helper(x):
    return 1 / x


def raises(completions, **kwargs):
    return [helper(0) for c in completions]


def raises_in_library(completions, **kwargs):
    return [float(c[0]["content"]) for c in completions]
'''


@pytest.mark.parametrize("name, message", [
    ("not_a_list", "on the completions of data.jsonl, line 7 and 1 other record: returned 1.0 (float), "
                   "not a list of 4 rewards"),
    ("too_few", "on the completions of data.jsonl, line 7 and 1 other record: returned 3 rewards for 4 "
                "completions"),
    ("a_nan", "on data.jsonl, line 9: returned nan; a reward is a finite number, or None where the "
              "function does not apply"),
    ("an_inf", "on data.jsonl, line 7: returned -inf; a reward is a finite number, or None where the "
               "function does not apply"),
    ("a_string", "on data.jsonl, line 7: returned '1.0' (str); a reward is a number, or None where the "
                 "function does not apply"),
    ("raises", "on the completions of data.jsonl, line 7 and 1 other record: raised ZeroDivisionError: "
               "division by zero ({path}:29)"),
    ("raises_in_library", "on the completions of data.jsonl, line 7 and 1 other record: raised "
                          "ValueError: could not convert string to float: 'a cat' ({path}:37)"),
])
def test_bad_return_or_raise_is_one_line(tmp_path, name, message):
    path = write(tmp_path, BAD)
    rewards = load_rewards([f"{path}:{name}", "format"])
    with pytest.raises(LmforgeError) as error:
        score_four(rewards)
    assert str(error.value) == f"reward {path}:{name} " + message.format(path=path)


def test_a_completion_no_function_applies_to(tmp_path):
    path = write(tmp_path, BAD)
    rewards = load_rewards([f"{path}:nothing"])
    with pytest.raises(LmforgeError) as error:
        score_four(rewards)
    assert str(error.value) == f"no reward function applies to data.jsonl, line 7: {path}:nothing all returned None"


def test_loading_errors(tmp_path):
    good = write(tmp_path, "x = 3\n\ndef f(completions, **kwargs):\n    return []\n")
    broken = write(tmp_path, "def f(:\n    pass\n", "broken.py")
    failing = write(tmp_path, "import os\nraise RuntimeError('no API key\\nset')\n", "failing.py")
    missing = str(tmp_path / "missing.py")
    cases = {
        f"{missing}:f": f"reward {missing}:f: no such file {missing}",
        f"{broken}:f": f"reward {broken}:f: syntax error in {broken}, line 1: invalid syntax",
        f"{failing}:f": f"reward {failing}:f: importing {failing} raised RuntimeError: no API key set ({failing}:2)",
        f"{good}:g": f"reward {good}:g: {good} defines no 'g' (its functions: f)",
        f"{good}:x": f"reward {good}:x: x in {good} is not callable (it is of type int)",
        "acuracy": "reward 'acuracy': neither a built-in (accuracy, format, overlong) nor a function in a "
                   "file (path/to/file.py:name)",
    }
    for spec, message in cases.items():
        with pytest.raises(LmforgeError) as error:
            load_rewards([spec])
        assert str(error.value) == message
    with pytest.raises(LmforgeError) as error:
        load_rewards(["format", "format"])
    assert str(error.value) == "reward format is listed twice"


def test_check_columns():
    rewards = load_rewards(["format", "accuracy"], options=RewardOptions(answer_column="solution"))
    check_columns(rewards, ["solution", "level"])
    with pytest.raises(LmforgeError) as error:
        check_columns(rewards, ["answer", "level"])
    assert str(error.value) == ("reward accuracy needs the column 'solution', which the data lacks "
                                "(its columns: answer, level)")
    with pytest.raises(LmforgeError) as error:
        check_columns(load_rewards(["format"]), ["completions"])
    assert str(error.value) == ("the data's column 'completions' has the name of an argument every reward "
                                "function gets (prompts, completions, completion_ids, trainer_state, "
                                "log_extra, log_metric); rename the column")


def test_tensor_and_numpy_rewards_are_numbers(tmp_path):
    path = write(tmp_path, "import torch\n\ndef f(completions, **kwargs):\n"
                           "    return [torch.tensor(0.5), 1, None, False]\n")
    scores = score_four(load_rewards([f"{path}:f", "format"]))
    assert scores.per_function[:, 0].tolist()[:2] == [0.5, 1.0]
    assert math.isnan(scores.per_function[2, 0]) and scores.per_function[3, 0] == 0.0
    assert isinstance(scores.total, torch.Tensor) and scores.total.dtype == torch.float32
    assert np.isfinite(scores.total.numpy()).all()
