"""The embedded benchmark's world: a word-level tokenizer, a pretraining corpus and a GSM8K-like task.

Everything is generated from a seed, in process, so every run sees the same data.

A problem is a story with one or two changes to a count, and its question:

    question  "ann has 12 apples . ann buys 7 more . ann eats 5 . how many apples does ann have ?"
    answer    "12 + 7 = 19 . 19 - 5 = 14 . #### 14"

Pretraining teaches the skill and a prior against using it: a story followed
by its worked equations (no question, no `####`), equations followed by
`#### result` (no story), and stories followed by their question, of which
only one in ANSWERED_EVERY is answered (the equations and `#### n` after the
question mark); the others end at the question mark. So the base can solve the
problem, but the likelier continuation of a question is the end of the line,
and greedy decoding stops there: before fine-tuning it scores near 0%.
Fine-tuning teaches it to answer every question, as MetaMathQA teaches a base
model that already does arithmetic GSM8K's format and when to use it. The
change is one decision at the question mark, which every correct variant can
make, gains included (IA3 and the AntiPaSTO family only rescale what the base
computes). Test problems are held out: no test question (names, objects,
numbers, verbs) is in the training split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWERED_EVERY = 4  # pretraining answers one question in this many; the others end the line
MAX_NUMBER = 20  # every number in the world (operands and results) is in 0..MAX_NUMBER
NAMES = ["ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal", "ivy", "jon"]
OBJECTS = ["apples", "pens", "coins", "cards", "eggs", "books", "shells", "stamps"]
GAIN = ["buys", "finds", "gets", "wins"]  # "+"
LOSS = ["eats", "loses", "sells", "drops"]  # "-"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
WORDS = ["has", "more", "how", "many", "does", "have", "?", ".", "+", "-", "=", "####"]


class Tokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; every number 0..MAX_NUMBER is one token."""

    def __init__(self) -> None:
        numbers = [str(n) for n in range(MAX_NUMBER + 1)]
        self.vocab = [PAD, BOS, EOS, *WORDS, *NAMES, *OBJECTS, *GAIN, *LOSS, *numbers]
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))


@dataclass(frozen=True)
class Problem:
    question: str  # the story and its question
    answer: str  # the worked equations and "#### n"
    result: int


def make_problem(rng: random.Random) -> Problem:
    """One story with one or two changes to a count; numbers stay in 0..MAX_NUMBER."""
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(0, MAX_NUMBER)
    story = [f"{name} has {value} {thing} ."]
    steps = []
    for _ in range(rng.randint(1, 2)):
        if value == 0 or (value < MAX_NUMBER and rng.random() < 0.5):
            amount = rng.randint(1, MAX_NUMBER - value)
            story.append(f"{name} {rng.choice(GAIN)} {amount} more .")
            steps.append(f"{value} + {amount} = {value + amount} .")
            value += amount
        else:
            amount = rng.randint(1, value)
            story.append(f"{name} {rng.choice(LOSS)} {amount} .")
            steps.append(f"{value} - {amount} = {value - amount} .")
            value -= amount
    question = " ".join([*story, f"how many {thing} does {name} have ?"])
    return Problem(question, " ".join([*steps, f"#### {value}"]), value)


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """n lines, a third of each kind: a story and its worked equations, equations and their result, a story
    and its question; one question in ANSWERED_EVERY is followed by its answer, the others end the line."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        problem = make_problem(rng)
        steps = problem.answer.split(" #### ")[0]
        story = problem.question[: problem.question.index(" how many")]
        asked = f"{problem.question} {problem.answer}" if (i // 3) % ANSWERED_EVERY == 0 else problem.question
        lines.append([f"{story} {steps}", problem.answer, asked][i % 3])
    rng.shuffle(lines)
    return lines


def splits(n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Distinct problems; the test questions never occur in the training split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_test:
        problem = make_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems[n_test:], problems[:n_test]
