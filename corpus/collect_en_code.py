"""Rebuild corpus/en and corpus/code from text this machine's Python and Debian already carry.

Run once by a maintainer (the outputs are committed; training never runs this):
  python corpus/collect_en_code.py
English prose: the Python documentation's topic pages (pydoc_data.topics, PSF licence) and three
licence texts Debian ships in /usr/share/common-licenses (verbatim copying is permitted).
Python code: a fixed list of pure-Python standard-library modules (PSF licence).
Each output is JSONL, one document per line: {"text": ..., "source": ...}.
"""
from __future__ import annotations

import json
import pathlib
import sysconfig

HERE = pathlib.Path(__file__).resolve().parent
CODE_CHAR_BUDGET = 900_000      # keep the bundled corpus small (a few MB at most)
LICENCES = ["Apache-2.0", "GPL-3", "MPL-2.0"]
CODE_MODULES = [
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "getopt.py",
    "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py", "inspect.py", "ipaddress.py",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
    "collections/__init__.py", "keyword.py", "linecache.py", "locale.py", "numbers.py",
    "operator.py", "optparse.py", "os.py", "pathlib.py", "pprint.py", "queue.py", "random.py",
    "reprlib.py", "sched.py", "secrets.py", "shlex.py", "shutil.py", "statistics.py",
    "string.py", "struct.py", "subprocess.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "types.py", "typing.py", "uuid.py", "warnings.py",
    "weakref.py", "zipfile.py",
]


def main():
  import pydoc_data.topics as topics
  en = [{"text": text, "source": f"pydoc_data.topics:{name}"}
        for name, text in sorted(topics.topics.items())]
  for lic in LICENCES:
    p = pathlib.Path("/usr/share/common-licenses") / lic
    en.append({"text": p.read_text(encoding="utf-8"), "source": f"/usr/share/common-licenses/{lic}"})
  lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  code, total = [], 0
  for m in sorted(CODE_MODULES, key=lambda m: (lib / m).stat().st_size):  # small modules first
    text = (lib / m).read_text(encoding="utf-8")
    if total + len(text) > CODE_CHAR_BUDGET:
      break
    code.append({"text": text, "source": f"cpython-stdlib:Lib/{m}"})
    total += len(text)
  for sub, docs in (("en", en), ("code", code)):
    out = HERE / sub
    out.mkdir(exist_ok=True)
    with open(out / f"{sub}.jsonl", "w", encoding="utf-8") as f:
      for d in docs:
        f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(out, len(docs), "documents", sum(len(d["text"]) for d in docs), "characters")


if __name__ == "__main__":
  main()
