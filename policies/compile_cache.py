"""Where ``torch.compile`` keeps its caches across launches (``model.compile_cache_dir``).

Inductor's FX-graph and autotuning caches and Triton's compiled kernels go under one folder that outlives the job,
so a second launch of the same config on the same machine loads its compiled decoder blocks and AR decode step
instead of compiling them again (Dynamo still traces the Python, which is seconds). The variables a user set
(``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def use_compile_cache(folder: Optional[str]) -> Optional[Path]:
    """Point inductor and Triton at ``folder``/inductor and ``folder``/triton (created); None leaves torch's
    defaults (``/tmp/torchinductor_$USER``). Call before the first compile. Returns the folder used."""
    if not folder:
        return None
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return root
