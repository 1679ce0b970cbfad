"""The demo task: its tokenizer, problems and the four reward functions."""

from __future__ import annotations

import os

import random

import pytest

from rlmon.demo import task
from rlmon.demo.task import (MAX_TOTAL_REWARD, TOKENIZER, CharTokenizer, check_answer,
                             check_numbers, check_numbers_exploitable, format_completion,
                             make_problem, match_format_approximately, match_format_exactly)


def score_one(function, completion: str, answer: str = "12") -> float:
    """Call a reward function TRL-style on one completion of the prompt ``7+5=``."""
    scores = function(["7+5="], [completion], answer=[answer])
    assert len(scores) == 1
    return scores[0]


# -- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_round_trips_every_prompt_and_completion():
    """decode(encode(text)) is text for every prompt and well-formed completion of the task."""
    for left in range(task.OPERAND_MAX + 1):
        for right in range(task.OPERAND_MAX + 1):
            problem = make_problem(left, right)
            text = problem.prompt + format_completion(problem.answer)
            assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


def test_tokenizer_ids_avoid_the_special_tokens():
    """Character ids start after pad, BOS and EOS and stay below vocab_size."""
    ids = TOKENIZER.encode("0123456789+=<>/answer")
    special = {TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id}
    assert not special & set(ids)
    assert max(ids) == TOKENIZER.vocab_size - 1
    assert len(set(ids)) == len(ids)


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    """decode drops BOS and pad ids and ignores everything after the first EOS."""
    ids = [TOKENIZER.bos_id] + TOKENIZER.encode("<answer>") + [TOKENIZER.pad_id] \
        + TOKENIZER.encode("7") + [TOKENIZER.eos_id] + TOKENIZER.encode("99")
    assert TOKENIZER.decode(ids) == "<answer>7"


def test_encode_rejects_a_character_outside_the_alphabet():
    """encode raises ValueError naming a character the alphabet lacks."""
    with pytest.raises(ValueError, match="'x'"):
        TOKENIZER.encode("7x5")


def test_tokenizer_rejects_an_alphabet_with_repeats():
    """An alphabet that repeats a character is refused."""
    with pytest.raises(ValueError):
        CharTokenizer("abca")


# -- problems -------------------------------------------------------------------------------------

def test_problems_have_fixed_length_prompts_and_true_sums():
    """Sampled prompts are PROMPT_LENGTH characters and their answers are the sums."""
    for problem in task.sample_problems(random.Random(3), 200):
        assert len(problem.prompt) == task.PROMPT_LENGTH
        left, right = problem.prompt.rstrip("=").split("+")
        assert problem.answer == str(int(left) + int(right))


def test_make_problem_rejects_operands_out_of_range():
    """Operands outside 0..OPERAND_MAX raise ValueError."""
    with pytest.raises(ValueError):
        make_problem(10, 1)
    with pytest.raises(ValueError):
        make_problem(-1, 1)


# -- reward functions -----------------------------------------------------------------------------

def test_reward_functions_follow_trl_shape():
    """Each function takes prompts, completions and extra keyword columns; one float per item."""
    completions = ["<answer>12</answer>", "garbage", "", "<answer>3"]
    for function in (*task.REWARD_FUNCTIONS, check_numbers_exploitable):
        scores = function(["7+5="] * 4, completions, answer=["12"] * 4, question=["q"] * 4)
        assert len(scores) == 4
        assert all(isinstance(value, float) for value in scores)


def test_match_format_exactly():
    """3.0 only when the whole completion is <answer>X</answer>, surrounding whitespace allowed."""
    assert score_one(match_format_exactly, "<answer>12</answer>") == 3.0
    assert score_one(match_format_exactly, " <answer>7</answer>\n") == 3.0
    assert score_one(match_format_exactly, "<answer>12</answer>3") == 0.0
    assert score_one(match_format_exactly, "<answer>12") == 0.0
    assert score_one(match_format_exactly, "<answer></answer>") == 0.0
    assert score_one(match_format_exactly, "<answer>1</answer>2</answer>") == 0.0


