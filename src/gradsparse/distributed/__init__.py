"""Running on torch.distributed: what each torchrun process runs (``worker``), ``gradsparse
launch`` (``launch``) and restarts (``restart``). How the messages travel is the communication
seam's (:mod:`gradsparse.comm`: collectives and point-to-point channels); the DDP hook is
:mod:`gradsparse.ddp`."""
