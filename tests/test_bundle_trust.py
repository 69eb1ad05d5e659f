"""Bundles are data unless trusted: native code needs a signature, archives hold only what torch writes,
and no malformed manifest gets past ``load`` as anything but a BundleError.

The attacker here can write the bundle folder and reseal its manifest (the sha256 list sits in the
manifest itself); what they cannot do is sign with the operator's key.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

import codesign
from codesign.build.bundle_write import file_sha256
from codesign.build.signing import generate_key, sign_bundle
from codesign.errors import BundleError
from codesign.serving.deployment import Bundle, load_bundle

ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 57  # the head of a 64-bit shared object


@pytest.fixture(scope="module")
def variant() -> codesign.Variant:
    return codesign.compile(codesign.load_model_ref("din", size="tiny"), target="host", backend="eager")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("operator", "stranger"):
        generate_key(d / f"{who}.key", d / f"{who}.pub")
        out[who], out[f"{who}.pub"] = d / f"{who}.key", d / f"{who}.pub"
    return out


def reseal(d: Path) -> None:
    """What an attacker with write access does: list every file's new sha256 in the manifest."""
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(d.iterdir())
        if p.name not in ("manifest.json", "signature.json")
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def with_native_file(variant: codesign.Variant, d: Path) -> Path:
    variant.save(d, verify="none")
    (d / "wrapper.so").write_bytes(ELF)
    reseal(d)
    return d


def test_native_code_loads_only_signed_by_a_trusted_key(
    variant: codesign.Variant, keys: dict[str, Path], tmp_path: Path
) -> None:
    d = with_native_file(variant, tmp_path / "b")
    with pytest.raises(BundleError, match=r"carries native code \(wrapper\.so\) and no signature"):
        codesign.load(d)
    assert codesign.load(d, allow_unsigned_native=True).check_reference()[0]  # the operator's explicit risk
    sign_bundle(d, keys["stranger"])
    with pytest.raises(BundleError, match="not among the trusted keys"):
        codesign.load(d, trusted_keys=[keys["operator.pub"]])
    sign_bundle(d, keys["operator"])
    assert codesign.load(d, trusted_keys=[keys["operator.pub"]]).check_reference()[0]
    # a change after signing: the signature no longer covers the manifest, with or without native code
    (d / "wrapper.so").write_bytes(ELF + b"more")
    reseal(d)
    with pytest.raises(BundleError, match="signs another manifest"):
        codesign.load(d, trusted_keys=[keys["operator.pub"]])
    (d / "signature.json").write_text('{"format": "codesign-signature", "algorithm": "rsa"}')
    with pytest.raises(BundleError, match="not a codesign Ed25519 signature"):
        codesign.load(d, trusted_keys=[keys["operator.pub"]])


def test_native_code_inside_an_archive_is_found(tmp_path: Path) -> None:
    from codesign.build.signing import has_native_code

    package = tmp_path / "package.pt2"
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("package/data/aotinductor/model/model.wrapper", ELF)  # a shared object by its bytes
    plain = tmp_path / "plain.pt2"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("plain/data/weights/weight_0", b"\0" * 64)
    assert has_native_code({"package.pt2": package, "plain.pt2": plain}) == [
        "package.pt2:package/data/aotinductor/model/model.wrapper"
    ]


@pytest.mark.slow  # an AOTInductor build (~30 s) and two fresh processes
def test_an_aoti_bundle_needs_a_signature_in_another_process(keys: dict[str, Path], tmp_path: Path) -> None:
    import os

    aoti = codesign.compile(
        codesign.load_model_ref("din", size="tiny"), target="host", backend="aoti", passes=[]
    )
    d = aoti.save(tmp_path / "aoti", verify="none")
    assert codesign.load(d).check_reference()[0]  # written by this process: its own generated code
    check = [sys.executable, "-m", "codesign.build.bundle", str(d)]
    refused = subprocess.run(check, capture_output=True, text=True)
    assert refused.returncode == 1 and "carries native code (aoti_package.pt2" in refused.stdout
    sign_bundle(d, keys["operator"])
    env = {**os.environ, "CODESIGN_TRUSTED_KEYS": str(keys["operator.pub"])}
    loaded = subprocess.run(check, capture_output=True, text=True, env=env)
    assert loaded.returncode == 0 and '"ok": true' in loaded.stdout, loaded.stdout[-2000:]


def test_a_bundle_this_process_wrote_needs_no_signature_but_a_copy_elsewhere_does(
    variant: codesign.Variant, keys: dict[str, Path], tmp_path: Path
) -> None:
    d = with_native_file(variant, tmp_path / "b")
    sign_bundle(d, keys["operator"])
    code = (
        "import sys, codesign\n"
        "from codesign.errors import BundleError\n"
        "try:\n"
        "    codesign.load(sys.argv[1], trusted_keys=sys.argv[2:])\n"
        "    print('LOADED')\n"
        "except BundleError as exc:\n"
        "    print('REFUSED', exc.message)\n"
    )
    run = [sys.executable, "-c", code, str(d)]
    assert (
        "LOADED" in subprocess.run([*run, str(keys["operator.pub"])], capture_output=True, text=True).stdout
    )
    refused = subprocess.run(run, capture_output=True, text=True).stdout
    assert "REFUSED" in refused and "not among the trusted keys" in refused