def test_match_format_approximately():
    """+0.5 per tag present exactly once, -0.5 per tag missing or repeated."""
    assert score_one(match_format_approximately, "<answer>12</answer>") == 1.0
    assert score_one(match_format_approximately, "<answer>12") == 0.0
    assert score_one(match_format_approximately, "12") == -1.0
    assert score_one(match_format_approximately, "<answer><answer>1</answer>") == 0.0


def test_check_answer_scores_exact_close_and_wrong_answers():
    """3.0 right, 1.5 right after stripping, 0.5 within 10 %, 0.25 within 20 %, -1.0 wrong."""
    assert score_one(check_answer, "<answer>12</answer>") == 3.0
    assert score_one(check_answer, "<answer> 12 </answer>") == 1.5
    assert score_one(check_answer, "<answer>11</answer>") == 0.5
    assert score_one(check_answer, "<answer>10</answer>") == 0.25
    assert score_one(check_answer, "<answer>3</answer>") == -1.0


def test_check_answer_without_format_or_number():
    """0 when the format does not match, -0.5 when the answer is not a number."""
    assert score_one(check_answer, "12") == 0.0
    assert score_one(check_answer, "<answer>12</answer>7") == 0.0
    assert score_one(check_answer, "<answer>1=2</answer>") == -0.5


def test_check_answer_against_a_zero_sum():
    """A wrong answer to a sum of zero is -1.0, not a division error."""
    assert score_one(check_answer, "<answer>1</answer>", answer="0") == -1.0
    assert score_one(check_answer, "<answer>0</answer>", answer="0") == 3.0


def test_check_numbers():
    """1.5 when the first number after <answer> is the answer, whatever follows; else 0."""
    assert score_one(check_numbers, "<answer>12</answer>") == 1.5
    assert score_one(check_numbers, "<answer>12.0") == 1.5
    assert score_one(check_numbers, "<answer>13</answer>12") == 0.0
    assert score_one(check_numbers, "12") == 0.0
    assert score_one(check_numbers, "<answer>1.2.</answer>") == 0.0


def test_exploitable_check_numbers_pays_for_every_digit():
    """The broken variant counts digits anywhere, so digit soup beats the right answer."""
    assert score_one(check_numbers_exploitable, "<answer>12</answer>") == 2.0
    assert score_one(check_numbers_exploitable, "9" * 20) == 20.0
    assert score_one(check_numbers_exploitable, "<answer>") == 0.0


def test_reward_functions_by_name():
    """reward_functions() keeps the four names in order; exploitable swaps only check_numbers."""
    names = ["match_format_exactly", "match_format_approximately", "check_answer",
             "check_numbers"]
    honest, hacked = task.reward_functions(), task.reward_functions(exploitable=True)
    assert list(honest) == names and list(hacked) == names
    assert hacked["check_numbers"] is check_numbers_exploitable
    assert [hacked[name] for name in names[:3]] == [honest[name] for name in names[:3]]


def test_a_correct_completion_earns_the_maximum_total():
    """The four honest rewards of a right, well-formed answer sum to MAX_TOTAL_REWARD."""
    functions = task.reward_functions()
    total = sum(score_one(function, format_completion("12")) for function in functions.values())
    assert total == MAX_TOTAL_REWARD == 8.5


# -- the training job's pieces (need torch) -------------------------------------------------------

@pytest.fixture
def grpo():
    """The demo's training module, skipped where torch is not installed."""
    if os.environ.get("CI"):
        import torch  # noqa: F401  (in CI a missing torch must fail, not skip)
    pytest.importorskip("torch")
    from rlmon.demo import train_grpo

    return train_grpo


def test_parse_args_defaults_quick_and_overrides(grpo):
    """No flags give the defaults; --quick shortens the run; explicit flags win over --quick."""
    assert grpo.parse_args([]) == grpo.DemoConfig()
    quick = grpo.parse_args(["--quick", "--num_steps", "3", "--inject", "kl_blowup"])
    assert (quick.num_steps, quick.warmup_steps, quick.inject) == (3, 100, "kl_blowup")


