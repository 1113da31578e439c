"""Rewards for `lmforge grpo`: the built-in reward functions, user reward functions loaded from
files, and the scoring of one batch of completions.

A reward function has TRL's signature, `f(prompts, completions, **columns) -> list[float | None]`,
and is called with the keyword arguments TRL's GRPOTrainer passes for conversational data, so a
function written for TRL runs here unchanged (`Rewards.score` says what exactly is matched).
`None` means "this function does not apply to this completion": the completion's total is the
weighted sum over the functions that did apply.

    rewards = load_rewards(["accuracy", "format", "my_rewards.py:length_penalty"], [1.0, 0.2, 1.0])
    check_columns(rewards, first_record_columns)            # before any generation
    scores = rewards.score(prompts, completions, completion_ids, columns, records)
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import reprlib
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from lmforge.errors import LmforgeError

RewardFunction = Callable[..., Any]
Messages = list[dict[str, Any]]

ANSWER_COLUMN = "answer"
# <think>...</think> then <answer>...</answer>, as R1-style prompts ask; whitespace around and
# between the two is tolerated, the whole completion must match (DOTALL: reasoning has newlines).
THINK_THEN_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
# The DAPO paper's soft overlong punishment used a buffer of 4096 tokens for a maximum of 20480.
DAPO_BUFFER_FRACTION = Fraction(4096, 20480)

# Keyword arguments every reward function gets besides the columns (TRL's names): a column with
# one of these names would be overwritten, or make the call fail.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
NOT_APPLICABLE = "or None where the function does not apply"


# ---------------------------------------------------------------------------------------------
# Reading answers
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_OR_RATIO = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
# A number inside prose: a \frac, a number with thousands separators, a decimal or a ratio a/b.
# A minus counts only where it cannot be a hyphen or an operator (not after a word or a bracket:
# "3-5" ends with 5, "x = -5" with -5).
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)\]}])-)?"
    r"(?:\\[dt]?frac\{-?\d+(?:\.\d+)?\}\{-?\d+(?:\.\d+)?\}"
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"
    r"|\d+(?:\.\d+)?(?:/\d+)?"
    r"|\.\d+)"
)


def last_boxed(text: str) -> str | None:
    """The contents of the last closed `\\boxed{...}` in `text`, nested braces included; None if
    there is none. A `\\boxed{` left open (a completion cut at the length limit) is passed over
    for the one before it."""
    for start in reversed([m.end() for m in _BOXED.finditer(text)]):
        end = _closing_brace(text, start)
        if end is not None:
            return text[start:end]
    return None


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the `}` closing a group opened just before `start`. Escaped braces (`\\{`,
    a set's braces in LaTeX) are text, not groups."""
    depth, i = 1, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    return None


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives: the last `\\boxed{...}`, else the last `<answer>...</answer>`,
    else the last number in it; None where it has none of these."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1]
    numbers_found = _NUMBER_IN_TEXT.findall(completion)
    return numbers_found[-1] if numbers_found else None


def reference_answer(value: Any) -> str | None:
    """The answer a record's answer column holds: the text after the last `####` (GSM8K's
    solutions end with `#### 42`), else the last `\\boxed{...}` (MATH's solutions), else the whole
    value. None for a null cell."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if "####" in text:
        return text.rsplit("####", 1)[1]
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def normalise(text: str) -> str:
    """`text` for a string comparison: without `$` signs, spaces collapsed, no trailing period."""
    return " ".join(text.replace("$", "").split()).rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number, or None where it is not one: integers, decimals (`42.0` is 42),
    thousands separators (`1,000`, LaTeX's `1{,}000` and `1\\,000`), a sign, `a/b` and
    `\\frac{a}{b}`, with `$` signs and a trailing period ignored. Exact fractions, so `0.5` equals
    `1/2` and no tolerance decides what is equal."""
    s = normalise(text.replace("\\$", "").replace("\u2212", "-").replace("{,}", ",").replace("\\,", ","))
    frac = _FRAC.fullmatch(s)
    if frac:
        sign, numerator, denominator = frac.groups()
        value = _ratio(numerator, denominator)
        return -value if sign and value is not None else value
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _DECIMAL_OR_RATIO.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except ZeroDivisionError:  # "1/0" is a string, not a number
        return None


