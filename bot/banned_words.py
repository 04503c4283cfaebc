"""Owner-configured banned words and phrases, checked on a prompt before a job is accepted.

The rules come from ``BANNED_WORDS`` (comma-separated) and/or ``BANNED_WORDS_FILE`` (one term a
line, ``#`` starts a comment). A term is a word (``nude``), a phrase (``bare skin``) or a prefix
ending in ``*`` (``nud*`` also catches ``nudes`` and ``nudity``). Matching is on whole words of the
normalised prompt, so ``grape`` never trips ``rape``:

- Unicode NFKC and case folding, accents dropped (``ＮＵＤＥ``, ``Nüde`` and ``nude`` are one word);
- anything that is not a letter or digit separates words, so ``bare_skin`` and ``bare-skin``
  match the phrase ``bare skin``;
- simple evasions: leetspeak digits and symbols (``nud3``, ``$ex``) and letters spelled out one by
  one (``n u d e``, ``n.u.d.e``).

:func:`check_prompt` is pure and returns the terms as the owner wrote them, so the member can be
told which words to change (:func:`banned_words_message`).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Characters commonly typed for letters to get past word filters. "1" reads as "i" or "l", so
# both readings are tried.
_LEET = str.maketrans(
    {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "!": "i"}
)
_ONE_READINGS = ("i", "l")
_WORD = re.compile(r"[^\W_]+")
# Fewest one-character words in a row read as a spelled-out word ("s e x" is three).
_MIN_SPELLED = 3


class BannedWordSettings(Protocol):
    """The two settings the rules are read from (``BotSettings`` has both)."""

    banned_words: str
    banned_words_file: Path | None


@dataclass(frozen=True, slots=True)
class Term:
    """One banned term: as the owner wrote it, and as words to match."""

    text: str
    words: tuple[str, ...]
    prefix: bool  # the last word matches any word it starts (written with a trailing ``*``)


@dataclass(frozen=True, slots=True)
class BannedWordRules:
    """The compiled rules: every term, in the order the owner listed them, without duplicates."""

    terms: tuple[Term, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.terms)

    @classmethod
    def from_terms(cls, terms: Iterable[str]) -> BannedWordRules:
        """Rules from raw terms; blank ones and terms without a letter or digit are skipped."""
        compiled: list[Term] = []
        seen: set[tuple[tuple[str, ...], bool]] = set()
        for raw in terms:
            text = raw.strip()
            prefix = text.endswith("*")
            words = tuple(_words(_fold(text.rstrip("*"))))
            if not words or (words, prefix) in seen:
                continue
            seen.add((words, prefix))
            compiled.append(Term(text=text, words=words, prefix=prefix))
        return cls(tuple(compiled))

    @classmethod
    def from_settings(cls, settings: BannedWordSettings) -> BannedWordRules:
        """Rules from ``BANNED_WORDS`` and ``BANNED_WORDS_FILE``.

        A configured file that cannot be read raises ``OSError``: starting without the owner's
        filter would be worse than not starting.
        """
        terms = parse_list(settings.banned_words)
        if settings.banned_words_file is not None:
            terms += parse_file(settings.banned_words_file.read_text(encoding="utf-8"))
        rules = cls.from_terms(terms)
        if rules:
            log.info("banned words: %d terms", len(rules.terms))
        return rules


def parse_list(value: str) -> list[str]:
    """Terms from a comma-separated setting (``"nude, gore, bare skin"``)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_file(text: str) -> list[str]:
    """Terms from a file's text: one a line, blank lines and ``#`` comments ignored."""
    terms = []
    for line in text.splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(term)
    return terms


def check_prompt(text: str, rules: BannedWordRules) -> list[str]:
    """The banned terms ``text`` contains, as the owner wrote them and in the rules' order.

    Empty when the prompt may run. Every variant of the prompt (as written, with leetspeak read
    as letters, with spelled-out letters joined) is checked against every term. Pass the text
    the image is made from (``GenerationParams.model_prompt``), not the negative prompt: a
    member writing ``--no nudity`` asks for less of it.
    """
    if not rules or not text:
        return []
    variants = _variants(text)
    return [
        term.text for term in rules.terms if any(_contains(words, runs, term) for words, runs in variants)
    ]


def check_prompts(texts: Iterable[str], rules: BannedWordRules) -> list[str]:
    """The banned terms any of ``texts`` contains, each once, in the order they are first met."""
    matched: list[str] = []
    for text in texts:
        matched += [term for term in check_prompt(text, rules) if term not in matched]
    return matched


def banned_words_message(matched: list[str]) -> str:
    """The member-facing refusal naming the terms that matched."""
    shown = ", ".join(f"`{_code_safe(term)}`" for term in matched)
    noun = "a word" if len(matched) == 1 else "words"
    return (
        f"Your prompt contains {noun} this server does not allow: {shown}. Please rephrase it and try again."
    )


def _code_safe(term: str) -> str:
    # A backtick in a term would end the inline code span early.
    return term.replace("`", "'")


def _fold(text: str) -> str:
    """NFKC, case-folded, with combining accents removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch)))


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _spelled_runs(words: list[str]) -> list[str]:
    """Runs of at least three one-character words, joined ("n u d e" -> "nude")."""
    runs: list[str] = []
    current: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1:
            current.append(word)
            continue
        if len(current) >= _MIN_SPELLED:
            runs.append("".join(current))
        current = []
    return runs


def _variants(text: str) -> list[tuple[list[str], list[str]]]:
    """The prompt's word lists to check, each with its spelled-out runs."""
    folded = _fold(text)
    leet = folded.translate(_LEET)
    texts = dict.fromkeys([folded, *(leet.replace("1", one) for one in _ONE_READINGS)])
    variants = []
    for variant in texts:
        words = _words(variant)
        variants.append((words, _spelled_runs(words)))
    return variants


def _contains(words: list[str], runs: list[str], term: Term) -> bool:
    """Whether ``term`` occurs as whole words in ``words``, or spelled out inside a run."""
    size = len(term.words)
    head, last = term.words[:-1], term.words[-1]
    for start in range(len(words) - size + 1):
        if tuple(words[start : start + size - 1]) != head:
            continue
        word = words[start + size - 1]
        if word == last or (term.prefix and word.startswith(last)):
            return True
    # Spelled-out letters carry no word boundaries ("a n u d e"), so look inside the run.
    joined = "".join(term.words)
    return any(joined in run for run in runs)
