"""The demo's toy task, its character tokenizer and its four reward functions.

A problem is a one-digit addition: the prompt ``7+5=`` wants the completion ``<answer>12</answer>``.
Every prompt has the same length (:data:`PROMPT_LENGTH` characters), so a batch of prompts needs no
padding.

The reward functions follow the GRPO reward-monitoring guide (``seeds/``) and TRL's
``reward_funcs`` shape, ``f(prompts, completions, **kwargs) -> list[float]``, where ``kwargs`` holds
the dataset's other columns as lists aligned with ``completions`` (here ``answer``, the true sum as
a string). Scores, per completion:

* ``match_format_exactly``: 3.0 when the whole completion is ``<answer>X</answer>``, else 0.
* ``match_format_approximately``: +0.5 for each tag present exactly once, -0.5 for each that is
  missing or repeated (-1 .. 1).
* ``check_answer``: for a well-formed completion, 3.0 for the right answer, 1.5 for it with spaces
  around, 0.5 / 0.25 within 10 % / 20 % of it, -1.0 otherwise, -0.5 when not a number; 0 when the
  format does not match.
* ``check_numbers``: 1.5 when the first number after ``<answer>`` is the right one, else 0.

A correct, well-formed completion scores :data:`MAX_TOTAL_REWARD` (8.5).
:func:`check_numbers_exploitable` is the broken variant used to demonstrate reward hacking.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
#: Largest operand; sums run from 0 to ``2 * OPERAND_MAX``.
OPERAND_MAX = 9
#: Characters in every prompt (``"a+b="``).
PROMPT_LENGTH = 4
#: Total reward of a correct, well-formed completion.
MAX_TOTAL_REWARD = 3.0 + 1.0 + 3.0 + 1.5

RewardFunction = Callable[..., list[float]]

_FORMAT = re.compile(rf"\s*{ANSWER_OPEN}([^<>]+?){ANSWER_CLOSE}\s*")
_FIRST_NUMBER_IN_ANSWER = re.compile(rf"{ANSWER_OPEN}.*?([\d.]+)", flags=re.DOTALL)


@dataclass(frozen=True, slots=True)
class Problem:
    """One addition: ``prompt`` (``"7+5="``) and ``answer``, the true sum as text (``"12"``)."""

    prompt: str
    answer: str


def make_problem(left: int, right: int) -> Problem:
    """The problem ``left+right=``; operands must lie in ``0 .. OPERAND_MAX``."""
    if not (0 <= left <= OPERAND_MAX and 0 <= right <= OPERAND_MAX):
        raise ValueError(f"operands must lie in 0..{OPERAND_MAX}, got {left} and {right}")
    return Problem(prompt=f"{left}+{right}=", answer=str(left + right))


def sample_problems(rng: random.Random, count: int) -> list[Problem]:
    """``count`` problems with operands drawn uniformly by ``rng``."""
    return [make_problem(rng.randint(0, OPERAND_MAX), rng.randint(0, OPERAND_MAX))
            for _ in range(count)]


def format_completion(answer: str) -> str:
    """The well-formed completion carrying ``answer``: ``<answer>12</answer>``."""
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet plus three special tokens.

    Ids 0, 1, 2 are ``pad_id``, ``bos_id`` and ``eos_id``; each alphabet character follows.
    ``encode`` raises ``ValueError`` on a character outside the alphabet; ``decode`` skips the
    special tokens and stops at the first end-of-sequence token."""

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("the alphabet repeats a character")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._id_of = {char: index + 3 for index, char in enumerate(alphabet)}
        self._char_of = {index: char for char, index in self._id_of.items()}
        self.vocab_size = len(alphabet) + 3

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s characters (no special tokens added)."""
        try:
            return [self._id_of[char] for char in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the alphabet") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first end-of-sequence id; pad and BOS ids are skipped."""
        chars = []
        for token in ids:
            if token == self.eos_id:
                break
            if token in self._char_of:
                chars.append(self._char_of[token])
        return "".join(chars)


#: The tokenizer of the demo: digits, the operators and the characters of the answer tags.
TOKENIZER = CharTokenizer("0123456789+=<>/answer")


def match_format_exactly(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """3.0 for each completion that is exactly ``<answer>X</answer>`` (spaces around allowed)."""
    return [3.0 if _FORMAT.fullmatch(completion) else 0.0 for completion in completions]


def match_format_approximately(prompts: list[str], completions: list[str],
                               **kwargs) -> list[float]:
    """+0.5 for each answer tag present exactly once, -0.5 for each that is not (range -1 .. 1)."""
    return [sum(0.5 if completion.count(tag) == 1 else -0.5 for tag in (ANSWER_OPEN, ANSWER_CLOSE))
            for completion in completions]


def check_answer(prompts: list[str], completions: list[str], answer: list[str],
                 **kwargs) -> list[float]:
    """Score the answer inside a well-formed completion against ``answer`` (see the module)."""
    scores = []
    for completion, truth in zip(completions, answer):
        match = _FORMAT.fullmatch(completion)
        scores.append(0.0 if match is None else _answer_score(match.group(1), truth))
    return scores


def check_numbers(prompts: list[str], completions: list[str], answer: list[str],
                  **kwargs) -> list[float]:
    """1.5 when the first number after ``<answer>`` equals ``answer``, else 0."""
    scores = []
    for completion, truth in zip(completions, answer):
        match = _FIRST_NUMBER_IN_ANSWER.search(completion)
        scores.append(1.5 if match is not None and _same_number(match.group(1), truth) else 0.0)
    return scores


def check_numbers_exploitable(prompts: list[str], completions: list[str], answer: list[str],
                              **kwargs) -> list[float]:
    """A broken ``check_numbers`` that pays 1.0 per digit anywhere: a policy that spews digits wins.

    Used by ``--inject reward_hack`` in place of :func:`check_numbers`, under the same name."""
    return [float(sum(char.isdigit() for char in completion)) for completion in completions]


#: The reward functions of a healthy run, in logging order.
REWARD_FUNCTIONS: tuple[RewardFunction, ...] = (
    match_format_exactly, match_format_approximately, check_answer, check_numbers)


def reward_functions(exploitable: bool = False) -> dict[str, RewardFunction]:
    """The four reward functions by name; with ``exploitable`` the ``check_numbers`` slot holds
    :func:`check_numbers_exploitable` (same name, so its series continues in the monitor)."""
    functions = {function.__name__: function for function in REWARD_FUNCTIONS}
    if exploitable:
        functions["check_numbers"] = check_numbers_exploitable
    return functions


def _answer_score(guess: str, truth: str) -> float:
    """``check_answer``'s score of one extracted answer ``guess`` against ``truth``."""
    if guess == truth:
        return 3.0
    if guess.strip() == truth.strip():
        return 1.5
    try:
        guess_value, true_value = float(guess), float(truth)
    except ValueError:
        return -0.5
    if true_value == 0.0:
        return -1.0
    ratio = guess_value / true_value
    if 0.9 <= ratio <= 1.1:
        return 0.5
    if 0.8 <= ratio <= 1.2:
        return 0.25
    return -1.0


def _same_number(text: str, truth: str) -> bool:
    """Whether ``text`` and ``truth`` parse to the same number (False if either does not)."""
    try:
        return float(text) == float(truth.strip())
    except ValueError:
        return False
