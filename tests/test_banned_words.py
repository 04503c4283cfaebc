"""Banned words: normalised whole-word matching, phrases, prefixes, evasions, and the owner's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.banned_words import (
    BannedWordRules,
    banned_words_message,
    check_prompt,
    parse_file,
    parse_list,
)
from bot.settings import BotSettings


def rules(*terms: str) -> BannedWordRules:
    return BannedWordRules.from_terms(terms)


@pytest.mark.parametrize(
    "prompt",
    ["a NUDE statue", "a Nude statue", "a ＮＵＤＥ statue", "a nüde statue", "a nude, statue", "nude"],
)
def test_case_width_and_accents_are_folded(prompt: str) -> None:
    """Upper case, full-width letters (NFKC) and accents all read as the plain word."""
    assert check_prompt(prompt, rules("nude")) == ["nude"]


@pytest.mark.parametrize("prompt", ["grape harvest", "therapist at work", "a drape", "rapeseed field"])
def test_only_whole_words_match(prompt: str) -> None:
    """A banned word inside a longer word is not a match."""
    assert check_prompt(prompt, rules("rape")) == []


def test_plural_needs_a_prefix_term() -> None:
    """``nude`` does not catch ``nudes``; ``nud*`` catches every word starting with it."""
    assert check_prompt("two nudes", rules("nude")) == []
    assert check_prompt("two nudes", rules("nud*")) == ["nud*"]
    assert check_prompt("nudity in art", rules("nud*")) == ["nud*"]
    assert check_prompt("a nudge", rules("nud*")) == ["nud*"]  # the owner chose a short prefix
    assert check_prompt("a new day", rules("nud*")) == []


@pytest.mark.parametrize(
    "prompt", ["bare skin", "BARE   skin", "bare_skin", "bare-skin", "a bare\nskin study", "bare, skin"]
)
def test_phrases_match_across_any_separator(prompt: str) -> None:
    """A phrase matches its words in order with any non-letter between them."""
    assert check_prompt(prompt, rules("bare skin")) == ["bare skin"]


def test_phrase_words_out_of_order_or_apart_do_not_match() -> None:
    """The phrase's words must be adjacent and in order."""
    assert check_prompt("skin that is bare", rules("bare skin")) == []
    assert check_prompt("bare feet and skin", rules("bare skin")) == []


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("nud3 portrait", "nude"),
        ("$ex scene", "sex"),
        ("s3x scene", "sex"),
        ("g0re", "gore"),
        ("1ewd pose", "lewd"),
        ("k1ll", "kill"),
        ("bl00dy @rt", "bloody"),
        ("@rt", "art"),
    ],
)
def test_leetspeak_reads_as_letters(prompt: str, term: str) -> None:
    """Digits and symbols standing for letters are read as those letters ("1" as i and as l)."""
    assert check_prompt(prompt, rules(term)) == [term]


@pytest.mark.parametrize(
    "prompt", ["n u d e", "N.U.D.E woman", "n-u-d-e", "draw a n u d e woman", "n_u_d_e", "n u d 3"]
)
def test_spelled_out_letters_are_joined(prompt: str) -> None:
    """Letters written one by one, with any separator, count as the word they spell."""
    assert check_prompt(prompt, rules("nude")) == ["nude"]


def test_spelled_out_phrase_is_joined() -> None:
    """A spelled-out phrase is found without its space."""
    assert check_prompt("b a r e s k i n", rules("bare skin")) == ["bare skin"]


def test_normal_short_words_are_not_joined_into_matches() -> None:
    """Ordinary one- and two-letter words do not trigger the spelled-out check."""
    assert check_prompt("a cat in a hat on a mat", rules("cat hat", "nude")) == []
    assert check_prompt("a class of students", rules("ass")) == []


def test_returns_terms_as_written_in_rule_order_once() -> None:
    """Matches come back as the owner wrote them, in the list's order, each once."""
    owner = rules("Gore", "nude", "bare skin", "NUDE", "  ")
    assert [term.text for term in owner.terms] == ["Gore", "nude", "bare skin"]
    assert check_prompt("nude gore, bare skin, more gore and nude", owner) == ["Gore", "nude", "bare skin"]


def test_empty_rules_or_prompt_match_nothing() -> None:
    """No rules, or an empty prompt, never match."""
    assert check_prompt("anything at all", BannedWordRules()) == []
    assert check_prompt("", rules("nude")) == []
    assert not BannedWordRules() and rules("x")


def test_terms_without_letters_are_ignored() -> None:
    """A term made only of punctuation would match nothing sensible, so it is dropped."""
    assert rules("***", "--", "#").terms == ()


def test_parse_list_and_file() -> None:
    """The setting splits on commas; the file has one term a line and # comments."""
    assert parse_list(" nude , bare skin,,gore ") == ["nude", "bare skin", "gore"]
    text = "# house rules\nnude\n\n  bare skin   # phrase\n#gore\nkill*\n"
    assert parse_file(text) == ["nude", "bare skin", "kill*"]


def test_rules_from_settings_merge_list_and_file(tmp_path: Path) -> None:
    """BANNED_WORDS and BANNED_WORDS_FILE both contribute, duplicates once."""
    words_file = tmp_path / "banned.txt"
    words_file.write_text("# extra\ngore\nNude\n", encoding="utf-8")
    settings = BotSettings(_env_file=None, banned_words="nude, bare skin", banned_words_file=words_file)
    owner = BannedWordRules.from_settings(settings)
    assert [term.text for term in owner.terms] == ["nude", "bare skin", "gore"]
    assert check_prompt("GORE and NUDE", owner) == ["nude", "gore"]


def test_rules_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings read BANNED_WORDS from the environment; unset means no rules."""
    assert not BannedWordRules.from_settings(BotSettings(_env_file=None))
    monkeypatch.setenv("BANNED_WORDS", "nude,gore")
    assert check_prompt("gore", BannedWordRules.from_settings(BotSettings(_env_file=None))) == ["gore"]


def test_missing_rules_file_is_an_error(tmp_path: Path) -> None:
    """A configured file that is not there stops startup instead of silently allowing everything."""
    settings = BotSettings(_env_file=None, banned_words_file=tmp_path / "missing.txt")
    with pytest.raises(OSError):
        BannedWordRules.from_settings(settings)


def test_message_names_the_matched_terms() -> None:
    """The member is told which terms to change, each in code formatting."""
    one = banned_words_message(["nude"])
    assert "a word" in one and "`nude`" in one
    many = banned_words_message(["nude", "bare skin"])
    assert "words" in many and "`nude`" in many and "`bare skin`" in many
    assert "`it's`" in banned_words_message(["it`s"])  # a backtick cannot break the formatting
