"""The vote vocabulary, defined once: the choices, which are preferences, how each reads as a
comparison outcome, its label, and how a gold answer is graded.

Pure Python: the web, the exports, the rating maths and the worker all import it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

# The longest client-measured time from images loaded to click that is stored (a day): anything
# longer is a clock problem, not a vote.
MAX_LATENCY_MS = 24 * 3600 * 1000


class Outcome(IntEnum):
    """A comparison's result from the first (left, `model_a`) item's point of view."""

    A = 0  # the first item won
    B = 1  # the second item won
    TIE = 2


class Choice(StrEnum):
    """What an annotator answered on a pair, as seen on the screen."""

    LEFT = "left"
    RIGHT = "right"
    TIE = "tie"
    BOTH_BAD = "both_bad"
    SKIP = "skip"

    @property
    def is_preference(self) -> bool:
        """Counts as an answer: takes one of the pair's wanted votes (a skip does not)."""
        return self is not Choice.SKIP

    @property
    def is_decisive(self) -> bool:
        """Prefers one image: the only votes reward models and DPO learn a direction from."""
        return self in (Choice.LEFT, Choice.RIGHT)

    @property
    def outcome(self) -> Outcome | None:
        """The comparison outcome for ratings: "both bad" is a tie, a skip is no data."""
        return _OUTCOMES[self]

    @property
    def p_left(self) -> float | None:
        """P(left preferred) the vote states: 1, 0, ½ for a tie or both bad; None for a skip."""
        return _P_LEFT[self]

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def fastchat_winner(self) -> str | None:
        """FastChat's `winner` for the vote, `model_a` being the left image's model."""
        return _FASTCHAT_WINNER[self]


_OUTCOMES: dict[Choice, Outcome | None] = {
    Choice.LEFT: Outcome.A,
    Choice.RIGHT: Outcome.B,
    Choice.TIE: Outcome.TIE,
    Choice.BOTH_BAD: Outcome.TIE,
    Choice.SKIP: None,
}
_P_LEFT: dict[Choice, float | None] = {
    Choice.LEFT: 1.0,
    Choice.RIGHT: 0.0,
    Choice.TIE: 0.5,
    Choice.BOTH_BAD: 0.5,
    Choice.SKIP: None,
}
_FASTCHAT_WINNER: dict[Choice, str | None] = {
    Choice.LEFT: "model_a",
    Choice.RIGHT: "model_b",
    Choice.TIE: "tie",
    Choice.BOTH_BAD: "tie (bothbad)",
    Choice.SKIP: None,
}
_LABELS = {
    Choice.LEFT: "Left",
    Choice.RIGHT: "Right",
    Choice.TIE: "Tie",
    Choice.BOTH_BAD: "Both bad",
    Choice.SKIP: "Skip",
}

CHOICES: tuple[str, ...] = tuple(c.value for c in Choice)
PREFERENCES: tuple[str, ...] = tuple(c.value for c in Choice if c.is_preference)
DECISIVE: tuple[str, ...] = tuple(c.value for c in Choice if c.is_decisive)


def parse_choice(value: str) -> Choice:
    """The choice `value` names; ValueError listing the valid ones otherwise."""
    try:
        return Choice(value)
    except ValueError:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, not {value!r}") from None


def gold_answer(expected: str, left_image_id: str, right_image_id: str) -> Choice:
    """The choice a gold pair expects from an annotator who saw it in this order.

    `expected` is the pair's gold answer: the id of the better image, or "tie".
    """
    if expected == Choice.TIE:
        return Choice.TIE
    return Choice.LEFT if expected == left_image_id else Choice.RIGHT


def gold_correct(choice: str, answer: str | None) -> bool | None:
    """Whether a vote gave the gold answer; None when there is nothing to grade (no gold
    answer, or a skip, which is not an answer)."""
    if answer is None or choice == Choice.SKIP:
        return None
    return choice == answer
