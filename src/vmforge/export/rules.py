"""Rules as data: what a target accepts, each rule with its id, its words and its source.

A profile is a list of ``Rule``s. Each rule's ``check`` looks at a ``Subject`` (the file
being validated, with its facts gathered lazily) and returns ``None`` when the file
keeps the rule (or the rule does not apply to what the file is) and a one-line detail
when the file breaks it. ``validate`` runs every rule, so a report names every rule a
file breaks, not just the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import ExportRequest
    from .facts import Subject

Check = Callable[["Subject"], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One requirement of a target: ``id`` like ``azure.fixed``, and where it comes from."""

    id: str
    description: str
    source: str
    check: Check


@dataclass(frozen=True)
class Profile:
    """A target: its rules, and how an export for it is made.

    ``build(request, path)`` writes the output at ``path`` (a private name the caller
    renames into place once the output validates) and returns notes to print, such as
    the Glance formats; ``notes(subject)`` adds such facts to a validation report.
    ``stream(request, fd)``, for targets whose output can be written in order, writes
    it to a pipe or socket (``export -o -``).
    """

    name: str
    summary: str
    rules: tuple[Rule, ...]
    build: Callable[[ExportRequest, str], dict[str, Any]]
    #: output names the target's files carry; the first is what a bare name gets
    extensions: tuple[str, ...] = ()
    notes: Callable[[Subject], dict[str, Any]] | None = None
    stream: Callable[[ExportRequest, int], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Finding:
    """A rule the file breaks, with what was found."""

    rule: Rule
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule.id, "description": self.rule.description,
                "detail": self.detail, "source": self.rule.source}


@dataclass
class Report:
    """The verdict of one target's rules on one file."""

    target: str
    path: str
    kind: str
    checked: list[str]
    findings: list[Finding]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "file": self.path, "kind": self.kind, "valid": self.ok,
                "violations": [f.to_dict() for f in self.findings], "checked": self.checked,
                **self.notes}


def run_rules(target: str, rules: tuple[Rule, ...], subject: Subject) -> Report:
    """Every rule of ``rules`` against ``subject``, in order."""
    findings = []
    for rule in rules:
        detail = rule.check(subject)
        if detail is not None:
            findings.append(Finding(rule, detail))
    return Report(target, subject.path, subject.kind, [r.id for r in rules], findings)
