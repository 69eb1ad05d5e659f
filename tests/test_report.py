"""codesign report: one self-contained HTML page with a section per kind of data, charts embedded."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import codesign
from codesign.cli import main as cli_main
from codesign.errors import ReportError
from codesign.hardware.target import get_target
from codesign.passes import SelectiveFp8
from codesign.passes.manager import PassManager
from codesign.report import SECTIONS, build_report, load_sources, measure_scaling, render, write_report
from codesign.serving.router import LoadAwarePolicy, Router, Rule, RulesPolicy
from tests.conftest import tiny_program, tiny_workload

pytest.importorskip("matplotlib")


class _Page(HTMLParser):
    """Sections in order, and the images (and external references) inside each."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: dict[str, list[str]] = {}
        self.external: list[str] = []
        self.tables: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(str(a["id"]))
            self.images[self.sections[-1]] = []
            self.tables[self.sections[-1]] = 0
        elif tag == "img" and self.sections:
            self.images[self.sections[-1]].append(str(a.get("src")))
        elif tag == "table" and self.sections:
            self.tables[self.sections[-1]] += 1
        if tag in ("script", "link", "iframe") or any(
            k in ("src", "href") and v and v.split(":", 1)[0] in ("http", "https", "file") for k, v in attrs
        ):
            self.external.append(f"<{tag} {a}>")


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A sharded single-variant bundle, a routed bundle from a search, and an FP8 report for h100."""
    d = tmp_path_factory.mktemp("report")
    program = tiny_program("dlrm")
    host2 = get_target("host", devices=2)
    single = codesign.compile(program, target=host2).save(d / "single", verify="in_process")
    result = codesign.tune(program, host2, trials=4, storage=":memory:", backends=["eager"])
    routed = codesign.Bundle.from_search(
        result,
        program,
        k=2,
        target=host2,
        policy=LoadAwarePolicy(default_budget_ms=20.0),
        candidates=(16, 64),
        requests=(1,),
        repeats=1,
    ).save(d / "routed", verify="in_process")
    _, report = PassManager([SelectiveFp8()], get_target("h100")).run(program)
    fp8 = d / "fp8.json"
    fp8.write_text(json.dumps(report.passes[-1].stats))
    result.save(d / "search.json")
    return [single, routed, fp8, d / "search.json"]


def test_every_section_with_embedded_svg_charts(report_inputs: list[Path], tmp_path: Path) -> None:
    out = write_report(report_inputs[:3], tmp_path / "r.html")
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    parsed = _parse(page)
    assert parsed.sections == list(SECTIONS)
    assert parsed.external == [], "the report must open offline: no scripts, links or remote images"
    for section in SECTIONS:
        if section == "overview":
            continue
        images = parsed.images[section]
        assert images, f"section {section} has no chart"
        assert parsed.tables[section] >= 1, f"section {section} has no table"
        for src in images:
            assert src.startswith("data:image/svg+xml;base64,")
            svg = base64.b64decode(src.split(",", 1)[1]).decode()
            assert "<svg" in svg and svg.rstrip().endswith("</svg>")
            assert "<text" in svg  # titles and axis labels kept as text (svg.fonttype none)
    # the compile record behind the profile and scaling sections is the cost model's, for both programs
    manifest = json.loads((report_inputs[0] / "manifest.json").read_text())
    scaling = manifest["cost"]["scaling"]
    assert len(scaling["original_s"]) == len(scaling["candidates"]) == len(scaling["compiled_s"])
    assert all(b > 0 for b in scaling["compiled_s"])
    assert "lower bound" in page and "Pareto front" in page and "LoadAwarePolicy" in page
    assert "On paper, one request of 1000 candidates" in page and "queueing" in page


def test_sections_appear_only_with_their_data(report_inputs: list[Path]) -> None:
    only_search = _parse(build_report([report_inputs[3]]))
    assert only_search.sections == ["overview", "search"]
    only_fp8 = _parse(build_report([report_inputs[2]]))
    assert only_fp8.sections == ["overview", "fp8"]
    single = _parse(build_report([report_inputs[0]]))
    assert single.sections == ["overview", "profile", "passes", "scaling", "sharding"]


def test_routed_bundle_keeps_its_search(report_inputs: list[Path]) -> None:
    data = load_sources([report_inputs[1]])
    assert data.search is not None and data.router is not None
    chosen = data.search["chosen"]
    assert set(chosen) == {v.name for v in data.variants}
    front = {t["number"] for t in data.search["trials"] if t["pareto"]}
    for name, c in chosen.items():
        assert c["trial"] in front and name == "+".join(c["roles"])


def test_bad_inputs_say_what_is_wrong(tmp_path: Path, report_inputs: list[Path]) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        load_sources([tmp_path / "nope"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match="must be JSON"):
        load_sources([tmp_path / "notes.txt"])
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ReportError, match="none of the JSON files"):
        load_sources([tmp_path / "other.json"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ReportError, match="not a codesign bundle"):
        load_sources([tmp_path / "folder"])
    with pytest.raises(ReportError, match="--study-name"):
        load_sources(["sqlite:///x.db"])
    with pytest.raises(ReportError, match="at least one input"):
        load_sources([])


def test_cli_writes_the_report(
    report_inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.html"
    assert cli_main(["report", str(report_inputs[1]), "--out", str(out), "--title", "routed"]) == 0
    printed = capsys.readouterr().out
    assert "report written" in printed and "Router" in printed
    assert "<title>routed</title>" in out.read_text()
    assert cli_main(["report", str(tmp_path / "missing")]) == 2


CHROMIUM = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)
CHROMIUM_FLAGS = (  # what runs on a closed, screenless machine as root
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Writes every chart's box (page coordinates) into the DOM once the page has loaded; --dump-dom prints it.
LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const boxes = {};
  for (const s of document.querySelectorAll("section")) {
    boxes[s.id] = [...s.querySelectorAll("figure img")].map((img) => {
      const r = img.getBoundingClientRect();
      return [r.left + scrollX, r.top + scrollY, r.width, r.height, img.complete && img.naturalWidth > 0];
    });
  }
  const pre = document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify({boxes, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


# `make test` installs Debian's chromium (make browser); CODESIGN_SKIP_BROWSER=1 opts out explicitly.
@pytest.mark.skipif(
    os.environ.get("CODESIGN_SKIP_BROWSER") == "1", reason="CODESIGN_SKIP_BROWSER=1: no headless Chromium run"
)
def test_every_sections_chart_draws_in_headless_chromium(report_inputs: list[Path], tmp_path: Path) -> None:
    """Each section's charts decode and draw in a real browser: in a screenshot of the whole page, the box
    of every chart holds a chart's worth of ink."""
    from PIL import Image

    assert CHROMIUM is not None, "headless Chromium is not installed: run `make browser` (Debian's chromium)"
    page = write_report(report_inputs, tmp_path / "r.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    width = 1200
    dom = _chromium(
        f"--window-size={width},2000", "--dump-dom", probe.resolve().as_uri(), user_data=tmp_path / "u1"
    )
    layout = json.loads(re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.S).group(1))  # type: ignore[union-attr]
    boxes = layout["boxes"]
    charted = {k for k in SECTIONS if k != "overview"}
    assert charted <= set(boxes), f"sections missing from the page: {charted - set(boxes)}"
    height = int(layout["height"])
    shot = tmp_path / "r.png"
    _chromium(
        f"--window-size={width},{height}",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
        user_data=tmp_path / "u2",
    )
    image = Image.open(shot).convert("L")
    assert image.size == (width, height)
    for section in sorted(charted):
        assert boxes[section], f"section '{section}' has no chart"
        for k, (x, y, w, h, decoded) in enumerate(boxes[section]):
            assert decoded, f"chart {k} of section '{section}' did not decode in Chromium"
            assert w > 200 and h > 100, f"chart {k} of section '{section}' is {w:.0f}x{h:.0f} px"
            crop = image.crop((int(x), int(y), int(x + w), int(y + h)))
            ink = sum(1 for p in crop.getdata() if p < 200) / (crop.size[0] * crop.size[1])
            assert ink > 0.01, (
                f"chart {k} of section '{section}' is (nearly) blank in the screenshot ({ink:.4f})"
            )


