"""Request and response bodies for projects, prompts and annotators."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


class ProjectSettings(BaseModel):
    """Per-project knobs; every field has a default so a project works out of the box."""

    model_config = ConfigDict(extra="forbid")

    votes_per_pair: int = Field(default=3, ge=1, le=100, description="overlap k")
    gold_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    reservation_minutes: float = Field(default=5.0, gt=0, le=240)
    tie_policy: Literal["drop", "soft"] = "drop"
    active_sampling: bool = False
    # Share of pairs served at random even with active sampling, so estimates stay unbiased.
    random_floor: float = Field(default=0.2, ge=0.0, le=1.0)
    votes_per_second: float = Field(default=5.0, gt=0, le=100)
    change_vote_seconds: int = Field(default=60, ge=0, le=3600)
    reveal_gold: bool = False
    train_pairs_per_prompt: int = Field(default=2, ge=0, le=100)
    # Votes cast sooner after the pair was shown are refused (0: no minimum).
    min_view_ms: int = Field(default=500, ge=0, le=60_000)
    # An annotator whose gold accuracy is surely below this (upper Wilson bound) is flagged.
    min_gold_accuracy: float = Field(default=0.7, ge=0.0, le=1.0)
    # Flagged annotators' votes are left out of ratings, reward models and DPO snapshots.
    exclude_flagged: bool = True
    # A lead's decisions by hand (user ids), over the rule: always left out / always kept.
    excluded_annotators: list[int] = Field(default_factory=list, max_length=10_000)
    included_annotators: list[int] = Field(default_factory=list, max_length=10_000)
    question: str = Field(
        default="Which image fits the prompt better?", min_length=1, max_length=300
    )
    # Markdown shown (as text, never raw HTML) on the vote page.
    guidelines: str = Field(default="", max_length=20_000)
    # What a lead asks of one sitting; the vote page shows progress towards it (0: no target).
    session_target: int = Field(
        default=0, ge=0, le=10_000, description="votes asked of an annotator per session (0: none)"
    )


def _strip_not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


# A project's or a model version's name, kept without the spaces around it.
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_strip_not_blank)]


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: str = Field(default="", max_length=5000)
    settings: ProjectSettings = Field(default_factory=ProjectSettings)


class ProjectUpdate(BaseModel):
    """A rename, a new description and/or (un)archiving; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    description: str | None = Field(default=None, max_length=5000)
    archived: bool | None = None


class ProjectPublic(BaseModel):
    id: int
    name: str
    description: str
    settings: ProjectSettings
    archived: bool = False


# Limits on a prompt wherever it comes from (API, files, imported datasets): a caption of
# megabytes would be carried into every page, export and training batch that shows it.
PROMPT_TEXT_MAX = 2000
TAG_MAX = 100
TAGS_MAX = 50


class PromptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=PROMPT_TEXT_MAX)
    split: Literal["train", "val", "test"] = "train"
    tags: list[Annotated[str, Field(max_length=TAG_MAX)]] = Field(
        default_factory=list, max_length=TAGS_MAX
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("tags")
    @classmethod
    def _no_nul(cls, value: list[str]) -> list[str]:
        if any("\x00" in tag for tag in value):
            raise ValueError("must not contain NUL characters")
        return value


class PromptUpdate(BaseModel):
    """Edit one prompt; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, min_length=1, max_length=PROMPT_TEXT_MAX)
    split: Literal["train", "val", "test"] | None = None
    tags: list[Annotated[str, Field(max_length=TAG_MAX)]] | None = Field(
        default=None, max_length=TAGS_MAX
    )
    archived: bool | None = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return None if value is None else PromptIn._not_blank(value)

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        value = PromptIn._no_nul(value)
        # Blank tags and repeats carry nothing (the form splits on commas).
        return list(dict.fromkeys(t.strip() for t in value if t.strip()))


class PromptPublic(BaseModel):
    id: int
    project_id: int
    text: str
    split: str
    tags: list[str]
    archived: bool


class PromptsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptIn] = Field(min_length=1, max_length=100_000)


class AnnotatorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)


class MemberCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)
    role: Literal["lead", "annotator"] = "annotator"


class MemberUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["lead", "annotator"] | None = None
    active: bool | None = None


class MemberPublic(BaseModel):
    user_id: int
    email: str
    role: str
    active: bool
    account_active: bool
