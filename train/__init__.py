"""train: the torchrun-launched DDP trainer.

Where things live: the entry point (``__main__``: parse, set up, build, train,
tear down) and how processes end (``entry``, ``errors``); flags and TOML
presets (``config``); building a run and its epochs (``trainer``), the step
and epoch loop (``loop``); the run's state as parts that save and load
themselves (``state``) and checkpoint files (``checkpoint``); the process
group (``distributed``); data loaders (``data``), models, optimizer and
metrics (``models``, ``optim``, ``metrics``); the article's techniques
(``transfer``, ``distill``, ``prune``); ``evaluate`` as its own command;
test-only fault injection (``faults``).
"""