def _ratio(numerator: str, denominator: str) -> Fraction | None:
    """numerator / denominator of two decimals; None for a zero denominator."""
    bottom = Fraction(denominator)
    return Fraction(numerator) / bottom if bottom else None


def answers_match(given: str, reference: str) -> bool:
    """Whether a completion's answer is the reference: numerically where both are numbers, else as
    normalised strings."""
    a, b = parse_number(given), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalise(given) == normalise(reference)


def completion_text(completion: str | Messages) -> str:
    """The text of one completion: the string itself (TRL's standard format), or the content of
    the last message (the conversational format, where a completion is a list of messages)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1].get("content") if completion else None
    return content if isinstance(content, str) else ""


def soft_overlong(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment of a completion of `length` tokens: 0 up to
    max_length - buffer, then falling linearly to -1 at max_length, and -1 beyond."""
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / buffer
    return -1.0


# ---------------------------------------------------------------------------------------------
# Built-in reward functions
# ---------------------------------------------------------------------------------------------
# Frozen dataclasses rather than closures: a closure cannot be pickled to a worker process, and
# `check_columns` reads which column `Accuracy` needs.


@dataclass(frozen=True)
class Accuracy:
    """1.0 where the completion's answer (`extract_answer`) is the record's, else 0.0; None for a
    record whose answer cell is null (in mixed data, a task this function does not judge)."""

    column: str = ANSWER_COLUMN
    """The records' column holding the reference answer."""

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [self._one(completion_text(c), ref) for c, ref in zip(completions, columns[self.column])]

    @staticmethod
    def _one(completion: str, cell: Any) -> float | None:
        reference = reference_answer(cell)
        if reference is None:
            return None
        given = extract_answer(completion)
        return float(given is not None and answers_match(given, reference))


@dataclass(frozen=True)
class Format:
    """1.0 where the whole completion matches `pattern` (DOTALL), else 0.0."""

    pattern: re.Pattern
    """Compiled with re.DOTALL, so `.` spans the lines of a reasoning."""

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        return [float(self.pattern.fullmatch(completion_text(c)) is not None) for c in completions]


@dataclass(frozen=True)
class Overlong:
    """DAPO's soft overlong punishment (`soft_overlong`) on each completion's token count."""

    max_length: int
    """L_max: a completion this long or longer gets -1."""
    buffer: int
    """L_cache: the last tokens before max_length, over which the punishment grows from 0 to -1."""

    def __call__(self, prompts: list, completions: list, completion_ids: list, **columns: Any) -> list[float]:
        return [soft_overlong(len(ids), self.max_length, self.buffer) for ids in completion_ids]


BUILTINS = ("accuracy", "format", "overlong")


@dataclass(frozen=True)
class RewardOptions:
    """Settings of the built-in reward functions."""

    answer_column: str = ANSWER_COLUMN
    """`accuracy`: the column holding each record's reference answer."""
    format_pattern: str = THINK_THEN_ANSWER
    """`format`: the regular expression the whole completion must match."""
    overlong_max_length: int | None = None
    """`overlong`: L_max, in tokens; required by `overlong` (the run's maximum completion length)."""
    overlong_buffer: int | None = None
    """`overlong`: L_cache, in tokens; None for a fifth of L_max (the DAPO paper's 4096 of 20480)."""


def builtin(name: str, options: RewardOptions) -> RewardFunction:
    """The built-in reward function `name` (one of BUILTINS), set up from `options`."""
    if name == "accuracy":
        return Accuracy(options.answer_column)
    if name == "format":
        try:
            return Format(re.compile(options.format_pattern, re.DOTALL))
        except re.error as e:
            raise LmforgeError(f"reward format: bad pattern {options.format_pattern!r}: {e}") from None
    return _overlong(options)