def test_rules_policy_and_malformed_search_record(report_inputs: list[Path], tmp_path: Path) -> None:
    data = load_sources([report_inputs[1]])
    assert data.router is not None
    profiles = data.router["profiles"]
    names = list(profiles)
    first, last = names[0], names[-1]
    policy = RulesPolicy((Rule(last, {"history_length": ("<", 32)}, name="light <users>"),), first)
    data.router["describe"] = Router(list(profiles.values()), policy).describe()
    page = render(data)
    assert "<td>light &lt;users&gt;</td><td>history_length &lt; 32</td>" in page  # escaped once, not twice

    broken = tmp_path / "broken"
    shutil.copytree(report_inputs[1], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["search"]["chosen"] = {first: ["fast", "trial-0"]}  # an older, unsupported shape
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match="'search' record is malformed"):
        load_sources([broken])


def test_a_variant_folder_outside_the_bundle_is_refused(report_inputs: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "escaping"
    shutil.copytree(report_inputs[1], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["variants"][0]["dir"] = "../elsewhere"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match=r"lists folder '\.\./elsewhere'"):
        load_sources([broken])


def test_measured_scaling_times_original_and_compiled_here(report_inputs: list[Path]) -> None:
    data = load_sources([report_inputs[0]])
    skipped = measure_scaling(data, original=tiny_workload("dlrm"), candidates=(1, 16), rounds=1)
    assert skipped == []
    measured = data.variants[0].measured
    assert measured is not None and measured["candidates"] == [1, 16]
    assert all(s > 0 for s in measured["compiled_s"] + measured["original_s"])
    page = render(data)
    assert "<p>Measured:</p>" in page
    svgs = [base64.b64decode(src.split(",", 1)[1]).decode() for src in _parse(page).images["scaling"]]
    assert any("original (measured, eager)" in svg and "compiled (measured)" in svg for svg in svgs)

    with pytest.raises(ReportError, match="was compiled from 'dlrm'"):
        measure_scaling(load_sources([report_inputs[0]]), original=tiny_workload("din"), rounds=1)
    # a variant whose target does not run here is skipped, and says why
    elsewhere = load_sources([report_inputs[0]])
    elsewhere.variants[0].manifest["target"] = get_target("h100").to_dict()
    assert measure_scaling(elsewhere) == ["dlrm: target h100 does not run on this machine"]
    assert elsewhere.variants[0].measured is None
    assert cli_main(["report", str(report_inputs[0]), "--model", "dlrm"]) == 2  # --model needs --measure