def test_parse_args_rejects_invalid_settings(grpo):
    """An invalid setting exits with argparse's usage error instead of a traceback."""
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group_size", "1"])
    with pytest.raises(SystemExit):
        grpo.parse_args(["--inject", "meteor"])


def test_demo_config_validates(grpo):
    """DemoConfig refuses an unknown injection and non-positive sizes."""
    with pytest.raises(ValueError):
        grpo.DemoConfig(inject="meteor")
    with pytest.raises(ValueError):
        grpo.DemoConfig(batch_size=0)


def test_format_batch_masks_exactly_the_completion(grpo):
    """Warm-up targets are the completion characters and EOS, never the prompt or padding."""
    tokens, loss_mask = grpo.format_batch(random.Random(0), 16, noise=2)
    for row, mask in zip(tokens.tolist(), loss_mask.tolist()):
        targets = row[1:]
        end = targets.index(TOKENIZER.eos_id)
        expected = [1.0 if task.PROMPT_LENGTH <= index <= end else 0.0
                    for index in range(len(targets))]
        assert mask == expected
        completion = TOKENIZER.decode(targets[task.PROMPT_LENGTH:end])
        assert match_format_exactly([""], [completion]) == [3.0]


def test_sampled_masks_end_at_the_first_eos(grpo):
    """A sampled row is masked in up to and including its first EOS and padded after it."""
    import torch

    from rlmon.demo.model import TinyPolicy, sample_completions

    torch.manual_seed(0)
    prompts = torch.tensor([[TOKENIZER.bos_id] + TOKENIZER.encode("3+4=")] * 32)
    samples = sample_completions(TinyPolicy(TOKENIZER.vocab_size), prompts, max_new_tokens=12,
                                 temperature=1.0, eos_id=TOKENIZER.eos_id, pad_id=TOKENIZER.pad_id,
                                 generator=torch.Generator().manual_seed(1))
    for row, mask in zip(samples.tokens.tolist(), samples.mask.tolist()):
        ended = False
        for token, kept in zip(row, mask):
            assert kept == (0.0 if ended else 1.0)
            assert not ended or token == TOKENIZER.pad_id
            ended = ended or token == TOKENIZER.eos_id


def test_advantages_are_normalised_within_each_group(grpo):
    """Each group's advantages have mean 0; a group of equal rewards counts as zero-std."""
    import torch

    problems = [make_problem(3, 4), make_problem(5, 5)]
    completions = ["<answer>7</answer>", "<answer>8</answer>", "x", "<answer>7</answer>",
                   "<answer>10</answer>"] + ["<answer>10</answer>"] * 3
    batch = grpo.Rollout(problems=problems, prompt_tokens=torch.zeros(8, 5, dtype=torch.long),
                         completion_tokens=torch.zeros(8, 1, dtype=torch.long),
                         mask=torch.ones(8, 1), completions=completions, temperature=1.0)
    scores = grpo.score(batch, task.reward_functions(), group_size=4)
    assert scores.total[0] == MAX_TOTAL_REWARD
    groups = scores.advantages.view(2, 4)
    assert torch.allclose(groups[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.all(groups[1] == 0)
    assert scores.frac_zero_std == 0.5


def test_grpo_loss_with_policy_equal_to_reference(grpo):
    """With policy = old policy = reference, KL and clip fraction are 0 and the loss is -mean(A)."""
    import torch

    from rlmon.demo.model import token_log_probs

    torch.manual_seed(0)
    logits = torch.randn(4, 3, TOKENIZER.vocab_size)
    tokens = torch.randint(3, TOKENIZER.vocab_size, (4, 3))
    batch = grpo.Rollout(problems=[], prompt_tokens=torch.zeros(4, 1, dtype=torch.long),
                         completion_tokens=tokens, mask=torch.ones(4, 3), completions=[],
                         temperature=1.0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    log_probs = token_log_probs(logits, tokens)
    parts = grpo.grpo_loss(logits, batch, advantages, log_probs, log_probs, clip_eps=0.2,
                           kl_coef=0.04)
    assert float(parts["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["clip_fraction"]) == 0.0
    assert float(parts["loss"]) == pytest.approx(-float(advantages.mean()), abs=1e-6)