def _overlong(options: RewardOptions) -> Overlong:
    max_length = options.overlong_max_length
    if max_length is None:
        raise LmforgeError("reward overlong: needs the maximum completion length (overlong_max_length)")
    buffer = options.overlong_buffer
    if buffer is None:
        buffer = max(1, int(max_length * DAPO_BUFFER_FRACTION))
    if not 1 <= buffer <= max_length:
        raise LmforgeError(f"reward overlong: overlong_buffer={buffer} must be between 1 and "
                           f"overlong_max_length={max_length}")
    return Overlong(max_length, buffer)


# ---------------------------------------------------------------------------------------------
# Loading user functions
# ---------------------------------------------------------------------------------------------


def load_function(spec: str) -> RewardFunction:
    """The function a `path/to/file.py:name` spec names, the file imported by its path."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise LmforgeError(f"reward {spec!r}: neither a built-in ({', '.join(BUILTINS)}) nor a "
                           "function in a file (path/to/file.py:name)")
    module = _import_file(spec, path)
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise LmforgeError(f"reward {spec}: {path} defines no {name!r} "
                           f"(its functions: {', '.join(defined) or 'none'})")
    function = getattr(module, name)
    if not callable(function):
        raise LmforgeError(f"reward {spec}: {name} in {path} is not callable "
                           f"(it is of type {type(function).__name__})")
    return function


def _import_file(spec: str, path: str) -> Any:
    """The module of the file at `path`, imported once per process under a name of its own."""
    if not os.path.isfile(path):
        raise LmforgeError(f"reward {spec}: no such file {path}")
    real = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0])
    module_name = f"lmforge_reward_{stem}_{hashlib.sha1(real.encode()).hexdigest()[:12]}"
    if module_name in sys.modules:  # two functions of one file: its top level runs once
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as `import` does: dataclasses and pickling look a module's
    # classes up in sys.modules.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[module_name]
        raise LmforgeError(f"reward {spec}: syntax error in {e.filename}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        del sys.modules[module_name]
        raise LmforgeError(f"reward {spec}: importing {path} raised {_describe(e, real)}") from None
    return module


def _describe(error: BaseException, user_file: str | None) -> str:
    """`Type: message (file:line)` on one line. The line is the traceback's last one in
    `user_file` (else its last): where the user's code failed, not where deep in a library the
    error surfaced."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if user_file and os.path.realpath(f.filename) == user_file]
    where = (own or frames)[-1] if frames else None
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return f"{text} ({where.filename}:{where.lineno})" if where else text


def _source_file(function: RewardFunction) -> str | None:
    """The real path of the file defining `function` (or its class, for a callable object)."""
    try:
        target = function if inspect.isroutine(function) else type(function)
        return os.path.realpath(inspect.getfile(inspect.unwrap(target)))
    except (TypeError, OSError):  # a builtin or C-defined callable has no file
        return None


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardScores:
    """The rewards of one batch of completions."""

    names: tuple[str, ...]
    """The reward functions' display names, in the order of `per_function`'s columns."""
    per_function: torch.Tensor
    """(completions, functions) float32; NaN where a function returned None."""
    total: torch.Tensor
    """(completions,) float32: each completion's weighted sum over the functions that applied."""
    logged_columns: dict[str, list]
    """Values functions passed to `log_extra(column, values)`: extra columns for a completions
    table, each extended by every call."""
    logged_metrics: dict[str, list[float]]
    """Values functions passed to `log_metric(name, value)`, in call order (TRL averages them
    over a logging step)."""


