"""The review page: its files, escaping, atomic replacement, its size at 50,000 boxes, and a real browser.

Browser tests drive Debian's `chromium` headless (no new dependency): `--dump-dom` gives the DOM after the
page's code ran, `--screenshot` a PNG. Without chromium they skip, except where REFINE_REQUIRE_CHROMIUM is
set (CI sets it), where they fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import RefineError
from pipeline.inference.review import MAX_CARDS, write_review
from pipeline.inference.review_cards import CROP_SIZE, ReviewCard

EVIL_CATEGORY = "</script><script>document.body.dataset.pwned=1</script>"
EVIL_FILE = '<b>&"<img src=x onerror="document.body.dataset.pwned=2">.png'
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_TIMEOUT = 60


def _image(path: Path, width: int = 160, height: int = 120) -> None:
    """A smooth gradient: crops of it compress like photographs, not like noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _cards(count: int, files: list[str], categories: list[str], truth: bool = True, seed: int = 0) -> list[ReviewCard]:
    """Cards with distinct scores, changes and IoU gains (ties only among kept cards), a fifth kept coarse."""
    rng = random.Random(seed)
    scores = rng.sample(range(10 * count), count)
    cards = []
    for i in range(count):
        x, y = rng.uniform(5, 100), rng.uniform(5, 70)
        coarse = (x, y, x + 40, y + 30)
        proposed = (x + rng.uniform(-4, 4), y + rng.uniform(-4, 4), x + 40 + rng.uniform(-4, 4), y + 30)
        kept = i % 5 == 0
        iou_refined = 0.8 if kept else 0.8 + rng.uniform(-0.2, 0.2)
        cards.append(
            ReviewCard(
                image_file=files[i % len(files)],
                image_id=i % len(files) + 1,
                box_id=1000 + i,
                category=categories[i % len(categories)],
                coarse=coarse,
                refined=coarse if kept else proposed,
                proposed=proposed,
                score=scores[i] / (10 * count),
                kept_coarse=kept,
                truth=(x + 1, y, x + 39, y + 31) if truth else None,
                iou_coarse=0.8 if truth else None,
                iou_refined=iou_refined if truth else None,
            )
        )
    return cards


