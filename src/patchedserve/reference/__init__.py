"""Reference path: whole-image, one-request generation with our own pieces, and its diffusers oracle.

`ReferencePipeline` is what the patched engine must reproduce; `diffusers_generate` is what the
reference itself is checked against. The CLI's ``generate`` and ``run`` commands live in `commands`.
The names load on first use (`patchedserve._lazy`), so the CLI's parser does without torch.
"""

from typing import TYPE_CHECKING

from patchedserve._lazy import lazy_exports

if TYPE_CHECKING:
    from patchedserve.reference.diffusers_baseline import diffusers_generate as diffusers_generate
    from patchedserve.reference.pipeline import ReferencePipeline as ReferencePipeline
    from patchedserve.reference.pipeline import ReferenceResult as ReferenceResult

_MODULES = {
    "ReferencePipeline": "pipeline",
    "ReferenceResult": "pipeline",
    "diffusers_generate": "diffusers_baseline",
}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
