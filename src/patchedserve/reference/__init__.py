"""Reference path: whole-image, one-request generation with our own pieces, and its diffusers oracle.

`ReferencePipeline` is what the patched engine must reproduce; `diffusers_generate` is what the
reference itself is checked against. The CLI's ``generate`` and ``run`` commands live in `commands`.
"""

from patchedserve.reference.diffusers_baseline import diffusers_generate
from patchedserve.reference.pipeline import ReferencePipeline, ReferenceResult

__all__ = ["ReferencePipeline", "ReferenceResult", "diffusers_generate"]
