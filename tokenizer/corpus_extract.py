"""Rebuild corpus/<lang>/ Brahmic text from Debian translation catalogs (.mo files).

Run: python -m tokenizer.corpus_extract DEB_ROOT OUT_DIR
where DEB_ROOT holds Debian packages extracted with `dpkg-deb -x` (see corpus/SOURCES.md for the
package list and versions). Each message translation (msgstr) becomes one document, one per line:
keyboard-accelerator underscores, printf placeholders and markup are stripped, newlines turned into
spaces, and only strings with at least one letter of the language's script are kept. Strings are
deduplicated per language and split deterministically (by a hash of the text) into train.txt (the
audit corpus) and eval.txt (the held-out fertility sample), so the two never share a line.
"""
from __future__ import annotations

import hashlib
import pathlib
import re
import struct
import sys

# language code -> (locale dirs to read, Unicode block of its script)
LANGS = {
  "hi": (("hi",), (0x0900, 0x097F)),
  "bn": (("bn", "bn_IN"), (0x0980, 0x09FF)),
  "pa": (("pa",), (0x0A00, 0x0A7F)),
  "gu": (("gu",), (0x0A80, 0x0AFF)),
  "or": (("or",), (0x0B00, 0x0B7F)),
  "ta": (("ta",), (0x0B80, 0x0BFF)),
  "te": (("te",), (0x0C00, 0x0C7F)),
  "kn": (("kn",), (0x0C80, 0x0CFF)),
  "ml": (("ml",), (0x0D00, 0x0D7F)),
}
EVAL_FRACTION = 0.25
MAX_BYTES_PER_LANG = 250_000

_PLACEHOLDER = re.compile(r"%(\d+\$)?[-+ #0]*\d*(\.\d+)?(l|ll|h|z)?[sdiufgxXcp%]|%\{[^}]*\}|\{[0-9a-z_]*\}")
_MARKUP = re.compile(r"</?[a-zA-Z][^<>]*>|&[a-z]+;")


def read_mo(path: pathlib.Path) -> list[tuple[str, str]]:
  """(msgid, msgstr) pairs of a GNU .mo file (plural forms split on NUL)."""
  data = path.read_bytes()
  magic = struct.unpack("<I", data[:4])[0]
  end = "<" if magic == 0x950412DE else ">"
  _, n, o_ids, o_strs = struct.unpack(end + "4I", data[4:20])
  out = []
  for i in range(n):
    ln, off = struct.unpack(end + "2I", data[o_ids + 8 * i:o_ids + 8 * i + 8])
    ls, offs = struct.unpack(end + "2I", data[o_strs + 8 * i:o_strs + 8 * i + 8])
    mid = data[off:off + ln].decode("utf-8", "replace")
    mstr = data[offs:offs + ls].decode("utf-8", "replace")
    if mid:
      out.append((mid, mstr))
  return out


def clean(s: str) -> str:
  s = _MARKUP.sub(" ", s)
  s = _PLACEHOLDER.sub(" ", s)
  s = s.replace("_", "")
  s = re.sub(r"\s+", " ", s)
  return s.strip()


def collect(root: pathlib.Path, lang: str) -> list[tuple[str, str]]:
  """Unique cleaned strings of one language, with the package file each came from."""
  dirs, (lo, hi) = LANGS[lang]
  seen, out = set(), []
  for d in dirs:
    for mo in sorted(root.glob(f"usr/share/locale/{d}/LC_MESSAGES/*.mo")):
      for _, mstr in read_mo(mo):
        for part in mstr.split("\x00"):
          t = clean(part)
          if not t or t in seen or not any(lo <= ord(c) <= hi for c in t):
            continue
          seen.add(t)
          out.append((t, mo.name))
  return out


def split(lines: list[str]) -> tuple[list[str], list[str]]:
  train, evl = [], []
  for t in lines:
    h = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") / 2**32
    (evl if h < EVAL_FRACTION else train).append(t)
  return train, evl


def main(argv) -> int:
  """absl main: argv = [program, DEB_ROOT, OUT_DIR] (this command has no options)."""
  if len(argv) != 3:
    print("usage: python -m tokenizer.corpus_extract DEB_ROOT OUT_DIR", file=sys.stderr)
    return 2
  root, out = pathlib.Path(argv[1]), pathlib.Path(argv[2])
  if not root.is_dir():
    print(f"error: DEB_ROOT {root} is not a directory; expected the packages of "
          f"corpus/SOURCES.md extracted with `dpkg-deb -x`.", file=sys.stderr)
    return 2
  for lang in LANGS:
    items = collect(root, lang)
    # keep longer strings first (running text over single words), within a byte budget
    items.sort(key=lambda x: (-len(x[0]), x[0]))
    kept, total = [], 0
    for t, _ in items:
      b = len(t.encode()) + 1
      if total + b > MAX_BYTES_PER_LANG:
        continue
      kept.append(t)
      total += b
    kept.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    train, evl = split(kept)
    d = out / lang
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (d / "eval.txt").write_text("\n".join(evl) + "\n", encoding="utf-8")
    print(f"{lang}: {len(items)} strings available, kept {len(kept)} ({total} bytes): "
          f"train {len(train)}, eval {len(evl)}")
  return 0


if __name__ == "__main__":
  from absl import app
  app.run(lambda argv: sys.exit(main(argv)))