def _dataset(root: Path, files: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for name in files:
        _image(root / name)
    return root


def _data(out: Path) -> dict:
    """The JSON the page's code reads (its <, > and & are \\u escapes, which JSON reads back as they were)."""
    page = (out / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _expected_orders(cards: list[ReviewCard]) -> dict[str, list[int]]:
    """Each view's full order, computed here independently of the module."""
    indices = range(len(cards))
    orders = {
        "score": sorted(indices, key=lambda i: (cards[i].score, i)),
        "change": sorted(indices, key=lambda i: (_iou(cards[i].coarse, cards[i].refined), i)),
    }
    if any(card.truth is not None for card in cards):
        orders["worse"] = sorted(indices, key=lambda i: (cards[i].iou_refined - cards[i].iou_coarse, i))
    return orders


def _leftovers(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}."))


# --- the folder ------------------------------------------------------------------------------------------


def test_every_card_has_its_crop_and_every_crop_a_card(tmp_path: Path):
    root = _dataset(tmp_path / "images")
    cards = _cards(7, ["a.png", "b.png"], ["cat", "dog"])
    out = tmp_path / "review"
    write_review(out, root, cards, {"boxes": "7"}, "run 1")
    data = _data(out)
    assert len(data["cards"]) == 7
    referenced = {card["crop"] for card in data["cards"]}
    assert all(re.fullmatch(r"crops/\d{6}\.jpg", name) for name in referenced)
    assert referenced == {f"crops/{p.name}" for p in (out / "crops").iterdir()}
    for name in referenced:
        with Image.open(out / name) as crop:
            assert crop.format == "JPEG" and max(crop.size) == CROP_SIZE
    assert sorted(os.listdir(out)) == [".refine-review", "crops", "index.html"]
    assert _leftovers(tmp_path, out) == []


def test_input_strings_are_escaped_and_nothing_comes_from_the_network(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png", EVIL_FILE))
    cards = _cards(4, ["a.png", EVIL_FILE], [EVIL_CATEGORY, "<i>cat</i>"])
    title = "<script>alert(2)</script>"
    out = tmp_path / "review"
    write_review(out, root, cards, {"<i>boxes</i>": "<b>4</b> & more"}, title)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("<script") == 2  # the data block and the page's own code, nothing from the input
    for raw in (EVIL_CATEGORY, EVIL_FILE, title, "<i>", "<b>", "<img src=x"):
        assert raw not in page
    assert "<title>&lt;script&gt;alert(2)&lt;/script&gt;</title>" in page
    assert "<dt>&lt;i&gt;boxes&lt;/i&gt;</dt><dd>&lt;b&gt;4&lt;/b&gt; &amp; more</dd>" in page
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)  # no CDN, no remote anything
    data = _data(out)
    assert EVIL_CATEGORY in data["categories"] and EVIL_FILE in data["files"]  # the text survives, unchanged


def test_made_worse_view_only_with_ground_truth(tmp_path: Path):
    root = _dataset(tmp_path / "images")
    write_review(tmp_path / "with", root, _cards(5, ["a.png"], ["cat"]), {}, "t")
    write_review(tmp_path / "without", root, _cards(5, ["a.png"], ["cat"], truth=False), {}, "t")
    assert [view["key"] for view in _data(tmp_path / "with")["views"]] == ["score", "change", "worse"]
    assert [view["key"] for view in _data(tmp_path / "without")["views"]] == ["score", "change"]


def test_each_list_on_the_page_is_the_head_of_the_full_list(tmp_path: Path):
    """With more cards than fit, every view and every category's view still lists its true top cards."""
    root = _dataset(tmp_path / "images")
    cards = _cards(300, ["a.png", "b.png"], ["cat", "dog", "rare"])
    cards += _cards(4, ["a.png"], ["very rare"], seed=1)
    out = tmp_path / "review"
    write_review(out, root, cards, {}, "t", per_page=10, max_cards=60)
    data = _data(out)
    assert len(data["cards"]) == 60 and len(list((out / "crops").iterdir())) == 60
    expected = _expected_orders(cards)
    names = data["categories"]
    for view in data["views"]:
        on_page = [data["cards"][p] for p in view["order"]]
        for key, category in [("all", None)] + [(str(i), name) for i, name in enumerate(names)]:
            full = [i for i in expected[view["key"]] if category is None or cards[i].category == category]
            mine = [card["index"] for card in on_page if category is None or names[card["category"]] == category]
            assert view["total"][key] == len(full)
            assert 0 < view["listed"][key] <= len(mine)
            assert mine[: view["listed"][key]] == full[: view["listed"][key]], (view["key"], category)
        assert view["listed"]["all"] >= 10  # half the budget goes to the views over all categories
        assert view["listed"][str(names.index("very rare"))] == 4  # a rare category is listed whole


def test_no_cards_is_a_page_that_says_so(tmp_path: Path):
    write_review(tmp_path / "review", tmp_path, [], {"boxes": "0"}, "empty")
    data = _data(tmp_path / "review")
    assert data["cards"] == [] and [view["total"] for view in data["views"]] == [{}, {}]


def test_missing_image_is_one_line_naming_it_and_writes_nothing(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    out = tmp_path / "review"
    with pytest.raises(RefineError, match=r"gone\.png") as raised:
        write_review(out, root, _cards(4, ["a.png", "gone.png"], ["cat"]), {}, "t")
    assert "\n" not in str(raised.value)
    assert not out.exists() and _leftovers(tmp_path, out) == []


def test_unreadable_image_is_one_line_naming_it(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(RefineError, match=r"broken\.png.*not a readable image|broken\.png.*corrupt"):
        write_review(tmp_path / "review", root, _cards(2, ["a.png", "broken.png"], ["cat"]), {}, "t")


def test_file_name_escaping_the_image_root_is_refused(tmp_path: Path):
    _image(tmp_path / "outside.png")
    root = _dataset(tmp_path / "images", ("a.png",))
    with pytest.raises(RefineError, match="escapes the image root"):
        write_review(tmp_path / "review", root, _cards(2, ["a.png", "../outside.png"], ["cat"]), {}, "t")


def test_non_finite_score_is_refused(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    cards = _cards(2, ["a.png"], ["cat"])
    cards[1] = dataclasses.replace(cards[1], score=float("nan"))
    with pytest.raises(RefineError, match="not a finite number"):
        write_review(tmp_path / "review", root, cards, {}, "t")
    assert not (tmp_path / "review").exists()


def test_failed_rewrite_keeps_the_old_review(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    out = tmp_path / "review"
    write_review(out, root, _cards(3, ["a.png"], ["cat"]), {}, "old")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RefineError, match=r"gone\.png"):
        write_review(out, root, _cards(3, ["a.png", "gone.png"], ["cat"]), {}, "new")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path, out) == []


def test_rewrite_replaces_the_old_review_whole(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    out = tmp_path / "review"
    write_review(out, root, _cards(6, ["a.png"], ["cat"]), {}, "old")
    write_review(out, root, _cards(2, ["a.png"], ["cat"]), {}, "new")
    assert "<title>new</title>" in (out / "index.html").read_text()
    assert len(list((out / "crops").iterdir())) == 2  # no crops of the old review left over
    assert _leftovers(tmp_path, out) == []


KILLED_REVIEW = """
import os, signal, sys
from pathlib import Path
import pipeline.inference.review as review

def killed(*args):
    os.kill(os.getpid(), signal.SIGKILL)  # half-way: the temporary folder holds crops, no page

box = (10.0, 10.0, 50.0, 40.0)
card = review.ReviewCard("a.png", 1, 1, "cat", box, box, box, 0.5, False)
review._page_data = killed
review.write_review(Path(sys.argv[1]), Path(sys.argv[2]), [card], {}, "killed")
"""


def test_a_review_killed_mid_write_leaves_nothing_the_next_one_keeps(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    out = tmp_path / "review"
    write_review(out, root, _cards(3, ["a.png"], ["cat"]), {}, "old")
    killed = subprocess.run([sys.executable, "-c", KILLED_REVIEW, str(out), str(root)], cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL
    assert len(_leftovers(tmp_path, out)) == 1  # the killed writer's temporary; the old review untouched
    assert "<title>old</title>" in (out / "index.html").read_text()
    write_review(out, root, _cards(2, ["a.png"], ["cat"]), {}, "new")
    assert _leftovers(tmp_path, out) == [] and "<title>new</title>" in (out / "index.html").read_text()


def test_a_folder_not_written_by_review_is_never_replaced(tmp_path: Path):
    root = _dataset(tmp_path / "images", ("a.png",))
    out = tmp_path / "my-documents"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(RefineError, match="not a review folder"):
        write_review(out, root, _cards(2, ["a.png"], ["cat"]), {}, "t")
    assert (out / "thesis.tex").read_text() == "precious" and sorted(os.listdir(out)) == ["thesis.tex"]


# --- 50,000 boxes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_review(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """50,000 cards on one small image, written once for the tests below; with the seconds it took."""
    folder = tmp_path_factory.mktemp("large")
    root = _dataset(folder / "images", ("a.png",))
    cards = _cards(50_000, ["a.png"], [f"category {i}" for i in range(20)])
    started = time.perf_counter()
    write_review(folder / "review", root, cards, {"boxes": "50,000"}, "large")
    return folder / "review", time.perf_counter() - started


def test_50k_cards_write_fast_into_a_bounded_page(large_review: tuple[Path, float]):
    out, seconds = large_review
    assert seconds < 30, f"write_review took {seconds:.1f} s for 50,000 cards"  # ~3 s on a free core
    assert (out / "index.html").stat().st_size < 2_000_000  # bounded by MAX_CARDS, not by the input
    assert len(list((out / "crops").iterdir())) == MAX_CARDS
    data = _data(out)
    assert all(view["total"]["all"] == 50_000 for view in data["views"][:2])


# --- in a real browser --------------------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("REFINE_REQUIRE_CHROMIUM"):
            pytest.fail("REFINE_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI installs it")
    return found


def _browse(page: Path, fragment: dict[str, str], profile: Path, *action: str) -> str:
    """Open `page#fragment` headless and do `action` (--dump-dom, --screenshot=...); return its stdout."""
    url = page.as_uri() + ("#" + urlencode(fragment) if fragment else "")
    command = [_chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *action, url]
    # A session of its own, so that a hung browser is ended with all its helper processes.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as browser:
        try:
            stdout, stderr = browser.communicate(timeout=BROWSER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            raise
    assert browser.returncode == 0, stderr[-2000:]
    return stdout


def _shown(dom: str) -> list[int]:
    return [int(index) for index in re.findall(r'<article class="card" data-card="(\d+)"', dom)]


@pytest.fixture(scope="module")
def small_review(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ReviewCard]]:
    folder = tmp_path_factory.mktemp("small")
    root = _dataset(folder / "images", ("a.png", EVIL_FILE))
    cards = _cards(12, ["a.png", EVIL_FILE], ["cat", EVIL_CATEGORY, "dog"])
    write_review(folder / "review", root, cards, {"boxes": "12", "<i>kept</i>": "20%"}, "<script>t</script>", 5)
    return folder / "review" / "index.html", cards


def test_browser_views_order_the_cards(small_review: tuple[Path, list[ReviewCard]], tmp_path: Path):
    page, cards = small_review
    expected = _expected_orders(cards)
    by_score = _shown(_browse(page, {"view": "score"}, tmp_path, "--dump-dom"))
    by_change = _shown(_browse(page, {"view": "change"}, tmp_path, "--dump-dom"))
    by_worse = _shown(_browse(page, {"view": "worse"}, tmp_path, "--dump-dom"))
    assert by_score == expected["score"][:5]
    assert by_change == expected["change"][:5]
    assert by_worse == expected["worse"][:5]
    assert by_score != by_change
    assert _shown(_browse(page, {}, tmp_path, "--dump-dom")) == by_score  # the default view


def test_browser_pages_and_category_filter(small_review: tuple[Path, list[ReviewCard]], tmp_path: Path):
    page, cards = small_review
    expected = _expected_orders(cards)["score"]
    assert _shown(_browse(page, {"view": "score", "page": "3"}, tmp_path, "--dump-dom")) == expected[10:]
    dom = _browse(page, {"view": "score", "category": EVIL_CATEGORY}, tmp_path, "--dump-dom")
    assert _shown(dom) == [i for i in expected if cards[i].category == EVIL_CATEGORY]
    assert "boxes 1–4 of 4" in dom
    # Input text shows as text: escaped in the DOM, and its markup never ran.
    assert "category &lt;/script&gt;&lt;script&gt;document.body.dataset.pwned=1&lt;/script&gt;" in dom
    assert '&lt;b&gt;&amp;"&lt;img src=x' in dom
    assert "data-pwned" not in dom and "<b>" not in dom


def test_browser_screenshot(small_review: tuple[Path, list[ReviewCard]], tmp_path: Path):
    page, _ = small_review
    shot = tmp_path / "shot.png"
    _browse(page, {}, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100  # crops, not a blank page


def test_browser_opens_the_50k_page(large_review: tuple[Path, float], tmp_path: Path):
    out, _ = large_review
    started = time.perf_counter()
    dom = _browse(out / "index.html", {"view": "change"}, tmp_path, "--dump-dom")
    assert time.perf_counter() - started < 30
    assert len(_shown(dom)) == 200  # one page of cards, not 50,000
    assert "boxes 1–200 of 50000." in dom and "more are not on it" in dom
    change = _data(out)["views"][1]
    listed = change["listed"][str(_data(out)["categories"].index("category 3"))]
    dom = _browse(out / "index.html", {"view": "change", "category": "category 3"}, tmp_path, "--dump-dom")
    assert len(_shown(dom)) == listed and f"of 2500. The page lists the first {listed};" in dom
