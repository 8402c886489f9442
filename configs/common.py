"""The one base config every stage derives from (SPEC.md numbers; stages override fields).

Sections: model, moe, reversible, tqp, data, tokenizer, optim, mesh, checkpoint, train. Every
field, with its default, allowed values, whether it may change on resume and one line of help, is
declared once in lightning_jax/config/schema.py (the table: docs/config.md). Stage files call
`get_base_config()` and change only what differs for their stage.
"""
from lightning_jax.config import base_config


def get_base_config():
  return base_config()
