"""python -m launch.convert: import a reference state dict into a step-0 run that launch.inspect
reads, check it against the fixture, export it back bit for bit; bad input gives one line."""
from __future__ import annotations

import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from lightning_jax import reference as R

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "reference" / "dense_2b_tiny.npz"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from lightning_jax.data import shards
  root = tmp_path_factory.mktemp("convert")
  rng = random.Random(0)
  words = "the of and to in is that for it as was with be by on not he this are or".split()
  (root / "raw" / "en").mkdir(parents=True)
  for d in range(6):
    (root / "raw" / "en" / f"d{d}.txt").write_text(" ".join(rng.choice(words) for _ in range(800)))
  shards.prepare([str(root / "raw")], str(root / "data"), val_fraction=0.34, log=lambda *_: None)
  return root


def test_import_inspect_check_export(data, capsys):
  from launch import convert
  from lightning_jax.run import checkpoints as run_ckpt
  run = data / "run"
  out = convert.import_run(str(FIXTURE), str(run), data_path=str(data / "data"),
                           overrides=["train.seq_len=64", "train.global_batch=2",
                                      "train.micro_batch=0"])
  assert out["cfg"].model.compat == "reference_cuda" and (run / "config.py").exists()
  log = capsys.readouterr().out
  assert "dropped 4 (memory-stream" in log and "alias" in log
  # launch.inspect reads it; the run's config file loads as --config would
  ckdir, _ = run_ckpt.locate(str(run))
  assert (ckdir / "0").is_dir()
  from lightning_jax.config import load_config
  assert load_config(str(run / "config.py")).train.seq_len == 64
  src = run_ckpt.read_source(str(run), log=lambda *_: None)
  assert src["step"] == 0 and src["meta"]["provenance"]["transform"] == "reference_import"
  # check: every quantity within tolerance, one line each
  assert convert.check_run(str(run), str(FIXTURE))
  lines = capsys.readouterr().out.splitlines()
  assert [l.split()[0] for l in lines[:5]] == ["logits_ntp", "logits_mtp", "ce_ntp", "ce_mtp", "aux"]
  assert lines[-1] == "check passed"
  # export: the same tensors, bit for bit
  st = data / "m.safetensors"
  convert.export_run(str(run), str(st))
  back = R.load_source(st)["state_dict"]
  ref = R.load_source(FIXTURE)["state_dict"]
  assert set(back) == set(ref)
  for n, a in ref.items():
    if n not in R.DROPPED:
      assert np.asarray(back[n]).tobytes() == np.asarray(a).tobytes(), n
  # a check against a file of another stage fails with a sentence, not a traceback
  with pytest.raises(R.ReferenceError):
    R.import_state_dict(R.load_source(REPO / "tests/fixtures/reference/moe_120b_tiny.npz")["state_dict"],
                        src["cfg"])


def test_cli_bad_input_one_line(tmp_path):
  cut = tmp_path / "cut.npz"
  cut.write_bytes(FIXTURE.read_bytes()[:4096])
  p = subprocess.run([sys.executable, "-m", "launch.convert", "import", "--src", str(cut),
                      "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
  assert p.returncode == 1, p.stderr
  err = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and "truncated" in err[0], p.stderr
