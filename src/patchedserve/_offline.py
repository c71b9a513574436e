"""Switches the Hugging Face libraries to offline mode before they are imported.

Imported first by the package ``__init__``: nothing in PatchedServe may touch the network, so a
missing file must surface as a clear error rather than a download attempt.
"""

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
