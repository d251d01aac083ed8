"""difflower.validate: parity metrics, gates, the validate report and benchmark support.

The package is also callable: `difflower.validate(artifact, reference, ...)` runs
`difflower.validate.parity.validate_artifact`, as DESIGN.md's public surface has it.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, artifact: Any, reference: Any, **options: Any):
        from difflower.validate.parity import validate_artifact

        return validate_artifact(artifact, reference, **options)


sys.modules[__name__].__class__ = _CallableModule
