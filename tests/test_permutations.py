"""Permutation prompts ``{a, b}`` and ``--repeat``: expansion, counts and limits."""

from __future__ import annotations

import pytest

from bot.permutations import MAX_DEPTH, MAX_PROMPTS, count_permutations, expand_permutations
from bot.prompt import MAX_JOBS, PromptError, parse_prompt, plan_prompts


def test_expands_in_order_with_options_trimmed() -> None:
    assert expand_permutations("a {red, blue,green} car") == ["a red car", "a blue car", "a green car"]


def test_several_groups_multiply() -> None:
    prompts = expand_permutations("a {red, blue} {car, bike}")
    assert prompts == ["a red car", "a red bike", "a blue car", "a blue bike"]
    assert count_permutations("a {red, blue} {car, bike} {x, y, z}") == 12


def test_parameters_may_be_permuted() -> None:
    plan = plan_prompts("a fox --ar {1:1, 16:9} --chaos {0, 50}")
    assert [(p.aspect, p.chaos) for p in plan.params] == [
        ((1, 1), 0),
        ((1, 1), 50),
        ((16, 9), 0),
        ((16, 9), 50),
    ]
    assert {p.prompt for p in plan.params} == {"a fox"}


def test_nested_groups() -> None:
    assert expand_permutations("{a {big, small} dog, a cat}") == ["a big dog", "a small dog", "a cat"]
    assert count_permutations("{a {big, small} dog, a cat} {x, y}") == 6


def test_escapes_stand_for_the_character() -> None:
    assert expand_permutations(r"{salt\, pepper, oil} \{literal\} back\\slash") == [
        "salt, pepper {literal} back\\slash",
        "oil {literal} back\\slash",
    ]


def test_text_without_braces_is_one_prompt() -> None:
    assert expand_permutations("a plain prompt --ar 3:2") == ["a plain prompt --ar 3:2"]
    assert count_permutations("") == 1


def test_limit_is_inclusive_and_the_error_names_the_count() -> None:
    forty = "x {" + ", ".join(str(n) for n in range(8)) + "} {a, b, c, d, e}"
    assert len(expand_permutations(forty)) == MAX_PROMPTS == 40
    with pytest.raises(PromptError) as caught:
        expand_permutations("x {1, 2, 3, 4, 5, 6, 7} {a, b, c, d, e, f}")
    assert "42 prompts" in str(caught.value) and "limit is 40" in str(caught.value)


def test_huge_products_are_refused_without_expanding() -> None:
    text = "x" + " {a, b, c, d}" * 40  # 4**40 prompts: counting must not enumerate them
    with pytest.raises(PromptError) as caught:
        expand_permutations(text)
    assert "more than a million prompts" in str(caught.value)
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize(("text", "brace"), [("a {red, blue car", "{"), ("a red} car", "}"), ("{{a}", "{")])
def test_unbalanced_braces(text: str, brace: str) -> None:
    with pytest.raises(PromptError) as caught:
        expand_permutations(text)
    assert caught.value.value == brace and f"`{brace}`" in str(caught.value)


def test_nesting_depth_is_bounded() -> None:
    assert expand_permutations("{" * MAX_DEPTH + "x" + "}" * MAX_DEPTH) == ["x"]
    with pytest.raises(PromptError, match="nest more than"):
        expand_permutations("{" * (MAX_DEPTH + 1) + "x" + "}" * (MAX_DEPTH + 1))
    with pytest.raises(PromptError):
        plan_prompts("{" * 3000)  # no RecursionError on hostile input


# --- --repeat and plans -------------------------------------------------------------------------


def test_repeat_makes_that_many_jobs() -> None:
    plan = plan_prompts("a fox --repeat 3")
    assert plan.count == 3 and plan.needs_confirmation
    assert plan.params == [parse_prompt("a fox")] * 3
    assert plan_prompts("a fox --r 1").count == 1
    assert not plan_prompts("a fox").needs_confirmation


def test_repeat_multiplies_permutations() -> None:
    plan = plan_prompts("a {fox, owl} --r 4")
    assert [p.prompt for p in plan.params] == ["a fox"] * 4 + ["a owl"] * 4


def test_repeat_and_permutations_share_the_limit() -> None:
    assert plan_prompts("a {fox, owl} --r 20").count == MAX_JOBS
    with pytest.raises(PromptError) as caught:
        plan_prompts("a {fox, owl, cat} --r 20")
    assert "60 jobs" in str(caught.value) and caught.value.parameter == "repeat"
    with pytest.raises(PromptError) as caught:
        plan_prompts("a fox --repeat 41")
    assert "from 1 to 40" in str(caught.value)
    assert plan_prompts("a {fox, owl} --r 3", max_jobs=6).count == 6


def test_problems_of_every_permutation_are_reported_once() -> None:
    with pytest.raises(PromptError) as caught:
        plan_prompts("a {fox, owl} --chaos {5, 500} --zork")
    messages = [problem.message for problem in caught.value.problems]
    assert len(messages) == 2
    assert any("--chaos 500" in m for m in messages) and any("--zork" in m for m in messages)


def test_notes_are_collected_once() -> None:
    plan = plan_prompts("a {fox, owl} --exp 10")
    assert plan.count == 2
    assert len(plan.notes) == 1 and "--exp" in plan.notes[0]


def test_parse_prompt_refuses_several_jobs_clearly() -> None:
    for text in ("a {fox, owl}", "a fox --repeat 2"):
        with pytest.raises(PromptError) as caught:
            parse_prompt(text)
        assert "makes 2 jobs" in str(caught.value)
    assert parse_prompt("a {fox}").prompt == "a fox"