@dataclass(frozen=True)
class Rewards:
    """The reward functions of a run, their display names and weights, and the scoring of a
    batch with them."""

    functions: tuple[RewardFunction, ...]
    """Callables with TRL's reward signature."""
    names: tuple[str, ...]
    """A built-in's name, or the `path/to/file.py:name` spec a user function was loaded from."""
    weights: tuple[float, ...]
    """Each function's weight in a completion's total."""

    def score(self, prompts: Sequence[Messages], completions: Sequence[str | Messages],
              completion_ids: Sequence[list[int]], columns: Mapping[str, Sequence[Any]],
              records: Sequence[str], trainer_state: Any = None) -> RewardScores:
        """Score `completions` (decoded texts, or their message lists as TRL passes them; the
        prompt messages of each in `prompts`, its tokens in `completion_ids`, its record's other
        columns in `columns` and its record's location in `records`, each aligned with the
        completions: G completions of a prompt repeat its prompt and columns G times).

        Each function is called as TRL 1.9's `GRPOTrainer._calculate_rewards` calls a reward
        function on conversational data (trl/trainer/grpo_trainer.py): keyword arguments only,
        `prompts` the message lists, `completions` one `[{"role": "assistant", "content": text}]`
        per completion, `completion_ids` lists of token ids, one list per column, `trainer_state`,
        and `log_extra(column, values)` / `log_metric(name, value)` (collected here into the
        result). Async functions are awaited together, as TRL does with `asyncio.gather`.
        """
        count = len(completions)
        if not all(len(v) == count for v in (prompts, completion_ids, records, *columns.values())):
            raise ValueError("prompts, completion_ids, records and every column must have one entry "
                             "per completion")
        _check_reserved(columns)
        logged_columns: defaultdict[str, list] = defaultdict(list)
        logged_metrics: defaultdict[str, list[float]] = defaultdict(list)
        kwargs = {**columns, "prompts": list(prompts),
                  "completions": [_as_messages(c) for c in completions],
                  "completion_ids": list(completion_ids), "trainer_state": trainer_state,
                  "log_extra": lambda column, values: logged_columns[column].extend(values),
                  "log_metric": lambda name, value: logged_metrics[name].append(value)}
        outputs = self._call_all(kwargs, records)
        matrix = [self._check_output(n, out, records) for n, out in zip(self.names, outputs)]
        per_function = torch.tensor(matrix, dtype=torch.float32).T
        return RewardScores(self.names, per_function, self._totals(per_function, records),
                            dict(logged_columns), dict(logged_metrics))

    def _call_all(self, kwargs: dict[str, Any], records: Sequence[str]) -> list[Any]:
        """Every function's output; an async function's coroutines are awaited together after
        the synchronous ones ran."""
        outputs: list[Any] = []
        for function, name in zip(self.functions, self.names):
            try:
                outputs.append(function(**kwargs))
            except Exception as e:
                for pending in outputs:  # never awaited: closed, so Python does not warn about them
                    if inspect.iscoroutine(pending):
                        pending.close()
                raise self._raised(name, function, e, records) from None
        waiting = [i for i, out in enumerate(outputs) if inspect.isawaitable(out)]
        if waiting:
            done = asyncio.run(_gather([outputs[i] for i in waiting]))
            for i, out in zip(waiting, done):
                if isinstance(out, Exception):
                    raise self._raised(self.names[i], self.functions[i], out, records) from None
                outputs[i] = out
        return outputs

    @staticmethod
    def _raised(name: str, function: RewardFunction, error: Exception,
                records: Sequence[str]) -> LmforgeError:
        described = _describe(error, _source_file(function))
        return LmforgeError(f"reward {name} on {_batch(records)}: raised {described}")

    @staticmethod
    def _check_output(name: str, output: Any, records: Sequence[str]) -> list[float]:
        """One function's rewards as floats, NaN for None."""
        if not isinstance(output, (list, tuple)):
            raise LmforgeError(f"reward {name} on {_batch(records)}: returned {_shown(output)}, "
                               f"not a list of {len(records)} rewards")
        if len(output) != len(records):
            raise LmforgeError(f"reward {name} on {_batch(records)}: returned {len(output)} rewards "
                               f"for {len(records)} completions")
        return [_as_reward(name, value, record) for value, record in zip(output, records)]

    def _totals(self, per_function: torch.Tensor, records: Sequence[str]) -> torch.Tensor:
        """Each completion's weighted sum over the functions that applied to it."""
        applied = ~per_function.isnan()
        unjudged = (~applied.any(dim=1)).nonzero().flatten().tolist()
        if unjudged:
            raise LmforgeError(f"no reward function applies to {records[unjudged[0]]}: "
                               f"{', '.join(self.names)} all returned None")
        weights = torch.tensor(self.weights, dtype=torch.float32)
        return torch.where(applied, per_function * weights, 0.0).sum(dim=1)


