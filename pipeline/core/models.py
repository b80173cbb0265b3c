"""Base model provisioning and loading.

`provision_base_model` turns a `ModelSpec` into a plain Hugging Face checkpoint directory, converting once and
reusing the converted copy from the cache: a GGUF file shipped in a PyPI wheel is de-quantised and saved; a tiny
random Llama is built with a tokenizer trained on the run's texts. `load_model` loads a checkpoint directory, a hub
id, a peft adapter folder, or an exported model, in the dtype asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from sentimerge.pipeline.core.config import ModelSpec, RunConfig, TinyModel, suggest
from sentimerge.pipeline.core.errors import ModelError, SentimergeError, first_line
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids
from sentimerge.pipeline.core.pypi import fetch_pypi_file

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def cast_weights(model, dtype: torch.dtype):
    """Cast the parameters and saved buffers to `dtype`, as `from_pretrained(dtype=...)` loads them.

    `model.to(dtype)` would also cast non-persistent buffers such as RoPE's `inv_freq`, which `from_pretrained`
    keeps in float32: a bf16 `inv_freq` moves every position's rotation, and the model scores differently from the
    same weights saved and loaded again (0.756 against 0.762 on the demo's final model)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)
    return model


ATTENTION = {"name": "auto"}  # set per run by `api.session` from the config's `attention`


def set_attention(name: str) -> None:
    """The attention kernel every model this process loads from now on uses: `auto`, `eager` or `sdpa`."""
    if name not in ("auto", "eager", "sdpa"):
        raise ValueError(f"attention must be auto, eager or sdpa, got {name!r}")
    ATTENTION["name"] = name


def attention_kwargs(device: str | torch.device = "cpu") -> dict[str, str]:
    """`from_pretrained` keyword for the attention kernel: with `auto`, eager on CPU and transformers' default
    (sdpa) elsewhere. Prompts here are short (about 100 tokens) and carry padding masks; there, on 2 CPU cores,
    eager attention trains SmolLM2-135M 1.15x and scores it 1.12x faster than CPU sdpa, whose backward alone took
    a fifth of a LoRA training step (benchmarks/results/demo_profile.md). Both compute the same attention."""
    name = ATTENTION["name"]
    if name == "auto":
        name = "eager" if torch.device(device).type == "cpu" else None
    return {"attn_implementation": name} if name else {}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def provision_base_model(spec: ModelSpec, cache_dir: Path, corpus: list[str] | None = None) -> str:
    """A local checkpoint directory (or hub id resolved to one) for `spec`; `corpus` trains a tiny tokenizer."""
    if spec.path is not None:
        path = Path(spec.path)
        check_model_dir(path)
        return str(path)
    if spec.hub is not None:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(spec.hub, revision=spec.revision, cache_dir=cache_dir / "hub")
        except Exception as error:
            raise ModelError(f"base_model.hub: cannot fetch {spec.hub!r}: {first_line(error)}") from None
    if spec.gguf is not None:
        return str(_convert_gguf(spec, cache_dir))
    return str(_build_tiny(spec.tiny, corpus or [], cache_dir))


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: Path) -> None:
    """Fail early, naming the file, when `path` is not a loadable model or adapter directory.

    Checks what can be checked without loading weights: the config parses and names its architecture, the weights
    are there, and an adapter's base model exists when it is a local path.
    """
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    config, adapter = path / "config.json", path / "adapter_config.json"
    if adapter.is_file():
        base = _read_json(adapter).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter}: no `base_model_name_or_path`")
        if looks_local(base) and not Path(base).expanduser().is_dir():
            raise ModelError(f"{adapter}: base model {base} not found (from {Path.cwd()})")
        if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise ModelError(f"{path}: no adapter weights (adapter_model.safetensors)")
    elif config.is_file():
        if not _read_json(config).get("model_type"):
            raise ModelError(f"{config}: no `model_type`; not a transformers model config")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelError(f"{path}: no weights (model.safetensors or an index of shards)")
    else:
        raise ModelError(f"{path}: not a model directory (no config.json or adapter_config.json)")


def looks_local(ref: str) -> bool:
    """Whether a model reference is a local path rather than a hub id (`org/name`): it starts with `.`, `/` or `~`,
    or has more than two parts (`runs/demo/shared/model`)."""
    return ref.startswith((".", "/", "~")) or len(Path(ref).parts) > 2


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def local_model_dir(spec: ModelSpec, cache_dir: Path) -> Path | None:
    """The base model's local checkpoint directory when it is there without converting, building or downloading
    anything (a `path`, or a GGUF converted earlier into the cache); None otherwise."""
    if spec.path is not None:
        return Path(spec.path)
    if spec.gguf is not None and (_gguf_target(spec, cache_dir) / "config.json").is_file():
        return _gguf_target(spec, cache_dir)
    return None


def _gguf_target(spec: ModelSpec, cache_dir: Path) -> Path:
    gguf = spec.gguf
    return cache_dir / "models" / f"{gguf.package}-{gguf.version}-{Path(gguf.member).stem}"


