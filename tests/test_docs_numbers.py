"""The numbers in README.md and docs/ that launch.docs_numbers generates (parameter counts, FLOPs
per token, the fertility table, the results files' tables) match what the code and the results
files give today; and the generator rewrites exactly the marked blocks."""
import pathlib

import pytest

from launch import docs_numbers as D

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_docs_are_in_sync_with_the_generators():
  assert D.update(check=True) == [], "run: python -m launch.docs_numbers"


def test_every_generator_is_used_and_every_block_names_one():
  text = "".join((REPO / d).read_text() for d in D.DOCS if (REPO / d).exists())
  names = [m.group(1).split(":")[0] for m in D.BLOCK.finditer(text)]
  assert set(names) == set(D.BLOCKS)
  # the figures the issue names are generated, not typed
  for doc, block in (("docs/data.md", "gflop:stage_120b"), ("README.md", "count:stage_120b"),
                     ("README.md", "tiny_heldout_falls"), ("docs/tokenizer.md", "fertility_table")):
    assert f"<!-- gen:{block} -->" in (REPO / doc).read_text(), (doc, block)


def test_rewrites_only_the_marked_blocks(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("120B: <!-- gen:gflop:stage_120b -->37.71<!-- /gen:gflop:stage_120b --> GFLOP; "
                 "37.71 elsewhere\n<!-- gen:tiny_steps -->7<!-- /gen:tiny_steps -->\n")
  assert D.update(check=True, docs=[str(doc)]) == [f"{doc}: gen:gflop:stage_120b",
                                                   f"{doc}: gen:tiny_steps"]
  assert "37.71<!--" in doc.read_text()                  # --check changes nothing
  D.update(docs=[str(doc)])
  text = doc.read_text()
  assert text.count("37.71") == 1 and "37.71 elsewhere" in text
  assert f"-->{D.gflop('stage_120b')}<!--" in text
  assert D.update(check=True, docs=[str(doc)]) == []


def test_bad_blocks_are_one_sentence(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("<!-- gen:nope -->x<!-- /gen:nope -->")
  with pytest.raises(D.DocsError, match="names no generator"):
    D.update(check=True, docs=[str(doc)])
  doc.write_text("<!-- gen:count:stage_7q -->x<!-- /gen:count:stage_7q -->")
  with pytest.raises(D.DocsError, match="configs/stage_7q.py does not exist"):
    D.update(check=True, docs=[str(doc)])


def test_tiny_main_job_record_from_a_run_directory(tmp_path):
  """benchmarks.tiny_main_job reads the held-out losses and the run's config back and counts the
  training tokens each domain supplied (data only: the loader's allocation replayed)."""
  import json
  from benchmarks import tiny_main_job
  from lightning_jax import checkpoint as ck, metrics
  from lightning_jax.config import load_config
  from lightning_jax.data import shards
  src = tmp_path / "src"
  for dom in ("en", "code", "hi", "bn"):
    (src / dom).mkdir(parents=True)
    f = (REPO / "corpus" / dom / f"{dom}.jsonl") if dom in ("en", "code") else \
        (REPO / "corpus" / dom / "train.txt")
    lines = f.read_text().splitlines()[:40]
    texts = [json.loads(l)["text"][:2000] for l in lines] if f.suffix == ".jsonl" else lines
    (src / dom / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  run = tmp_path / "run"
  shards.prepare([str(src)], str(run / "data"), val_fraction=0.2, log=lambda *_: None)
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  cfg.data.pools.D1.update(weight=0.5, domains="en")
  cfg.data.pools.D2.update(weight=0.0, domains="")
  cfg.data.pools.D3.update(weight=0.25, domains="code")
  cfg.data.pools.always_on.update(weight=0.25, domains="hi,bn")
  log = metrics.Logger(run, tensorboard=False, config=ck.config_to_json(cfg))
  doms = ["en", "code", "hi", "bn"]
  log.write(0, {**{f"val/{d}": 10.0 for d in doms}, "val/mean": 10.0, "val/mix": 10.0})
  log.write(3, {**{f"val/{d}": 9.0 - i for i, d in enumerate(doms)}, "val/mean": 7.5,
                "val/mix": 8.0})
  log.close()
  rec = tiny_main_job.record(run, device="test")
  assert rec["steps"] == 3 and rec["heldout_end"]["bn"] == 6.0 and rec["heldout_mix"] == [10, 8]
  assert rec["pools"] == {"D1": ["en"], "D3": ["code"], "always_on": ["hi", "bn"]}
  seen = rec["train_tokens_by_domain"]
  assert sum(seen.values()) == 3 * cfg.train.global_batch * cfg.train.seq_len
  assert set(seen) <= set(doms) and seen["en"] > 0 and seen["code"] > 0
  assert rec["commit"] == metrics.git_commit()
