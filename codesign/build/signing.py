"""Bundle signatures: native code runs only from a bundle whose manifest a trusted key signed.

A bundle's manifest lists the sha256 of every file it holds (a multi-variant bundle's manifest, the
sha256 of each variant's manifest), so one Ed25519 signature over the manifest's sha256 vouches for
every byte. It sits beside the manifest in ``signature.json``. A bundle that carries native code
(an AOTInductor shared library, a TensorRT engine, or any file that is a shared object) is loaded
only when

- its signature verifies against a public key the operator trusts (``trusted_keys=``, ``codesign serve
  --trusted-key``, or the ``CODESIGN_TRUSTED_KEYS`` paths), or
- this process wrote it (``Variant.save`` remembers the manifests it wrote: a bundle compiled and
  reloaded in one process runs code it generated itself), or
- the caller says ``allow_unsigned_native=True`` (``--allow-unsigned-native``), accepting that a
  resealed bundle's shared library runs its constructors the moment it is opened.

Bundles without native code (eager, inductor: their program is data that this process compiles)
need no signature; a signature present on one is still checked. ``cryptography`` is imported only to
make or check a signature (the ``sign`` extra).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codesign.errors import BundleError

__all__ = [
    "SIGNATURE",
    "Trust",
    "generate_key",
    "has_native_code",
    "remember_written",
    "sign_bundle",
    "verify_signature",
]

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "codesign-signature"
ENV_TRUSTED_KEYS = "CODESIGN_TRUSTED_KEYS"
_CONTEXT = b"codesign-bundle-signature-v1:"
# ELF and Mach-O heads (4 bytes: a tensor's raw bytes match one by chance once in 2^32)
_NATIVE_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
_NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".engine", ".plan")

_written_lock = threading.Lock()
_written: set[str] = set()


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise BundleError(
            "signing and verifying bundles needs the cryptography package",
            fix="pip install 'codesign[sign]'",
        ) from exc
    return serialization, ed25519


@dataclasses.dataclass(frozen=True)
class Trust:
    """Which bundles may run native code: signed by one of ``trusted_keys`` (paths of PEM public keys),
    written by this process, or any when ``allow_unsigned_native``."""

    trusted_keys: tuple[Path, ...] = ()
    allow_unsigned_native: bool = False

    @classmethod
    def of(cls, trusted_keys: Iterable[str | Path] = (), allow_unsigned_native: bool = False) -> Trust:
        env = [p for p in os.environ.get(ENV_TRUSTED_KEYS, "").split(os.pathsep) if p]
        return cls(tuple(Path(p) for p in (*trusted_keys, *env)), allow_unsigned_native)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (bundle manifests list one per file)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remember_written(manifest: Path) -> None:
    """Record a manifest this process wrote (its bundle may run the native code this process generated)."""
    with _written_lock:
        _written.add(file_sha256(manifest))


def written_here(manifest: Path | str) -> bool:
    """Whether this process wrote the manifest (a path, or the sha256 of the bytes the caller read)."""
    digest = manifest if isinstance(manifest, str) else file_sha256(manifest)
    with _written_lock:
        return digest in _written


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_key(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM (the private key readable by its owner only); its key id."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv, pub = Path(private_path), Path(public_path)
    for p in (priv, pub):
        if p.exists():
            raise BundleError(f"{p} exists; refusing to overwrite a key", fix="choose another path")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub.write_bytes(public)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id(raw)


def _read_key(path: Path, private: bool) -> Any:
    serialization, ed25519 = _crypto()
    try:
        data = path.read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        kind = "private" if private else "public"
        raise BundleError(f"{path} is not a readable PEM {kind} key: {exc}") from exc
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise BundleError(f"{path} is not an Ed25519 key", fix="make one with `codesign keygen`")
    return key


def sign_bundle(directory: str | Path, private_key: str | Path) -> str:
    """Sign the bundle's manifest (single or multi-variant) with an Ed25519 private key; the key id."""
    serialization, _ = _crypto()
    d = Path(directory)
    manifest = d / "manifest.json"
    if not manifest.is_file():
        raise BundleError(f"{d} is not a bundle: it has no manifest.json")
    key = _read_key(Path(private_key), private=True)
    digest = file_sha256(manifest)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "format": SIGNATURE_FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "key_id": key_id(raw),
        "manifest_sha256": digest,
        "signature": base64.b64encode(key.sign(_CONTEXT + digest.encode())).decode(),
    }
    (d / SIGNATURE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return str(record["key_id"])


def verify_signature(
    directory: Path,
    trusted_keys: Sequence[Path],
    *,
    manifest_sha: str | None = None,
    shown: Path | None = None,
) -> str | None:
    """The key id that signed the bundle's manifest, None if it is unsigned; BundleError if the
    signature is malformed, does not match the manifest, or is by a key not trusted here.

    ``manifest_sha``: the sha256 of the manifest bytes the caller parsed (else the file is hashed);
    ``shown``: the folder named in errors (``directory`` may be a private copy of it)."""
    name = shown or directory
    path = directory / SIGNATURE
    if not path.exists():
        return None
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 16:
        raise BundleError(f"{name / SIGNATURE} is not a signature file (a link, a folder or over 64 KiB)")
    try:
        record = json.loads(path.read_text())
        ok = (
            isinstance(record, dict)
            and record.get("format") == SIGNATURE_FORMAT
            and record.get("algorithm") == "ed25519"
            and all(isinstance(record.get(k), str) for k in ("key_id", "manifest_sha256", "signature"))
        )
        signature = base64.b64decode(record["signature"], validate=True) if ok else b""
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise BundleError(f"{name / SIGNATURE} is malformed: {type(exc).__name__}") from exc
    if not ok:
        raise BundleError(f"{name / SIGNATURE} is not a codesign Ed25519 signature record")
    digest = manifest_sha or file_sha256(directory / "manifest.json")
    if record["manifest_sha256"] != digest:
        raise BundleError(
            f"{name / SIGNATURE} signs another manifest: the bundle changed after it was signed",
            fix="rebuild the bundle and sign it again (codesign sign)",
        )
    serialization, _ = _crypto()
    keys = {}
    for p in trusted_keys:
        key = _read_key(p, private=False)
        keys[key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))] = key
    key = keys.get(record["key_id"])
    if key is None:
        raise BundleError(
            f"{name} is signed by key {record['key_id']}, which is not among the trusted keys "
            f"({sorted(keys) or 'none given'})",
            fix="pass the signer's public key with --trusted-key (or trusted_keys=)",
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, _CONTEXT + digest.encode())
    except InvalidSignature:
        raise BundleError(
            f"{name / SIGNATURE}: the signature does not verify with key {record['key_id']}"
        ) from None
    return str(record["key_id"])


