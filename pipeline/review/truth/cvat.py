"""CVAT for images 1.1 XML: `<image name="URI">` with `<tag label>` (classification) and `<box label xtl ytl xbr
ybr>` (detection, original pixels; a `rotation` in degrees about the box's centre, as CVAT turns it, gives the box
around it). In a file with boxes, an image without any was reviewed and holds nothing. The time is the export's
`<meta><dumped>`, else the file's."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree

from pipeline.job.errors import UserError
from pipeline.review.truth.answers import Answer, Box, FileFacts, Parsed, utc


def parse(data: bytes, facts: FileFacts) -> Parsed:
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise UserError(f"not a CVAT XML file ({exc})") from None
    images = root.findall("image")
    if root.tag != "annotations" or not images:
        raise UserError("not a CVAT for images 1.1 file (<annotations> with <image> elements); export the task "
                        "as \"CVAT for images 1.1\"")
    when = utc(root.findtext("meta/dumped")) or facts.file_time
    detection = root.find("image/box") is not None
    parsed = Parsed()
    for image in images:
        tags = [t.get("label") for t in image.findall("tag") if t.get("label")]
        boxes = tuple(_box(b) for b in image.findall("box"))
        if not detection and not tags:
            parsed.unanswered += 1
            continue
        parsed.answers.append(Answer(_name(image), tags[0] if tags else None, boxes if detection else None,
                                     facts.reviewer, when))
    return parsed


def _name(image) -> str:
    name = image.get("name")
    if not name:
        raise UserError(f"CVAT <image id=\"{image.get('id')}\"> has no name")
    return name


def _box(box) -> Box:
    x1, y1, x2, y2 = (float(box.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))
    angle = math.radians(float(box.get("rotation") or 0))
    if angle:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        half_w = abs(w * math.cos(angle)) + abs(h * math.sin(angle))
        half_h = abs(w * math.sin(angle)) + abs(h * math.cos(angle))
        x1, y1, x2, y2 = cx - half_w, cy - half_h, cx + half_w, cy + half_h
    return (box.get("label"), x1, y1, x2, y2)
