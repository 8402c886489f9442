"""Unicode script of characters and of (possibly partial-UTF-8) token byte strings.

Scripts are the Unicode Script property (UAX #24, `Script=`, not Script_Extensions) as the
`regex` module implements it (tiktoken already depends on `regex`). "Common" (punctuation,
digits, symbols, the danda U+0964/U+0965, ...) and "Inherited" (combining marks shared by scripts)
belong to no script; "Unknown" is unassigned.

A byte-level BPE token need not be whole UTF-8. Its bytes are read as:
  * leading continuation bytes (0x80-0xBF) of a character begun in an earlier token: no script;
  * complete characters: their script;
  * a trailing incomplete character (lead byte + fewer continuation bytes than it needs): the set
    of code points it can still become is a range; if every assigned code point of that range
    has one and the same script (Common/Inherited included in "every"), the fragment counts as
    that script (e.g. b"\\xe0\\xa4" can only start U+0900..U+093F: Devanagari; b"\\xd0" only
    U+0400..U+043F: Cyrillic); otherwise (b"\\xe0" could start Devanagari ... Thai; b"\\xe3\\x83"
    Katakana or the Common U+30FC) it counts as no script.
"""
from __future__ import annotations

import functools

import regex

ALL_SCRIPTS = """Adlam Ahom Anatolian_Hieroglyphs Arabic Armenian Avestan Balinese Bamum Bassa_Vah Batak
Bengali Bhaiksuki Bopomofo Brahmi Braille Buginese Buhid Canadian_Aboriginal Carian
Caucasian_Albanian Chakma Cham Cherokee Chorasmian Common Coptic Cuneiform Cypriot Cypro_Minoan
Cyrillic Deseret Devanagari Dives_Akuru Dogra Duployan Egyptian_Hieroglyphs Elbasan Elymaic Ethiopic
Georgian Glagolitic Gothic Grantha Greek Gujarati Gunjala_Gondi Gurmukhi Han Hangul Hanifi_Rohingya
Hanunoo Hatran Hebrew Hiragana Imperial_Aramaic Inherited Inscriptional_Pahlavi
Inscriptional_Parthian Javanese Kaithi Kannada Katakana Kawi Kayah_Li Kharoshthi Khitan_Small_Script
Khmer Khojki Khudawadi Lao Latin Lepcha Limbu Linear_A Linear_B Lisu Lycian Lydian Mahajani Makasar
Malayalam Mandaic Manichaean Marchen Masaram_Gondi Medefaidrin Meetei_Mayek Mende_Kikakui
Meroitic_Cursive Meroitic_Hieroglyphs Miao Modi Mongolian Mro Multani Myanmar Nabataean Nag_Mundari
Nandinagari New_Tai_Lue Newa Nko Nushu Nyiakeng_Puachue_Hmong Ogham Ol_Chiki Old_Hungarian
Old_Italic Old_North_Arabian Old_Permic Old_Persian Old_Sogdian Old_South_Arabian Old_Turkic
Old_Uyghur Oriya Osage Osmanya Pahawh_Hmong Palmyrene Pau_Cin_Hau Phags_Pa Phoenician
Psalter_Pahlavi Rejang Runic Samaritan Saurashtra Sharada Shavian Siddham SignWriting Sinhala
Sogdian Sora_Sompeng Soyombo Sundanese Syloti_Nagri Syriac Tagalog Tagbanwa Tai_Le Tai_Tham Tai_Viet
Takri Tamil Tangsa Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Toto Vai Vithkuqi Wancho
Warang_Citi Yezidi Yi Zanabazar_Square""".split()

NEUTRAL = frozenset({"Common", "Inherited", "Unknown"})

# The nine out-of-scope writing systems of SPEC §7 (Japanese kana = Hiragana + Katakana).
REMOVED_SCRIPTS = ("Han", "Hangul", "Arabic", "Cyrillic", "Thai", "Greek", "Hebrew", "Sinhala",
                   "Hiragana", "Katakana")
