"""A small English grammar whose sentences carry what the papers measure.

Word frequencies within each class follow Zipf's law (so unigram and bigram
statistics are worth learning first), determiners agree with their noun
(a local, token-level cue), and verbs agree in number with their subject
across prepositional phrases and relative clauses that may hold an
*attractor* noun of the other number (a long-range, abstract cue).
"""

from __future__ import annotations

import random
from typing import NamedTuple

NOUNS = (
    "dog cat teacher student doctor farmer king queen bird horse child man woman "
    "friend author pilot baker singer player driver nurse lawyer artist soldier "
    "officer girl boy neighbor guest manager worker mouse fox wolf lion bear "
    "rabbit tiger monkey sheep goose wizard knight sailor hunter poet clerk "
    "judge chef tourist painter dancer runner writer reader scientist "
    "engineer captain merchant prince princess baby parent uncle aunt cousin "
    "robot ghost giant dragon pirate monk priest guard thief spy visitor"
).split()
OBJECTS = (
    "book car house tree river table letter song apple box door window garden "
    "road bridge story picture ball cake hat lamp chair ship key map coin "
    "flower stone bottle cup plate bell clock basket rope boat wall fence gift "
    "candle mirror drum shirt coat"
).split()
PLACES = "park city forest village school market station castle harbor library kitchen valley".split()
IRREGULAR_PLURALS = {
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "sheep": "sheep",
    "goose": "geese",
    "knife": "knives",
    "wolf": "wolves",
    "thief": "thieves",
    "shelf": "shelves",
}
# Verbs whose two forms must differ (sheep-like nouns are kept out of agreement prompts).
INTRANSITIVE_VERBS = (
    "sleep run laugh smile wait sing dance swim cry shout arrive leave work "
    "rest travel play jump fall listen whisper complain agree wander hide"
).split()
TRANSITIVE_VERBS = (
    "see like love find watch help carry follow know admire push pull visit "
    "paint build read write open close bring hold want need fix clean draw"
).split()
ADJECTIVES = (
    "old young big small happy sad tall short red green quiet loud brave "
    "clever kind angry tired hungry strange famous rich poor lazy busy "
    "gentle wild proud calm"
).split()
ADVERBS = "often never always quickly slowly rarely happily quietly suddenly usually".split()
PREPOSITIONS = "near behind beside with above under beyond".split()
MODALS = "will can must should might".split()
CONJUNCTIONS = ("and", "but", "because", "while", "although")

SINGULAR, PLURAL = "sg", "pl"
DETERMINERS = {
    SINGULAR: ("the", "a", "this", "that", "every", "one"),
    PLURAL: ("the", "some", "these", "those", "many", "two"),
}


