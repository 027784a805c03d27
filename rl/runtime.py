"""Process-wide settings, made once at start-up (the CLI, or a Ray Train worker) — never in constructors.

* ``TOKENIZERS_PARALLELISM``, transformers/diffusers verbosity, Ray usage stats off: quiet, fork-safe workers.
* A stderr handler for tandem's own loggers (``tandem.*``) at ``--log-level`` (default info).
* With ``decoder.compile`` or ``ar.compile``: the 30 DiT blocks share one code object and dynamo keeps one compiled
  variant per input layout (grad and no-grad, LoRA adapters merged or not, glyph lengths, view inputs), and a token sampler's compiled decode step one per
  batch size and cache length; a job meets about 9, and past dynamo's default limit of 8 a variant silently runs
  eager, so the limit is raised to ``COMPILED_VARIANTS``. Inductor's coalesce
  tiling analysis is turned off: in torch 2.11 it asserts on the blocks' backward on CUDA.
"""

from __future__ import annotations

import logging
import os
import sys

COMPILED_VARIANTS = 32
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_environment() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the progress bar readable
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def configure_logging(level: str = "info") -> None:
    """tandem's messages (loggers ``tandem.*``) at ``level`` and above on stderr, one line each (``--log-level``).
    Other libraries' loggers are left as they are."""
    logger = logging.getLogger("tandem")
    logger.setLevel(level.upper())
    for old in [h for h in logger.handlers if getattr(h, "_tandem", False)]:  # a second call replaces the first's
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tandem %(levelname)s %(name)s: %(message)s"))
    handler._tandem = True
    logger.addHandler(handler)


def configure_torch(cfg) -> None:
    """torch settings a job's config asks for (``cfg``: the job config)."""
    if cfg.decoder.compile or cfg.ar.compile:
        import torch
        import torch._inductor.config as inductor

        inductor.triton.coalesce_tiling_analysis = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)
