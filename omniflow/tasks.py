"""Tasks as data: which modalities are generated, which condition, which are absent.

A target is noised to a sampled time and is in the loss; a condition is clean (t = 0) and not in
the loss; an absent modality is pure noise (t = 1) and not in the loss, or skipped entirely.
Built in: t2i, i2t, t2a, a2t, i2a, a2i, at2i, it2a, ai2t and joint; `Task.define` makes others.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from omniflow.modality import MODALITIES, Modality, parse_modality

# The condition whose pooled vector (CLIP text, CLIP image or audio embedding) conditions a
# sample when several are present: text first, as SD3 pools its prompt.
POOLED_PRIORITY: tuple[Modality, ...] = (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)


class Role(StrEnum):
    TARGET = "target"
    CONDITION = "condition"
    ABSENT = "absent"


@dataclass(frozen=True)
class Task:
    """A named assignment of a `Role` to every modality.

    Example:
        >>> t = Task.define("ti2a", targets=["audio"], conditions=["text", "image"])
        >>> t.targets, t.conditions
        ((<Modality.AUDIO: 'audio'>,), (<Modality.IMAGE: 'image'>, <Modality.TEXT: 'text'>))
    """

    name: str
    roles: Mapping[Modality, Role]

    @classmethod
    def define(cls, name: str, *, targets: Iterable[str], conditions: Iterable[str] = ()) -> "Task":
        targets = [parse_modality(m) for m in targets]
        conditions = [parse_modality(m) for m in conditions]
        if not targets:
            raise ValueError(f"task {name!r} needs at least one target modality")
        both = set(targets) & set(conditions)
        if both:
            raise ValueError(f"task {name!r}: {sorted(both)} cannot be both target and condition")
        roles = {
            m: Role.TARGET if m in targets else Role.CONDITION if m in conditions else Role.ABSENT
            for m in MODALITIES
        }
        return cls(name=name, roles=roles)

    def _with(self, role: Role) -> tuple[Modality, ...]:
        return tuple(m for m in MODALITIES if self.roles[m] == role)

    @property
    def targets(self) -> tuple[Modality, ...]:
        return self._with(Role.TARGET)

    @property
    def conditions(self) -> tuple[Modality, ...]:
        return self._with(Role.CONDITION)

    @property
    def absent(self) -> tuple[Modality, ...]:
        return self._with(Role.ABSENT)

    @property
    def pooled_source(self) -> Modality | None:
        """The condition that supplies the pooled vector, or None (pooled vector zero)."""
        return next((m for m in POOLED_PRIORITY if self.roles[m] == Role.CONDITION), None)


_T, _I, _A = "text", "image", "audio"
BUILTIN_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task.define("t2i", targets=[_I], conditions=[_T]),
        Task.define("i2t", targets=[_T], conditions=[_I]),
        Task.define("t2a", targets=[_A], conditions=[_T]),
        Task.define("a2t", targets=[_T], conditions=[_A]),
        Task.define("i2a", targets=[_A], conditions=[_I]),
        Task.define("a2i", targets=[_I], conditions=[_A]),
        Task.define("at2i", targets=[_I], conditions=[_A, _T]),
        Task.define("it2a", targets=[_A], conditions=[_I, _T]),
        Task.define("ai2t", targets=[_T], conditions=[_A, _I]),
        Task.define("joint", targets=[_I, _T, _A]),
    )
}


def get_task(task: str | Task) -> Task:
    """A built-in task by name (or a `Task`, returned as is)."""
    if isinstance(task, Task):
        return task
    try:
        return BUILTIN_TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; built in: {sorted(BUILTIN_TASKS)}") from None