def test_multi_variant_signature_vouches_for_every_variant(
    variant: codesign.Variant, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = Bundle.build({"a": variant}, candidates=(8,), requests=(1,), repeats=1)
    d = bundle.save(tmp_path / "multi", verify="none")
    sub = d / "variants" / "a"
    (sub / "wrapper.so").write_bytes(ELF)
    reseal(sub)
    top = json.loads((d / "manifest.json").read_text())
    top["variants"][0]["manifest_sha256"] = file_sha256(sub / "manifest.json")
    (d / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(BundleError, match=r"variants/a carries native code \(wrapper\.so\)"):
        load_bundle(d)
    sign_bundle(d, keys["operator"])
    loaded = load_bundle(d, trusted_keys=[keys["operator.pub"]])
    assert list(loaded.variants) == ["a"] and not loaded.failed


def _rewrite_archive(path: Path, extra: dict[str, tuple[bytes, int]]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        for name, (data, compression) in extra.items():
            dst.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize(
    ("entry", "data", "compression", "needle"),
    [
        (
            "program/extra/payload.pkl",
            b"\x80\x04N.",
            zipfile.ZIP_STORED,
            "an entry torch.export does not write",
        ),
        ("program/../../etc/cron", b"x", zipfile.ZIP_STORED, "an entry torch.export does not write"),
        ("program/data/weights/weight_999", b"\0" * (8 << 20), zipfile.ZIP_DEFLATED, "is compressed"),
    ],
)
def test_program_archive_holds_only_what_torch_writes(
    variant: codesign.Variant, tmp_path: Path, entry: str, data: bytes, compression: int, needle: str
) -> None:
    d = variant.save(tmp_path / "b", verify="none")
    _rewrite_archive(d / "program.pt2", {entry: (data, compression)})
    reseal(d)
    with pytest.raises(BundleError, match=needle):
        codesign.load(d)


BAD_VALUES: list[Any] = [None, 1, "x", [], {}, [[[]]], {"a": {"b": 1}}]


# every manifest field x every bad value (30 s): `make test-slow`
@pytest.mark.slow
def test_every_malformed_manifest_is_a_bundle_error(variant: codesign.Variant, tmp_path: Path) -> None:
    d = variant.save(tmp_path / "b", verify="none")
    good = json.loads((d / "manifest.json").read_text())
    assert codesign.load(d, check_reference=False).name == "din"  # the untouched manifest loads
    outcomes: dict[str, str] = {}
    for key in sorted(good):
        for value in BAD_VALUES:
            (d / "manifest.json").write_text(json.dumps({**good, key: value}))
            try:
                codesign.load(d, check_reference=False)  # the manifest's records, not the model, are on trial
                outcome = "loaded"
            except BundleError:
                outcome = "refused"
            except Exception as exc:  # the property under test: nothing but a BundleError escapes
                pytest.fail(f"manifest['{key}'] = {value!r}: {type(exc).__name__}: {exc}")
            outcomes[f"{key}={value!r}"] = outcome
    for raw in (b"[" * 100_000, b'{"format": ' + b"[" * 50_000, b"\xff\xfe"):
        (d / "manifest.json").write_bytes(raw)
        with pytest.raises(BundleError, match="not valid JSON"):
            codesign.load(d)
    # the records that matter are refused, not silently taken
    for key in ("files", "spec", "backend", "inputs", "target", "id_bounds", "tolerance"):
        assert outcomes[f"{key}=None"] == "refused" or key in ("id_bounds", "tolerance"), key
        assert outcomes[f"{key}=1"] == "refused", key


def test_a_file_swapped_after_its_check_never_reaches_the_loader(
    variant: codesign.Variant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import codesign.build.bundle as reader

    d = variant.save(tmp_path / "b", verify="none")
    evil = tmp_path / "evil.pt2"
    evil.write_bytes((d / "program.pt2").read_bytes())
    _rewrite_archive(evil, {"program/data/weights/model.pt": (b"\x80\x04N.", zipfile.ZIP_STORED)})
    real = reader._check_program_archive

    def check_then_swap(path: Path) -> None:
        real(path)
        (d / "program.pt2").write_bytes(evil.read_bytes())  # the attacker wins the race in the bundle folder

    monkeypatch.setattr(reader, "_check_program_archive", check_then_swap)
    loaded = codesign.load(d)  # loads what was checked: the private copy
    assert loaded.check_reference()[0]
    with pytest.raises(BundleError, match="legacy pickled weights"):  # the swapped file, checked on its own
        monkeypatch.setattr(reader, "_check_program_archive", real)
        reseal(d)
        codesign.load(d)
