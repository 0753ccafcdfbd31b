"""Registries: name -> class, for the extension points of inference (families,
objectives, gradient estimators, discrete q's, optimisers).  A new entry is a
class with a `name` and one `@REGISTRY.register`."""
from __future__ import annotations

from typing import Dict, Type, TypeVar

T = TypeVar("T")


class Registry(Dict[str, type]):
    def register(self, cls: Type[T]) -> Type[T]:
        self[cls.name] = cls
        return cls
