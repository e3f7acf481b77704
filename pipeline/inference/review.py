"""The review page: every box change as a card (crop, boxes, score, moves) on one self-contained HTML folder.

`write_review` writes `index.html` and `crops/NNNNNN.jpg` into a new folder that needs no network: CSS, code
and data are inline, and a Content-Security-Policy lets nothing but the page's own blocks and crops load.
Views (lowest score first, largest change first, made worse first when ground truth is known), the category
filter and the page are chosen in the page or through the URL hash: `index.html#view=change&category=cat&page=2`.

Everything that comes from input files (file names, ids, category names, figure labels and values, the
title) is untrusted: the header is built with `html.escape`, and the cards are built in the browser from
JSON with `textContent`, never as markup. Crop file names are made here, never from input strings.

Large inputs: at most `max_cards` cards get a crop and a place in the page (a crop costs ~1-2 ms, so 50,000
of them would take over a minute, and no one reviews them all). Half of that budget goes to the top of each
view over all categories, the rest to the top of each view within each category, so that a rare category
still has its worst boxes listed; the page says how many more each list has.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RefineError
from pipeline.jsonio import temporary_beside
from pipeline.metrics import paired_iou
from pipeline.inference.overlays import COARSE_COLOUR, GT_COLOUR, REFINED_COLOUR
from pipeline.inference.review_cards import PROPOSED_COLOUR, ReviewCard, crop_name, write_crops

MAX_CARDS = 2000
# A folder holding this file was written by `write_review` and may be replaced as a whole by the next run;
# any other non-empty folder is left alone, so a mistyped --out never deletes a user's files.
MARKER = ".refine-review"


@dataclass(frozen=True)
class _View:
    key: str  # its name in the URL hash
    label: str
    order: list[int]  # indices into the cards, in this view's order (only cards that belong to the view)


def write_review(
    out: Path,
    image_root: Path,
    cards: Sequence[ReviewCard],
    figures: Mapping[str, str],
    title: str,
    per_page: int = 200,
    max_cards: int = MAX_CARDS,
) -> None:
    """Write the review folder `out` (index.html, crops/) for `cards`, replacing an earlier review there.

    figures: the run's figures for the header, label -> formatted value (e.g. "kept coarse" -> "12.5%").
    per_page: cards per page of a view; max_cards: cards that get a crop and a place in the page at most.
    Each image is read once, for all its listed cards; images of cards not listed are not read.
    The folder appears complete or not at all: it is written beside `out` and swapped in at the end, so a
    failure (a missing or unreadable image is a one-line RefineError naming the file) leaves the earlier
    review intact and nothing half-written behind.
    """
    if per_page < 1 or max_cards < 1:
        raise RefineError(f"{out}: per_page and max_cards must be at least 1, got {per_page} and {max_cards}")
    _check_replaceable(out)
    changes = _changes(cards)
    views = _views(cards, changes)
    listed = _listed(cards, views, max_cards)
    temporary = temporary_beside(out)
    try:
        (temporary / "crops").mkdir(parents=True)
        sizes = write_crops(temporary, image_root, cards, listed)
        data = _page_data(cards, changes, views, listed, sizes, per_page)
        (temporary / "index.html").write_text(_page(title, figures, data), encoding="utf-8")
        (temporary / MARKER).write_text("written by refine review; the next review into this folder replaces it\n")
        _swap_into_place(temporary, out)
    except OSError as error:
        raise RefineError(f"{out}: cannot write the review ({error.strerror or error})") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / MARKER).is_file() or not any(out.iterdir()))):
        raise RefineError(f"{out}: exists and is not a review folder written by refine; not replacing it")


def _views(cards: Sequence[ReviewCard], changes: list[float]) -> list[_View]:
    """The orders a reviewer reads the cards in; ties keep the input order (sorts are stable)."""
    indices = range(len(cards))
    views = [
        _View("score", "lowest score first", sorted(indices, key=lambda i: cards[i].score)),
        _View("change", "largest change first", sorted(indices, key=lambda i: -changes[i])),
    ]
    gains = {
        i: card.iou_refined - card.iou_coarse
        for i, card in enumerate(cards)
        if card.iou_coarse is not None and card.iou_refined is not None
    }
    if gains:  # only with ground truth, and only over the cards that have it
        views.append(_View("worse", "made worse first", sorted(gains, key=gains.__getitem__)))
    return views


def _changes(cards: Sequence[ReviewCard]) -> list[float]:
    """1 - IoU(coarse, refined) per card: a share of the box, so a small box's move counts like a large one's."""
    if not cards:
        return []
    iou = paired_iou(
        torch.tensor([card.coarse for card in cards], dtype=torch.float64),
        torch.tensor([card.refined for card in cards], dtype=torch.float64),
    ).tolist()
    # A kept box did not change, even a degenerate one whose IoU with itself is 0.
    return [0.0 if card.refined == card.coarse else 1.0 - value for card, value in zip(cards, iou, strict=True)]


def _listed(cards: Sequence[ReviewCard], views: list[_View], budget: int) -> set[int]:
    """The cards the page lists: the top of every view, then the top of every view within each category.

    Within each half of the budget, rank r of every list comes before rank r + 1 of any.
    """
    best_overall: dict[int, int] = {}
    best_in_category: dict[int, int] = {}
    for view in views:
        ranks: dict[str, int] = {}
        for rank, index in enumerate(view.order):
            category = cards[index].category
            ranks[category] = ranks.get(category, -1) + 1
            best_overall[index] = min(rank, best_overall.get(index, rank))
            best_in_category[index] = min(ranks[category], best_in_category.get(index, ranks[category]))
    listed = set(_first(best_overall, budget // 2 or 1))
    listed.update(_first({i: r for i, r in best_in_category.items() if i not in listed}, budget - len(listed)))
    return listed


def _first(rank: dict[int, int], count: int) -> list[int]:
    return sorted(rank, key=lambda index: (rank[index], index))[: max(0, count)]


def _page_data(
    cards: Sequence[ReviewCard],
    changes: list[float],
    views: list[_View],
    listed: set[int],
    sizes: dict[int, tuple[int, int]],
    per_page: int,
) -> dict[str, Any]:
    """What the page's code reads: the listed cards, the category and file names once, each view's order.

    Per view and list ("all" or a category's position in `categories`): `total` cards in the list, of which
    the first `listed` are on the page (the list's longest head made only of listed cards).
    """
    categories = sorted({card.category for card in cards})
    category_of = {name: i for i, name in enumerate(categories)}
    files: dict[str, int] = {}
    position = {index: p for p, index in enumerate(sorted(listed))}
    records = []
    for index in sorted(listed):
        card = cards[index]
        width, height = sizes[index]
        records.append(
            {
                "index": index,
                "crop": crop_name(index),
                "width": width,
                "height": height,
                "file": files.setdefault(card.image_file, len(files)),
                "image": card.image_id,
                "box": card.box_id,
                "category": category_of[card.category],
                "score": float(card.score),
                "change": round(changes[index], 4),
                "kept": bool(card.kept_coarse),
                "coarse": _rounded(card.coarse),
                "refined": _rounded(card.refined),
                "proposed": _rounded(card.proposed),
                "iou_coarse": _optional(card.iou_coarse),
                "iou_refined": _optional(card.iou_refined),
            }
        )
    view_data = []
    for view in views:
        total: dict[str, int] = {}
        head: dict[str, int] = {}
        open_lists = {"all"} | {str(i) for i in range(len(categories))}
        for index in view.order:
            for key in ("all", str(category_of[cards[index].category])):
                total[key] = total.get(key, 0) + 1
                if key in open_lists and index in listed:
                    head[key] = head.get(key, 0) + 1
                else:
                    open_lists.discard(key)
        order = [position[index] for index in view.order if index in listed]
        view_data.append({"key": view.key, "label": view.label, "order": order, "total": total, "listed": head})
    return {"per_page": per_page, "categories": categories, "files": list(files), "cards": records, "views": view_data}


def _optional(value: float | None) -> float | None:
    return None if value is None else float(value)


def _rounded(box: Iterable[float]) -> list[float]:
    return [round(float(value), 2) for value in box]  # hundredths of a pixel: the page shows tenths


def _page(title: str, figures: Mapping[str, str], data: dict[str, Any]) -> str:
    """index.html: the template with the escaped header, the box colours and the data filled in."""
    try:
        # In a <script> element only "</" and "<!--" end or confuse it; escaping every <, > and & is simplest.
        payload = json.dumps(data, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise RefineError("review: a score, box or IoU is not a finite number") from None
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    values = {
        "nonce": secrets.token_urlsafe(16),
        "title": html.escape(title),
        "figures": "".join(
            f"<div><dt>{html.escape(str(label))}</dt><dd>{html.escape(str(value))}</dd></div>"
            for label, value in figures.items()
        ),
        "truth_colour": f"rgb{GT_COLOUR}",
        "coarse_colour": f"rgb{COARSE_COLOUR}",
        "refined_colour": f"rgb{REFINED_COLOUR}",
        "proposed_colour": f"rgb{PROPOSED_COLOUR}",
        "data": payload,
    }
    template = resources.files("pipeline.inference").joinpath("review_page.html").read_text(encoding="utf-8")
    # One pass, so a placeholder-looking string inside a filled-in value is never filled in itself.
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match.group(1)], template)


def _swap_into_place(folder: Path, out: Path) -> None:
    """Rename the finished `folder` to `out`; an earlier review there is moved aside first, removed last."""
    if not out.exists():
        os.replace(folder, out)
        return
    _check_replaceable(out)  # again: it may have changed while the crops were written
    aside = temporary_beside(out)  # a kill before the rmtree leaves it where the next review removes it
    os.replace(out, aside)
    try:
        os.replace(folder, out)
    except OSError:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