def _as_messages(completion: str | Messages) -> Messages:
    """A completion as TRL gives it to a reward function on conversational data."""
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion


async def _gather(awaitables: list) -> list:
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _as_reward(name: str, value: Any, record: str) -> float:
    """One returned reward as a float: NaN for None. Numbers of any kind (numpy scalars, a
    0-dimensional tensor) are read, as TRL's torch.tensor(...) reads them; bools too (True is 1.0),
    as they are to TRL and to Python: `[answer == reference for ...]` is a natural pass / fail
    reward. Anything else, and NaN or infinity, is an error."""
    if value is None:
        return math.nan
    if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise LmforgeError(f"reward {name} on {record}: returned {_shown(value)}; "
                           f"a reward is a number, {NOT_APPLICABLE}")
    number = float(value)
    if not math.isfinite(number):
        raise LmforgeError(f"reward {name} on {record}: returned {number}; "
                           f"a reward is a finite number, {NOT_APPLICABLE}")
    return number


def _shown(value: Any) -> str:
    """A returned value in an error: its repr, cut short (reprlib), and its type."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _batch(records: Sequence[str]) -> str:
    """The records of a batch, for an error that no single completion explains."""
    distinct = list(dict.fromkeys(records))
    others = len(distinct) - 1
    if not others:
        return f"the completions of {distinct[0]}"
    return f"the completions of {distinct[0]} and {others} other record{'s' if others > 1 else ''}"


# ---------------------------------------------------------------------------------------------
# Setting up
# ---------------------------------------------------------------------------------------------


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None = None,
                 options: RewardOptions = RewardOptions()) -> Rewards:
    """The reward functions `specs` name (a built-in's name, or `path/to/file.py:name`) with their
    weights (all 1.0 when None)."""
    if not specs:
        raise LmforgeError(f"no reward functions: name at least one ({', '.join(BUILTINS)}, "
                           "or path/to/file.py:name)")
    repeated = sorted({s for s in specs if list(specs).count(s) > 1})
    if repeated:
        raise LmforgeError(f"reward {repeated[0]} is listed twice")
    functions = tuple(builtin(s, options) if s in BUILTINS else load_function(s) for s in specs)
    return Rewards(functions, tuple(specs), _weights(specs, weights))


def _weights(specs: Sequence[str], weights: Sequence[float] | None) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * len(specs)
    if len(weights) != len(specs):
        raise LmforgeError(f"reward_weights has {len(weights)} values for {len(specs)} reward "
                           f"functions ({', '.join(specs)})")
    for spec, weight in zip(specs, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise LmforgeError(f"reward_weights: {weight!r} for {spec} is not a finite number")
    return tuple(float(w) for w in weights)


def check_columns(rewards: Rewards, columns: Iterable[str]) -> None:
    """Refuse, before any generation, data that lacks a column a built-in reads, or has a column
    named like an argument every reward function gets. `columns`: the first record's columns
    other than its prompt messages."""
    have = list(columns)
    _check_reserved(have)
    for function, name in zip(rewards.functions, rewards.names):
        if isinstance(function, Accuracy) and function.column not in have:
            raise LmforgeError(f"reward {name} needs the column {function.column!r}, which the data "
                               f"lacks (its columns: {', '.join(have) or 'none'})")


def _check_reserved(columns: Iterable[str]) -> None:
    clash = [c for c in columns if c in RESERVED]
    if clash:
        raise LmforgeError(f"the data's column {clash[0]!r} has the name of an argument every reward "
                           f"function gets ({', '.join(RESERVED)}); rename the column")
