"""What an ``apply(model)`` replaced: shared by the per-library patchers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PatchReport:
    """What ``apply`` replaced: module names by their library class, and the modules it left alone with why."""

    replaced: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(names) for names in self.replaced.values())

    def add(self, cls_name: str, module_name: str) -> None:
        self.replaced.setdefault(cls_name, []).append(module_name)

    def __str__(self) -> str:
        parts = [f"{len(names)} x {cls}" for cls, names in self.replaced.items()]
        text = "vlcore patched " + (", ".join(parts) if parts else "nothing")
        return text + (f"; skipped {len(self.skipped)}: {self.skipped}" if self.skipped else "")
