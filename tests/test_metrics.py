"""lightning_jax.metrics' sinks: namespaced TensorBoard tags, the run record (config + commit), the
optional Weights & Biases sink (a fake `wandb` module), and launch.plot still reading the JSONL."""
import json
import pathlib
import struct
import sys
import types

import pytest

from lightning_jax import metrics
from lightning_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def tb_events(run_dir):
  """(scalar tags -> {step: value}, text tags) read back from the TensorBoard event files (the
  TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
  from tensorboardX.proto import event_pb2
  scalars, texts = {}, set()
  for f in sorted((pathlib.Path(run_dir) / "tb").glob("events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "text":
          texts.add(v.tag.rsplit("/text_summary", 1)[0])
        else:
          scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
  return scalars, texts


def test_tags_are_namespaced():
  assert metrics.tb_tag("loss") == "train/loss"
  assert metrics.tb_tag("grad_norm") == "train/grad_norm"
  assert metrics.tb_tag("val/en") == "val/en"
  assert metrics.tb_tag("mfu") == "perf/mfu"
  assert metrics.tb_tag("compile_s/the training step") == "perf/compile_s/the_training_step"
  assert metrics.tb_tag("train/loss") == "train/loss"


def test_logger_writes_namespaced_tensorboard_plain_jsonl_and_the_run_record(tmp_path):
  cfg = {"model": {"d_model": 32}, "train": {"seq_len": 16}}
  log = metrics.Logger(tmp_path, config=cfg, step=3)
  log.write(4, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.25, "val/en": 3.0,
                "compile_s/the training step": 7.0, "grad_norm": float("nan")})
  log.note("peak = nominal")
  log.close()
  scalars, texts = tb_events(tmp_path)
  assert set(scalars) == {"train/loss", "train/lr", "perf/tokens_per_s", "perf/mfu", "val/en",
                          "perf/compile_s/the_training_step"}       # NaN is not a scalar
  assert scalars["train/loss"] == {4: pytest.approx(2.5)}
  assert {"run/commit", "run/config", "run/note"} <= texts
  # the JSONL keeps the plain keys its readers use
  rec = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "step" in r][0]
  assert rec["loss"] == 2.5 and rec["val/en"] == 3.0 and rec["grad_norm"] == "nan"
  info = [json.loads(l) for l in (tmp_path / "run_info.jsonl").read_text().splitlines()]
  assert len(info) == 1 and info[0]["config"] == cfg and info[0]["step"] == 3
  assert info[0]["commit"] == metrics.git_commit()
  # a resumed launch appends its own line
  metrics.Logger(tmp_path, config={**cfg, "train": {"seq_len": 32}}, step=4).close()
  info = [json.loads(l) for l in (tmp_path / "run_info.jsonl").read_text().splitlines()]
  assert [i["step"] for i in info] == [3, 4] and info[1]["config"]["train"]["seq_len"] == 32


def test_git_commit_names_head_or_unknown(tmp_path):
  c = metrics.git_commit()
  if (REPO / ".git").exists():
    assert len(c.split("+")[0]) == 40 and all(ch in "0123456789abcdef" for ch in c.split("+")[0])
  assert metrics.git_commit(tmp_path) == "unknown"      # not a checkout


class FakeWandb(types.ModuleType):
  """Stands in for the wandb package: records init arguments and logged scalars."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0

  def init(self, **kw):
    self.inits.append(kw)
    fake = self

    class Run:
      def log(self, data, step=None):
        fake.logged.append((step, dict(data)))

      def finish(self):
        fake.finished += 1
    return Run()


def test_wandb_sink_logs_namespaced_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = {"train": {"wandb_project": "lj"}}
  log = metrics.Logger(tmp_path, tensorboard=False, config=cfg, wandb_project="lj")
  log.write(1, {"loss": 3.0, "mfu": 0.5, "stopped": "x"})
  log.write(2, {"val/mean": 2.0})
  log.close()
  assert fake.logged == [(1, {"train/loss": 3.0, "perf/mfu": 0.5}), (2, {"val/mean": 2.0})]
  assert fake.finished == 1
  kw = fake.inits[0]
  assert kw["project"] == "lj" and kw["config"] == cfg and kw["resume"] == "allow"
  metrics.Logger(tmp_path, tensorboard=False, wandb_project="lj").close()
  assert fake.inits[1]["id"] == kw["id"]          # the resumed launch continues the same W&B run
  # off by default: nothing reaches wandb
  metrics.Logger(tmp_path / "b", tensorboard=False).write(1, {"loss": 1.0})
  assert len(fake.inits) == 2


def test_wandb_project_without_the_package_is_one_sentence(monkeypatch):
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  assert cfg.train.wandb_project == ""
  metrics.check_config(cfg)                      # off: nothing needed
  cfg.train.wandb_project = "lj"
  monkeypatch.setattr(metrics.importlib.util, "find_spec",       # as if not installed
                      lambda name: None if name == "wandb" else object())
  with pytest.raises(ConfigError, match="wandb package is not installed"):
    metrics.check_config(cfg)


def test_plot_reads_the_metrics_file(tmp_path):
  log = metrics.Logger(tmp_path, tensorboard=False)
  for s in range(1, 6):
    log.write(s, {"loss": 3.0 - 0.1 * s, "aux": 0.01, "lr": 1e-3, "mfu": 0.1, "tokens_per_s": 5.0,
                  "grad_norm": 1.0})
  log.write(5, {"val/en": 2.9, "val/mean": 2.9})
  log.close()
  names = sorted(p.name for p in metrics.plot_run(tmp_path))
  assert names == ["grad_norm.png", "heldout.png", "loss.png", "lr.png", "mfu.png",
                   "throughput.png"]
