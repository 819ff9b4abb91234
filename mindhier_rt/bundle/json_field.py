"""A JSON value and where it sits in a document, for readers that check field by field with messages that say
both (the manifest, the TensorRT plan section)."""

from __future__ import annotations

import json
from typing import Any

from mindhier_rt.bundle.files import check_name
from mindhier_rt.errors import BundleError


class JsonField:
    """A JSON value and where it sits (``graphs.context.inputs[0].shape``), for messages that say both."""

    def __init__(self, value: Any, where: str, source: str) -> None:
        self.value, self.where, self.source = value, where, source

    @property
    def label(self) -> str:
        return f"manifest field {self.where}" if self.where else "manifest"

    def error(self, expected: str) -> BundleError:
        found = json.dumps(self.value)
        found = found if len(found) <= 80 else found[:77] + "..."
        return BundleError(f"{self.source}: {self.label}: expected {expected}, found {found}")

    def _kind(self, kind: type | tuple[type, ...], name: str) -> Any:
        if not isinstance(self.value, kind) or (isinstance(self.value, bool) and kind is not bool):
            raise self.error(name)
        return self.value

    def obj(self) -> dict[str, Any]:
        return self._kind(dict, "an object")

    def list(self) -> list[Any]:
        return self._kind(list, "a list")

    def str(self) -> str:
        return self._kind(str, "a string")

    def int(self, minimum: int | None = 0) -> int:
        value = self._kind(int, "an integer")
        if minimum is not None and value < minimum:
            raise self.error(f"an integer >= {minimum}")
        return value

    def bool(self) -> bool:
        return self._kind(bool, "true or false")

    def key(self, name: str) -> JsonField:
        d = self.obj()
        if name not in d:
            raise BundleError(f"{self.source}: {self.label}: missing key {name!r}")
        return JsonField(d[name], f"{self.where}.{name}" if self.where else name, self.source)

    def opt(self, name: str) -> JsonField | None:
        return self.key(name) if name in self.obj() else None

    def items(self) -> list[tuple[str, JsonField]]:
        return [(k, JsonField(v, f"{self.where}.{k}" if self.where else k, self.source)) for k, v in self.obj().items()]

    def elements(self) -> list[JsonField]:
        return [JsonField(v, f"{self.where}[{i}]", self.source) for i, v in enumerate(self.list())]

    def file(self) -> str:
        return check_name(self.value, f"{self.source}: manifest field {self.where}")
