"""Which pip extra provides each optional module a command needs, and the one-line error when
one is missing: `rankops eval` on the core install says `pip install "rankops[eval]"`, not a
traceback."""
import importlib.util
from typing import Optional

# module -> the extra of pyproject.toml that installs it
EXTRA_OF = {"transformers": "eval", "tqdm": "eval", "gguf": "eval", "accelerate": "eval",
            "rdata": "eval", "safetensors": "eval", "matplotlib": "eval",
            "torchmetrics": "torchmetrics", "lm_eval": "lm-eval", "triton": "triton"}


def install_hint(module: str) -> str:
    extra = EXTRA_OF.get(module.split(".")[0])
    if extra is None:
        return f"pip install {module.split('.')[0]}"
    return f'pip install "rankops[{extra}]" (in a source checkout: pip install -e ".[{extra}]")'


def missing_message(module: str) -> str:
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    what = f"the [{extra}] extra's {top}" if extra else top
    return f"{what} is not installed: {install_hint(top)}"


def first_missing(*modules: str) -> Optional[str]:
    """The one-line message for the first of `modules` that cannot be imported, or None."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, a broken entry in sys.modules
            found = False
        if not found:
            return missing_message(module)
    return None