def _convert_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    gguf = spec.gguf
    target = _gguf_target(spec, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_pypi_file(gguf, cache_dir)
    log.info("converting %s to a Hugging Face checkpoint (once; cached in %s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Each from_pretrained parses the whole GGUF file (its vocabulary too: 3.8 s for SmolLM2-135M on 2 CPU cores);
    # the config read once and handed to the model's load saves one parse (conversion 26 -> 22 s).
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # float32 is the fast path for de-quantising GGUF here; the saved copy is in the dtype the spec asks for.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config,
                                                 dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    cast_weights(model, DTYPES[spec.dtype])
    _save_atomic(model, tokenizer, target, {"source": "gguf", **gguf.model_dump()})
    return target


def _build_tiny(spec: TinyModel, corpus: list[str], cache_dir: Path) -> Path:
    """A seeded random Llama with a byte-level BPE tokenizer trained (in milliseconds) on `corpus`."""
    corpus_hash = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
    spec_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:8]
    target = cache_dir / "models" / f"tiny-{spec_hash}-{corpus_hash}"
    if (target / "config.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(corpus, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    _save_atomic(model, tokenizer, target, {"source": "tiny", **spec.model_dump(), "corpus_sha": corpus_hash})
    return target


def train_tiny_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with ChatML special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus or ["positive negative neutral"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _save_atomic(model, tokenizer, target: Path, provenance: dict) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sentimerge_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


@contextlib.contextmanager
def peft_quietly():
    """Around peft's model constructors: peft reads `is_gradient_checkpointing`, which transformers 5 deprecates
    with a FutureWarning on every run; nothing on our side to fix, so that one warning, by message, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_model(ref: str, *, dtype: str = "bfloat16", device: str | torch.device = "cpu", merge_adapter: bool = True,
               trust_remote_code: bool = False):
    """(model, tokenizer) from a checkpoint directory, a hub id, or a peft adapter folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(ref)
    adapter = path.is_dir() and (path / "adapter_config.json").is_file()
    if path.exists() or looks_local(ref):
        check_model_dir(path)
    try:
        if adapter:
            from peft import PeftConfig, PeftModel

            base_ref = PeftConfig.from_pretrained(path).base_model_name_or_path
            base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=DTYPES[dtype],
                                                        trust_remote_code=trust_remote_code,
                                                        **attention_kwargs(device))
            with peft_quietly():
                model = PeftModel.from_pretrained(base, path)
            if merge_adapter:
                model = model.merge_and_unload()
            tokenizer_ref = path if (path / "tokenizer_config.json").is_file() else base_ref
        else:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                         **attention_kwargs(device))
            tokenizer_ref = ref
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_ref, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(f"{ref}: cannot load model: {first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def merge_adapter_into(adapter: Path, target: Path, *, dtype: str) -> None:
    """A peft LoRA adapter merged into its base model (in float32, then cast to `dtype`) and saved with the base's
    tokenizer as a plain `transformers` checkpoint at `target`, written under a temporary name and renamed."""
    from sentimerge.pipeline.core.rundir import fresh_dir

    model, tokenizer = load_model(str(adapter), dtype="float32", merge_adapter=True)
    model.to(DTYPES[dtype])
    with fresh_dir(target, overwrite=True) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def check_answer_tokens(cfg: RunConfig, model_path: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.base_model.trust_remote_code)
    for task in cfg.tasks:
        try:
            answer_tokens(tokenizer, task)
        except SentimergeError as error:
            raise SentimergeError(f"task {task.name}: {error}") from None


def check_against_base_model(cfg: RunConfig, model_path: str, data: dict | None = None) -> None:
    """What the config asks of the base model, checked before anything trains, every problem in one error: each
    LoRA `target_modules` name matches a linear layer (a typo trained nothing on it, an embedding's LoRA was left
    out of every merge), and the longest prompt plus answer fits the model's context (`max_position_embeddings`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = cfg.base_model.trust_remote_code
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    other = {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules()
             if name and not isinstance(module, torch.nn.Linear)}
    problems = []
    for section, lora in (("experts", cfg.experts.lora), ("finetune", cfg.finetune.lora)):
        if lora.target_modules == "all-linear":
            continue
        for target in lora.target_modules:
            if target in linear:
                continue
            if target in other:
                problems.append(f"{section}.lora.target_modules: {target!r} is a {other[target]}, not a linear layer; "
                                "only linear layers' LoRA deltas are merged")
            else:
                problems.append(f"{section}.lora.target_modules: no module named {target!r} in the base model"
                                f"{suggest(target, sorted(linear))}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and data is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
        for task in cfg.tasks:
            rows = [row for rows in data[task.name].values() for row in rows]
            aspect = max((row.get("aspect") or "" for row in rows), key=len, default="")
            answer = max(len(tokens) for tokens in answer_tokens(tokenizer, task).answers)
            # the longest prompt: the instruction and answer list, the longest aspect, a text cut at max_text_tokens
            frame = len(prompt_ids(tokenizer, task, {"text": "", "aspect": aspect or None}))
            longest = frame + task.max_text_tokens + answer + 1
            if longest > positions:
                problems.append(f"task {task.name}: prompts of up to {longest} tokens (max_text_tokens "
                                f"{task.max_text_tokens}) exceed the base model's context of {positions} positions; "
                                f"lower max_text_tokens to {max(8, positions - frame - answer - 1)} or less")
    if problems:
        raise SentimergeError("\n".join(problems))
