"""train: the torchrun-launched DDP trainer."""
