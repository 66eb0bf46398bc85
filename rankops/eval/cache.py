"""rankops' cache folder: $RANKOPS_CACHE, else ~/.cache/rankops. GGUF conversions (gguf/) and
the built-in corpora's unpacked Debian packages (corpora/debian/) live there."""
import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    return Path(os.environ.get("RANKOPS_CACHE") or Path.home() / ".cache" / "rankops").expanduser()
