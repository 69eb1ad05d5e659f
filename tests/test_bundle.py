"""Bundles: round trips for every example, and refusal of tampered, truncated or foreign bundles."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import codesign
from codesign.build.bundle_write import MANIFEST, PROGRAM, file_sha256
from codesign.errors import BundleError
from codesign.numerics import compare_outputs
from codesign.passes import default_passes
from tests.conftest import EXAMPLES, tiny_program, tiny_workload


class _Bundles(dict[str, Path]):
    """Eager bundles of the examples with the default passes, each built the first time a test asks."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        variant = codesign.compile(tiny_program(name), target="host", backend="eager")
        self[name] = variant.save(self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def eager_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _Bundles(tmp_path_factory.mktemp("bundles"))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def _reseal(bundle: Path) -> None:
    """Recompute a file's sha in the manifest, as an attacker editing both would."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {
            "sha256": file_sha256(bundle / name),
            "bytes": (bundle / name).stat().st_size,
        }
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_round_trips_through_a_bundle(name: str, eager_bundles: dict[str, Path]) -> None:
    w = tiny_workload(name)
    loaded = codesign.load(eager_bundles[name])
    assert loaded.check_reference()[0]
    batch = w.make_batch([3, 1, 7], 21)
    with torch.no_grad():
        ok, err, _ = compare_outputs(loaded.score(batch), w.model(**batch.inputs), loaded.tolerance)
    assert ok, err
    manifest = json.loads((eager_bundles[name] / MANIFEST).read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    assert [p["name"] for p in manifest["passes"]] == [p.name for p in default_passes()]
    assert manifest["cost"]["estimates"][0]["latency_s"] > 0
    assert set(manifest["files"]) == {"program.pt2", "reference.pt"}


def test_tampered_file_is_refused(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(eager_bundles["din"], tmp_path)
    data = bytearray((b / "reference.pt").read_bytes())
    data[-40] ^= 0xFF
    (b / "reference.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"reference.pt does not match its sha256.*tampered"):
        codesign.load(b)


def test_truncated_file_and_manifest_are_refused(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(eager_bundles["din"], tmp_path)
    data = (b / PROGRAM).read_bytes()
    (b / PROGRAM).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        codesign.load(b)
    text = (b / MANIFEST).read_text()
    (b / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        codesign.load(b)


def test_foreign_newer_missing_and_extra(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(eager_bundles["multitask"], tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    (b / MANIFEST).write_text(json.dumps({**manifest, "format": "someone-else"}))
    with pytest.raises(BundleError, match="foreign bundle"):
        codesign.load(b)
    (b / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99"):
        codesign.load(b)
    (b / MANIFEST).write_text(json.dumps(manifest))
    (b / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(BundleError, match=r"does not list: \['evil.so'\]"):
        codesign.load(b)
    (b / "evil.so").unlink()
    (b / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no manifest.json"):
        codesign.load(b)
    with pytest.raises(BundleError, match="does not exist"):
        codesign.load(tmp_path / "nowhere")


def test_config_outside_the_allow_list_is_refused(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(eager_bundles["multitask"], tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["backend"]["config"]["type"] = "subprocess.Popen"
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="allow-list"):
        codesign.load(b)


def test_pickled_payload_in_program_archive_is_refused(
    eager_bundles: dict[str, Path], tmp_path: Path
) -> None:
    b = _copy(eager_bundles["multitask"], tmp_path)
    with zipfile.ZipFile(b / PROGRAM, "a") as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/data/constants/custom_obj_0", b"cos\nsystem\n(S'echo pwned'\ntR.")
    _reseal(b)
    with pytest.raises(BundleError, match="pickled object"):
        codesign.load(b)


def test_abi_bound_backend_refuses_another_torch(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(eager_bundles["multitask"], tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["versions"]["torch"] = "2.0.0"
    manifest["backend"]["name"] = "aoti"
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"built with torch 2.0.0"):
        codesign.load(b)


def test_save_refuses_to_clobber(eager_bundles: dict[str, Path], tmp_path: Path) -> None:
    variant = codesign.load(eager_bundles["din"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        variant.save(tmp_path)
    with pytest.raises(BundleError, match="not a codesign bundle"):
        variant.save(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_micro_batch_is_kept_by_the_bundle_and_checked(tmp_path: Path) -> None:
    from codesign.errors import ConfigError

    program = tiny_program("din")
    variant = codesign.compile(program, passes=[], micro_batch=4)
    loaded = codesign.load(variant.save(tmp_path / "din"))
    assert loaded.micro_batch == 4
    batch = program.sample_batch([9, 2], seed=1)
    torch.testing.assert_close(loaded.score(batch), program.run(batch), rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "din" / MANIFEST).read_text())
    manifest["micro_batch"] = -3
    (tmp_path / "din" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="micro_batch"):
        codesign.load(tmp_path / "din")
    with pytest.raises(ConfigError, match="micro_batch"):
        codesign.compile(program, passes=[], micro_batch=0)