def has_native_code(files: Mapping[str, Path]) -> list[str]:
    """Files (or archive entries, as ``file:entry``) that are shared objects or native engines."""
    found: list[str] = []
    for name, path in files.items():
        if name.lower().endswith(_NATIVE_SUFFIXES) or _is_native(path):
            found.append(name)
            continue
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as z:
                    for info in z.infolist():
                        if info.filename.lower().endswith(_NATIVE_SUFFIXES):
                            found.append(f"{name}:{info.filename}")
                            break
                        with z.open(info) as entry:
                            if entry.read(4).startswith(_NATIVE_MAGIC):
                                found.append(f"{name}:{info.filename}")
                                break
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError):
                found.append(name)  # an archive we cannot read through is not known to be data
    return found


def _is_native(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(_NATIVE_MAGIC)


def check_native_trust(
    directory: Path,
    files: Mapping[str, Path],
    trust: Trust,
    native_backend: bool,
    *,
    manifest_sha: str | None = None,
    shown: Path | None = None,
) -> None:
    """Refuse native code from a bundle that is not signed by a trusted key (nor written here, nor allowed).

    ``files``: the backend's artifacts and any other file torch does not read as data (the program
    and reference archives are checked entry by entry against what torch writes, and are not sniffed:
    their tensors' raw bytes are arbitrary). ``manifest_sha`` and ``shown`` as in ``verify_signature``.
    """
    digest = manifest_sha or file_sha256(directory / "manifest.json")
    # a bad signature is refused in any case
    signer = verify_signature(directory, trust.trusted_keys, manifest_sha=digest, shown=shown)
    native = has_native_code(files)
    if native_backend and not native:
        native = ["(the backend's artifacts)"]
    if not native or signer is not None or trust.allow_unsigned_native or written_here(digest):
        return
    raise BundleError(
        f"{shown or directory} carries native code ({', '.join(native[:3])}) and no signature by a trusted key: opening a "
        "shared library runs its code, so a resealed bundle could run anything",
        fix="sign the bundle (codesign keygen; codesign sign BUNDLE --key KEY) and load it with --trusted-key PUB "
        "(trusted_keys=), or pass --allow-unsigned-native (allow_unsigned_native=True) if you accept that risk",
    )