def plural_noun(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person_singular(verb: str) -> str:
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


class AgreementItem(NamedTuple):
    """A prompt that ends right before a verb whose number it determines."""

    prompt: str
    correct_verb: str
    wrong_verb: str
    subject_number: str
    has_attractor: bool


class Grammar:
    """Seeded sentence generator; every sampling choice draws from ``rng``."""

    def __init__(self, seed: int, zipf_exponent: float = 1.1):
        self.rng = random.Random(seed)
        self.zipf_exponent = zipf_exponent
        self._weights: dict[int, list[float]] = {}

    def pick(self, words: tuple[str, ...] | list[str]) -> str:
        """Zipf-distributed choice: the word at rank r has weight 1 / (r + 1) ** s."""
        weights = self._weights.get(len(words))
        if weights is None:
            weights = [1.0 / (rank + 1) ** self.zipf_exponent for rank in range(len(words))]
            self._weights[len(words)] = weights
        return self.rng.choices(words, weights=weights)[0]

    def number(self) -> str:
        return self.rng.choice((SINGULAR, PLURAL))

    def noun_phrase(self, number: str, nouns: list[str] | None = None) -> str:
        noun = self.pick(nouns or NOUNS)
        noun = plural_noun(noun) if number == PLURAL else noun
        words = [self.rng.choice(DETERMINERS[number])]
        while self.rng.random() < 0.3 and len(words) < 3:
            words.append(self.pick(ADJECTIVES))
        words.append(noun)
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)

    def verb(self, verbs: list[str], number: str) -> str:
        lemma = self.pick(verbs)
        return third_person_singular(lemma) if number == SINGULAR else lemma

    def modifier(self, depth: int) -> str:
        """A phrase between subject and verb; its noun's number is independent of the subject's."""
        attractor_number = self.number()
        if depth < 1 and self.rng.random() < 0.35:
            relative_number = self.number()
            return f"that {self.noun_phrase(relative_number)} {self.verb(TRANSITIVE_VERBS, relative_number)}"
        return f"{self.pick(PREPOSITIONS)} {self.noun_phrase(attractor_number, NOUNS + PLACES)}"

    def predicate(self, number: str) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return f"{'is' if number == SINGULAR else 'are'} {self.pick(ADJECTIVES)}"
        if roll < 0.25:
            return f"{self.pick(MODALS)} {self.pick(INTRANSITIVE_VERBS)}"
        adverb = f"{self.pick(ADVERBS)} " if self.rng.random() < 0.2 else ""
        if roll < 0.55:
            return adverb + self.verb(INTRANSITIVE_VERBS, number)
        obj = self.noun_phrase(self.number(), OBJECTS + NOUNS)
        place = f" in the {self.pick(PLACES)}" if self.rng.random() < 0.2 else ""
        return f"{adverb}{self.verb(TRANSITIVE_VERBS, number)} {obj}{place}"

    def clause(self, depth: int = 0) -> str:
        number = self.number()
        subject = self.noun_phrase(number)
        if self.rng.random() < 0.45:
            subject += " " + self.modifier(depth)
        text = f"{subject} {self.predicate(number)}"
        if depth < 1 and self.rng.random() < 0.15:
            text += f" {self.rng.choice(CONJUNCTIONS)} {self.clause(depth + 1)}"
        return text

    def sentence(self) -> str:
        return self.clause() + " ."

    def document(self, min_sentences: int = 3, max_sentences: int = 8) -> str:
        count = self.rng.randint(min_sentences, max_sentences)
        return " ".join(self.sentence() for _ in range(count))

    def agreement_item(self, subject_number: str, with_attractor: bool) -> AgreementItem:
        """A subject (optionally with a prepositional attractor of the other number) and its verb."""
        countable = [n for n in NOUNS if plural_noun(n) != n]
        subject = self.noun_phrase(subject_number, countable)
        if with_attractor:
            other = PLURAL if subject_number == SINGULAR else SINGULAR
            subject += f" {self.pick(PREPOSITIONS)} {self.noun_phrase(other, countable)}"
        lemma = self.pick(INTRANSITIVE_VERBS + TRANSITIVE_VERBS)
        singular, plural = third_person_singular(lemma), lemma
        correct, wrong = (singular, plural) if subject_number == SINGULAR else (plural, singular)
        return AgreementItem(subject, correct, wrong, subject_number, with_attractor)


def flip_subject_number(item: AgreementItem) -> AgreementItem:
    """The same prompt with its subject in the other number (determiner and head noun swapped, word
    for word), so the agreeing verb swaps too: the corrupted counterpart used by attribution."""
    words = item.prompt.split()
    head = next(index for index, word in enumerate(words[1:], 1) if word not in ADJECTIVES)
    other = PLURAL if item.subject_number == SINGULAR else SINGULAR
    singular_of = {plural_noun(noun): noun for noun in NOUNS}
    words[head] = plural_noun(words[head]) if other == PLURAL else singular_of[words[head]]
    determiner = "a" if words[0] == "an" else words[0]
    words[0] = DETERMINERS[other][DETERMINERS[item.subject_number].index(determiner)]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return AgreementItem(" ".join(words), item.wrong_verb, item.correct_verb, other, item.has_attractor)


def vocabulary() -> set[str]:
    """Every word the grammar can write, for checking that the tokenizer keeps them whole."""
    words = {"is", "are", "that", "in", "an", ".", *ADJECTIVES, *ADVERBS, *PREPOSITIONS, *MODALS, *CONJUNCTIONS}
    for determiners in DETERMINERS.values():
        words.update(determiners)
    for noun in NOUNS + OBJECTS + PLACES:
        words.update((noun, plural_noun(noun)))
    for verb in INTRANSITIVE_VERBS + TRANSITIVE_VERBS:
        words.update((verb, third_person_singular(verb)))
    return words
