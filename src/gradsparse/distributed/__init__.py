"""Running on torch.distributed: what each torchrun process runs (``worker``), ``gradsparse
launch`` (``launch``), restarts (``restart``) and the DDP communication hook (``ddp_hook``,
also importable as :mod:`gradsparse.ddp`). How the messages travel is the communication seam's
(:mod:`gradsparse.comm`: collectives and point-to-point channels)."""