# The nine Brahmic scripts of the retrofit, with a language code for corpus/<lang>/ and the
# script's main Unicode block.
BRAHMIC_SCRIPTS = {
  "Devanagari": ("hi", 0x0900, 0x097F),
  "Bengali": ("bn", 0x0980, 0x09FF),
  "Gurmukhi": ("pa", 0x0A00, 0x0A7F),
  "Gujarati": ("gu", 0x0A80, 0x0AFF),
  "Oriya": ("or", 0x0B00, 0x0B7F),
  "Tamil": ("ta", 0x0B80, 0x0BFF),
  "Telugu": ("te", 0x0C00, 0x0C7F),
  "Kannada": ("kn", 0x0C80, 0x0CFF),
  "Malayalam": ("ml", 0x0D00, 0x0D7F),
}
LANG_OF_SCRIPT = {s: v[0] for s, v in BRAHMIC_SCRIPTS.items()}
SCRIPT_OF_LANG = {v[0]: s for s, v in BRAHMIC_SCRIPTS.items()}

_SCRIPT_RE = regex.compile("|".join(rf"(?P<{n}>\p{{sc={n}}})" for n in ALL_SCRIPTS))


@functools.lru_cache(maxsize=1 << 18)
def char_script(ch: str) -> str:
  m = _SCRIPT_RE.match(ch)
  return m.lastgroup if m else "Unknown"


@functools.lru_cache(maxsize=1 << 14)
def _range_script(lo: int, hi: int) -> str | None:
  """The script of every assigned code point in lo..hi, if they all share one, else None.

  Strict on purpose: a Common/Inherited code point in the range makes the fragment script-less
  (b"\\xe3\\x83" can complete to Katakana or to the Common U+30FB/U+30FC; b"\\xf0\\x9f" to emoji
  or to one Hiragana square), so the crop never drops a fragment that shared text needs.
  """
  found = None
  for cp in range(lo, min(hi, 0x10FFFF) + 1):
    if 0xD800 <= cp <= 0xDFFF:
      continue
    s = char_script(chr(cp))
    if s == "Unknown":
      continue
    if s in NEUTRAL or (found is not None and s != found):
      return None
    found = s
  return found


def _seq_len(lead: int) -> int:
  if lead < 0x80:
    return 1
  if 0xC0 <= lead < 0xE0:
    return 2
  if 0xE0 <= lead < 0xF0:
    return 3
  if 0xF0 <= lead < 0xF8:
    return 4
  return 0  # continuation or invalid


def _partial_range(frag: bytes) -> tuple[int, int]:
  """Code point range an incomplete UTF-8 sequence can still complete to."""
  n = _seq_len(frag[0])
  mask = {2: 0x1F, 3: 0x0F, 4: 0x07}[n]
  cp = frag[0] & mask
  for b in frag[1:]:
    cp = (cp << 6) | (b & 0x3F)
  missing = n - len(frag)
  return cp << (6 * missing), ((cp + 1) << (6 * missing)) - 1


@functools.lru_cache(maxsize=1 << 20)
def token_scripts(raw: bytes) -> frozenset:
  """Non-neutral scripts of a token's bytes (see module docstring)."""
  out = set()
  i, n = 0, len(raw)
  while i < n and 0x80 <= raw[i] < 0xC0:  # tail of a character begun elsewhere
    i += 1
  while i < n:
    k = _seq_len(raw[i])
    if k == 0:  # stray continuation / invalid byte inside: no script
      i += 1
      continue
    if i + k <= n:
      try:
        ch = raw[i:i + k].decode("utf-8")
      except UnicodeDecodeError:
        i += 1
        continue
      s = char_script(ch)
      if s not in NEUTRAL:
        out.add(s)
      i += k
    else:
      frag = raw[i:]
      if all(0x80 <= b < 0xC0 for b in frag[1:]):
        s = _range_script(*_partial_range(frag))
        if s is not None:
          out.add(s)
      break
  return frozenset(out)


def is_mixed(raw: bytes) -> bool:
  return len(token_scripts(raw)) > 1


def text_script_counts(text: str) -> dict[str, int]:
  """Letters per non-neutral script in a text."""
  out: dict[str, int] = {}
  for ch in text:
    s = char_script(ch)
    if s not in NEUTRAL:
      out[s] = out.get(s, 0) + 1
  return out
